"""``{{path}}`` templates: Redis keys, HTTP bodies, Kafka keys, object paths."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from dataflare.records import RecordError, getter

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")


def placeholders(text: str) -> list[str]:
    """The dotted paths a template refers to."""
    return _PLACEHOLDER.findall(text)


def compile_template(text: str, json_escape: bool = False, url_escape: bool = False
                     ) -> Callable[[Any], str]:
    """A function rendering ``text`` for a record; a missing value renders as empty text.

    With ``json_escape`` values are escaped for use inside a JSON string literal, so a
    body template such as ``{"email": "{{email}}"}`` stays valid JSON for any value. With
    ``url_escape`` they are percent-encoded (``/``, ``?`` and ``#`` too), so a value in a
    URL's path stays one path segment: ``../admin`` or ``1#x`` cannot name another one; a
    value of ``.`` or ``..`` raises :class:`~dataflare.records.RecordError` (clients
    resolve it as a path segment even escaped).
    """
    parts = _PLACEHOLDER.split(text)
    literals = parts[0::2]
    getters = [getter(p) for p in parts[1::2]]

    def render_value(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, dict | list):
            text = json.dumps(value, separators=(",", ":"), default=str)
        else:
            text = str(value)
        if url_escape:
            if text in (".", ".."):  # clients resolve them, escaped or not: another path
                msg = f"the value {text!r} cannot be put in a URL: it would name another path"
                raise RecordError(msg)
            return quote(text, safe="")
        return json.dumps(text)[1:-1] if json_escape else text

    if not getters:
        return lambda record: text

    def render(record: Any) -> str:
        out = [literals[0]]
        for get, lit in zip(getters, literals[1:], strict=True):
            out.append(render_value(get(record)))
            out.append(lit)
        return "".join(out)

    return render
