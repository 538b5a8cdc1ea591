"""The workflow's masking rules (``data_protection.masking_rules``) as one object.

A :class:`Masker` masks records before destinations and in dead letters, the values a
message quotes, and undecodable input kept as raw text. ``method: hash`` is a keyed
HMAC-SHA256 (key: ``data_protection.hash_key``), which a dictionary of likely values
cannot reverse without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from dataflare.encryption import FieldCipher
from dataflare.records import META, get_path, set_path

MASKED = "masked"
"""``_meta`` flag of a record masked already: replayed from a dead letter."""


class Rule(Protocol):
    """What a masking rule gives (``dsl_compiler.models.MaskingRule``)."""

    @property
    def field(self) -> str:
        """Dotted path of the field."""

    @property
    def method(self) -> str:
        """``partial``, ``full`` or ``hash``."""

    @property
    def show_chars(self) -> int:
        """Leading characters kept by ``partial``."""

    @property
    def replacement(self) -> str:
        """Replacement text."""


class Masker:
    """Masking rules applied to records, to raw text and to messages that quote values."""

    def __init__(
        self, rules: Sequence[Rule], hash_key: bytes | None, cipher: FieldCipher | None = None
    ) -> None:
        """Mask with ``rules``; ``hash_key`` keys ``method: hash`` (required by it).

        ``cipher`` then encrypts its fields (``data_protection.encryption.at_rest``).
        """
        self.rules = list(rules)
        self.hash_key = hash_key
        self.cipher = cipher
        if hash_key is None and any(r.method == "hash" for r in self.rules):
            msg = "masking method 'hash' needs data_protection.hash_key (an HMAC key)"
            raise ValueError(msg)
        self._raw = [(rule, _quoted(rule.field)) for rule in self.rules]
        self._raw_encrypted = [(f, _quoted(f)) for f in (cipher.fields if cipher else [])]

    def value(self, rule: Rule, value: Any) -> str:
        """The masked form of one value."""
        text = str(value)
        if rule.method == "full":
            return rule.replacement
        if rule.method == "partial":
            return text[: rule.show_chars] + rule.replacement
        assert self.hash_key is not None
        return hmac.new(self.hash_key, text.encode(), hashlib.sha256).hexdigest()

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with every rule's field masked (a copy).

        A record replayed from a dead letter (``_meta.masked``) was masked when the dead
        letter was written: it is not masked twice (a hash of a hash, a value encrypted
        twice).
        """
        meta = record.get(META)
        if isinstance(meta, dict) and meta.get(MASKED):
            return record
        out = dict(record)
        for rule in self.rules:
            value = get_path(out, rule.field)
            if value is not None:
                set_path(out, rule.field, self.value(rule, value))
        return self.cipher.encrypt_record(out) if self.cipher else out

    def text(self, raw: str) -> str:
        """Undecodable input (a broken JSON line) with the ruled fields it holds masked."""
        for rule, pattern in self._raw:

            def repl(m: re.Match[str], rule: Rule = rule) -> str:
                quoted = m.group(2)
                try:
                    value = json.loads(quoted)
                except ValueError:
                    value = quoted.strip('"')
                return m.group(1) + json.dumps(self.value(rule, value))

            raw = pattern.sub(repl, raw)
        for field, pattern in self._raw_encrypted:
            assert self.cipher is not None

            def encrypt(m: re.Match[str], field: str = field) -> str:
                assert self.cipher is not None
                try:
                    value = json.loads(m.group(2))
                except ValueError:
                    value = m.group(2).strip('"')
                return m.group(1) + json.dumps(self.cipher.encrypt(field, value))

            raw = pattern.sub(encrypt, raw)
        return raw

    def message(self, message: str, record: Any) -> str:
        """``message`` without the clear values of ``record`` that the rules mask."""
        if isinstance(record, dict):
            for before, after in _changed(record, self(record)):
                message = message.replace(str(before), str(after))
        elif isinstance(record, str) and record:
            masked = self.text(record)
            if masked != record:
                for before, after in _changed_text(record, masked):
                    message = message.replace(before, after)
        return message


def _quoted(field: str) -> re.Pattern[str]:
    """``"<last key of field>": <JSON string or number>`` in raw (undecodable) JSON text."""
    key = re.escape(field.rsplit(".", 1)[-1])
    return re.compile(r'("' + key + r'"\s*:\s*)("(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*)')


def _changed(before: Any, after: Any) -> Iterator[tuple[Any, Any]]:
    """The ``(old, new)`` leaf values that differ between two records."""
    if isinstance(before, dict) and isinstance(after, dict):
        for k, v in before.items():
            yield from _changed(v, after.get(k))
    elif before != after and before not in (None, ""):
        yield before, after


def _changed_text(before: str, after: str) -> Iterator[tuple[str, str]]:
    """The whole raw text and its masked form (a message may quote either)."""
    yield before, after
