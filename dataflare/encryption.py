"""``data_protection.encryption``: TLS in transit, and field encryption at rest.

``in_transit: true`` requires TLS on every connection: PostgreSQL ``sslmode`` at least
``require`` (a DSN without ``sslmode``, or the host/port form, gets ``require`` through
libpq's ``PGSSLMODE`` at run), ``rediss://``, Kafka ``security.protocol`` ``SSL`` or
``SASL_SSL``, ``https://``, also for remote plugins and enrichments (``http_api``, lookups).
A connection that would go in clear is a warning of ``validate`` and an error of ``run``,
naming the component. The connection settings are read from each
component's validated config by their field names (``dsn``, ``url``, ``bootstrap_servers``
with ``properties``, ``host``), the same for every connector.

``at_rest: true`` with ``fields`` and ``key`` encrypts the named fields before every
destination (:class:`FieldCipher`, AES-GCM); ``dataflare decrypt`` reads them back.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, SecretStr

from dataflare.records import get_path, set_path

PG_SSLMODE_ENV = "PGSSLMODE"
TLS_SSLMODES = ("require", "verify-ca", "verify-full")
_KV_SSLMODE = re.compile(r"\bsslmode\s*=\s*'?([\w-]+)", re.I)
_CLEAR_SCHEMES = {"http", "redis", "ws", "mysql", "mariadb", "amqp", "mongodb", "tcp"}
_TLS_SCHEMES = {"https", "rediss", "wss", "amqps", "ssl", "s3", "file"}
_POSTGRES_SCHEMES = {"postgres", "postgresql"}


def _text(value: Any) -> str | None:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value if isinstance(value, str) else None


def _sslmode_problem(dsn: str) -> str | None:
    """Why a PostgreSQL DSN would connect in clear, or None."""
    if "://" in dsn:
        modes = parse_qs(urlsplit(dsn).query).get("sslmode", [])
        mode = modes[-1] if modes else None
    else:
        found = _KV_SSLMODE.findall(dsn)
        mode = found[-1] if found else None
    if mode is None or mode.lower() in TLS_SSLMODES:
        return None  # without sslmode, PGSSLMODE=require applies at run
    return f"sslmode={mode} allows a connection in clear (use sslmode=require or verify-full)"


def _url_problem(field: str, url: str) -> str | None:
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in _POSTGRES_SCHEMES:
        return _sslmode_problem(url)
    if scheme in _CLEAR_SCHEMES:
        return f"{field} uses {scheme}:// (in clear)"
    return None


def clear_connections(config: Any) -> Iterator[str]:
    """Why the connection(s) of a component with this validated ``config`` go in clear."""
    if not isinstance(config, BaseModel):
        return
    fields = type(config).model_fields
    dsn = _text(getattr(config, "dsn", None))
    url = _text(getattr(config, "url", None))
    if dsn is not None:
        if "://" in dsn:
            problem = _url_problem("dsn", dsn)
        elif "=" in dsn:
            problem = _sslmode_problem(dsn)
        else:
            problem = None
        if problem:
            yield problem
    elif url is not None:
        problem = _url_problem("url", url)
        if problem:
            yield problem
    elif "bootstrap_servers" in fields:
        props = getattr(config, "properties", None) or {}
        protocol = str(props.get("security.protocol", "PLAINTEXT")).upper()
        if protocol not in ("SSL", "SASL_SSL"):
            yield (f"kafka security.protocol is {protocol} (in clear; use SSL or SASL_SSL "
                   "under properties)")
    elif "host" in fields and "port" in fields and "sslmode" not in fields:
        if _is_postgres(config):
            return  # libpq: PGSSLMODE=require applies at run
        yield "the host/port connection has no TLS setting (in clear)"


def _is_postgres(config: BaseModel) -> bool:
    """Whether ``config`` connects through libpq (its port defaults to 5432)."""
    port = type(config).model_fields["port"].default
    return port == 5432


def step_connections(wf: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], str]]:
    """``(location, reason)`` of the connections of plugins and enrichments in clear.

    Read from the workflow as written: a remote plugin's ``url``; an ``enrich`` step's
    ``http_api`` ``url`` and ``lookup`` ``connection`` (Redis URL, PostgreSQL DSN, MySQL).
    """
    plugins = wf.get("plugins")
    for pid, plugin in (plugins.items() if isinstance(plugins, dict) else []):
        if isinstance(plugin, dict) and plugin.get("type") == "remote":
            problem = _url_problem("url", str(plugin.get("url") or ""))
            if problem:
                yield ("plugins", pid, "url"), f"plugin {pid!r}: {problem}"
    steps = wf.get("transformations")
    for cid, comp in (steps.items() if isinstance(steps, dict) else []):
        config = comp.get("config") if isinstance(comp, dict) else None
        enrichments = config.get("enrichments") if isinstance(config, dict) else None
        for i, e in enumerate(enrichments if isinstance(enrichments, list) else []):
            if not isinstance(e, dict):
                continue
            at = ("transformations", cid, "config", "enrichments", i)
            conn = e.get("connection")
            problem = None
            if e.get("type") == "http_api":
                problem = _url_problem("url", str(e.get("url") or ""))
            elif isinstance(conn, dict) and conn.get("type") == "redis":
                problem = _url_problem("url", str(conn.get("url") or ""))
            elif isinstance(conn, dict) and conn.get("type") == "mysql":
                problem = "the mysql connection has no TLS setting (in clear)"
            elif isinstance(conn, dict) and isinstance(conn.get("dsn"), str):
                problem = _url_problem("dsn", conn["dsn"]) if "://" in conn["dsn"] \
                    else _sslmode_problem(conn["dsn"])
            if problem:
                yield at, f"step {cid!r}: {problem}"


def in_transit_problems(configs: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(component id, message)`` of every connection that would go in clear."""
    for cid, config in configs.items():
        for reason in clear_connections(config):
            yield cid, f"data_protection.encryption.in_transit requires TLS: {reason}"


ENCRYPTED_PREFIX = "enc:v1:"
"""Start of an encrypted value: ``enc:v1:`` + base64 of the 12-byte nonce and the ciphertext."""


class FieldCipher:
    """AES-GCM encryption of named fields (``at_rest: true``, ``fields: [...]``).

    A value is encrypted as its JSON text, with the field's path as associated data (a
    value moved to another field does not decrypt), under a fresh random nonce.
    """

    def __init__(self, key: str, fields: Sequence[str]) -> None:
        """``key``: base64 of 16, 24 or 32 bytes (AES-128/192/256)."""
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ModuleNotFoundError as exc:  # pragma: no cover - an extra
            msg = "field encryption needs cryptography: pip install 'dataflare[security]'"
            raise ModuleNotFoundError(msg) from exc
        try:
            raw = base64.b64decode(key.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) not in (16, 24, 32):
            msg = ("data_protection.encryption.key must be base64 of 16, 24 or 32 bytes "
                   "(e.g. `openssl rand -base64 32`)")
            raise ValueError(msg)
        self.aead = AESGCM(raw)
        self.fields = list(fields)

    def encrypt(self, field: str, value: Any) -> str:
        """``value`` of ``field`` encrypted (text)."""
        nonce = os.urandom(12)
        data = self.aead.encrypt(nonce, json.dumps(value).encode(), field.encode())
        return ENCRYPTED_PREFIX + base64.b64encode(nonce + data).decode()

    def decrypt(self, field: str, text: str) -> Any:
        """The original value of ``field`` from its encrypted text."""
        from cryptography.exceptions import InvalidTag

        if not isinstance(text, str) or not text.startswith(ENCRYPTED_PREFIX):
            msg = f"field {field!r} is not an encrypted value"
            raise ValueError(msg)
        blob = base64.b64decode(text[len(ENCRYPTED_PREFIX) :])
        try:
            plain = self.aead.decrypt(blob[:12], blob[12:], field.encode())
        except InvalidTag:
            msg = f"field {field!r} does not decrypt with this key"
            raise ValueError(msg) from None
        return json.loads(plain)

    def encrypt_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``record`` with its named fields encrypted."""
        out = dict(record)
        for field in self.fields:
            value = get_path(out, field)
            if value is not None:
                set_path(out, field, self.encrypt(field, value))
        return out

    def decrypt_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``record`` with its named fields decrypted."""
        out = dict(record)
        for field in self.fields:
            value = get_path(out, field)
            if value is not None:
                set_path(out, field, self.decrypt(field, value))
        return out


def field_cipher(protection: Any) -> FieldCipher | None:
    """The cipher of ``data_protection`` (a validated model) when fields are encrypted."""
    enc = getattr(protection, "encryption", None)
    if enc is None or not enc.at_rest or not enc.fields or enc.key is None:
        return None
    return FieldCipher(enc.key.get_secret_value(), enc.fields)
