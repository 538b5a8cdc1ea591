"""Record schemas, followed through a workflow at ``validate`` (the type flow).

A :class:`FieldType` is what is known of a value: its kind (``string``, ``integer``, ...,
``any`` when unknown), for an object the fields it is known to have and whether it may have
others (``open``), and the source fields it was computed from (``origins``: the column
lineage). A record's schema is an object ``FieldType``; an unknown schema is :data:`ANY`.

A component declares how it transforms schemas with a hook registered beside its builder
(``@transformation(..., schema=hook)``)::

    def filter_schema(ctx: SchemaContext[FilterConfig]) -> FieldType:
        ctx.read_expression(("condition",), ctx.config.condition)
        return ctx.input

The hook names every field the step reads (:meth:`SchemaContext.read`, with the kind of
value it needs) and returns the schema of the step's main output. The validator checks the
reads against the upstream schemas where they are known: a field that cannot be there is a
warning with did-you-mean, a value of the wrong kind an error. Unknown stays permissive:
nothing read from an ``any`` or from an open object that does not list the field is
reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

Kind = Literal["any", "null", "boolean", "integer", "number", "string", "object", "array"]
Want = Literal["number", "time", "comparable", "scalar", "string"]
Origin = tuple[str, str]  # (source component id, dotted path in its records)

META_FIELD = "_meta"  # every record may carry its position; never reported


@dataclass(frozen=True)
class FieldType:
    """What is known of a value: kind, an object's fields, and its source fields."""

    kind: Kind = "any"
    fields: Mapping[str, FieldType] | None = None
    open: bool = True
    origins: frozenset[Origin] = frozenset()

    # construction ------------------------------------------------------------------------

    @staticmethod
    def record(fields: Mapping[str, FieldType], open: bool = False) -> FieldType:  # noqa: A002
        """An object with these fields (``open``: it may have others)."""
        return FieldType("object", dict(fields), open)

    @staticmethod
    def of(kind: Kind, origins: Iterable[Origin] = ()) -> FieldType:
        """A value of ``kind`` computed from ``origins``."""
        return FieldType(kind, None, True, frozenset(origins))

    @property
    def known(self) -> bool:
        """Whether anything is known of this value's shape."""
        return self.kind != "any"

    @property
    def closed(self) -> bool:
        """An object whose fields are all listed."""
        return self.kind == "object" and self.fields is not None and not self.open

    # paths -------------------------------------------------------------------------------

    def get(self, path: str) -> FieldType | None:
        """The type at dotted ``path``; ``None`` when the path cannot be there."""
        cur: FieldType = self
        for part in path.split("."):
            nxt = cur.child(part)
            if nxt is None:
                return None
            cur = nxt
        return cur

    def child(self, name: str) -> FieldType | None:
        """The type of field ``name`` of this value; ``None`` when it cannot be there."""
        if name == META_FIELD and self.kind in ("object", "any"):
            return ANY
        if self.kind == "object" and self.fields is not None and name in self.fields:
            return self.fields[name]
        if self.kind in ("any", "array") or (
                self.kind == "object" and (self.open or self.fields is None)):
            return FieldType(origins=frozenset((s, f"{p}.{name}" if p else name)
                                               for s, p in self.origins))
        return None  # a scalar, or a closed object without that field

    def with_path(self, path: str, value: FieldType) -> FieldType:
        """The object with ``value`` written at dotted ``path`` (nested objects created)."""
        head, _, rest = path.partition(".")
        base = self if self.kind == "object" else FieldType("object", {}, self.kind == "any")
        fields = dict(base.fields or {})
        if rest:
            inner = fields.get(head)
            if inner is None or inner.kind != "object":
                inner = FieldType("object", {}, False)
            fields[head] = inner.with_path(rest, value)
        else:
            fields[head] = value
        return FieldType("object", fields, base.open, base.origins)

    def without(self, name: str) -> FieldType:
        """The object without its field ``name`` (a dotted path reaches a nested one)."""
        if self.kind != "object" or self.fields is None:
            return self
        head, _, rest = name.partition(".")
        if rest:
            if head not in self.fields:
                return self
            return replace(self, fields={**self.fields, head: self.fields[head].without(rest)})
        return replace(self, fields={k: v for k, v in self.fields.items() if k != name})

    def paths(self, prefix: str = "") -> list[str]:
        """Every dotted path listed in this type (objects and their fields)."""
        out: list[str] = []
        for name, sub in (self.fields or {}).items():
            path = f"{prefix}{name}"
            out.append(path)
            out.extend(sub.paths(f"{path}."))
        return out

    def leaves(self, prefix: str = "") -> dict[str, FieldType]:
        """The listed fields that are not objects with listed fields, by dotted path."""
        out: dict[str, FieldType] = {}
        for name, sub in (self.fields or {}).items():
            path = f"{prefix}{name}"
            if sub.kind == "object" and sub.fields:
                out.update(sub.leaves(f"{path}."))
            else:
                out[path] = sub
        return out

    def all_origins(self) -> frozenset[Origin]:
        """The origins of this value and of everything inside it."""
        found = set(self.origins)
        for sub in (self.fields or {}).values():
            found |= sub.all_origins()
        return frozenset(found)

    # combination -------------------------------------------------------------------------

    def union(self, other: FieldType) -> FieldType:
        """A value that is either this or ``other`` (several inputs, branches)."""
        origins = self.origins | other.origins
        if self.kind == "null":
            return replace(other, origins=origins)
        if other.kind == "null":
            return replace(self, origins=origins)
        if self.kind == "object" and other.kind == "object":
            mine, theirs = self.fields or {}, other.fields or {}
            fields = {k: mine[k].union(theirs[k]) if k in theirs else mine[k] for k in mine}
            fields.update({k: v for k, v in theirs.items() if k not in mine})
            listed = self.fields is not None and other.fields is not None
            return FieldType("object", fields if listed else None,
                             self.open or other.open or not listed, origins)
        if {self.kind, other.kind} == {"integer", "number"}:
            return FieldType("number", None, True, origins)
        if self.kind == other.kind:
            return replace(self, origins=origins)
        return FieldType("any", None, True, origins)

    def with_origins(self, origins: Iterable[Origin]) -> FieldType:
        """The same type, computed from ``origins`` instead of its own."""
        return replace(self, origins=frozenset(origins))

    # description -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (kind, fields, open, origins as ``source.path``)."""
        out: dict[str, Any] = {"type": self.kind}
        if self.kind == "object" and self.fields is not None:
            out["fields"] = {k: v.to_json() for k, v in self.fields.items()}
            out["open"] = self.open
        if self.origins:
            out["from"] = sorted(f"{s}.{p}" if p else s for s, p in self.origins)
        return out


ANY = FieldType()
"""Nothing known."""

_CLASHES: dict[str, tuple[str, ...]] = {
    "number": ("string", "boolean", "object", "array"),
    "time": ("boolean", "object", "array"),
    "comparable": ("boolean", "object", "array"),
    "scalar": ("object", "array"),
    "string": ("integer", "number", "boolean", "object", "array"),
}
WANTS: dict[str, str] = {
    "number": "a number",
    "time": "a time (ISO-8601 text or epoch number)",
    "comparable": "a number or a string",
    "scalar": "a scalar value",
    "string": "a string",
}


def clashes(t: FieldType, want: str | None) -> bool:
    """Whether a value of type ``t`` can never be what a reader wanting ``want`` needs."""
    return want is not None and t.kind in _CLASHES.get(want, ())


_SCALARS: dict[str, Kind] = {k: k for k in ("string", "integer", "number", "boolean", "array",
                                             "null")}


def from_json_schema(schema: Any, origin: tuple[str, str] | None = None,
                     closed: bool = True) -> FieldType:
    """The type described by a JSON Schema (``properties``, ``type``, ``items``).

    An object lists its ``properties``; it may have more where it lists none, where
    ``additionalProperties`` allows them, or, when not ``closed`` (a user's schema, read
    as JSON Schema reads it), where ``additionalProperties`` is not given. ``closed``:
    a described shape (a database table, a generator) has exactly the fields it lists.
    """
    if not isinstance(schema, dict):
        return _origin(ANY, origin)
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and "properties" in schema:
        kind = "object"
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict):
            return _origin(FieldType("object", None, True), origin)
        extra = schema.get("additionalProperties", not closed)
        fields = {
            str(name): from_json_schema(sub, None if origin is None else (
                origin[0], f"{origin[1]}.{name}" if origin[1] else str(name)), closed)
            for name, sub in props.items()
        }
        return FieldType("object", fields, extra is not False, frozenset())
    if kind in _SCALARS:
        return _origin(FieldType(_SCALARS[kind]), origin)
    return _origin(ANY, origin)


def _origin(t: FieldType, origin: tuple[str, str] | None) -> FieldType:
    return t if origin is None else t.with_origins([origin])


def sourced(t: FieldType, source: str) -> FieldType:
    """``t`` as the records of source ``source``: every field's origin is itself."""
    return _sourced(t, source, "")


def _sourced(t: FieldType, source: str, path: str) -> FieldType:
    fields = None if t.fields is None else {
        k: _sourced(v, source, f"{path}.{k}" if path else k) for k, v in t.fields.items()}
    return FieldType(t.kind, fields, t.open, frozenset([(source, path)]))


# What components declare -------------------------------------------------------------------

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Read:
    """A field a step reads: where it is set (``loc`` in the component), which input."""

    loc: Loc
    path: str
    input: int | None = None  # index of the input read; None: every input
    want: str | None = None
    what: str = "field"
    schema: FieldType | None = None  # read from these records instead of the input's
    column: int | None = None  # where the path starts in the setting's text (1-based)


@dataclass(frozen=True)
class Note:
    """A problem a hook found itself (a SQL query that does not bind)."""

    loc: Loc
    message: str
    severity: Literal["error", "warning"] = "error"


C = TypeVar("C")



@dataclass
class SchemaContext(Generic[C]):
    """What a schema hook sees: its config, its inputs' schemas; it records its reads."""

    step_id: str
    config: C
    inputs: list[FieldType]
    input_ids: list[str] = field(default_factory=list)
    component: Mapping[str, Any] = field(default_factory=dict)
    """The component as written (its ``plugin:``, its blocks)."""
    workflow: Mapping[str, Any] = field(default_factory=dict)
    """The ``workflow:`` block as written (its ``plugins:``)."""
    reads: list[Read] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    @property
    def input(self) -> FieldType:
        """The schema of the records of all inputs together."""
        if not self.inputs:
            return ANY
        out = self.inputs[0]
        for t in self.inputs[1:]:
            out = out.union(t)
        return out

    def at(self, index: int) -> FieldType:
        """The schema of input ``index`` (unknown when absent)."""
        return self.inputs[index] if index < len(self.inputs) else ANY

    def type_of(self, path: str, input: int | None = None,  # noqa: A002
                schema: FieldType | None = None) -> FieldType:
        """The type of ``path`` in the input(s) (``any`` when not there or unknown)."""
        base = schema or (self.input if input is None else self.at(input))
        found = base.get(path)
        return ANY if found is None else found

    def read(self, loc: Loc, path: str | None, *, input: int | None = None,  # noqa: A002
             want: str | None = None, config: bool = True,
             schema: FieldType | None = None, column: int | None = None) -> FieldType:
        """Record that the step reads ``path`` (set at ``loc`` of its config); its type.

        ``schema``: the records read, when the step reads its own intermediate records
        (an enrichment reading what an earlier one added) rather than its input's.
        """
        if not path:
            return ANY
        loc = ("config", *loc) if config else loc
        self.reads.append(Read(loc, path, input, want, schema=schema, column=column))
        return self.type_of(path, input, schema)

    def read_expression(self, loc: Loc, text: str | None, *, input: int | None = None,  # noqa: A002
                        config: bool = True, schema: FieldType | None = None) -> FieldType:
        """Record the paths an expression reads; a value computed from them (kind unknown).

        A path compared with a number (``amount > 10``) or computed with ``+ - * / %`` and a
        number is read as needing a number.
        """
        from dataflare.expr import ExpressionError, expression_reads

        if not text:
            return ANY
        try:
            reads = expression_reads(text)
        except ExpressionError:
            return ANY  # reported by the config's own validation
        origins: set[Origin] = set()
        for path, want, column in reads:
            t = self.read(loc, path, input=input, want=want, config=config, schema=schema,
                          column=column)
            origins |= t.all_origins()
        return FieldType(origins=frozenset(origins))

    def read_template(self, loc: Loc, text: str | None, *, input: int | None = None,  # noqa: A002
                      skip: Iterable[str] = (), config: bool = True,
                      schema: FieldType | None = None) -> FieldType:
        """Record the ``{{path}}`` fields a template reads (names in ``skip`` are not fields)."""
        from dataflare.template import placeholders

        origins: set[Origin] = set()
        names = set(skip)
        for path in placeholders(text or ""):
            if path.split(".", 1)[0] in names:
                continue
            origins |= self.read(loc, path, input=input, config=config,
                                 schema=schema).all_origins()
        return FieldType(origins=frozenset(origins))

    def error(self, loc: Loc, message: str, *, config: bool = True) -> None:
        """Report a problem of this step's config found while deriving its schema."""
        self.notes.append(Note(("config", *loc) if config else loc, message))


SchemaHook = Callable[[SchemaContext[Any]], FieldType | None]
"""A component's schema hook: records its reads and returns its main output's schema."""


def window_output(ctx: SchemaContext[Any], group_by: Iterable[str],
                  extra: Mapping[str, FieldType]) -> FieldType:
    """One record per group (and window): the group-by paths and ``extra`` fields."""
    out = FieldType.record({})
    for i, path in enumerate(group_by):
        out = out.with_path(path, ctx.read(("group_by", i), path))
    for name, t in extra.items():
        out = out.with_path(name, t)
    return out


AGGREGATE_KIND: dict[str, Kind | None] = {
    "count": "integer", "count_distinct": "integer", "avg": "number", "sum": None,
    "min": None, "max": None, "first": None, "last": None,
}
AGGREGATE_WANT: dict[str, str | None] = {
    "sum": "number", "avg": "number", "min": "comparable", "max": "comparable",
    "count_distinct": "scalar",
}


def aggregate_fields(ctx: SchemaContext[Any], aggs: Iterable[Any],
                     loc: Loc = ("aggregations",)) -> dict[str, FieldType]:
    """The output fields of ``aggregations`` (window, aggregation), their reads checked."""
    out: dict[str, FieldType] = {}
    for i, agg in enumerate(aggs):
        for name, op in zip(agg.output_names(), agg.ops, strict=True):
            src = ctx.read((*loc, i, "field"), agg.field, want=AGGREGATE_WANT.get(op))
            kind = AGGREGATE_KIND.get(op)
            if kind is None:
                kind = src.kind if op != "sum" or src.kind in ("integer", "number") else "number"
            out[name] = FieldType.of(kind, src.all_origins())
    return out
