"""HTTP plumbing shared by the remote providers (Fly Machines, Vercel Sandbox, Sprites;
E2B and Daytona read their settings with `setting_or_env` too).

One job: send a request to a vendor API with a finite timeout, retry what the vendor
says to retry (HTTP 429), and turn every failure into this package's errors with the
API key scrubbed from the text. Keys come from the provider settings or the
environment, never from tool arguments, and never appear in an error message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx

from mcp_sandboxes.errors import NotFoundError, ProviderError, ProviderUnavailableError
from mcp_sandboxes.redaction import redact_values as redact

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_REQUEST_TIMEOUT_S = 60.0
# The shielded clean-up of a remote sandbox or command (delete it, kill it) takes at most this long.
CLEANUP_TIMEOUT_S = 30.0
# 429 handling: the vendor's Retry-After is honoured, but never waited on longer than this.
MAX_RETRY_AFTER_S = 5.0
MAX_RATE_LIMIT_RETRIES = 8

ErrorText = Callable[[httpx.Response], str]


class RemoteApiError(ProviderError):
    """A vendor API answered with an error status. `status` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


class RemoteNotFoundError(RemoteApiError, NotFoundError):
    pass


def setting_or_env(settings: Mapping[str, Any], key: str, env_names: Iterable[str]) -> str | None:
    """A string setting, falling back to the first environment variable that is set."""
    value = settings.get(key)
    if isinstance(value, str) and value:
        return value
    for name in env_names:
        env_value = os.environ.get(name)
        if env_value:
            return env_value
    return None


def _retry_after(response: httpx.Response) -> float:
    raw = response.headers.get("retry-after", "")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.05), MAX_RETRY_AFTER_S)


class VendorClient:
    """An httpx.AsyncClient bound to one vendor: base URL, auth header, error wording."""

    def __init__(
        self,
        *,
        vendor: str,
        base_url: str,
        headers: Mapping[str, str],
        secrets: Iterable[str],
        credential_fix: str,
        error_text: ErrorText,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        default_params: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.vendor = vendor
        self.base_url = base_url.rstrip("/")
        self._secrets = [s for s in secrets if s]
        self._credential_fix = credential_fix
        self._error_text = error_text
        self._default_params = dict(default_params or {})
        self.request_timeout_s = request_timeout_s
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=dict(headers),
            timeout=httpx.Timeout(request_timeout_s, connect=DEFAULT_CONNECT_TIMEOUT_S),
            transport=transport,
        )

    def scrub(self, text: str) -> str:
        return redact(text, self._secrets)

    def _params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        merged: dict[str, Any] = dict(self._default_params)
        if params:
            merged.update({k: v for k, v in params.items() if v is not None})
        return merged

    def _transport_error(self, method: str, path: str, exc: httpx.HTTPError) -> ProviderError:
        where = f"{method} {self.base_url}{path}"
        if isinstance(exc, httpx.TimeoutException):
            return ProviderUnavailableError(self.scrub(f"{self.vendor}: {where} timed out ({type(exc).__name__})"))
        return ProviderUnavailableError(
            self.scrub(f"{self.vendor}: cannot reach {where}: {exc!s}; check the provider's api_url and the network")
        )

    def status_error(self, method: str, path: str, response: httpx.Response) -> RemoteApiError:
        detail = self.scrub(self._error_text(response))
        status = response.status_code
        where = f"{method} {path}"
        if status in (401, 403):
            return RemoteApiError(
                f"{self.vendor}: the API refused the credentials for {where} (HTTP {status}: {detail}). "
                f"Fix: {self._credential_fix}",
                status,
            )
        if status == 404:
            return RemoteNotFoundError(f"{self.vendor}: {where} found nothing (HTTP 404: {detail})", status)
        return RemoteApiError(f"{self.vendor}: {where} failed (HTTP {status}: {detail})", status)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        unbounded_read: bool = False,
        ok: Iterable[int] = (200, 201, 202, 204),
    ) -> httpx.Response:
        """Send one request; 429 is retried (bounded), other non-`ok` statuses raise.

        `unbounded_read` is for calls that block server-side until something ends (a command's
        `wait`): the caller bounds them with its own deadline instead.
        """
        ok_set = set(ok)
        timeout = httpx.Timeout(
            timeout_s or self.request_timeout_s,
            connect=DEFAULT_CONNECT_TIMEOUT_S,
            read=None if unbounded_read else (timeout_s or self.request_timeout_s),
        )
        for _attempt in range(MAX_RATE_LIMIT_RETRIES + 1):
            try:
                response = await self._client.request(
                    method,
                    path,
                    params=self._params(params),
                    json=json,
                    content=content,
                    headers=dict(headers or {}),
                    timeout=timeout,
                )
            except httpx.HTTPError as exc:
                raise self._transport_error(method, path, exc) from None
            if response.status_code == 429:
                await anyio.sleep(_retry_after(response))
                continue
            if response.status_code not in ok_set:
                raise self.status_error(method, path, response)
            return response
        raise RemoteApiError(
            f"{self.vendor}: {method} {path} was still rate limited after {MAX_RATE_LIMIT_RETRIES} retries", 429
        )

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        read_timeout_s: float | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A streamed response whose status was checked; `read_timeout_s=None` waits for data indefinitely."""
        timeout = httpx.Timeout(self.request_timeout_s, connect=DEFAULT_CONNECT_TIMEOUT_S, read=read_timeout_s)
        for _attempt in range(MAX_RATE_LIMIT_RETRIES + 1):
            try:
                async with self._client.stream(
                    method, path, params=self._params(params), json=json, timeout=timeout
                ) as response:
                    if response.status_code == 429:
                        delay = _retry_after(response)
                    elif response.status_code >= 300:
                        await response.aread()
                        raise self.status_error(method, path, response)
                    else:
                        yield response
                        return
            except httpx.HTTPError as exc:
                raise self._transport_error(method, path, exc) from None
            await anyio.sleep(delay)
        raise RemoteApiError(f"{self.vendor}: {method} {path} was still rate limited", 429)

    async def aclose(self) -> None:
        await self._client.aclose()
