"""The vendor-neutral heart of the scripted model server: what to answer, and what was asked.

A `Script` holds `Reply`s and the rules that choose among them. Each vendor route module
(anthropic.py, later openai_responses.py, gemini.py, ...) parses its own wire format into a
`ModelRequest`, asks the script for a reply, and renders that reply in its own format. The
script never sees a vendor's JSON, so one script works for every CLI.

Picking a reply, in this order:
1. rules added with `script.on(...)`, first match wins, each usable `times` times (None: always);
2. the in-order queue filled with `script.then(...)`;
3. the fallback reply (a text naming the miss, so a test fails on content, not on a hang).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ErrorKind = Literal[
    "invalid_request",
    "authentication",
    "permission",
    "not_found",
    "request_too_large",
    "rate_limit",
    "server_error",
    "overloaded",
]

SECRET_HEADER_PARTS = ("key", "token", "secret", "authorization", "cookie", "password")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class ApiError:
    """An HTTP error the model API answers with; each vendor module maps `kind` to its own
    status code and error JSON. `status` overrides the vendor's usual code for the kind."""

    kind: ErrorKind = "server_error"
    message: str = "Internal server error"
    status: int | None = None


@dataclass(frozen=True)
class Reply:
    text: str | None = None
    thinking: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    delay_s: float = 0
    error: ApiError | None = None


@dataclass(frozen=True)
class ModelRequest:
    """A vendor's request reduced to what rules look at.

    `user_text` is the text of the newest user message that is a prompt (not a message that
    only carries tool output); `tool_results` are the tool outputs in the newest message when
    that message carries them (non-empty means the model is being called back after tools)."""

    model: str
    user_text: str
    tool_results: list[str] = field(default_factory=list)

    @property
    def after_tool_result(self) -> bool:
        return bool(self.tool_results)


# A reply computed from the request, for conversations whose next step depends on what came
# back (ids a tool returned, say). Rules only: the queue and the fallback are fixed replies.
Responder = Callable[[ModelRequest], Reply]


@dataclass
class Rule:
    reply: Reply | Responder
    user_contains: str | None = None
    after_tool_result: bool | None = None
    tool_result_contains: str | None = None
    model_contains: str | None = None
    times: int | None = 1
    used: int = 0

    def matches(self, request: ModelRequest) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        if self.model_contains is not None and self.model_contains not in request.model:
            return False
        if self.tool_result_contains is not None:
            if not any(self.tool_result_contains in result for result in request.tool_results):
                return False
        elif self.after_tool_result is not None and self.after_tool_result != request.after_tool_result:
            return False
        elif self.after_tool_result is None and self.user_contains is not None and request.after_tool_result:
            # A prompt rule answers the prompt, not the tool round trips that follow it.
            return False
        return self.user_contains is None or self.user_contains in request.user_text


class Script:
    """Scripted replies. Thread-safe: the server thread picks while a test may add rules."""

    def __init__(self, fallback: Reply | None = None) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._queue: list[Reply] = []
        self.fallback = fallback or Reply(text="SCRIPT-EXHAUSTED: no scripted reply matched this request")
        self.misses = 0

    def on(
        self,
        *,
        reply: Reply | Responder,
        user_contains: str | None = None,
        after_tool_result: bool | None = None,
        tool_result_contains: str | None = None,
        model_contains: str | None = None,
        times: int | None = 1,
    ) -> Script:
        """Answer requests that match every given condition with `reply`.

        `user_contains` alone matches a fresh prompt (not the tool round trips after it);
        `after_tool_result=True` / `tool_result_contains` match the request that carries tool
        output back to the model. `times=None` keeps the rule forever (e.g. for API errors
        that the CLI retries). `reply` may be a function of the request (a `Responder`)."""
        rule = Rule(
            reply=reply,
            user_contains=user_contains,
            after_tool_result=after_tool_result,
            tool_result_contains=tool_result_contains,
            model_contains=model_contains,
            times=times,
        )
        with self._lock:
            self._rules.append(rule)
        return self

    def then(self, *replies: Reply) -> Script:
        """Append replies to the in-order queue used when no rule matches."""
        with self._lock:
            self._queue.extend(replies)
        return self

    def pick(self, request: ModelRequest) -> Reply:
        with self._lock:
            for rule in self._rules:
                if rule.matches(request):
                    rule.used += 1
                    reply = rule.reply
                    return reply if isinstance(reply, Reply) else reply(request)
            if self._queue:
                return self._queue.pop(0)
            self.misses += 1
            return self.fallback

    @property
    def pending(self) -> int:
        """Replies still waiting to be used (rules with a finite count, plus the queue)."""
        with self._lock:
            left = sum(rule.times - rule.used for rule in self._rules if rule.times is not None)
            return left + len(self._queue)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Script:
        """The JSON script file format:

        {"rules": [{"user_contains": "hi", "reply": {"text": "hello"}, "times": 1}, ...],
         "queue": [{"text": "..."}, {"tool_calls": [{"name": "Bash", "arguments": {...}}]}],
         "fallback": {"text": "..."}}

        A rule's conditions are the keyword arguments of `Script.on`; a reply's keys are the
        fields of `Reply` (`error`: {"kind": "overloaded", "message": "...", "status": 529})."""
        unknown = set(data) - {"rules", "queue", "fallback"}
        if unknown:
            raise ValueError(f"script: unknown keys {sorted(unknown)}; use rules, queue, fallback")
        fallback = data.get("fallback")
        script = cls(fallback=reply_from_dict(fallback) if fallback else None)
        for index, raw in enumerate(data.get("rules", [])):
            conditions = dict(raw)
            if "reply" not in conditions:
                raise ValueError(f"script: rules[{index}] has no reply")
            reply = reply_from_dict(conditions.pop("reply"))
            script.on(reply=reply, **conditions)
        script.then(*(reply_from_dict(raw) for raw in data.get("queue", [])))
        return script

    @classmethod
    def load(cls, path: str | Path) -> Script:
        return cls.from_dict(json.loads(Path(path).read_text("utf-8")))


def reply_from_dict(data: Mapping[str, Any]) -> Reply:
    values = dict(data)
    values["tool_calls"] = [ToolCall(**call) for call in values.get("tool_calls", [])]
    if values.get("error") is not None:
        values["error"] = ApiError(**values["error"])
    return Reply(**values)


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the server received. `kind` is "model" when it consumed a script
    reply and "side" for everything else (HEAD /, token counting, telemetry, titles)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    kind: Literal["model", "side"]
    reply: Reply | None = None

    def contains(self, needle: str) -> bool:
        return needle in json.dumps(self.body, ensure_ascii=False)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name: "[redacted]" if any(part in name.lower() for part in SECRET_HEADER_PARTS) else value
        for name, value in headers.items()
    }


def credential_digest(value: str) -> str:
    """How the recorder remembers a credential it saw: never the value itself."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


class Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        # Digests of every credential-bearing header value and `key` query value received (with
        # "Bearer " stripped), so a test can tell which key reached the model API.
        self._credentials: set[str] = set()

    def saw_credentials(self, headers: Mapping[str, str], query: Mapping[str, str]) -> None:
        values = [v for k, v in headers.items() if any(part in k.lower() for part in SECRET_HEADER_PARTS)]
        values += [v for k, v in query.items() if k == "key"]
        with self._lock:
            for value in values:
                self._credentials.add(credential_digest(value.removeprefix("Bearer ").strip()))

    def received_credential(self, value: str) -> bool:
        with self._lock:
            return credential_digest(value) in self._credentials

    def add(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def model_requests(self) -> list[RecordedRequest]:
        return [request for request in self.requests if request.kind == "model"]

    def requests_containing(self, needle: str) -> list[RecordedRequest]:
        """Model requests whose JSON body contains `needle` anywhere (history included)."""
        return [request for request in self.model_requests if request.contains(needle)]
