"""Secret values of the running workflows, and the scrubber that keeps them out of every output.

Secrets are collected once, when a workflow is loaded and validated (:func:`collect`): the
values of secret fields (passwords, tokens, keys, ``Authorization``-like headers), the
variables interpolated into them, the passwords and credential query parameters of every
DSN or URL, and every ``${file:...}`` secret. :func:`scrub` replaces each of them, and any
fragment of six characters or more of one (drivers quote parts of a DSN they cannot
parse; eight when the fragment is all letters, which is likely a word of the message), by
``***``. It is applied where messages leave the process: log records
(:func:`install`), the command's stderr, and dead-letter messages. The command's stdout
carries results (a ``stdout`` destination's records, manifests, JSON) and is scrubbed of
whole secrets only: a fragment of six characters ("Secret" in a token) is ordinary text
there more often than a leak, and masking it would corrupt the result.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
import threading
from typing import Any, TextIO
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

from pydantic import BaseModel, SecretStr

MASK = "***"
_MIN = 4
"""Shorter values are not registered: they would blot out ordinary text."""
_SHINGLE = 6
"""A fragment of a secret this long or longer is scrubbed too ..."""
_WORD = 8
"""... unless it is all letters and shorter than this: a word of the message, likely."""

SECRET_KEY = re.compile(
    r"password|passwd|secret|token|api[-_]?key|credential|authorization|private[-_]key"
    r"|access[-_]key|hash[-_]key|encryption[-_]key|signature|^sig$",
    re.I,
)
"""Names of fields, headers and query parameters whose values are secrets."""
_KV_PASSWORD = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.I)
_KV_PAIR = re.compile(r"^\s*[A-Za-z_]+\s*=")
"""The start of a key/value DSN (``host=... dbname=...``)."""
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

_SCHEME = re.compile(r"^(?:Bearer|Basic|Token|Bot|ApiKey|Digest)\s+", re.I)
"""An ``Authorization`` value's scheme, which is no secret."""
_UNRESOLVED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")
_lock = threading.Lock()
_values: set[str] = set()
_shingles: set[str] = set()


def register(value: Any) -> None:
    """Remember ``value`` (and its URL-encoded forms) as a secret."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return
    value = value.strip()
    if len(value) < _MIN or _UNRESOLVED.search(value):
        return  # a ``${VAR}`` left unset is no secret: its name must stay readable
    with _lock:
        for form in {value, quote(value, safe=""), quote_plus(value), unquote(value)}:
            if len(form) < _MIN or form in _values:
                continue
            _values.add(form)
            for i in range(len(form) - _SHINGLE + 1):
                _shingles.add(form[i : i + _SHINGLE])


def register_credentials(text: Any) -> None:
    """Register the secrets inside a DSN or URL: its password and credential query params."""
    if isinstance(text, SecretStr):
        text = text.get_secret_value()
    if not isinstance(text, str):
        return
    if _URL.match(text):
        rest = text.split("://", 1)[1]
        authority = rest.rsplit("@", 1)[0] if "@" in rest else ""
        if ":" in authority:  # up to the last '@': a password may hold '#', '/' or '?'
            register(authority.split(":", 1)[1])
        query = urlsplit(text).query
        for name, val in parse_qsl(query, keep_blank_values=False):
            if SECRET_KEY.search(name):
                register(val)
        return
    for m in _KV_PASSWORD.finditer(text):
        raw = m.group(1)
        register(raw[1:-1].replace("\\'", "'") if raw.startswith("'") else raw)


_NAMED_BEFORE = re.compile(r"([A-Za-z_]+)\s*=\s*'?$")


def in_credentials(template: str, at: int) -> bool:
    """Whether offset ``at`` of a DSN or URL template (``${VAR}`` not yet replaced) is a secret's.

    After ``password=`` or another secret name's ``=``, or in a URL's password: a variable
    there is a secret whatever its name.
    """
    named = _NAMED_BEFORE.search(template, 0, at)
    if named is not None and SECRET_KEY.search(named[1]):
        return True
    if _URL.match(template):
        start = template.index("://") + 3
        at_sign = template.rfind("@", start)
        colon = template.find(":", start)
        return start <= colon < at < at_sign
    return False


def register_field(name: str, value: Any) -> None:
    """Register the value of a field called ``name``: whole if a secret, its credentials always."""
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not isinstance(text, str):
        return
    register_credentials(text)
    if isinstance(value, SecretStr) or SECRET_KEY.search(name):
        if _URL.match(text) or _KV_PAIR.match(text):
            return  # a DSN: its password only (host names are not secrets)
        register(_SCHEME.sub("", text))  # the credential, not the scheme's name before it


def register_basic(username: Any, password: Any) -> None:
    """Remember the credential of HTTP Basic auth (``base64(user:password)``) as a secret."""
    if isinstance(password, SecretStr):
        password = password.get_secret_value()
    if password:
        register(base64.b64encode(f"{username or ''}:{password}".encode()).decode())


def collect(data: Any, key: str = "") -> None:
    """Register every secret in a loaded workflow (plain data) or a validated model."""
    if isinstance(data, BaseModel):
        for name in type(data).model_fields:
            collect(getattr(data, name, None), name)
        if getattr(data, "type", None) == "basic":  # the Authorization header derived from it
            register_basic(getattr(data, "username", None), getattr(data, "password", None))
        for name, val in (data.model_extra or {}).items():
            collect(val, name)
    elif isinstance(data, dict):
        for k, v in data.items():
            collect(v, str(k))
    elif isinstance(data, list | tuple):
        for v in data:
            collect(v, key)
    elif isinstance(data, str | SecretStr):
        register_field(key, data)


def values() -> frozenset[str]:
    """The registered secret values."""
    with _lock:
        return frozenset(_values)


def clear() -> None:
    """Forget every registered secret (tests)."""
    with _lock:
        _values.clear()
        _shingles.clear()


def scrub(text: str, fragments: bool = True) -> str:
    """``text`` with every secret, and every fragment of one, replaced by ``***``.

    ``fragments=False``: whole secrets only (a command's results, see the module docs).
    """
    if not _values or not text:
        return text
    with _lock:
        secrets, shingles = sorted(_values, key=len, reverse=True), set(_shingles)
    for value in secrets:
        if value in text:
            text = text.replace(value, MASK)
    n = len(text)
    if n < _SHINGLE or not shingles or not fragments:
        return text
    hidden = bytearray(n)
    found = False
    for i in range(n - _SHINGLE + 1):
        if text[i : i + _SHINGLE] in shingles:
            hidden[i : i + _SHINGLE] = b"\x01" * _SHINGLE
            found = True
    if not found:
        return text
    out, i = [], 0
    while i < n:
        if hidden[i]:
            start = i
            while i < n and hidden[i]:
                i += 1
            run = text[start:i]
            # A word of a message ("secret", a file name) may be part of a secret: a run of
            # letters is masked from _WORD characters on, any other run from _SHINGLE.
            out.append(MASK if len(run) >= _WORD or not run.isalpha() else run)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def scrub_bytes(data: bytes) -> bytes:
    """:func:`scrub` for bytes (a pipe of the process's own stderr)."""
    if not _values:
        return data
    return scrub(data.decode("utf-8", "replace")).encode("utf-8")


class ScrubbedStream:
    """A text stream that scrubs secrets (and fragments of them) from everything written."""

    def __init__(self, stream: TextIO, fragments: bool = True) -> None:
        self.stream, self.fragments = stream, fragments

    def write(self, text: str) -> int:
        """Write ``text`` without its secrets."""
        self.stream.write(scrub(text, self.fragments))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


_logging_installed = False


def install_logging() -> None:
    """Scrub every log record from now on (any handler, any format, any level)."""
    global _logging_installed
    if _logging_installed:
        return
    _logging_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _values:
            scrub_record(record)
        return record

    logging.setLogRecordFactory(factory)


def install() -> None:
    """Scrub every log record and the process's stdout and stderr (the command line)."""
    install_logging()
    if not isinstance(sys.stderr, ScrubbedStream):
        sys.stderr = ScrubbedStream(sys.stderr)
    if not isinstance(sys.stdout, ScrubbedStream):
        sys.stdout = ScrubbedStream(sys.stdout, fragments=False)


def scrub_record(record: logging.LogRecord) -> None:
    """Keep secret values out of a log record: its message, arguments and traceback."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is logging's own report
        return
    clean = scrub(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info:
        text = logging.Formatter().formatException(record.exc_info)
        record.exc_text, record.exc_info = scrub(text), None
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
