"""Recognising and hiding credentials: names and values that look like secrets, and the
redaction of known secret values (and secret-shaped strings) in text shown to a caller."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

MARKER = "[redacted]"
# Values shorter than this are not replaced even when known: "1" or "true" would wreck any text.
MIN_SECRET_LENGTH = 8

# A variable name says it holds a credential: ..._API_KEY, ..._TOKEN, ..._SECRET, PASSWORD, ...
SECRET_NAME = re.compile(
    r"(?:^|_)(?:API_?KEY|ACCESS_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|PRIVATE_?KEY|AUTH)(?:$|_)",
    re.IGNORECASE,
)

# Published shapes of common credentials.
SECRET_VALUE = re.compile(
    r"sk-[A-Za-z0-9_-]{16,}"  # Anthropic / OpenAI
    r"|(?:ghp|gho|ghs|ghu|ghr)_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # a JWT
)


def looks_like_secret_name(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


def looks_like_secret_value(value: str) -> bool:
    return SECRET_VALUE.search(value) is not None


# What a vendor client puts in place of its own credential in an error it passes on.
VENDOR_MARKER = "***"
# A credential shorter than this is never searched for (it would match everywhere).
MIN_VENDOR_SECRET_LENGTH = 4


def redact_values(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with each given credential replaced by ***: what provider clients do to a vendor's
    error before it reaches a caller (longest first, so one secret inside another goes whole)."""
    known = {s for s in secrets if s and len(s) >= MIN_VENDOR_SECRET_LENGTH}
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, VENDOR_MARKER)
    return text


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret value and every secret-shaped string replaced by a marker."""
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, MARKER)
    return SECRET_VALUE.sub(MARKER, text)


def redact_known(text: str, secrets: Iterable[str]) -> str:
    """`text` with each known secret value (of MIN_SECRET_LENGTH or more) replaced by the marker,
    longest first; nothing else changes (code an agent writes may hold secret-shaped strings)."""
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, MARKER)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that replaces known secret values in every record's message (the values
    come from `secrets`, asked at each record: sessions come and go)."""

    def __init__(self, secrets: Callable[[], Iterable[str]]) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = list(self._secrets())
        if not secrets:
            return True
        message = record.getMessage()
        redacted = redact_known(message, secrets)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            shown = str(record.exc_info[1])
            if redact_known(shown, secrets) != shown:
                # A traceback would print the secret again: keep the exception's redacted text only.
                exc = record.exc_info[1]
                record.exc_info, record.exc_text = None, None
                record.msg, record.args = (
                    f"{record.getMessage()} ({type(exc).__name__}: {redact_known(shown, secrets)})",
                    None,
                )
        return True
