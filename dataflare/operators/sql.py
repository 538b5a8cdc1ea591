"""The ``sql`` transformation: a DuckDB query over records.

The query reads the relation ``input``: per batch and per window, several inputs are
merged into it; with ``over: all`` and several inputs, each input is a relation named by
its id. It runs:

- once per batch (no ``window``, no ``over``): stateless;
- once per closed window with ``window`` and ``time_field``: the ``window`` operator
  collects each (group, window)'s records (same assignment, watermark, late rules and
  recovery state as ``window``) and the query runs over them when the window closes;
  each output row carries the group-by fields, ``window_start`` and ``window_end``;
- once over the whole input at the end with ``over: all`` (bounded inputs): the records
  are kept in one shard's recovery state until the inputs end.

Records go to DuckDB as Arrow tables and come back from Arrow: no Python per record
beyond pyarrow's own conversion. A column whose values have no common Arrow type (``note``
an integer in one record, a string in another) is JSON text when the query does not read
it; when it does, the records whose value does not fit the type the others share go to the
step's error policy, each named with its column, and the query runs over the rest. A query
that fails on a batch or a window sends that batch's records (or the window) to the step's
error policy.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

import bytewax.operators as op
from bytewax.dataflow import Stream
from pydantic import Field, field_validator, model_validator

from dataflare.config import Duration, Paths, Strict
from dataflare.operators.aggregates import collect_records
from dataflare.operators.keyed import (
    DOWN,
    ERRS,
    ShardLogic,
    component_id,
    idle_timeout_of,
    rejoined_upstream,
    route_and_merge,
    shards_of,
    stateful_shards,
)
from dataflare.operators.window import WindowConfig, WindowSpec, window
from dataflare.record_schema import FieldType, Kind, SchemaContext
from dataflare.records import META, Failed, RecordError, without_meta
from dataflare.registry import UNBOUNDED, BuildContext, Outputs, transformation

_WINDOWED = ("time_field", "time_unit", "allowed_lateness", "group_by", "late_to")


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError:  # pragma: no cover - the extra is part of the default install
        msg = "the 'sql' transformation needs duckdb: pip install 'dataflare[sql]'"
        raise ImportError(msg) from None
    return duckdb


def check_query(query: str) -> str:
    """Parse ``query`` with DuckDB: one SELECT (or WITH ... SELECT) statement."""
    duckdb = _duckdb()
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"invalid sql query: {first}"
        raise ValueError(msg) from None
    if len(statements) != 1:
        msg = f"'query' must be one statement (got {len(statements)})"
        raise ValueError(msg)
    if statements[0].type != duckdb.StatementType.SELECT:
        msg = f"'query' must be a SELECT query (got {statements[0].type.name.lower()})"
        raise ValueError(msg)
    return query


class SqlConfig(Strict):
    """Settings of a ``sql`` transformation."""

    query: str = Field(
        description="DuckDB SELECT over the relation `input` (with several inputs and "
        "`over: all`, one relation per input id)."
    )
    over: Literal["batch", "all"] = Field(
        "batch",
        description="`batch`: once per batch (stateless); `all`: once over the whole input "
        "at its end (bounded inputs).",
    )
    window: WindowSpec | None = Field(
        None, description="Run once per closed (group, window) instead (see `window`)."
    )
    time_field: str = Field("timestamp", description="With `window`: path of the event time.")
    time_unit: Literal["s", "ms"] = Field(
        "s", description="With `window`: unit of numeric event times."
    )
    allowed_lateness: Duration = Field(
        0.0, description="With `window`: how far behind the group's latest time a record may be."
    )
    group_by: Paths = Field((), description="With `window`: one query per group and window.")
    late_to: str | None = Field(None, description="With `window`: destination of late records.")

    _check_query = field_validator("query")(classmethod(lambda cls, v: check_query(v)))

    @model_validator(mode="after")
    def _check(self) -> SqlConfig:
        if self.window is not None and self.over == "all":
            msg = "'window' and 'over: all' exclude each other"
            raise ValueError(msg)
        if self.window is None:
            extra = [k for k in _WINDOWED if k in self.model_fields_set]
            if extra:
                msg = f"{', '.join(repr(k) for k in extra)} only apply with 'window'"
                raise ValueError(msg)
        return self

    def window_config(self) -> WindowConfig:
        """The ``window`` operator settings that collect each window's records."""
        assert self.window is not None  # noqa: S101 - callers check
        return WindowConfig.model_validate(
            {
                "window": self.window,
                "time_field": self.time_field,
                "time_unit": self.time_unit,
                "allowed_lateness": self.allowed_lateness,
                "group_by": list(self.group_by),
                "late_to": self.late_to,
            }
        )


def columns_read(query: str) -> Callable[[str], bool]:
    """Whether ``query`` may read an input column, from DuckDB's syntax tree.

    A column is read when the query names it (also as ``input.col`` or ``col.field``), or
    selects ``*`` without excluding it, ``columns(...)`` or a whole row (``select input``);
    when the tree cannot be had, every column is.
    """
    duckdb = _duckdb()
    con = duckdb.connect(":memory:")
    try:
        tree = json.loads(con.execute("select json_serialize_sql(?)", [query]).fetchone()[0])
    except duckdb.Error:
        tree = {"error": True}
    finally:
        con.close()
    named: set[str] = set()
    rows: set[str] = set()  # a one-part name that may be a relation: its whole row
    stars: list[set[str]] = []  # the columns each ``*`` leaves out
    relations: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("class")
        if kind == "COLUMN_REF":
            parts = [str(p).lower() for p in node["column_names"]]
            named.update(parts)
            if len(parts) == 1:
                rows.add(parts[0])
        elif kind == "STAR":
            stars.append(set() if node.get("columns") else
                         {str(c).lower() for c in node.get("exclude_list", ())})
        elif kind is None:  # a table reference or a CTE: the names rows are read under
            relations.update(str(node[k]).lower() for k in ("alias", "table_name", "key")
                             if isinstance(node.get(k), str))
        for value in node.values():
            walk(value)

    walk(tree)
    if tree.get("error") or rows & relations:
        return lambda name: True
    return lambda name: name.lower() in named or any(name.lower() not in s for s in stars)


class Query:
    """A compiled query: runs over Arrow tables, one DuckDB connection per thread."""

    def __init__(self, step: str, query: str) -> None:
        self.step = step
        self.query = query
        self.reads = columns_read(query)
        self._local = threading.local()

    def _connection(self) -> Any:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = _duckdb().connect(":memory:")
        return con

    def run(self, relations: dict[str, list[Any]]) -> tuple[list[dict[str, Any]], list[Failed]]:
        """The query's rows over ``relations`` (name -> records), and the records left out.

        A record is left out (to the error policy) when a column the query reads holds a
        value Arrow cannot put with the others; a failing query raises.
        """
        con = self._connection()
        names = []
        failed: list[Failed] = []
        try:
            for name, records in relations.items():
                table, faults = to_arrow(records, self.reads)
                failed.extend(Failed.of(self.step, RecordError(f"step {self.step!r}: {msg}"),
                                        records[i]) for i, msg in faults.items())
                con.register(name, table)
                names.append(name)
            rel = con.sql(self.query)
            # duckdb >= 1.4 names it to_arrow_table; older versions arrow().
            table = (getattr(rel, "to_arrow_table", None) or rel.arrow)()
        finally:
            for name in names:
                con.unregister(name)
        return from_arrow(table), failed


def to_arrow(records: Sequence[Any], reads: Callable[[str], bool]) -> tuple[Any, dict[int, str]]:
    """Records as an Arrow table (nested dicts as structs), without ``_meta``.

    Column by column when the records have no common type: see :func:`arrow_column`. The
    records left out are returned apart (position -> message).
    """
    import pyarrow as pa

    if not records:
        return pa.table({}), {}
    try:
        table = pa.Table.from_struct_array(pa.array(records))
        return (table.drop_columns([META]) if META in table.column_names else table), {}
    except (pa.ArrowException, OverflowError):
        pass
    names = [k for k in dict.fromkeys(k for r in records for k in r) if k != META]
    faults: dict[int, str] = {}
    columns = []
    for name in names:
        column, bad = arrow_column(name, [r.get(name) for r in records], reads(name))
        columns.append(column)
        for i, msg in bad.items():
            faults.setdefault(i, msg)
    table = pa.table(columns, names=names)
    if faults:
        table = table.filter(pa.array([i not in faults for i in range(len(records))]))
    return table, faults


def _arrow_type(value: Any) -> Any:
    """The Arrow type of one value (``None``: Arrow cannot hold it)."""
    import pyarrow as pa

    try:
        return pa.array([value]).type
    except (pa.ArrowException, OverflowError):
        return None


def _unified(a: Any, b: Any) -> Any:
    """A type holding values of types ``a`` and ``b`` (int64 and double: double), or ``None``."""
    import pyarrow as pa

    try:
        schema = pa.unify_schemas([pa.schema([("v", a)]), pa.schema([("v", b)])],
                                  promote_options="permissive")
    except (pa.ArrowException, OverflowError):
        return None
    return schema.field("v").type


def arrow_column(name: str, values: list[Any], read: bool) -> tuple[Any, dict[int, str]]:
    """One column as Arrow, and the positions of the values left out of it (with why).

    Values with no common type are JSON text in a column the query does not ``read``.
    Else the column takes the type most values share, widened by the types that unify with
    it (int64 and double: double); a value of another type, or one Arrow cannot hold, is
    left out (null).
    """
    import pyarrow as pa

    try:
        return pa.array(values), {}
    except (pa.ArrowException, OverflowError):
        pass
    if not read:
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values],
                        pa.string()), {}
    types = {i: _arrow_type(v) for i, v in enumerate(values) if v is not None}
    target, fits = None, set()
    for t, _ in Counter(t for t in types.values() if t is not None).most_common():
        wider = t if target is None else _unified(target, t)
        if wider is not None:
            target = wider
            fits.add(t)
    expected = "a value Arrow can hold" if target is None else f"{target} like the other records"
    bad = {i: f"column {name!r} holds {type(values[i]).__name__} {repr(values[i])[:40]}, "
           f"expected {expected}" for i, t in types.items() if t not in fits}
    return pa.array([None if i in bad else v for i, v in enumerate(values)], target), bad


def from_arrow(table: Any) -> list[dict[str, Any]]:
    """Rows of an Arrow table as JSON-like records (decimals as int or float)."""
    import pyarrow as pa

    cols = []
    for f in table.schema:
        col = table.column(f.name)
        if pa.types.is_decimal(f.type):
            col = col.cast(pa.int64() if f.type.scale == 0 else pa.float64())
        cols.append(col)
    return pa.table(cols, names=table.column_names).to_pylist()


def _message(step: str, exc: BaseException, what: str) -> str:
    return f"step {step!r}: sql query failed on {what}: {exc}"


def _per_batch(query: Query) -> Any:
    def apply(batch: list[Any]) -> tuple[list[Any], list[Failed]]:
        try:
            return query.run({"input": batch})
        except Exception as exc:  # noqa: BLE001 - the batch goes to the error policy
            groups = _by_kinds(batch, query.reads)
            if len(groups) > 1:  # a column's type is the most records', the others' null:
                down: list[Any] = []  # the query may bind on one kind of value only, so
                errs: list[Failed] = []  # each kind runs alone and fails alone
                for group in groups:
                    rows, failed = apply(group)
                    down += rows
                    errs += failed
                return down, errs
            msg = _message(query.step, exc, "a batch")
            return [], [Failed(query.step, type(exc).__name__, msg, r, r.get(META, {}))
                        for r in batch]

    return apply


def _by_kinds(batch: list[Any], reads: Callable[[str], bool]) -> list[list[Any]]:
    """The records of ``batch`` grouped by the kinds of the values the query reads."""
    columns = [c for c in dict.fromkeys(k for r in batch for k in r) if c != META and reads(c)]
    groups: dict[tuple[str, ...], list[Any]] = {}
    for r in batch:
        kinds = tuple(_KINDS.get(type(r.get(c)), "other") for c in columns)
        groups.setdefault(kinds, []).append(r)
    return list(groups.values())


_KINDS = {bool: "bool", int: "number", float: "number", str: "text", type(None): "null",
          dict: "object", list: "list"}


def _per_window(query: Query) -> Any:
    def apply(windows: list[dict[str, Any]]) -> tuple[list[Any], list[Failed]]:
        down: list[Any] = []
        errs: list[Failed] = []
        for w in windows:
            head = dict(w)
            records = head.pop("_records")
            try:
                rows, failed = query.run({"input": records})
            except Exception as exc:  # noqa: BLE001 - the window goes to the error policy
                bound = f"window {head['window_start']}..{head['window_end']}"
                whole = {**head, "records": [without_meta(r) for r in records]}
                meta = records[0].get(META, {}) if records else {}
                msg = _message(query.step, exc, bound)
                errs.append(Failed(query.step, type(exc).__name__, msg, whole, meta))
                continue
            errs.extend(failed)
            down.extend({**head, **row} for row in rows)
        return down, errs

    return apply


class _OverAll(ShardLogic):
    """The one shard of an ``over: all`` step: every input's records until the end."""

    def __init__(self, query: Query, names: list[str], definition: dict[str, Any],
                 resume: Any) -> None:
        super().__init__(query.step, definition, resume)
        self.query = query
        self.names = names
        if self.state is None:
            self.state = {name: [] for name in names}

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        for name, sub in batches:
            self.state[name].extend(sub)
        return []

    def has_state(self) -> bool:
        return False

    def idle(self) -> list[tuple[str, list[Any]]]:
        return []

    def flush(self) -> list[tuple[str, list[Any]]]:
        relations = self.state
        self.state = {name: [] for name in self.names}
        try:
            rows, failed = self.query.run(relations)
        except Exception as exc:  # noqa: BLE001 - the input goes to the error policy
            records = [r for name in self.names for r in relations[name]]
            msg = _message(self.query.step, exc, "the whole input")
            meta = records[0].get(META, {}) if records else {}
            whole = {name: [without_meta(r) for r in relations[name]] for name in self.names}
            return [(ERRS, [Failed(self.query.step, type(exc).__name__, msg, whole, meta)])]
        return [(port, out) for port, out in ((DOWN, rows), (ERRS, failed)) if out]


def _split(step: str, pairs: Stream[Any]) -> tuple[Stream[Any], Stream[Any]]:
    return (
        op.filter_map(f"{step}_down", pairs, lambda p: p[0] or None),
        op.filter_map(f"{step}_errs", pairs, lambda p: p[1] or None),
    )


def _input_names(ctx: BuildContext) -> list[str]:
    return [str(i) for i in (getattr(ctx.component, "inputs", None) or ["input"])]


_DUCKDB_TYPE: dict[str, str] = {"string": "VARCHAR", "integer": "BIGINT", "number": "DOUBLE",
                                 "boolean": "BOOLEAN", "null": "VARCHAR", "array": "JSON[]"}
_FROM_DUCKDB: tuple[tuple[str, Kind], ...] = (
    ("[]", "array"), ("STRUCT", "object"), ("MAP", "object"), ("JSON", "any"),
    ("BOOLEAN", "boolean"), ("INT", "integer"), ("DECIMAL", "number"), ("DOUBLE", "number"),
    ("FLOAT", "number"), ("REAL", "number"), ("VARCHAR", "string"), ("TIMESTAMP", "string"),
    ("DATE", "string"), ("TIME", "string"), ("UUID", "string"), ("BLOB", "string"),
)


def _column_type(t: FieldType, unknown: str) -> str | None:
    """The DuckDB type of a column of type ``t`` (``None``: cannot be declared)."""
    if t.kind == "object":
        if not t.fields or t.open:
            return None
        inner = [f'"{k}" {_column_type(v, unknown)}' for k, v in t.fields.items()]
        return None if any(" None" in c for c in inner) else f"STRUCT({', '.join(inner)})"
    return _DUCKDB_TYPE.get(t.kind, unknown)


def _field_kind(duck_type: str) -> Kind:
    upper = duck_type.upper()
    return next((kind for marker, kind in _FROM_DUCKDB if marker in upper), "any")


def _describe(query: str, relations: dict[str, FieldType], unknown: str) -> list[tuple[str, str]]:
    """DuckDB's ``DESCRIBE`` of ``query`` over empty tables of the relations' columns."""
    duckdb = _duckdb()
    con = duckdb.connect(":memory:")
    try:
        for name, schema in relations.items():
            cols = []
            for col, t in (schema.fields or {}).items():
                duck = _column_type(t, unknown)
                if duck is None:
                    msg = f"column {col!r} has no declarable type"
                    raise LookupError(msg)
                cols.append(f'"{col}" {duck}')
            con.execute(f'CREATE TABLE "{name}" ({", ".join(cols) or "_empty INTEGER"})')
        return [(str(r[0]), str(r[1])) for r in con.execute(f"DESCRIBE {query}").fetchall()]
    finally:
        con.close()


def _sql_error(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith("LINE "):
            break
        keep.append(ln.strip())
    return " ".join(keep) or type(exc).__name__


def sql_schema(ctx: SchemaContext[SqlConfig]) -> FieldType:
    """The query's columns, by DuckDB's ``DESCRIBE`` over the input columns (when known).

    A query that does not bind (an unknown column, a sum over text) is an error of
    ``validate``. Inputs whose fields are not all known leave the output unknown. A column
    of the input passed under its own name keeps its lineage; another column is taken to
    come from the input columns the query reads (:func:`columns_read`).
    """
    cfg = ctx.config
    duckdb = _duckdb()
    if cfg.over == "all" and len(ctx.inputs) > 1:
        relations = dict(zip(ctx.input_ids, ctx.inputs, strict=False))
    else:
        relations = {"input": ctx.input}
    if cfg.window is not None:
        ctx.read(("time_field",), cfg.time_field, want="time")
    if not all(t.closed for t in relations.values()):
        return FieldType()
    names = {col for t in relations.values() for col in (t.fields or {})}
    columns: list[tuple[str, str]] | None = None
    guessed = any(v.kind in ("any", "null") for t in relations.values()
                  for v in (t.fields or {}).values())
    for unknown in (("VARCHAR", "DOUBLE") if guessed else ("VARCHAR",)):
        try:
            columns = _describe(cfg.query, relations, unknown)
            break
        except LookupError:
            return FieldType()
        except duckdb.Error as exc:
            error = _sql_error(exc)
            if not guessed or "not found" in error or "does not exist" in error:
                ctx.error(("query",), f"sql query does not bind on the columns of its input "
                          f"({', '.join(sorted(names))}): {error}")
                return FieldType()
    if columns is None:
        return FieldType()
    every = {col: t for r in relations.values() for col, t in (r.fields or {}).items()}
    reads = columns_read(cfg.query)
    mentioned = [t for col, t in every.items() if reads(col)]
    out: dict[str, FieldType] = {}
    for name, duck_type in columns:
        if name in every:
            origins = every[name].all_origins()
        else:
            origins = frozenset(o for t in mentioned for o in t.all_origins())
        out[name] = FieldType.of(_field_kind(duck_type), origins)
    if cfg.window is not None:
        head: dict[str, FieldType] = {"window_start": FieldType.of("string"),
                                      "window_end": FieldType.of("string")}
        result = FieldType.record(head)
        for i, path in enumerate(cfg.group_by):
            result = result.with_path(path, ctx.read(("group_by", i), path))
        return FieldType.record({**(result.fields or {}), **out})
    return FieldType.record(out)


def _advice(cfg: SqlConfig, modes: list[set[str]]) -> list[str]:
    """Warnings for ``validate``: ``over: all`` on an input that never ends."""
    if cfg.over == "all" and set().union(*modes) & UNBOUNDED:
        return ["'over: all' runs the query when the inputs end, and an input here is "
                "unbounded (streaming, cdc or hybrid): use a 'window' instead"]
    return []


@transformation(
    "sql",
    config=SqlConfig,
    description="Run a DuckDB SQL query over records: per batch, per closed window, or once "
    "over the whole input.",
    inputs=(1, None),
    stateful=True,
    named_outputs=lambda cfg: ["late"] if cfg.window is not None else [],
    merge_inputs=False,
    advise=_advice,
    schema=sql_schema,
)
def build_sql(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build the ``sql`` step."""
    cfg: SqlConfig = ctx.config
    step = component_id(ctx.step_id)
    query = Query(step, cfg.query)
    if cfg.over == "all":
        names = _input_names(ctx) if len(ups) > 1 else ["input"]
        definition = {"query": cfg.query, "over": "all", "inputs": names}
        keyed = route_and_merge(
            "collect", list(zip(names, ups, strict=True)), [lambda r: None] * len(ups), 1
        )
        outs = stateful_shards(
            "over_all",
            keyed,
            lambda resume: _OverAll(query, names, definition, resume),
            (DOWN, ERRS),
        )
        return Outputs(down=outs[DOWN], errs=outs[ERRS])
    # Per batch or per window, several inputs are one relation, as for other steps.
    up = ups[0] if len(ups) == 1 else op.merge("merge_inputs", *ups)
    if cfg.window is None:
        down, errs = _split("sql", op.map("query", up, _per_batch(query)))
        return Outputs(down=down, errs=errs)
    win = window(
        ctx.step_id,
        up,
        cfg.window_config(),
        idle_timeout=idle_timeout_of(ctx),
        shards=shards_of(ctx),
        in_time_order=rejoined_upstream(ctx),
        accs=collect_records(),
        definition={"query": cfg.query},
    )
    down, errs = _split("sql", op.map("query", win.down, _per_window(query)))
    return Outputs(
        down=down, errs=op.merge("errors", win.errs, errs), named={"late": win.late}
    )
