"""Translation of the `modal` SDK's errors (and grpclib's, and the network's) into ours.

The SDK turns gRPC statuses into `modal.exception` types (UNAUTHENTICATED -> AuthError,
NOT_FOUND -> NotFoundError, FAILED_PRECONDITION -> ConflictError, ...). Each becomes one of
our errors whose message says what to do; the token id and secret are scrubbed from every
message. `modal.exception` is imported only here and only when an error is translated, so
nothing pays for the SDK until Modal is used.
"""

from __future__ import annotations

from collections.abc import Iterable

from mcp_sandboxes.errors import (
    InvalidInputError,
    McpSandboxesError,
    ProviderError,
    ProviderUnavailableError,
    SandboxGoneError,
)
from mcp_sandboxes.redaction import redact_values as redact

TOKEN_HINT = (
    "set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET (or providers.modal.token_id / token_secret) "
    "to a valid token pair; `modal token new` or the Modal dashboard's API tokens page creates one"
)


def _detail(exc: BaseException, secrets: Iterable[str | None]) -> str:
    text = str(exc).strip() or type(exc).__name__
    return redact(text, secrets)[:500]


def translate(
    exc: BaseException,
    action: str,
    *,
    secrets: Iterable[str | None],
    server_url: str,
    sandbox_id: str | None = None,
) -> McpSandboxesError:
    """Our error for `exc`, raised while doing `action` (e.g. "creating a sandbox").

    With `sandbox_id`, NOT_FOUND and "already finished" mean that sandbox is gone.
    """
    if isinstance(exc, McpSandboxesError):
        return exc
    from modal import exception as modal_errors

    secrets = tuple(secrets)
    detail = _detail(exc, secrets)
    if isinstance(exc, modal_errors.AuthError):
        return ProviderUnavailableError(
            f"modal: {action} was refused: the token was not accepted ({detail}); {TOKEN_HINT}"
        )
    if isinstance(exc, modal_errors.PermissionDeniedError):
        return ProviderError(
            f"modal: {action} was refused: permission denied ({detail}); use a token of the workspace that owns "
            "providers.modal.app_name, or check providers.modal.environment"
        )
    if sandbox_id is not None and isinstance(
        exc, modal_errors.NotFoundError | modal_errors.ConflictError | modal_errors.SandboxTerminatedError
    ):
        return SandboxGoneError(f"modal: sandbox {sandbox_id} is gone ({action}: {detail}); create a new sandbox")
    if isinstance(exc, modal_errors.ImageBuildError):
        return InvalidInputError(
            "image",
            f"Modal could not build the image ({detail}); use a public registry reference such as debian:bookworm",
        )
    if isinstance(exc, modal_errors.ResourceExhaustedError):
        return ProviderError(f"modal: {action} failed: a Modal limit was reached ({detail}); wait, or raise the limit")
    if isinstance(exc, modal_errors.NotFoundError):
        return ProviderError(f"modal: {action} failed: not found ({detail}); check providers.modal.environment")
    if isinstance(exc, modal_errors.InvalidError):
        return ProviderError(f"modal: {action} was rejected as invalid ({detail}); fix the sandbox settings")
    if isinstance(exc, modal_errors.ClientClosed):
        return ProviderError(f"modal: {action} failed: the provider was closed; restart the server")
    if isinstance(
        exc,
        modal_errors.ConnectionError
        | modal_errors.ServiceError
        | modal_errors.InternalError
        | modal_errors.TimeoutError
        | OSError,
    ):
        return ProviderUnavailableError(
            f"modal: {action} could not reach Modal at {server_url} ({type(exc).__name__}: {detail}); "
            "check providers.modal.server_url and the network"
        )
    return ProviderError(f"modal: {action} failed ({type(exc).__name__}: {detail})")


def timed_out(action: str, timeout_s: float, server_url: str) -> ProviderUnavailableError:
    return ProviderUnavailableError(
        f"modal: {action} got no answer from {server_url} within {timeout_s:g} s; "
        "check providers.modal.server_url and the network"
    )
