"""A decoder of PostgreSQL's ``pgoutput`` logical replication protocol (version 1).

:func:`decode_message` parses one message (``B``egin, ``C``ommit, ``R``elation,
``I``nsert, ``U``pdate, ``D``elete, ``T``runcate, ``O``rigin, t``Y``pe, ``M``essage);
:class:`ChangeDecoder` follows a stream of messages, keeps the relations it was told
about and turns each committed transaction into records::

    {"id": 7, "name": "x", "_meta": {"op": "insert", "table": "public.products",
     "lsn": "0/16B3748", "commit_ts": "2024-05-01T10:00:00.123456+00:00", "xid": 750}}

Column values arrive as text and are converted by their type OID with psycopg's loaders
(the same conversion a query result gets, see :func:`register_loaders`), then made
JSON-like by :func:`dataflare.connectors.schema.json_value`. A delete carries the key
columns of the relation's REPLICA IDENTITY (all columns with ``REPLICA IDENTITY FULL``);
a truncate yields one record per table holding only ``_meta``. A value that cannot be
converted turns the change into a :class:`~dataflare.records.Failed` entry naming the
column (see :func:`~dataflare.connectors.sql_source.change_record`).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dataflare.connectors.schema import DecimalHandling, UnconvertibleValue, json_value
from dataflare.connectors.sql_source import change_record, say_changed_columns
from dataflare.records import META, Failed

log = logging.getLogger(__name__)

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class ProtocolError(ValueError):
    """A message that does not follow the pgoutput protocol."""


def lsn_to_int(lsn: str | int) -> int:
    """An LSN (``'16/B374D848'``) as an integer."""
    if isinstance(lsn, int):
        return lsn
    hi, _, lo = str(lsn).partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    """An integer LSN as PostgreSQL writes it (``'16/B374D848'``)."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def pg_timestamp(micros: int) -> datetime:
    """A protocol timestamp (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


# -- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    """Start of a transaction."""

    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a transaction."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """Origin of a transaction replicated from elsewhere."""

    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    """A column of a relation."""

    name: str
    type_oid: int
    type_modifier: int
    key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's description, sent before its first change in a session."""

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        """``schema.table``."""
        return f"{self.namespace}.{self.name}"


@dataclass(frozen=True, slots=True)
class Type:
    """A data type's name."""

    oid: int
    namespace: str
    name: str


# A column value of a tuple: None (null), UNCHANGED (unchanged TOAST), bytes (text form),
# or Binary(bytes) (binary form, protocol version 2 and later).
UNCHANGED = "unchanged-toast"


@dataclass(frozen=True, slots=True)
class Binary:
    """A column value in binary form."""

    data: bytes


TupleValue = None | str | bytes | Binary


@dataclass(frozen=True, slots=True)
class Insert:
    """A new row."""

    relation_oid: int
    new: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """A changed row; ``old`` is the key (``K``) or the old row (``O``) when sent."""

    relation_oid: int
    old_kind: str | None
    old: tuple[TupleValue, ...] | None
    new: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    """A deleted row: its key (``K``) or whole old row (``O``)."""

    relation_oid: int
    old_kind: str
    old: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    """Truncated tables."""

    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A message written by ``pg_logical_emit_message``."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            msg = f"message ends after {len(self.data)} bytes, expected at least {end}"
            raise ProtocolError(msg)
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def byte(self) -> str:
        return chr(self.take(1)[0])

    def int8(self) -> int:
        return int(self.take(1)[0])

    def int16(self) -> int:
        return int(struct.unpack("!h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack("!i", self.take(4))[0])

    def uint32(self) -> int:
        return int(struct.unpack("!I", self.take(4))[0])

    def int64(self) -> int:
        return int(struct.unpack("!q", self.take(8))[0])

    def uint64(self) -> int:
        return int(struct.unpack("!Q", self.take(8))[0])

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            msg = f"unterminated string at byte {self.pos}"
            raise ProtocolError(msg)
        out = self.data[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return out

    def tuple_data(self) -> tuple[TupleValue, ...]:
        n = self.int16()
        values: list[TupleValue] = []
        for _ in range(n):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind == "t":
                values.append(self.take(self.int32()))
            elif kind == "b":
                values.append(Binary(self.take(self.int32())))
            else:
                msg = f"unknown tuple value kind {kind!r}"
                raise ProtocolError(msg)
        return tuple(values)


def decode_message(data: bytes) -> Message:
    """Parse one pgoutput message (protocol version 1)."""
    if not data:
        msg = "empty pgoutput message"
        raise ProtocolError(msg)
    r = _Reader(bytes(data))
    tag = r.byte()
    if tag == "B":
        return Begin(r.uint64(), pg_timestamp(r.int64()), r.uint32())
    if tag == "C":
        return Commit(r.int8(), r.uint64(), r.uint64(), pg_timestamp(r.int64()))
    if tag == "O":
        return Origin(r.uint64(), r.string())
    if tag == "R":
        oid, namespace, name = r.uint32(), r.string(), r.string()
        identity = r.byte()
        columns = []
        for _ in range(r.int16()):
            flags = r.int8()
            columns.append(Column(r.string(), r.uint32(), r.int32(), bool(flags & 1)))
        return Relation(oid, namespace or "pg_catalog", name, identity, tuple(columns))
    if tag == "Y":
        oid = r.uint32()
        return Type(oid, r.string(), r.string())
    if tag == "I":
        oid = r.uint32()
        if r.byte() != "N":
            msg = "insert message without a new tuple"
            raise ProtocolError(msg)
        return Insert(oid, r.tuple_data())
    if tag == "U":
        oid = r.uint32()
        kind = r.byte()
        old_kind, old = None, None
        if kind in ("K", "O"):
            old_kind, old = kind, r.tuple_data()
            kind = r.byte()
        if kind != "N":
            msg = f"update message with tuple kind {kind!r}, expected 'N'"
            raise ProtocolError(msg)
        return Update(oid, old_kind, old, r.tuple_data())
    if tag == "D":
        oid = r.uint32()
        kind = r.byte()
        if kind not in ("K", "O"):
            msg = f"delete message with tuple kind {kind!r}, expected 'K' or 'O'"
            raise ProtocolError(msg)
        return Delete(oid, kind, r.tuple_data())
    if tag == "T":
        n = r.int32()
        options = r.int8()
        oids = tuple(r.uint32() for _ in range(n))
        return Truncate(oids, bool(options & 1), bool(options & 2))
    if tag == "M":
        flags = r.int8()
        lsn = r.uint64()
        prefix = r.string()
        content = r.take(r.int32())
        return LogicalMessage(bool(flags & 1), lsn, prefix, content)
    msg = f"unknown pgoutput message type {tag!r}"
    raise ProtocolError(msg)


# -- values ----------------------------------------------------------------------------------


# Values without a Python equivalent, by the start of their text: loaded as that text.
_AS_TEXT = {"date": (b"infinity", b"-infinity"), "timestamp": (b"infinity", b"-infinity"),
            "timestamptz": (b"infinity", b"-infinity"), "time": (b"24:",), "timetz": (b"24:",)}
_TEXT_LOADERS: dict[type, type] = {}


def _beyond_python_years(data: Any) -> bool:
    """Whether a date or timestamp's text is before year 1 (``... BC``) or after 9999."""
    text = bytes(data)
    return text.endswith(b" BC") or text[:5].isdigit()


def _text_loader(base: type, starts: tuple[bytes, ...]) -> type:
    """A loader of ``base``'s type that loads some values as their text.

    Those starting with ``starts``, and dates and timestamps outside Python's years 1-9999.
    """
    if base not in _TEXT_LOADERS:
        from psycopg import DataError
        from psycopg.adapt import Loader

        class AsText(Loader):
            def __init__(self, oid: int, context: Any = None) -> None:
                super().__init__(oid, context)
                self._load = base(oid, context).load

            def load(self, data: Any) -> Any:
                if bytes(data[:9]).startswith(starts):
                    return bytes(data).decode()
                try:
                    return self._load(data)
                except DataError:
                    if _beyond_python_years(data):
                        return bytes(data).decode()
                    raise

        _TEXT_LOADERS[base] = AsText
    return _TEXT_LOADERS[base]


def register_loaders(adapters: Any) -> None:
    """Make ``adapters`` (a psycopg ``AdaptersMap``) load every value the sources read.

    PostgreSQL's ``infinity`` and ``-infinity`` dates and timestamps, those before year 1
    or after 9999, and the time ``24:00:00`` have no Python equivalent (psycopg fails on
    them): they load as their text (``"infinity"``, ``"0044-03-15 BC"``, ``"24:00:00"``),
    which PostgreSQL reads back as the same values.
    """
    from psycopg.pq import Format

    for name, starts in _AS_TEXT.items():
        oid = adapters.types[name].oid
        base = adapters.get_loader(oid, Format.TEXT)
        if base is not None and base not in _TEXT_LOADERS.values():
            adapters.register_loader(oid, _text_loader(base, starts))


class ValueDecoder:
    """Converts text column values by type OID with psycopg's loaders.

    Pass a psycopg connection to use the types it knows (enums, domains, registered
    composites); without one the built-in types are converted and unknown types stay text.
    Either way the loaders of :func:`register_loaders` apply. ``decimals``: how
    ``numeric`` values come (see :func:`~dataflare.connectors.schema.json_value`).
    """

    def __init__(self, connection: Any = None, decimals: DecimalHandling = "number") -> None:
        import psycopg
        from psycopg.adapt import AdaptersMap, Transformer

        self.adapters = AdaptersMap(
            connection.adapters if connection is not None else psycopg.adapters
        )
        register_loaders(self.adapters)
        self.connection = connection
        self._tx = Transformer(self)  # the context: these adapters, that connection
        self._loaders: dict[int, Any] = {}
        self.decimals = decimals

    def load(self, type_oid: int, raw: bytes | Binary) -> Any:
        """The Python value of one column value, as psycopg loads it.

        An :class:`~dataflare.connectors.schema.UnconvertibleValue` holding the text when
        it cannot be converted (its row alone fails).
        """
        from psycopg.pq import Format

        if isinstance(raw, Binary):
            fmt, data = Format.BINARY, raw.data
            key = -type_oid - 1
        else:
            fmt, data, key = Format.TEXT, raw, type_oid
        loader = self._loaders.get(key)
        if loader is None:
            loader = self._tx.get_loader(type_oid, fmt)
            self._loaders[key] = loader
        try:
            return loader.load(data)
        except Exception as exc:  # noqa: BLE001 - a conversion failure belongs to its row
            return UnconvertibleValue(bytes(data).decode("utf-8", "replace"), exc)

    def decode(self, type_oid: int, raw: bytes | Binary) -> Any:
        """The JSON-like value of one column value."""
        return json_value(self.load(type_oid, raw), self.decimals)


# -- transactions ----------------------------------------------------------------------------


@dataclass(slots=True)
class Transaction:
    """A committed transaction: its records (or failures) and position."""

    xid: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime
    records: list[Any] = field(default_factory=list)


class ChangeDecoder:
    """Follows pgoutput messages and yields one :class:`Transaction` per commit.

    ``tables`` (``schema.table`` names) keeps only changes of those tables; ``None`` keeps
    all. Transactions committed before ``skip_below`` (already delivered ones, on resume)
    come out without records, their values never converted. Relations are remembered
    across calls of :meth:`feed`, as a stream resumed on
    another connection re-sends them.
    """

    def __init__(
        self,
        step_id: str,
        values: ValueDecoder | None = None,
        tables: Iterable[str] | None = None,
        excluded: Iterable[str] = (),
    ) -> None:
        self.step_id = step_id
        self.values = values or ValueDecoder()
        self.tables = None if tables is None else frozenset(tables)
        self.excluded = frozenset(excluded)
        self.relations: dict[int, Relation] = {}
        self._tx: Transaction | None = None
        self._begin: Begin | None = None
        self._skipping = False
        self.skip_below = 0
        """Transactions committed before this LSN are returned without records."""

    def feed(self, data: bytes, lsn: int | None = None) -> Transaction | None:
        """Process one message (``lsn``: its WAL position); a :class:`Transaction` on commit."""
        msg = decode_message(data)
        if isinstance(msg, Begin):
            self._begin = msg
            self._tx = Transaction(msg.xid, msg.final_lsn, msg.final_lsn, msg.commit_ts)
            self._skipping = msg.final_lsn < self.skip_below
            return None
        if isinstance(msg, Relation):
            before = self.relations.get(msg.oid)
            if before is not None and not self._skipping and self._wanted(msg):
                say_changed_columns(self.step_id, msg.qualified_name,
                                    [c.name for c in before.columns],
                                    [c.name for c in msg.columns])
            self.relations[msg.oid] = msg
            return None
        if isinstance(msg, Commit):
            done = self._tx or Transaction(0, msg.commit_lsn, msg.end_lsn, msg.commit_ts)
            done.commit_lsn, done.end_lsn = msg.commit_lsn, msg.end_lsn
            done.commit_ts = msg.commit_ts
            for rec in done.records:
                meta = rec.meta if isinstance(rec, Failed) else rec[META]
                meta["commit_ts"] = msg.commit_ts.isoformat()
            self._tx, self._begin = None, None
            return done
        if isinstance(msg, Origin | Type | LogicalMessage):
            return None
        tx = self._tx
        if tx is None:
            text = f"{type(msg).__name__.lower()} message outside a transaction"
            raise ProtocolError(text)
        if self._skipping:
            return None
        change_lsn = int_to_lsn(lsn if lsn is not None else tx.commit_lsn)
        if isinstance(msg, Truncate):
            for oid in msg.relation_oids:
                rel = self._relation(oid)
                if self._wanted(rel):
                    tx.records.append({META: self._meta("truncate", rel, change_lsn, tx)})
            return None
        if isinstance(msg, Insert):
            self._change(tx, "insert", msg.relation_oid, msg.new, None, change_lsn)
        elif isinstance(msg, Update):
            self._change(
                tx,
                "update",
                msg.relation_oid,
                msg.new,
                msg.old,
                change_lsn,
                old_key_only=msg.old_kind == "K",
            )
        elif isinstance(msg, Delete):
            self._change(
                tx,
                "delete",
                msg.relation_oid,
                msg.old,
                None,
                change_lsn,
                key_only=msg.old_kind == "K",
            )
        return None

    def _relation(self, oid: int) -> Relation:
        rel = self.relations.get(oid)
        if rel is None:
            msg = f"change of relation oid {oid} before its relation message"
            raise ProtocolError(msg)
        return rel

    def _wanted(self, rel: Relation) -> bool:
        name = rel.qualified_name
        return (self.tables is None or name in self.tables) and name not in self.excluded

    def _meta(self, op: str, rel: Relation, lsn: str, tx: Transaction) -> dict[str, Any]:
        return {
            "op": op,
            "table": rel.qualified_name,
            "lsn": lsn,
            "commit_ts": tx.commit_ts.isoformat(),
            "xid": tx.xid,
        }

    def _change(
        self,
        tx: Transaction,
        op: str,
        oid: int,
        values: tuple[TupleValue, ...],
        old: tuple[TupleValue, ...] | None,
        lsn: str,
        key_only: bool = False,
        old_key_only: bool = False,
    ) -> None:
        rel = self._relation(oid)
        if not self._wanted(rel):
            return
        meta = self._meta(op, rel, lsn, tx)
        record, unchanged = self._values(rel, values, key_only)
        if unchanged:
            meta["unchanged"] = unchanged
        previous = None if old is None else self._values(rel, old, old_key_only)[0]
        where = f"{op} at lsn {lsn}"
        decimals = self.values.decimals
        tx.records.append(change_record(self.step_id, record, previous, meta, where, decimals))

    def _values(
        self, rel: Relation, values: tuple[TupleValue, ...], key_only: bool
    ) -> tuple[dict[str, Any], list[str]]:
        """The loaded column values (see :meth:`ValueDecoder.load`), and the unchanged ones."""
        out: dict[str, Any] = {}
        unchanged: list[str] = []
        for col, raw in zip(rel.columns, values, strict=False):
            if key_only and not col.key:
                continue
            if raw is None:
                out[col.name] = None
            elif isinstance(raw, str):  # UNCHANGED: an unchanged TOASTed value
                unchanged.append(col.name)
            else:
                out[col.name] = self.values.load(col.type_oid, raw)
        return out, unchanged
