"""Validation: loaded YAML -> typed workflow model, with every problem located."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, SecretStr, ValidationError

from dataflare import encryption, registry, secrets
from dataflare.dsl_compiler import graph as graph_checks
from dataflare.dsl_compiler import types as type_flow
from dataflare.dsl_compiler.loader import Document, load
from dataflare.dsl_compiler.models import TestCase, Workflow, WorkflowFile
from dataflare.dsl_compiler.problems import Loc, Problem, did_you_mean
from dataflare.records import a_or_an

SOURCE_BLOCKS = ("incremental", "cdc", "streaming", "hybrid", "output_schema")
DESTINATION_BLOCKS = ("write_mode", "batch")


@dataclass
class Validated:
    """A validated workflow file: the typed model (when valid) and every problem."""

    file: str
    base_dir: Path
    document: Document
    workflow: Workflow | None = None
    tests: list[TestCase] = field(default_factory=list)
    graph: graph_checks.Graph | None = None
    types: type_flow.TypeFlow | None = None
    problems: list[Problem] = field(default_factory=list)

    def errors(self, for_run: bool = False) -> list[Problem]:
        """The problems that make the file invalid (``for_run``: that stop a run)."""
        return [p for p in self.problems if p.is_error(for_run)]


def validate_file(path: str | Path, env: Mapping[str, str] | None = None) -> Validated:
    """Load and validate a workflow file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        doc = Document(file=str(path), data=None)
        problem = Problem(str(path), 1, 1, "workflow", f"cannot read file: {exc.strerror}")
        return Validated(str(path), p.parent, doc, problems=[problem])
    return validate_text(text, str(path), env, base_dir=p.resolve().parent)


def validate_text(
    text: str,
    file: str = "<workflow>",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Validated:
    """Validate a workflow given as YAML text."""
    doc = load(text, file, env)
    out = Validated(file, base_dir or Path.cwd(), doc, problems=list(doc.problems))
    if doc.data is None:
        return _finish(out)
    secrets.collect(doc.data)  # before any message can quote a value
    if not isinstance(doc.data, dict) or not isinstance(doc.data.get("workflow"), dict):
        out.problems.append(doc.problem((), "a workflow file needs a top-level 'workflow:' block"))
        return _finish(out)
    wf = doc.data["workflow"]
    out.problems.extend(_normalize(doc, wf))

    generic: WorkflowFile | None = None
    try:
        generic = WorkflowFile.model_validate(doc.data)
        secrets.collect(generic)  # SecretStr settings: keys, tokens, passwords
    except ValidationError as exc:
        out.problems.extend(_problems(doc, exc, (), WorkflowFile))

    configs: dict[str, Any] = {}
    seen: set[str] = set()
    for section, kind in graph_checks.SECTIONS.items():
        comps = wf.get(section)
        if not isinstance(comps, dict):
            continue
        for cid, comp in comps.items():
            if not isinstance(comp, dict) or not isinstance(comp.get("type"), str):
                continue
            loc: Loc = ("workflow", section, cid)
            first = cid not in seen
            seen.add(cid)
            spec = registry.lookup(kind, comp["type"])  # type: ignore[arg-type]
            if spec is None:
                known = registry.names(kind)  # type: ignore[arg-type]
                hint = did_you_mean(comp["type"], known)
                out.problems.append(
                    doc.problem(
                        (*loc, "type"),
                        f"unknown {kind} type {comp['type']!r}{hint}; known: {', '.join(known)}",
                    )
                )
                continue
            raw = comp.get("config", {})
            config = None
            try:
                config = spec.config.model_validate({} if raw is None else raw)
                secrets.collect(config)  # SecretStr fields whatever their names
                if first:  # a duplicate id (refused) keeps the first's, as the graph does
                    configs[cid] = config
            except ValidationError as exc:
                out.problems.extend(_problems(doc, exc, (*loc, "config"), spec.config))
            missing = spec.missing()
            if missing:
                out.problems.append(doc.problem(
                    (*loc, "type"),
                    f"{kind} type {spec.type!r} needs {', '.join(missing)}, not installed: "
                    f"pip install 'dataflare[{spec.extra}]'"))
            out.problems.extend(_blocks_without_effect(doc, loc, kind, spec, comp, config))
            out.problems.extend(_blocks_of_other_modes(doc, loc, kind, spec, comp))
            out.problems.extend(_write_mode_fields(doc, loc, kind, spec, comp))
            out.problems.extend(_config_without_effect(doc, loc, spec, config))
            out.problems.extend(_written_secrets(doc, (*loc, "config"), config))
            eh = comp.get("error_handling")
            if isinstance(eh, dict) and eh.get("redirect_to") and eh.get(
                    "strategy", "fail") != "redirect":
                out.problems.append(doc.problem(
                    (*loc, "error_handling", "redirect_to"),
                    f"'redirect_to' has no effect with strategy {eh.get('strategy', 'fail')!r}"
                    " (failed records go there with strategy 'redirect')", key=True,
                    severity="warning"))
            if comp.get("serve") is True and not spec.serves:
                servable = sorted(s.type for s in registry.specs("transformation") if s.serves)
                out.problems.append(doc.problem(
                    (*loc, "serve"), f"{a_or_an(spec.type)} step has no state to serve; 'serve' "
                    f"works on: {', '.join(servable)}", key=True))
            if not spec.available:
                out.problems.append(
                    doc.problem(
                        (*loc, "type"),
                        f"{kind} type {spec.type!r} is {spec.planned or 'not available yet'}",
                        severity="warning",
                        at_run=True,
                    )
                )

    out.problems.extend(_not_effective(doc, wf))
    env_block = wf.get("environment")  # a variable named like a secret, its value written
    if isinstance(env_block, dict):
        out.problems.extend(_written_secrets(doc, ("workflow", "environment"), {
            k: v for k, v in env_block.items() if isinstance(v, str)}))

    out.problems.extend(_protection_problems(doc, wf, configs))
    out.graph, graph_problems = graph_checks.check(doc, wf, configs)
    out.problems.extend(graph_problems)
    out.types, type_problems = type_flow.check(doc, wf, out.graph)
    out.problems.extend(type_problems)
    out.problems.extend(_test_problems(doc, wf))

    if generic is not None and not any(p.severity == "error" for p in out.problems):
        workflow = _with_configs(generic.workflow, configs)
        out.problems.extend(_source_settings(doc, workflow, out.base_dir))
        if not any(p.severity == "error" for p in out.problems):
            out.workflow = workflow
            out.tests = [*generic.tests, *generic.workflow.tests]
    return _finish(out)


_SOURCE_PREFIX = re.compile(r"^(source|step) '[^']*': ")
_NAMED = re.compile(r"\b(config\.\w+|incremental|cdc|hybrid|mode)\b")  # where a message points


def _source_settings(doc: Document, wf: Workflow, base_dir: Path) -> list[Problem]:
    """The sources' own checks of how their settings combine (a mode and its blocks).

    A source type checks these when it is built, which does not connect to anything: each
    source is built here so that ``validate`` reports them with the others, at the block
    they concern (``mode``, ``incremental``...) where the source gives one. Only DataFlare's
    own types: a third-party one may connect when built.
    """
    out = []
    raw = doc.data["workflow"].get("sources") or {}
    for cid, comp in wf.sources.items():
        spec = registry.lookup("source", comp.type)
        if (spec is None or spec.build is None or spec.missing() or _unresolved(raw.get(cid))
                or not spec.build.__module__.startswith("dataflare.")):
            continue  # a variable not set here may be where it runs
        try:
            spec.build(registry.BuildContext(cid, "source", comp, comp.config, wf, base_dir))
        except ValueError as exc:
            message = _SOURCE_PREFIX.sub("", str(exc))
            loc: Loc = ("workflow", "sources", cid)
            named = [tuple(m.split(".")) for m in _NAMED.findall(message) if (
                m in comp.model_fields_set if "." not in m
                else m[7:] in comp.config.model_fields_set)]
            out.append(doc.problem((*loc, *named[0]) if named else loc, message, key=True))
    return out


# Settings the DSL accepts that nothing carries out yet: warned at validate and at run
# (``validate --strict`` fails on them), never ignored in silence.
_NOT_EFFECTIVE = {
    "roles": "roles in a workflow file are not used: the server's --config file holds users, "
             "tokens and roles",
}


def _not_effective(doc: Document, wf: dict[str, Any]) -> list[Problem]:
    out = []
    if wf.get("roles"):
        out.append(doc.problem(("workflow", "roles"), _NOT_EFFECTIVE["roles"],
                               severity="warning"))
    return out


def _config_without_effect(
    doc: Document, loc: Loc, spec: registry.ComponentSpec, config: Any
) -> list[Problem]:
    """Settings a component's other settings make idle: warned, with their lines.

    A trailing aggregate's ``window`` cannot work without ``time_field``: a warning of
    ``validate`` (the seed's own workflow has one), an error of ``run``.
    """
    if config is None:
        return []
    given = config.model_fields_set
    found: list[tuple[str, str, bool]] = []  # (field, message, an error at run)
    if spec.type == "aggregation" and config.time_field is None:
        trailing = [repr(a.field) for a in config.aggregations if a.window is not None]
        if trailing:
            found.append(("aggregations", f"the trailing 'window' of {', '.join(trailing)} "
                          "is measured on the event time 'time_field', which is not set", True))
    elif spec.type == "data_quality" and config.on_failure == "drop" and "quarantine_to" in given:
        found.append(("quarantine_to", "'quarantine_to' has no effect with on_failure: drop "
                      "(failed records are dropped; 'quarantine' sends them there)", False))
    elif spec.type == "join" and config.mode == "relational" and config.window is None:
        idle = [f for f in ("time_field", "left_time_field", "right_time_field", "time_unit",
                            "allowed_lateness", "late_to") if f in given]
        found += [(f, f"{f!r} has no effect on a join without 'window' (it joins when an "
                   "input ends, whatever the times)", False) for f in idle]
    elif spec.type == "dedupe" and "time_unit" in given and config.time_field is None:
        found.append(("time_unit", "'time_unit' has no effect without 'time_field' (times "
                      "are then arrival times)", False))
    elif spec.type == "mapping" and config.drop and not config.keep_unmapped:
        found.append(("drop", "'drop' has no effect without keep_unmapped: true (only the "
                      "mapped fields are kept anyway)", False))
    elif spec.type == "file" and spec.kind == "source" and "csv" in given:
        fmt = config.format or _file_format(config.path)
        if fmt not in (None, "csv"):
            found.append(("csv", f"'csv' has no effect on a {fmt} file", False))
    return [doc.problem((*loc, "config", f), message, key=True, severity="warning",
                        at_run=at_run) for f, message, at_run in found]


# A connection string is a secret for its password only (``user:pw@``, ``password=``).
_CONNECTION = re.compile(r"(dsn|url|uri|connection_string)$")
_PASSWORD_IN = re.compile(r"://[^/@:]*:[^/@]+@|password\s*=", re.IGNORECASE)


def _secret_paths(value: Any, loc: Loc) -> Iterator[Loc]:
    """The places of the non-empty secret values in a validated config."""
    if isinstance(value, SecretStr):
        text = value.get_secret_value()
        if (text and "${" not in text  # an unset variable is left as written
                and (not _CONNECTION.search(str(loc[-1])) or _PASSWORD_IN.search(text))):
            yield loc
    elif isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            yield from _secret_paths(getattr(value, name), (*loc, field.alias or name))
    elif isinstance(value, str) and "://" in value and "?" in value and "{{" not in value:
        query = parse_qs(urlsplit(value).query)  # a URL whose query holds a key
        if any(secrets.SECRET_KEY.search(k) and "${" not in v[0] for k, v in query.items()):
            yield loc
    elif isinstance(value, dict):  # headers, query parameters, client properties
        for key, item in value.items():
            if (isinstance(item, str) and item and secrets.SECRET_KEY.search(str(key))
                    and "${" not in item and "{{" not in item):  # not a record's value
                yield (*loc, key)
            else:
                yield from _secret_paths(item, (*loc, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _secret_paths(item, (*loc, i))


def _written_secrets(doc: Document, loc: Loc, config: Any) -> list[Problem]:
    """Warn of secrets written in the workflow's text rather than given as ``${VAR}``."""
    if config is None:
        return []
    return [doc.problem(where, "a secret written in the workflow: whoever reads the workflow "
                        "(its file, its revisions on the server, the server's viewers) reads "
                        "it; give it as ${VAR}", severity="warning")
            for where in _secret_paths(config, loc)
            if where in doc.positions and where not in doc.templates]


def _unresolved(value: Any) -> bool:
    """Whether ``value`` holds a ``${...}`` left as written (a variable not set)."""
    if isinstance(value, dict):
        return any(_unresolved(v) for v in value.values())
    if isinstance(value, list):
        return any(_unresolved(v) for v in value)
    return isinstance(value, str) and "${" in value


def _file_format(path: str) -> str | None:
    from dataflare.connectors.file import file_format

    try:
        return file_format(path, None, "")
    except ValueError:
        return None


def _protection_problems(
    doc: Document, wf: dict[str, Any], configs: dict[str, Any]
) -> list[Problem]:
    """Encryption settings that cannot hold: warnings of ``validate``, errors of ``run``."""
    protection = wf.get("data_protection")
    enc = protection.get("encryption") if isinstance(protection, dict) else None
    if not isinstance(enc, dict):
        return []
    at: Loc = ("workflow", "data_protection", "encryption")
    out: list[Problem] = []
    if enc.get("key_management") not in (None, "", "local"):
        out.append(doc.problem((*at, "key_management"),
                               f"key service {enc['key_management']!r} is not available "
                               "(no external key service is supported)",
                               severity="warning", at_run=True))
    if enc.get("at_rest") is True and not (enc.get("fields") and enc.get("key")):
        out.append(doc.problem((*at, "at_rest"),
                               "at_rest encrypts the listed 'fields' under 'key'; "
                               "whole-store encryption is not available",
                               severity="warning", at_run=True))
    elif enc.get("fields") and enc.get("at_rest") is not True:
        out.append(doc.problem((*at, "fields"), "fields are encrypted only with at_rest: true",
                               severity="warning", at_run=True))
    if enc.get("in_transit") is True:
        sections = {cid: section for section in ("sources", "destinations")
                    for cid in (wf.get(section) or {})}
        for cid, message in encryption.in_transit_problems(
            {cid: cfg for cid, cfg in configs.items() if cid in sections}
        ):
            out.append(doc.problem(("workflow", sections[cid], cid, "config"),
                                   f"{sections[cid][:-1]} {cid!r}: {message}",
                                   severity="warning", at_run=True))
        for loc, reason in encryption.step_connections(wf):
            out.append(doc.problem(("workflow", *loc), "data_protection.encryption.in_transit "
                                   f"requires TLS: {reason}", severity="warning", at_run=True))
    return out


# The source blocks each mode reads (hybrid: its first phase's and its second's).
_MODE_BLOCKS = {"full": set(), "incremental": {"incremental"}, "cdc": {"cdc"},
                "hybrid": {"hybrid", "cdc", "incremental"}}


def _blocks_of_other_modes(doc: Document, loc: Loc, kind: str, spec: registry.ComponentSpec,
                           comp: dict[str, Any]) -> list[Problem]:
    """Warnings for a source's blocks its (given) mode does not read: `cdc` in full mode."""
    mode = comp.get("mode")
    blocks = spec.blocks or ()
    if kind != "source" or "mode" not in blocks or mode not in _MODE_BLOCKS:
        return []
    return [doc.problem((*loc, block), f"{block!r} has no effect in mode {mode!r}", key=True,
                        severity="warning")
            for block in ("incremental", "cdc", "hybrid")
            if block in comp and block in blocks and block not in _MODE_BLOCKS[mode]]


def _blocks_without_effect(
    doc: Document, loc: Loc, kind: str, spec: registry.ComponentSpec, comp: dict[str, Any],
    config: Any = None,
) -> list[Problem]:
    """Warnings for the blocks the component's type ignores; errors for types it refuses.

    A type lists in ``blocks`` the blocks it acts on, a block as ``name=type`` when it acts
    on those of its types only (a file destination: ``write_mode=append``); ``blocks_for``
    when they depend on its (valid) ``config``. An ignored block changes nothing, but a
    type of it (``write_mode: {type: merge}`` on files) would be done as another one.
    """
    out = []
    acts = spec.blocks
    if spec.blocks_for is not None and config is not None:
        acts = spec.blocks_for(config)
    for block in registry.TYPE_BLOCKS.get(kind, ()):
        if acts is None or block not in comp or block in acts:
            continue
        types = sorted(b.split("=", 1)[1] for b in acts if b.startswith(f"{block}="))
        given = comp[block].get("type") if isinstance(comp[block], dict) else None
        if not types:
            message = f"{block!r} has no effect on a {kind} of type {spec.type!r}"
        elif given is None or given in types:
            continue
        else:
            where = " with this config" if acts != spec.blocks else ""
            out.append(doc.problem((*loc, block, "type"), (
                f"{block} {given!r} is not supported by a {kind} of type {spec.type!r}{where}; "
                f"it supports: {', '.join(types)}")))
            continue
        out.append(doc.problem((*loc, block), message, key=True, severity="warning"))
    return out


def _write_mode_fields(doc: Document, loc: Loc, kind: str, spec: registry.ComponentSpec,
                       comp: dict[str, Any]) -> list[Problem]:
    """Warnings for ``merge_key`` / ``deduplicate`` where they do nothing.

    Only table destinations (whose type acts on the whole ``write_mode`` block) key their
    writes; ``deduplicate`` there needs a ``merge_key``.
    """
    wm = comp.get("write_mode")
    blocks = spec.blocks or ()
    if kind != "destination" or not isinstance(wm, dict) or not any(
            b.split("=", 1)[0] == "write_mode" for b in blocks):
        return []  # no write_mode block at all is warned as a whole
    table = "write_mode" in blocks
    if not table and f"write_mode={wm.get('type', 'append')}" not in blocks:
        return []  # the write mode itself is warned
    out = []
    for name in ("merge_key", "deduplicate"):
        if wm.get(name) and not table:
            out.append(doc.problem((*loc, "write_mode", name), f"{name!r} has no effect on a "
                                   f"destination of type {spec.type!r}", key=True,
                                   severity="warning"))
    if table and wm.get("deduplicate") and not wm.get("merge_key"):
        out.append(doc.problem((*loc, "write_mode", "deduplicate"), "'deduplicate' has no "
                               "effect without 'merge_key' (the key whose last record a batch "
                               "keeps)", key=True, severity="warning"))
    kind_of = wm.get("type", "append")
    if table and wm.get("merge_key") and kind_of != "merge" and not wm.get("deduplicate"):
        out.append(doc.problem((*loc, "write_mode", "merge_key"), f"'merge_key' has no "
                               f"effect on {a_or_an(str(kind_of))} without deduplicate (type: "
                               "merge upserts on it)", key=True, severity="warning"))
    return out


def _test_problems(doc: Document, wf: dict[str, Any]) -> list[Problem]:
    """Tests whose inputs name no source, or whose expectations name no destination."""
    out = []
    roots: list[tuple[Loc, Any]] = [(("tests",), doc.data.get("tests")),
                                    (("workflow", "tests"), wf.get("tests"))]
    for root, cases in roots:
        for i, case in enumerate(cases if isinstance(cases, list) else []):
            if not isinstance(case, dict):
                continue
            for part, section in (("inputs", "sources"), ("expect", "destinations")):
                known = list(wf.get(section) or {}) if isinstance(wf.get(section), dict) else []
                names = case.get(part)
                for name in names if isinstance(names, dict) else {}:
                    if name not in known:
                        message = f"no {section[:-1]} named {name!r}{did_you_mean(name, known)}"
                        out.append(doc.problem((*root, i, part, name), message, key=True))
    return out


def _finish(out: Validated) -> Validated:
    out.problems = sorted(set(out.problems), key=lambda p: (p.line, p.col, p.path, p.message))
    return out


def _normalize(doc: Document, wf: dict[str, Any]) -> list[Problem]:
    """Move blocks the DSL allows inside ``config:`` to the component level."""
    problems: list[Problem] = []
    for section, blocks in (("sources", SOURCE_BLOCKS), ("destinations", DESTINATION_BLOCKS)):
        comps = wf.get(section)
        if not isinstance(comps, dict):
            continue
        for cid, comp in comps.items():
            cfg = comp.get("config") if isinstance(comp, dict) else None
            if not isinstance(cfg, dict):
                continue
            for block in blocks:
                if block not in cfg:
                    continue
                old = ("workflow", section, cid, "config", block)
                if block in comp:
                    problems.append(
                        doc.problem(
                            old,
                            f"'{block}' is given both in 'config' and beside it; keep one",
                            key=True,
                        )
                    )
                    continue
                comp[block] = cfg.pop(block)
                doc.move(old, ("workflow", section, cid, block))
    return problems


def _with_configs(wf: Workflow, configs: dict[str, Any]) -> Workflow:
    update: dict[str, Any] = {}
    for section in graph_checks.SECTIONS:
        comps = getattr(wf, section)
        update[section] = {
            cid: comp.model_copy(update={"config": configs[cid]}) for cid, comp in comps.items()
        }
    return wf.model_copy(update=update)


def _field_type(tp: Any, part: str | int) -> Any:
    """The annotation reached from type ``tp`` by one step ``part`` of a location."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _field_type(args[0], part)
    if origin in (Union, types.UnionType):
        for arg in args:
            if arg is not type(None):
                found = _field_type(arg, part)
                if found is not None:
                    return found
        return None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        info = tp.model_fields.get(str(part))
        return info.annotation if info else None
    if origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
        return args[0]
    if origin is dict and args:
        return args[1]
    return None


def _model_fields(model: type[BaseModel], path: Loc) -> list[str]:
    tp: Any = model
    for part in path:
        tp = _field_type(tp, part)
        if tp is None:
            return []
    while typing.get_origin(tp) in (Union, types.UnionType, Annotated):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or name for name, f in tp.model_fields.items()]
    return []


_EXPECTED = {"tuple_type": "a list", "list_type": "a list", "dict_type": "a mapping",
             "model_type": "a mapping", "model_attributes_type": "a mapping"}


def _problems(
    doc: Document, exc: ValidationError, root: Loc, model: type[BaseModel]
) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc: Loc = tuple(err["loc"])
        full = (*root, *loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            key = loc[-1]
            known = _model_fields(model, loc[:-1])
            hint = did_you_mean(str(key), known)
            tail = f"; known: {', '.join(known)}" if known else ""
            out.append(doc.problem(full, f"unknown key {key!r}{hint}{tail}", key=True))
            continue
        if kind == "missing":
            out.append(doc.problem(full[:-1], f"missing required key {loc[-1]!r}"))
            continue
        message = re.sub(r"^(Value error|Assertion failed), ", "", err["msg"])
        message = message[:1].lower() + message[1:]
        value = err.get("input")
        if value is None and kind in _EXPECTED:  # a key written with nothing after it
            message = f"no value given: expected {_EXPECTED[kind]}"
        if kind == "literal_error":
            known = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
            hint = did_you_mean(str(value), known)
            message = f"unknown value {value!r}{hint}; expected one of: {', '.join(known)}"
        elif isinstance(value, str | int | float | bool) and str(value) not in message:
            if full in doc.templates:
                message += f" (got {doc.templates[full]!r})"
            elif not any(secrets.SECRET_KEY.search(str(p)) for p in full if isinstance(p, str)):
                message += f" (got {value!r})"
            if isinstance(value, bool) and kind == "string_type":
                message += (": YAML reads an unquoted on/off/yes/no/true/false as a boolean; "
                            "quote it")
        out.append(doc.problem(full, message))
    return out
