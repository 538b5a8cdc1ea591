"""Graph checks: inputs that name nothing, cycles, arity, ids and dangling references."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dataflare import registry
from dataflare.dsl_compiler.loader import Document
from dataflare.dsl_compiler.models import ID_PATTERN
from dataflare.dsl_compiler.problems import Loc, Problem, did_you_mean
from dataflare.records import META, a_or_an, parse_duration

SECTIONS = {"sources": "source", "transformations": "transformation", "destinations": "destination"}


@dataclass
class Graph:
    """The workflow's components and edges, as read from the (normalized) YAML data."""

    kinds: dict[str, str] = field(default_factory=dict)  # id -> section
    types: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, list[str]] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)  # typed configs that validated

    def upstream(self, ref: str) -> str:
        """The component id of an input reference (``router.route`` -> ``router``)."""
        return ref.split(".", 1)[0]

    def consumers(self) -> dict[str, list[str]]:
        """For every component id, the ids that read it."""
        out: dict[str, list[str]] = {cid: [] for cid in self.kinds}
        for cid, refs in self.inputs.items():
            for ref in refs:
                up = self.upstream(ref)
                if up in out and cid not in out[up]:
                    out[up].append(cid)
        return out

    def order(self) -> list[str]:
        """Component ids in an order where every component comes after its inputs."""
        seen: set[str] = set()
        out: list[str] = []

        def visit(cid: str) -> None:
            if cid in seen:
                return
            seen.add(cid)
            for ref in self.inputs.get(cid, []):
                up = self.upstream(ref)
                if up in self.kinds:
                    visit(up)
            out.append(cid)

        for cid in self.kinds:
            visit(cid)
        return out


def redirect_targets(wf: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Every ``*_to`` reference to a destination: ``error_handling.redirect_to``, ``late_to``."""
    out: list[tuple[tuple[Any, ...], str]] = []
    for section in SECTIONS:
        comps = wf.get(section)
        if not isinstance(comps, dict):
            continue
        for cid, comp in comps.items():
            if not isinstance(comp, dict):
                continue
            eh = comp.get("error_handling")
            if isinstance(eh, dict) and isinstance(eh.get("redirect_to"), str):
                loc = ("workflow", section, cid, "error_handling", "redirect_to")
                out.append((loc, eh["redirect_to"]))
            cfg = comp.get("config")
            if isinstance(cfg, dict):
                for key, value in cfg.items():
                    if key.endswith("_to") and isinstance(value, str):
                        out.append((("workflow", section, cid, "config", key), value))
    return out


def build_graph(wf: dict[str, Any], configs: dict[str, Any]) -> Graph:
    """The graph of a workflow's raw data."""
    g = Graph(configs=configs)
    for section in SECTIONS:
        comps = wf.get(section)
        if not isinstance(comps, dict):
            continue
        for cid, comp in comps.items():
            if cid in g.kinds:
                continue
            g.kinds[cid] = section
            comp = comp if isinstance(comp, dict) else {}
            g.types[cid] = str(comp.get("type", ""))
            refs = comp.get("inputs", [])
            refs = refs if isinstance(refs, list) else []
            g.inputs[cid] = [r for r in refs if isinstance(r, str)]
    return g


def check(
    doc: Document, wf: dict[str, Any], configs: dict[str, Any]
) -> tuple[Graph, list[Problem]]:
    """Check the workflow graph; returns the graph and every problem found."""
    problems: list[Problem] = []
    g = build_graph(wf, configs)
    first_section: dict[str, str] = {}
    for section in SECTIONS:
        comps = wf.get(section)
        if not isinstance(comps, dict):
            continue
        for cid in comps:
            loc: tuple[str | int, ...] = ("workflow", section, cid)
            if not ID_PATTERN.match(str(cid)):
                problems.append(
                    doc.problem(
                        loc,
                        f"invalid id {cid!r}: use letters, digits, '_' and '-' "
                        "(no '.': it separates a router's id from a route name)",
                        key=True,
                    )
                )
            if cid in first_section:
                problems.append(
                    doc.problem(
                        loc, f"duplicate id {cid!r}: already used in {first_section[cid]}", key=True
                    )
                )
            else:
                first_section[cid] = section

    readable = [cid for cid, s in g.kinds.items() if s != "destinations"]
    targets = {ref for _, ref in redirect_targets(wf)}
    for cid, refs in g.inputs.items():
        section = g.kinds[cid]
        if section == "sources":
            continue
        for i, ref in enumerate(refs):
            loc = ("workflow", section, cid, "inputs", i)
            up, _, port = ref.partition(".")
            if up not in g.kinds:
                hint = did_you_mean(up, readable)
                problems.append(doc.problem(loc, f"input {ref!r} names nothing{hint}"))
                continue
            if g.kinds[up] == "destinations":
                problems.append(
                    doc.problem(loc, f"input {ref!r} is a destination; inputs are sources or "
                                "transformations")
                )
                continue
            up_spec = registry.lookup("transformation", g.types[up]) if g.kinds[up] == (
                "transformations") else None
            if (not port and up_spec is not None and not up_spec.main_output
                    and up_spec.named_outputs and up in configs):
                listed = ", ".join(f"{up}.{p}" for p in up_spec.named_outputs(configs[up]))
                problems.append(
                    doc.problem(loc, f"input {ref!r} is {a_or_an(g.types[up])}; read one of its "
                                f"outputs: {listed}")
                )
            if port:
                spec = up_spec
                if spec is None or spec.named_outputs is None:
                    problems.append(
                        doc.problem(loc, f"input {ref!r}: {up!r} has no named outputs")
                    )
                elif up in configs:
                    ports = spec.named_outputs(configs[up])
                    if port not in ports:
                        hint = did_you_mean(port, ports)
                        problems.append(
                            doc.problem(
                                loc,
                                f"input {ref!r}: {up!r} has no output {port!r}{hint} "
                                f"(outputs: {', '.join(ports)})",
                            )
                        )
        kind = SECTIONS[section]
        spec = registry.lookup(kind, g.types[cid])  # type: ignore[arg-type]
        if spec is not None and kind == "transformation":
            least, most = spec.inputs
            n = len(refs)
            if n < least or (most is not None and n > most):
                want = f"exactly {least}" if least == most else (
                    f"at least {least}" if most is None else f"{least} to {most}")
                problems.append(
                    doc.problem(
                        ("workflow", section, cid, "inputs"),
                        f"{a_or_an(g.types[cid])} takes {want} input(s), got {n}",
                    )
                )
        if section == "destinations" and not refs and cid not in targets:
            problems.append(
                doc.problem(("workflow", section, cid), f"destination {cid!r} has no inputs",
                            key=True)
            )

    problems.extend(_cycles(doc, g))
    problems.extend(_advice(doc, wf, g))

    consumers = g.consumers()
    for cid, section in g.kinds.items():
        if section != "destinations" and not consumers.get(cid):
            what = "source" if section == "sources" else "transformation"
            problems.append(
                doc.problem(
                    ("workflow", section, cid),
                    f"{what} {cid!r} feeds nothing",
                    key=True,
                    severity="warning",
                )
            )

    for ref_loc, target in redirect_targets(wf):
        target_section = g.kinds.get(target)
        if target_section is None:
            hint = did_you_mean(target, [c for c, s in g.kinds.items() if s == "destinations"])
            problems.append(
                doc.problem(
                    ref_loc,
                    f"{ref_loc[-1]} {target!r} names no destination{hint}",
                    severity="warning",
                    at_run=True,
                )
            )
        elif target_section != "destinations":
            problems.append(
                doc.problem(ref_loc, f"{ref_loc[-1]} {target!r} is not a destination")
            )

    problems.extend(_unpositioned_appends(doc, wf, g))
    problems.extend(_writes_to_meta(doc, wf))
    plugins = wf.get("plugins") if isinstance(wf.get("plugins"), dict) else {}
    comps = wf.get("transformations")
    for cid, comp in (comps.items() if isinstance(comps, dict) else []):
        if not isinstance(comp, dict) or comp.get("type") not in ("plugin", "custom"):
            continue  # elsewhere `plugin` is warned of as having no effect
        name = comp.get("plugin")
        formula = isinstance(comp.get("config"), dict) and "formula" in comp["config"]
        if isinstance(name, str) and name not in (plugins or {}) and not formula:
            hint = did_you_mean(name, list(plugins or {}))
            problems.append(doc.problem(("workflow", "transformations", cid, "plugin"),
                                        f"plugin {name!r} is not defined in 'plugins'{hint}"))
        elif isinstance(name, str) and isinstance(comp.get("config"), dict):
            limits = sorted({"timeout", "memory_limit"} & set(comp["config"]))
            if limits and isinstance((plugins or {}).get(name), dict):  # handed over as data
                problems.append(doc.problem(
                    ("workflow", "transformations", cid, "config", limits[0]),
                    f"{', '.join(map(repr, limits))} in a step's config is a setting handed "
                    f"to the plugin, not a limit of its calls: set it on plugins.{name}",
                    key=True, severity="warning"))
        if name is None and not formula:
            problems.append(doc.problem(
                ("workflow", "transformations", cid), f"a {comp['type']} step needs 'plugin' "
                "(one of 'plugins'), or config.formula and config.output_field", key=True))
    return g, problems


_OUTPUT_KEYS = frozenset({"destination", "output_field", "as"})
"""Config keys naming the field a transformation writes."""


def _writes_to_meta(doc: Document, wf: dict[str, Any]) -> list[Problem]:
    """Fields a transformation would write under ``_meta``: where a record came from.

    Error messages, dead letters and exactly-once appends read the position there.
    """
    out: list[Problem] = []

    def walk(value: Any, loc: Loc) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k in _OUTPUT_KEYS and isinstance(v, str) and v.split(".", 1)[0] == META:
                    out.append(doc.problem((*loc, k), f"{k} {v!r} is under {META!r}, which "
                                           "holds where a record came from: write elsewhere"))
                else:
                    walk(v, (*loc, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, (*loc, i))

    comps = wf.get("transformations")
    for cid, comp in (comps.items() if isinstance(comps, dict) else []):
        if isinstance(comp, dict):
            walk(comp.get("config"), ("workflow", "transformations", cid, "config"))
    return out


def _cycles(doc: Document, g: Graph) -> list[Problem]:
    """One problem per cycle among the components, naming the cycle."""
    problems: list[Problem] = []
    state: dict[str, int] = {}
    stack: list[str] = []
    reported: set[frozenset[str]] = set()

    def visit(cid: str) -> None:
        state[cid] = 1
        stack.append(cid)
        for ref in g.inputs.get(cid, []):
            up = g.upstream(ref)
            if up not in g.kinds:
                continue
            if state.get(up) == 1:
                cycle = [*stack[stack.index(up) :], up]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    path = " -> ".join(reversed(cycle))
                    problems.append(
                        doc.problem(
                            ("workflow", g.kinds[cid], cid, "inputs"), f"cycle: {path}"
                        )
                    )
            elif state.get(up) is None:
                visit(up)
        stack.pop()
        state[cid] = 2

    for cid in g.kinds:
        if cid not in state:
            visit(cid)
    return problems


def _upstream(g: Graph, refs: list[str]) -> list[str]:
    """The components feeding the inputs ``refs``, directly or not (nearest first)."""
    found: list[str] = []
    todo = list(refs)
    while todo:
        up = g.upstream(todo.pop(0))
        if up in found or up not in g.kinds:
            continue
        found.append(up)
        if g.kinds[up] != "sources":
            todo.extend(g.inputs.get(up, []))
    return found


def _upstream_sources(wf: dict[str, Any], g: Graph, cid: str,
                      refs: list[str] | None = None) -> list[Any]:
    """The (raw) sources feeding ``cid`` (or only its inputs ``refs``), directly or not."""
    ups = _upstream(g, g.inputs.get(cid, []) if refs is None else refs)
    return [wf["sources"].get(up) for up in ups if g.kinds[up] == "sources"]


# Sources whose records carry a position a SQL table's append records (offset, line).
_POSITIONED = {"kafka", "file", "s3"}
_SQL_TABLES = {"postgres", "duckdb", "snowflake"}


def _unpositioned_appends(doc: Document, wf: dict[str, Any], g: Graph) -> list[Problem]:
    """Warn of SQL appends of records without ordered positions: at least once after a crash.

    Records carry no position from some sources (an API, a database), and none, or none
    in order, once a stateful step has made them (a window's aggregates, a join's pairs)
    or reordered them across its shards.
    """
    out = []
    for cid, section in g.kinds.items():
        comp = wf["destinations"].get(cid) if section == "destinations" else None
        if not isinstance(comp, dict) or g.types.get(cid) not in _SQL_TABLES:
            continue
        mode = comp.get("write_mode")
        if (mode.get("type", "append") if isinstance(mode, dict) else "append") != "append":
            continue
        ups = _upstream(g, g.inputs.get(cid, []))
        loose = sorted(u for u in ups if g.kinds[u] == "sources"
                       and g.types.get(u) not in _POSITIONED)
        made = [u for u in ups if g.kinds[u] == "transformations" and _stateful(g.types.get(u))]
        why = []
        if loose:
            why.append(f"the records of {', '.join(repr(s) for s in loose)} carry no source "
                       "position (as a Kafka offset or a file line)")
        if made:
            names = ", ".join(repr(s) for s in made)
            why.append(f"{names} (a stateful step) makes new records or reorders them, so they "
                       "carry no ordered position" if len(made) == 1 else
                       f"{names} (stateful steps) make new records or reorder them, so they "
                       "carry no ordered position")
        if why:
            where = ("workflow", "destinations", cid,
                     "write_mode" if isinstance(mode, dict) else "type")
            out.append(doc.problem(where, (
                f"{'; '.join(why)}: appended, a crash and resume may write some twice; use "
                "write_mode {type: merge, merge_key: ...} for exactly once"), severity="warning"))
    return out


def _stateful(type_name: str | None) -> bool:
    spec = registry.lookup("transformation", type_name) if type_name else None
    return spec is not None and spec.stateful


def _upstream_modes(wf: dict[str, Any], g: Graph, cid: str) -> list[set[str]]:
    """Per input of ``cid``, the extraction modes of the sources feeding it.

    ``''`` stands for a source without a mode.

    A source whose config sets ``stop_at_end: true`` ends by itself: its mode counts as
    ``full`` whatever it reads (a CDC catch-up, a Kafka topic up to its end offsets).
    """
    def mode(src: Any) -> str:
        if not isinstance(src, dict):
            return ""
        config = src.get("config")
        if isinstance(config, dict) and config.get("stop_at_end") is True:
            return "full"
        return str(src.get("mode") or "")

    return [{mode(src) for src in _upstream_sources(wf, g, cid, [ref])}
            for ref in g.inputs.get(cid, [])]


def _with_source_lateness(wf: dict[str, Any], g: Graph, cid: str, config: Any) -> Any:
    """``config`` as the compiler builds it (its unset ``allowed_lateness`` from the sources).

    The largest ``streaming.watermark_delay`` of the sources (as the compiler does), so that
    advice about the lateness judges the value the step will run with.
    """
    if "allowed_lateness" not in type(config).model_fields or (
            "allowed_lateness" in config.model_fields_set):
        return config
    delays: list[float] = []
    for src in _upstream_sources(wf, g, cid):
        streaming = src.get("streaming") if isinstance(src, dict) else None
        delay = streaming.get("watermark_delay") if isinstance(streaming, dict) else None
        try:
            delays += [] if delay is None else [parse_duration(delay)]
        except ValueError:
            return config
    if not delays:
        return config
    return config.model_copy(update={"allowed_lateness": max(delays)})


def _advice(doc: Document, wf: dict[str, Any], g: Graph) -> list[Problem]:
    """Warnings of component types about valid but doubtful configurations."""
    out = []
    for cid, section in g.kinds.items():
        if section != "transformations" or cid not in g.configs:
            continue
        spec = registry.lookup("transformation", g.types[cid])
        # An id used twice (reported) may hold another section's config.
        if spec is None or spec.advise is None or not isinstance(g.configs[cid], spec.config):
            continue
        config = _with_source_lateness(wf, g, cid, g.configs[cid])
        for message in spec.advise(config, _upstream_modes(wf, g, cid)):
            out.append(doc.problem(("workflow", section, cid, "config"), message,
                                   severity="warning"))
    return out

