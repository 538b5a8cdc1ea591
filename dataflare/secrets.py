"""Secret values are kept out of every output, by value, where output leaves the process.

Validation registers what must not be shown: the value of every interpolated ``${VAR}``
(shown as ``${VAR}``), every secret field (``password``, ``token``... shown as ``***``),
the password and credential query parameters of DSNs and URLs, and credential headers.
Each value is registered with its URL-encoded form and its pieces around spaces and
``#`` (a driver's parse error may quote only a piece). :func:`scrub` then replaces them in
log records, the runner's messages and summary, dead letters, and everything the
``dataflare`` command writes to stdout and stderr (also what bytewax's workers print).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

from pydantic import BaseModel, SecretStr

MIN_LENGTH = 4  # shorter values would blot out ordinary text
_CREDENTIAL = re.compile(r"pass|secret|token|key|auth|credential|signature|sig$|session",
                         re.IGNORECASE)
_known: dict[str, str] = {}
_pattern: re.Pattern[str] | None = None
_bpattern: re.Pattern[bytes] | None = None
_lock = threading.Lock()


def register(value: str, shown: str = "***") -> None:
    """Keep ``value`` (and its encoded forms and pieces) out of every output."""
    global _pattern, _bpattern
    if not isinstance(value, str) or len(value) < MIN_LENGTH:
        return
    forms = {value, quote(value, safe=""), quote_plus(value), unquote(value)}
    for separators in (r"\s+", r"#+", r"[\s#]+"):  # a parse error may quote any piece
        forms.update(re.split(separators, value))
    with _lock:
        added = False
        for form in forms:
            if len(form) >= MIN_LENGTH and form not in _known:
                _known[form] = shown if form == value else "***"
                added = True
        if added:
            alternation = "|".join(re.escape(k) for k in sorted(_known, key=len, reverse=True))
            _pattern = re.compile(alternation)
            _bpattern = re.compile(alternation.encode())


def scrub(text: str) -> str:
    """``text`` with every registered value replaced."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(lambda m: _known.get(m.group(0), "***"), text)


def scrub_bytes(data: bytes) -> bytes:
    """``data`` (UTF-8) with every registered value replaced."""
    pattern = _bpattern
    if pattern is None or not data:
        return data
    return pattern.sub(lambda m: _known.get(m.group(0).decode(), "***").encode(), data)


def scrub_value(value: Any) -> Any:
    """A JSON-like value with every string scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_value(v) for v in value]
    return value


def register_workflow(data: Any, substituted: dict[str, str]) -> None:
    """The secrets of a workflow (its parsed, interpolated data).

    Secret settings and headers (``password``, ``token``, ``Authorization``...), URL and
    DSN passwords and credential query parameters, the values of variables named like
    secrets (``*PASSWORD*``, ``*TOKEN*``, ``*SECRET*``, ``*KEY*``) and of ``${file:...}``.
    A value that came from a variable is shown as its ``${VAR}``.
    """
    for value, name in substituted.items():
        if name.startswith("${file:") or is_credential_key(name[2:-1]) or \
                name[2:-1].upper().endswith(("_KEY", "KEY")):
            register(value, name)

    def reg(value: str) -> None:
        register(value, substituted.get(value, "***"))

    for key, value in _leaves(data):
        if isinstance(value, SecretStr):
            reg(value.get_secret_value())
        elif isinstance(value, str):
            if is_credential_key(key):
                reg(value)
                if " " in value:  # "Bearer <token>"
                    reg(value.split(" ", 1)[1])
            for credential in url_credentials(value):
                reg(credential)


_CREDENTIAL_KEYS = {"authorization", "x_api_key", "api_key", "apikey", "access_key",
                    "access_key_id", "private_key", "client_secret", "passwd"}


def is_credential_key(key: str) -> bool:
    """Whether a setting or header of this name holds a credential."""
    k = key.lower().replace("-", "_")
    if k.endswith(("_template", "_field", "_header", "_file")):
        return False
    return k in _CREDENTIAL_KEYS or any(w in k for w in ("password", "secret", "token"))


def url_credentials(text: str) -> list[str]:
    """Passwords and credential query parameters of a URL or a key/value DSN."""
    found: list[str] = []
    if "://" in text:
        try:
            parts = urlsplit(text)
            if parts.password:
                found.append(unquote(parts.password))
            found.extend(unquote(v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                         if _CREDENTIAL.search(k))
        except ValueError:  # a URL too broken to parse: its password field is guessed
            m = re.search(r"://[^:/@]*:(.*)@", text)
            if m:
                found.append(m.group(1))
    else:
        for m in re.finditer(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", text):
            raw = m.group(1)
            found.append(raw[1:-1] if raw.startswith("'") else raw)
    return found


def _leaves(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _leaves(getattr(value, name), name)
        for name, extra in (value.model_extra or {}).items():
            yield from _leaves(extra, name)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, str(k))
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _leaves(v, key)
    else:
        yield key, value
