"""``dataflare plan``: what a changed workflow does before it runs, like ``terraform plan``.

A plan compares a workflow with what it replaces: another workflow file (``--against``)
or a run's recovery directory (``--recovery-dir``), which holds the saved state and, since
runs record it there, the workflow of that run. It reports

- steps added, removed and changed (settings that differ, secrets compared but not shown);
- for each stateful step whether its saved state resumes, is dropped (the step is gone) or
  blocks the resume: the definitions are compared exactly as a resumed shard compares them
  (:class:`~dataflare.operators.keyed.ShardLogic`), the old ones read from the recovery
  snapshots themselves when a recovery directory is given;
- destinations whose shape changes: new columns, columns no longer written, types that
  widen (integer to double, as the table writers do) or clash, from the schemas the type
  flow of ``validate`` derives (:func:`~dataflare.dsl_compiler.schemas`; nothing is said of
  a destination whose records' fields are not all known);
- sources and destinations whose saved partitions block the resume (a partition the new
  source or sink no longer lists: another topic, another file), and sources whose saved
  positions would be applied to something else (another consumer group, query or server).

Exit codes: 0 no change, 2 safe change, 3 unsafe change (state that cannot resume, or a
source position that resets).
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dataflare import secrets
from dataflare.dsl_compiler import Validated, compile_validated, schemas, validate_text
from dataflare.operators.keyed import (
    describe_change,
    resumable,
    resume_advice,
    shard_builders,
)

WORKFLOW_RECORD = "dataflare-workflow.json"
"""The file of a recovery directory naming the workflow its state belongs to."""

NO_CHANGE, SAFE_CHANGE, UNSAFE_CHANGE = 0, 2, 3

# Settings of a source that say *what* it reads: a change means its saved positions (Kafka
# offsets per topic partition, a file's line, a table's cursor) no longer apply.
POSITION_SETTINGS = (
    "type", "mode", "config.topic", "config.topics", "config.table", "config.tables",
    "config.query", "config.path", "config.schema", "config.database", "config.dsn",
    "config.host", "config.port", "config.url", "config.bootstrap_servers", "config.bucket",
    "config.prefix", "config.key_pattern", "config.stream", "config.consumer_group",
    "incremental.column", "incremental.cursor_field", "cdc.slot_name", "cdc.include_tables",
    "config.partitions",  # a generator's: each partition then makes other records
)

# Column types as the table writers name them (dataflare.connectors.sql_writer).
_JSON_TYPES = {"integer": "integer", "number": "double", "boolean": "boolean",
               "string": "text", "object": "json", "array": "json"}
_WIDENS = {("integer", "double")}


@dataclass(frozen=True)
class Change:
    """One line of a plan.

    ``what``: step, state, source or destination; ``verdict``: added, removed, changed
    (steps), resumes, new, dropped, blocks, none saved (state), blocks, resets, reused
    (sources), shape (destinations); ``changed``: whether it is a change at all (a state
    that resumes is not); ``unsafe``: whether it loses or refuses something.
    """

    what: str
    component: str
    verdict: str
    detail: str = ""
    changed: bool = True
    unsafe: bool = False


@dataclass(frozen=True)
class Plan:
    """What running ``workflow`` instead of ``against`` does."""

    workflow: str
    against: str
    changes: tuple[Change, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def exit_code(self) -> int:
        """0 no change, 2 safe change, 3 unsafe change."""
        if any(c.unsafe for c in self.changes):
            return UNSAFE_CHANGE
        if any(c.changed for c in self.changes):
            return SAFE_CHANGE
        return NO_CHANGE

    @property
    def verdict(self) -> str:
        """``no change``, ``safe change`` or ``unsafe change``."""
        return {NO_CHANGE: "no change", SAFE_CHANGE: "safe change",
                UNSAFE_CHANGE: "unsafe change"}[self.exit_code]

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON-able data (``--format json``)."""
        return {"workflow": self.workflow, "against": self.against, "verdict": self.verdict,
                "exit_code": self.exit_code, "changes": [asdict(c) for c in self.changes],
                "notes": list(self.notes)}

    def text(self) -> str:
        """The plan for a terminal: one line per change, then the verdict."""
        marks = {"added": "+", "new": "+", "removed": "-", "dropped": "-"}
        lines = [f"plan for {self.workflow} against {self.against}:"]
        for c in self.changes:
            mark = "!" if c.unsafe else marks.get(c.verdict, "~" if c.changed else "=")
            detail = f": {c.detail}" if c.detail else ""
            lines.append(f"  {mark} {c.what} {c.component!r} {c.verdict}{detail}")
        if not self.changes:
            lines.append("  (nothing differs)")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append(f"{self.verdict} (exit {self.exit_code})")
        return "\n".join(lines)


class PlanError(ValueError):
    """A workflow or recovery directory that cannot be planned against."""


def plan_against_file(new: Validated, old: Validated) -> Plan:
    """The plan of replacing the workflow ``old`` by ``new`` (both valid)."""
    before, after = _definitions(compile_validated(old)), _definitions(compile_validated(new))
    changes = [*_step_changes(old, new), *_state_changes(before, after, None)]
    for cid, what in _moved_sources(old, new).items():
        changes.append(Change("source", cid, "resets",
                              f"{what}: the positions it has reached do not apply to what it "
                              "now reads", unsafe=True))
    changes += _destination_changes(old, new)
    return Plan(new.file, old.file, tuple(_ordered(changes)))


def plan_against_recovery(new: Validated, directory: str | Path) -> Plan:
    """The plan of resuming the run saved in ``directory`` with the workflow ``new``."""
    directory = Path(directory)
    saved = read_snapshots(directory)
    old = recorded_workflow(directory)
    flow = compile_validated(new)
    # The stateful steps of the recorded workflow, with the definitions their saved shards
    # carry (those are what the resume checks).
    before = _definitions(compile_validated(old)) if old is not None else {}
    before.update(_saved_definitions(saved))
    notes: list[str] = []
    changes: list[Change] = []
    moved: dict[str, str] = {}
    if old is None:
        notes.append(f"{directory} does not name the workflow of its run (runs record it in "
                     f"{WORKFLOW_RECORD}): steps and shapes are not compared")
    else:
        seen = _masked(new)  # as recorded: secrets written out in it are not compared
        changes += _step_changes(old, seen)
        moved = _moved_sources(old, seen)
        changes += _destination_changes(old, seen)
    changes += _state_changes(before, _definitions(flow), saved)
    changes += _partition_changes(flow, saved, moved, notes)
    return Plan(new.file, f"recovery directory {directory}", tuple(_ordered(changes)),
                tuple(notes))


# -- the workflow a recovery directory belongs to ------------------------------------------

def _masked(v: Validated) -> Validated:
    """``v`` as :func:`record_workflow` records it: the secrets written out in it masked."""
    try:
        text = Path(v.file).read_text(encoding="utf-8")
    except OSError:
        return v
    masked = secrets.scrub(text, fragments=False)
    if masked == text:
        return v
    out = validate_text(masked, v.file, base_dir=v.base_dir)
    return v if out.workflow is None else out


def record_workflow(directory: Path, path: str) -> str | None:
    """Record ``path``'s workflow as the one of ``directory``'s state; the previous record."""
    file = directory / WORKFLOW_RECORD
    previous = file.read_text() if file.exists() else None
    p = Path(path).resolve()
    tmp = file.with_suffix(f".{os.getpid()}.tmp")
    # Secrets written out in the workflow (a password in a DSN) are not kept: see _masked.
    text = secrets.scrub(p.read_text(encoding="utf-8"), fragments=False)
    tmp.write_text(json.dumps({"path": str(p), "text": text}))
    tmp.replace(file)
    return previous


def restore_record(directory: Path, previous: str | None) -> None:
    """Put back the record :func:`record_workflow` replaced (a resume that was refused)."""
    file = directory / WORKFLOW_RECORD
    if previous is None:
        file.unlink(missing_ok=True)
    else:
        file.write_text(previous)


def committed_epoch(directory: Path) -> int | None:
    """The epoch a resume from ``directory`` starts at (None before the first commit)."""
    commits: list[int] = []
    for part in sorted(directory.glob("*.sqlite3")):
        with closing(sqlite3.connect(f"file:{part}?mode=ro", uri=True)) as db:
            commits += [r[0] for r in db.execute("SELECT commit_epoch FROM commits")]
    return min(commits) if commits else None


def recorded_workflow(directory: Path) -> Validated | None:
    """The workflow recorded in ``directory``, validated (None when none is recorded)."""
    file = directory / WORKFLOW_RECORD
    if not file.exists():
        return None
    record = json.loads(file.read_text())
    path = Path(record["path"])
    old = validate_text(record["text"], f"{path} (recorded in {directory})",
                        base_dir=path.parent)
    if old.workflow is None or old.errors(for_run=True):
        msg = (f"the workflow recorded in {file} is no longer valid: "
               + "; ".join(p.render(True) for p in old.errors(for_run=True)))
        raise PlanError(msg)
    return old


# -- saved state -------------------------------------------------------------------------

def read_snapshots(directory: Path) -> dict[str, dict[str, Any]]:
    """The snapshots a resume from ``directory`` loads: step id -> state key -> state.

    Discarded states (``None``) are left out.
    """
    if not any(directory.glob("*.sqlite3")):
        msg = f"{directory} is not a recovery directory (no *.sqlite3 partitions)"
        raise PlanError(msg)
    out: dict[str, dict[str, Any]] = {}
    for (step, key), blob in _latest(directory, "ser_change").items():
        if blob is not None:
            out.setdefault(step, {})[key] = pickle.loads(blob)  # noqa: S301 - the run's own
    return out


def saved_keys(directory: Path) -> dict[str, set[str]]:
    """The state keys a resume from ``directory`` hands out, by step id (nothing unpickled)."""
    out: dict[str, set[str]] = {}
    for (step, key), discarded in _latest(directory, "ser_change IS NULL").items():
        if not discarded:
            out.setdefault(step, set()).add(key)
    return out


def _latest(directory: Path, column: str) -> dict[tuple[str, str], Any]:
    """``column`` of each state key's snapshot that a resume from ``directory`` loads.

    By (step id, state key): the latest snapshot at or before the epoch the run resumes
    from (the smallest committed epoch of the partitions).
    """
    resume = committed_epoch(directory)
    latest: dict[tuple[str, str], tuple[int, Any]] = {}
    for part in sorted(directory.glob("*.sqlite3")):
        with closing(sqlite3.connect(f"file:{part}?mode=ro", uri=True)) as db:
            for step, key, epoch, value in db.execute(
                    f"SELECT step_id, state_key, snap_epoch, {column} FROM snaps"):  # noqa: S608
                if resume is not None and epoch > resume:
                    continue
                if (step, key) not in latest or epoch > latest[(step, key)][0]:
                    latest[(step, key)] = (epoch, value)
    return {k: value for k, (_, value) in latest.items()}


def resume_blocks(flow: Any, directory: Path) -> list[str]:
    """Why ``flow`` cannot resume from ``directory``: partitions whose saved state it lacks.

    Bytewax would stop the run with a panic naming only the state key; this says which
    source or destination, as ``dataflare plan`` does.
    """
    saved = {step: dict.fromkeys(keys) for step, keys in saved_keys(directory).items()}
    return [f"{c.what} {c.component!r}: {c.detail}"
            for c in _partition_changes(flow, saved, {}, []) if c.verdict == "blocks"]


def _is_shard_state(state: Any) -> bool:
    return (isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict)
            and isinstance(state[1], bytes))


def _saved_definitions(saved: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The definition each stateful step's saved shards carry."""
    out = {}
    for step, states in saved.items():
        for state in states.values():
            if _is_shard_state(state):
                out[step] = state[0]
                break
    return out


def _definitions(flow: Any) -> dict[str, dict[str, Any]]:
    """The definition of each stateful step of a compiled dataflow, by bytewax step id."""
    return {step: b.definition() for step, b in shard_builders(flow).items()}


def _component(step_id: str) -> str:
    """The workflow component of a bytewax step id (``flow.comp.comp.windows`` -> comp)."""
    parts = step_id.split(".")
    return parts[1] if len(parts) > 1 else step_id


def _state_changes(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]],
                   saved: dict[str, dict[str, Any]] | None) -> list[Change]:
    """Per stateful step: resumes, new, dropped or blocks.

    ``saved`` (the snapshots of a recovery directory) tells which steps hold state: a step
    whose shards hold none resumes whatever its definition.
    """
    out = []
    for step in sorted(set(old) | set(new)):
        comp = _component(step)
        held = saved is None or bool(saved.get(step))
        shards = len(saved.get(step, {})) if saved is not None else None
        holding = "" if shards is None else f" ({shards} shard(s) saved)" if shards else \
            " (nothing saved)"
        if step not in old:
            out.append(Change("state", comp, "new", "starts empty"))
        elif step not in new:
            out.append(Change("state", comp, "dropped",
                              f"the step is gone: its state{holding} is never resumed",
                              unsafe=held))
        elif old[step] == new[step]:
            out.append(Change("state", comp, "resumes", f"same definition{holding}",
                              changed=False))
        elif resumable(old[step], new[step]):
            change = describe_change(old[step], new[step])
            out.append(Change("state", comp, "resumes",
                              f"fewer fields held per record ({change}){holding}"))
        elif not held:
            out.append(Change("state", comp, "none saved",
                              f"definition changed ({describe_change(old[step], new[step])}) "
                              "but no state is saved"))
        else:
            out.append(Change("state", comp, "blocks",
                              f"the resume is refused: definition changed "
                              f"({describe_change(old[step], new[step])}){holding}; "
                              f"{resume_advice(old[step], new[step])}", unsafe=True))
    return out


# -- steps, sources, destinations ---------------------------------------------------------

def _components(v: Validated) -> dict[str, tuple[str, Any]]:
    wf = v.workflow
    assert wf is not None
    return {cid: (section[:-1], comp) for section in ("sources", "transformations",
                                                       "destinations")
            for cid, comp in getattr(wf, section).items()}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _settings(comp: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A component's settings, flat: (as compared, secrets included; as shown, masked)."""
    compared = _flat(comp.model_dump(exclude={"description"}))
    shown = _flat(comp.model_dump(mode="json", exclude={"description"}))
    return compared, shown


def _differences(old: Any, new: Any) -> tuple[list[str], str]:
    """The settings that differ, and a description that shows no secret."""
    (a, a_shown), (b, b_shown) = _settings(old), _settings(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown_old = {k: a_shown.get(k) for k in keys}
    shown_new = {k: b_shown.get(k) for k in keys}
    text = "; ".join(
        f"{k}: {shown_old[k]!r} -> {shown_new[k]!r}" if shown_old[k] != shown_new[k]
        else f"{k}: a secret changed" for k in keys)
    return keys, text


def _step_changes(old: Validated, new: Validated) -> list[Change]:
    a, b = _components(old), _components(new)
    out = []
    for cid in sorted(set(a) | set(b)):
        if cid not in a:
            out.append(Change("step", cid, "added", f"a {b[cid][0]} of type {b[cid][1].type}"))
        elif cid not in b:
            out.append(Change("step", cid, "removed", f"a {a[cid][0]} of type {a[cid][1].type}"))
        else:
            keys, text = _differences(a[cid][1], b[cid][1])
            if keys:
                out.append(Change("step", cid, "changed", text))
    wa, wb = old.workflow, new.workflow
    assert wa is not None and wb is not None
    if (wa.id or wa.name) != (wb.id or wb.name):
        out.append(Change("step", "workflow", "changed",
                          f"id {wa.id or wa.name!r} -> {wb.id or wb.name!r}: every step id "
                          "changes, no saved state or position applies"))
    return out


def _moved_sources(old: Validated, new: Validated) -> dict[str, str]:
    """Sources whose settings of what they read changed, with the changes (no secret)."""
    wa, wb = old.workflow, new.workflow
    assert wa is not None and wb is not None
    out = {}
    for cid in sorted(set(wa.sources) & set(wb.sources)):
        keys, _ = _differences(wa.sources[cid], wb.sources[cid])
        moved = [k for k in keys if any(k == s or k.startswith(s + ".")
                                        for s in POSITION_SETTINGS)]
        if moved:
            a, b = _settings(wa.sources[cid])[1], _settings(wb.sources[cid])[1]
            out[cid] = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" if a.get(k) != b.get(k)
                                 else f"{k}: a secret changed" for k in moved)
    return out


def _partitioned_steps(flow: Any) -> dict[str, tuple[str, Any]]:
    """The partitioned inputs and outputs of a dataflow: step id -> (kind, source or sink)."""
    from bytewax.inputs import FixedPartitionedSource
    from bytewax.outputs import FixedPartitionedSink

    found: dict[str, tuple[str, Any]] = {}
    todo: list[Any] = list(flow.substeps)
    while todo:
        step = todo.pop()
        source, sink = getattr(step, "source", None), getattr(step, "sink", None)
        if isinstance(source, FixedPartitionedSource):
            found[step.step_id] = ("source", source)
        elif isinstance(sink, FixedPartitionedSink):
            found[step.step_id] = ("destination", sink)
        todo.extend(step.substeps)
    return found


def _partition_changes(flow: Any, saved: dict[str, dict[str, Any]], moved: dict[str, str],
                       notes: list[str]) -> list[Change]:
    """Sources and destinations whose saved partitions block the resume or mean another thing.

    A resume hands each saved partition's state to the source's (or sink's) partition of
    that name; bytewax refuses one it no longer lists (another topic, another file). The
    partitions are listed as the run lists them (``list_parts``: a source may connect to its
    system). ``moved`` names the sources whose settings of what they read changed.
    """
    out = []
    seen: set[str] = set()
    steps = sorted(_partitioned_steps(flow).items())
    holding = {_component(step) for step, _ in steps if saved.get(step)}
    for step, (kind, part) in steps:
        cid = _component(step)
        seen.add(cid)
        what = moved.get(cid, "") if kind == "source" else ""
        held = sorted(saved.get(step, {}))
        if not held:
            if what and cid not in holding:  # else said for the step holding the state
                out.append(Change(kind, cid, "resets", f"{what}; no position is saved"))
            continue
        try:
            parts = list(part.list_parts())
        except Exception as exc:  # noqa: BLE001 - an unreachable system: said, not fatal
            if what:
                out.append(Change(kind, cid, "resets",
                                  f"{what}: its saved positions ({', '.join(held)}) may not "
                                  f"apply (its partitions could not be listed: {exc})",
                                  unsafe=True))
            else:
                notes.append(f"the partitions of {kind} {cid!r} could not be listed: {exc}")
            continue
        lost = [k for k in held if k not in parts]
        prefix = f"{what}: " if what else ""
        if lost:
            out.append(Change(kind, cid, "blocks",
                              f"{prefix}the saved state of {', '.join(lost)} belongs to "
                              f"partitions it no longer has ({', '.join(parts) or 'none'}): "
                              "the resume is refused; restore the previous setting, or start "
                              "with a fresh recovery directory (a new run then starts from "
                              "the beginning)", unsafe=True))
        elif what:
            out.append(Change(kind, cid, "reused",
                              f"{what}: the saved positions of {', '.join(held)} are applied "
                              "to what it now reads", unsafe=True))
    for cid, what in moved.items():
        if cid not in seen:  # a source without partitions keeps no position
            out.append(Change("source", cid, "resets", f"{what}; it keeps no position"))
    return out


def destination_columns(v: Validated, cid: str) -> dict[str, str | None] | None:
    """The columns destination ``cid`` writes, typed where the type flow knows the type.

    ``None`` when the fields its records may have are not all known (a schemaless input).
    """
    schema = schemas(v).get(cid)
    if schema is None or not schema.closed or schema.fields is None:
        return None
    return {name: _JSON_TYPES.get(t.kind) for name, t in schema.fields.items()}


def _destination_changes(old: Validated, new: Validated) -> list[Change]:
    wa, wb = old.workflow, new.workflow
    assert wa is not None and wb is not None
    out = []
    for cid in sorted(set(wa.destinations) & set(wb.destinations)):
        was, now = _write_mode(wa.destinations[cid]), _write_mode(wb.destinations[cid])
        if was != now:  # what the next run does to what the destination holds
            out.append(Change("destination", cid, "write mode", f"{was} -> {now}"))
        a, b = destination_columns(old, cid), destination_columns(new, cid)
        if a is None or b is None:
            continue
        added = [k for k in b if k not in a]
        gone = [k for k in a if k not in b]
        parts, unsafe = [], False
        if added:
            parts.append("new column(s) " + ", ".join(
                f"{k} ({b[k] or 'type from the records'})" for k in added))
        if gone:
            parts.append("no longer writes " + ", ".join(gone) + " (the columns stay, null "
                         "in new rows)")
        for k in a:
            if k in b and a[k] and b[k] and a[k] != b[k]:
                if (a[k], b[k]) in _WIDENS:
                    parts.append(f"column {k} widens {a[k]} -> {b[k]}")
                else:
                    parts.append(f"column {k} changes {a[k]} -> {b[k]}: the existing column "
                                 "refuses the new values")
                    unsafe = True
        if parts:
            out.append(Change("destination", cid, "shape", "; ".join(parts), unsafe=unsafe))
    return out


def _write_mode(comp: Any) -> str:
    """A destination's write mode as a run carries it out."""
    if (comp.type == "file" and not comp.config.partitioned()
            and "write_mode" not in comp.model_fields_set):
        return "the file rewritten at each run"
    mode = comp.write_mode
    return f"{mode.type} on {mode.merge_key}" if mode.type == "merge" else mode.type


def _ordered(changes: Iterable[Change]) -> list[Change]:
    order = {"step": 0, "state": 1, "source": 2, "destination": 3}
    return sorted(changes, key=lambda c: (order.get(c.what, 9), c.component))
