"""The type flow: record schemas followed through the DAG, and the fields each step reads.

A pass of ``validate`` after the graph checks. Sources give the schema of their records
(``output_schema``, or their type's hook when the config says it, e.g. a generator's
fields); each transformation's hook (registered with its type, see
:mod:`dataflare.record_schema`) derives its output schema from its inputs' and names the
fields it reads; destinations name the fields they read (``filter``, ``merge_key``,
templates). Every read is checked against the schema it reads, where it is known:

- a field that cannot be in the records (its object is closed and does not list it) is a
  warning with did-you-mean (``validate --strict`` fails on it);
- a value of a kind the reader can never use (a ``sum`` over a string, a ``time_field``
  that is a boolean, ``amount > 10`` on text) is an error.

Unknown stays permissive: an unknown schema, or an open object that does not list a field,
reports nothing. :func:`schemas` is the public entry: ``step id -> schema``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from dataflare import registry
from dataflare.dsl_compiler.graph import SECTIONS, Graph, redirect_targets
from dataflare.dsl_compiler.loader import Document
from dataflare.dsl_compiler.problems import Loc, Problem, did_you_mean
from dataflare.record_schema import (
    ANY,
    WANTS,
    FieldType,
    Read,
    SchemaContext,
    clashes,
    from_json_schema,
    sourced,
)
from dataflare.records import a_or_an

if TYPE_CHECKING:
    from dataflare.dsl_compiler.validate import Validated


@dataclass
class TypeFlow:
    """The schemas of a workflow: each step's output, inputs and reads."""

    outputs: dict[str, FieldType] = field(default_factory=dict)
    """Main output schema per source and transformation; a destination's input schema."""
    ports: dict[str, FieldType] = field(default_factory=dict)
    """Named outputs (``router.route``, ``window.late``) whose schema differs from passing."""
    passing: dict[str, FieldType] = field(default_factory=dict)
    """The records entering each transformation (its named outputs pass them on)."""
    inputs: dict[str, list[FieldType]] = field(default_factory=dict)
    reads: dict[str, list[Read]] = field(default_factory=dict)

    def of_ref(self, ref: str) -> FieldType:
        """The schema of an input reference (``step`` or ``step.output``)."""
        up, _, port = ref.partition(".")
        if port:
            return self.ports.get(ref) or self.passing.get(up, ANY)
        return self.outputs.get(up, ANY)


def schemas(validated: Validated) -> dict[str, FieldType]:
    """The schema of each step's records (``step id -> FieldType``) of a validated file.

    Sources and transformations: their main output; destinations: what they receive. An
    unknown schema is :data:`~dataflare.record_schema.ANY`.
    """
    flow = validated.types
    return dict(flow.outputs) if flow is not None else {}


def check(doc: Document, wf: dict[str, Any], g: Graph) -> tuple[TypeFlow, list[Problem]]:
    """Derive every step's schema in DAG order and check every field read."""
    flow = TypeFlow()
    problems: list[Problem] = []
    dead_letters = {target for _, target in redirect_targets(wf)}
    for cid in g.order():
        section = g.kinds[cid]
        comp = (wf.get(section) or {}).get(cid)
        comp = comp if isinstance(comp, dict) else {}
        kind = SECTIONS[section]
        spec = registry.lookup(kind, g.types[cid])  # type: ignore[arg-type]
        config = g.configs.get(cid)
        if spec is None or not isinstance(config, spec.config):
            config = None  # invalid, or an id used twice (reported by the graph checks)
        refs = g.inputs.get(cid, []) if section != "sources" else []
        inputs = [flow.of_ref(ref) for ref in refs]
        if cid in dead_letters:  # also receives dead letters: {error, source, record}
            inputs.append(ANY)
        ctx: SchemaContext[Any] = SchemaContext(cid, config, inputs, refs, comp, wf)
        flow.inputs[cid] = inputs
        flow.passing[cid] = ctx.input
        if section == "sources":
            flow.outputs[cid] = sourced(_source_schema(comp, spec, ctx), cid)
            continue
        derived: FieldType | None = None
        if section == "destinations":
            _destination_reads(ctx, comp)
        if spec is not None and spec.schema is not None and config is not None:
            derived = spec.schema(ctx)
        flow.outputs[cid] = ctx.input if section == "destinations" else (derived or ANY)
        if spec is not None and spec.named_outputs is not None and config is not None:
            for port in spec.named_outputs(config):
                flow.ports.setdefault(f"{cid}.{port}", ctx.input)
        flow.reads[cid] = ctx.reads
        loc: Loc = ("workflow", section, cid)
        problems.extend(_check_reads(doc, loc, ctx))
        for note in ctx.notes:
            problems.append(doc.problem((*loc, *note.loc), note.message, severity=note.severity))
    problems.extend(_masking(doc, wf, flow, g))
    return flow, problems


def _source_schema(comp: Mapping[str, Any], spec: registry.ComponentSpec | None,
                   ctx: SchemaContext[Any]) -> FieldType:
    declared = comp.get("output_schema")
    if isinstance(declared, dict) and isinstance(declared.get("definition"), dict):
        return from_json_schema(declared["definition"], closed=False)
    if spec is not None and spec.schema is not None and ctx.config is not None:
        return spec.schema(ctx) or ANY
    return ANY


def _destination_reads(ctx: SchemaContext[Any], comp: Mapping[str, Any]) -> None:
    """The fields every destination may read: its ``filter`` and its ``merge_key``."""
    if isinstance(comp.get("filter"), str):
        ctx.read_expression(("filter",), comp["filter"], config=False)
    mode = comp.get("write_mode")
    keys = mode.get("merge_key") if isinstance(mode, dict) else None
    for i, key in enumerate([keys] if isinstance(keys, str) else keys or []):
        loc: Loc = ("write_mode", "merge_key") if isinstance(keys, str) else (
            "write_mode", "merge_key", i)
        if isinstance(key, str):
            ctx.read(loc, key, config=False)


def _at_column(doc: Document, loc: Loc, read: Read, problem: Problem) -> Problem:
    """The problem at the column of the path in an expression, when it can be told."""
    col = None if read.column is None else doc.column_of(loc, read.column)
    return problem if col is None else replace(problem, col=col)


def _check_reads(doc: Document, loc: Loc, ctx: SchemaContext[Any]) -> list[Problem]:
    out: list[Problem] = []
    for read in ctx.reads:
        base = read.schema or (ctx.input if read.input is None else ctx.at(read.input))
        found = base.get(read.path)
        refs = ctx.input_ids if read.input is None else ctx.input_ids[read.input:read.input + 1]
        origin = _records_of(refs)
        at = (*loc, *read.loc)
        if found is None:
            known = base.paths()
            hint = did_you_mean(read.path, known)
            shown = [p for p in known if "." not in p] if len(known) > _SHOWN else known
            more = ", ..." if len(shown) > _SHOWN else ""
            has = f"; they have: {', '.join(shown[:_SHOWN])}{more}" if known else ""
            given = at in doc.positions or (isinstance(at[-1], int) and at[:-1] in doc.positions)
            default = "" if given else f" ({read.loc[-1]} not set: its default)"
            out.append(_at_column(doc, at, read, doc.problem(
                at, f"{read.what} {read.path!r}{default} is not in the records {origin}{hint}"
                f"{has}", severity="warning")))
        elif read.path not in (listed := base.paths()) and (
                hint := did_you_mean(read.path, listed)):
            # a shape that may have more fields: only a near miss of a listed one is said
            out.append(_at_column(doc, at, read, doc.problem(
                at, f"{read.what} {read.path!r} is not in the records {origin} as their "
                f"schema lists them{hint}", severity="warning")))
        elif clashes(found, read.want):
            out.append(_at_column(doc, at, read, doc.problem(
                at,
                f"{read.what} {read.path!r} is {a_or_an(found.kind)} in the records {origin}, "
                f"{read.loc[-1] if isinstance(read.loc[-1], str) else read.loc[-2]} needs "
                f"{WANTS[read.want or '']}")))
    return out


_SHOWN = 12  # fields listed in a message at most


def _records_of(refs: list[str]) -> str:
    names = ", ".join(repr(r) for r in refs)
    return f"from {names}" if refs else "read"


def _masking(doc: Document, wf: dict[str, Any], flow: TypeFlow, g: Graph) -> list[Problem]:
    """A masking rule's field that no destination's records can have."""
    protection = wf.get("data_protection")
    rules = protection.get("masking_rules") if isinstance(protection, dict) else None
    dests = [cid for cid, s in g.kinds.items() if s == "destinations"]
    if not isinstance(rules, list) or not dests:
        return []
    out = []
    for i, rule in enumerate(rules):
        path = rule.get("field") if isinstance(rule, dict) else None
        if not isinstance(path, str):
            continue
        if rule.get("method") in ("partial", "full"):
            out.extend(_masked_keys(doc, wf, i, path, rule["method"]))
        if all(flow.outputs.get(d, ANY).get(path) is None for d in dests):
            known = sorted({p for d in dests for p in flow.outputs.get(d, ANY).paths()})
            out.append(doc.problem(
                ("workflow", "data_protection", "masking_rules", i, "field"),
                f"masking field {path!r} is in no destination's records"
                f"{did_you_mean(path, known)}", severity="warning"))
    return out


def _masked_keys(doc: Document, wf: dict[str, Any], i: int, path: str, method: str
                 ) -> list[Problem]:
    """Keys a destination reads from a field masking makes alike (``al****``).

    Masking comes before the write: a merge key made of it merges distinct records into
    one row, a Redis hash or string key overwrites them (errors); another key template
    gives them one key (a warning: a compacted Kafka topic keeps one of them).
    """
    from dataflare.template import placeholders

    def masked(key: str) -> bool:
        return key == path or key.startswith(f"{path}.") or path.startswith(f"{key}.")

    out = []
    for cid, comp in (wf.get("destinations") or {}).items():
        if not isinstance(comp, dict):
            continue
        mode = comp.get("write_mode")
        keys = mode.get("merge_key") if isinstance(mode, dict) else None
        for key in [keys] if isinstance(keys, str) else keys or []:
            if isinstance(key, str) and masked(key):
                out.append(doc.problem(
                    ("workflow", "destinations", cid, "write_mode", "merge_key"),
                    f"merge_key {key!r} is masked ({method}, data_protection.masking_rules"
                    f"[{i}]) before the write: distinct records would merge into one row; "
                    "mask it with method: hash, or merge on another field"))
        config = comp.get("config")
        config = config if isinstance(config, dict) else {}
        template = config.get("key_template")
        if isinstance(template, str) and any(masked(k) for k in placeholders(template)):
            # A Redis hash or string is overwritten: records are lost, not only keyed alike.
            lost = comp.get("type") == "redis" and config.get("data_structure", "hash") in (
                "hash", "string")
            out.append(doc.problem(
                ("workflow", "destinations", cid, "config", "key_template"),
                f"key_template reads {path!r}, masked ({method}, data_protection."
                f"masking_rules[{i}]) before the write: distinct records get one key"
                f"{' and overwrite each other' if lost else ''}; mask it with method: hash, "
                "or key on another field", severity="error" if lost else "warning",
                at_run=not lost))
    return out
