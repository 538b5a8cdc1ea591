"""Compiler: a validated workflow -> a bytewax ``Dataflow``.

Every component becomes one bytewax operator whose step id is the component id, so
recovery state survives recompiles. Builders come from the registry; the compiler only
wires streams: fan-in, fan-out, named outputs (``router.route``), ``*_to`` redirects and
each step's error policy.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream, _MultiStream, operator
from bytewax.inputs import Source
from bytewax.testing import TestingSink, TestingSource

from dataflare import metrics, registry
from dataflare.connectors.batching import RUN_ID_ENV
from dataflare.connectors.schema import OutputSchemaCheck
from dataflare.dsl_compiler.models import DataProtection, ErrorHandling
from dataflare.dsl_compiler.problems import WorkflowError
from dataflare.dsl_compiler.validate import Validated, validate_file
from dataflare.expr import compile_expression
from dataflare.operators.records import map_records, separate_failed
from dataflare.records import META, Batch, Failed, get_path, set_path

log = logging.getLogger(__name__)
_DEAD = "dead_letter"


@dataclass(frozen=True)
class Provenance:
    """What a step's dead letters say of their origin: the run, and the source if only one."""

    run_id: str
    source: str | None = None


class StepFailed(RuntimeError):
    """A step stopped the run under its ``fail`` policy (or past ``max_errors``)."""


def compile_file(path: str | Path, env: Mapping[str, str] | None = None) -> Dataflow:
    """Compile a workflow file into a bytewax dataflow.

    Usable as ``python -m bytewax.run "dataflare.dsl_compiler:compile_file('flow.yaml')"``.
    Raises :class:`~dataflare.dsl_compiler.problems.WorkflowError` listing every problem.
    """
    return compile_validated(validate_file(path, env))


def compile_validated(
    validated: Validated,
    *,
    test_inputs: Mapping[str, list[Any]] | None = None,
    captured: dict[str, list[Any]] | None = None,
    replay: tuple[str, list[Any]] | None = None,
) -> Dataflow:
    """Compile a validated workflow.

    With ``test_inputs`` every source is replaced by the given records (none when absent)
    and every destination writes into ``captured[destination id]`` instead of its system.
    With ``replay = (step, records)`` only ``step`` and what follows it run: ``records``
    are its input (its output, for a source), the rest as in a normal run.
    """
    if validated.errors(for_run=True) or validated.workflow is None or validated.graph is None:
        raise WorkflowError(validated.problems)
    flow = _Compiler(validated, test_inputs, captured, replay).compile()
    tune_gc()
    return flow


def tune_gc() -> None:
    """Collect garbage less often: a dataflow allocates many short-lived records.

    CPython's default (a young collection every 700 allocations) costs a pipeline of small
    dicts up to 40% of its CPU. ``DATAFLARE_GC=default`` keeps CPython's settings.
    """
    if os.environ.get("DATAFLARE_GC", "") == "default":
        return
    gc.set_threshold(100_000, 50, 100)
    gc.freeze()  # what exists now (modules, the compiled flow) is never garbage


def component_context(validated: Validated, cid: str) -> registry.BuildContext:
    """The build context of component ``cid`` of a valid workflow (e.g. for discovery)."""
    wf = validated.workflow
    assert wf is not None
    for kind in registry.KINDS:
        comps = getattr(wf, registry.SECTION[kind])
        if cid in comps:
            comp = comps[cid]
            return registry.BuildContext(cid, kind, comp, comp.config, wf, validated.base_dir)
    msg = f"no component {cid!r}"
    raise KeyError(msg)


def _flow_id(validated: Validated) -> str:
    wf = validated.workflow
    name = (wf.id or wf.name if wf else None) or Path(validated.file).stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "workflow"


def _count(name: str, counter: Any) -> Callable[[str, Batch], None]:
    child = counter.labels(name)
    return lambda _step, batch: child.inc(len(batch))


def _policy(
    name: str, eh: ErrorHandling, mask: Callable[[Any], Any] | None, origin: Provenance
) -> Callable[[list[Failed]], Batch | None]:
    errors = metrics.ERRORS.labels(name, eh.strategy)
    seen = [0]

    def handle(batch: list[Failed]) -> Batch | None:
        errors.inc(len(batch))
        first = batch[0]
        if eh.strategy == "fail":
            msg = (
                f"step {first.step!r} failed on the record at {first.position()}: "
                f"{first.type}: {first.message}"
            )
            raise StepFailed(msg)
        seen[0] += len(batch)
        if eh.max_errors is not None and seen[0] > eh.max_errors:
            msg = (
                f"step {name!r}: {seen[0]} failed records, more than max_errors "
                f"{eh.max_errors}; last at {batch[-1].position()}: {batch[-1].message}"
            )
            raise StepFailed(msg)
        if seen[0] - len(batch) < 10:
            log.warning(
                "step %r: %s record at %s: %s: %s",
                first.step, "skipped" if eh.strategy == "skip" else "redirected",
                first.position(), first.type, first.message,
            )
        if eh.strategy == "redirect":
            at = datetime.now(UTC).isoformat()
            return [f.as_record(mask, component=origin.source, run_id=origin.run_id, at=at)
                    for f in batch]
        return None

    return handle


def _guard(
    name: str,
    eh: ErrorHandling,
    errs: list[Stream[Any]],
    mask: Callable[[Any], Any] | None,
    origin: Provenance,
) -> Stream[Any] | None:
    """Apply the error policy to a component's failure streams; the dead letters, if any.

    ``mask`` (the workflow's masking rules) applies to the records dead letters carry;
    ``origin`` is the run's id and the source the failed records entered by, if known.
    """
    if not errs:
        return None
    stream = errs[0] if len(errs) == 1 else op.merge("errors", *errs)
    dead = op.filter_map(f"on_error_{eh.strategy}", stream, _policy(name, eh, mask, origin))
    return dead if eh.strategy == "redirect" else None


def _ports(down: Stream[Any] | None, named: Mapping[str, Stream[Any]], dead: Stream[Any] | None,
           ) -> _MultiStream[str]:
    streams: dict[str, Stream[Any]] = {f"port:{k}": v for k, v in named.items()}
    if down is not None:
        streams[""] = down
    if dead is not None:
        streams[_DEAD] = dead
    return _MultiStream(streams)


@operator
def source_component(
    step_id: str,
    flow: Dataflow,
    source: Source[Any],
    name: str,
    eh: ErrorHandling,
    check: OutputSchemaCheck | None,
    mask: Callable[[Any], Any] | None,
    run_id: str,
) -> _MultiStream[str]:
    """A source: read batches, check ``output_schema``, separate failures, apply the policy."""
    items = op.input("read", flow, source)
    if check is not None:
        items = op.map("output_schema", items, check.check)
    parts = separate_failed("decode", items)
    op.inspect("count", parts.down, _count(name, metrics.RECORDS_OUT))
    return _ports(parts.down, {}, _guard(name, eh, [parts.errs], mask,
                                                Provenance(run_id, name)))


@operator
def transformation_component(
    step_id: str,
    spec: registry.ComponentSpec,
    ctx: registry.BuildContext,
    origin: Provenance,
    *ups: Stream[Any],
) -> _MultiStream[str]:
    """A transformation: its inputs (merged), the registered builder, counts, error policy."""
    streams = list(ups)
    if spec.merge_inputs and len(streams) > 1:
        streams = [op.merge("inputs", *streams)]
    assert spec.build is not None
    out: registry.Outputs = spec.build(ctx, streams)
    if out.down is not None:
        op.inspect("count", out.down, _count(ctx.step_id, metrics.RECORDS_OUT))
    for port, stream in out.named.items():
        op.inspect(f"count_{port}", stream, _count(ctx.step_id, metrics.RECORDS_OUT))
    dead = _guard(ctx.step_id, ctx.component.error_handling, [out.errs] if out.errs else [],
                  masker(ctx.workflow.data_protection), origin)
    return _ports(out.down, out.named, dead)


@operator
def destination_component(
    step_id: str,
    build: Callable[..., Any],
    ctx: registry.BuildContext,
    prepare: Callable[[Any], Any] | None,
    origin: Provenance,
    *ups: Stream[Any],
) -> _MultiStream[str]:
    """A destination: merge its inputs, filter and mask, then the registered sink."""
    up = ups[0] if len(ups) == 1 else op.merge("inputs", *ups)
    errs: list[Stream[Any]] = []
    if prepare is not None:
        prepared = map_records("prepare", up, prepare, ctx.step_id)
        up = prepared.down
        errs.append(prepared.errs)
    op.inspect("count", up, _count(ctx.step_id, metrics.RECORDS_WRITTEN))
    sink_errs = build(ctx, up)
    if sink_errs is not None:
        errs.append(sink_errs)
    return _ports(None, {}, _guard(ctx.step_id, ctx.component.error_handling, errs,
                                   masker(ctx.workflow.data_protection), origin))


def masker(protection: DataProtection | None) -> Callable[[Any], Any] | None:
    """The masking rules of ``data_protection`` as one per-record function."""
    if protection is None or not protection.masking_rules:
        return None
    rules = protection.masking_rules

    def mask(record: dict[str, Any]) -> dict[str, Any]:
        out = dict(record)
        for rule in rules:
            value = get_path(out, rule.field)
            if value is None:
                continue
            text = str(value)
            if rule.method == "full":
                masked = rule.replacement
            elif rule.method == "partial":
                masked = text[: rule.show_chars] + rule.replacement
            else:
                masked = hashlib.sha256(text.encode()).hexdigest()
            set_path(out, rule.field, masked)
        return out

    return mask


def _prepare(
    filter_text: str | None, mask: Callable[[Any], Any] | None
) -> Callable[..., Any] | None:
    test = compile_expression(filter_text).test if filter_text else None
    if test is None:
        return mask
    if mask is None:
        return lambda r: r if test(r) else None
    return lambda r: mask(r) if test(r) else None


class _Compiler:
    def __init__(
        self,
        validated: Validated,
        test_inputs: Mapping[str, list[Any]] | None,
        captured: dict[str, list[Any]] | None,
        replay: tuple[str, list[Any]] | None = None,
    ) -> None:
        assert validated.workflow is not None and validated.graph is not None
        self.v = validated
        self.wf = validated.workflow
        self.graph = validated.graph
        self.test_inputs = test_inputs
        self.captured = captured if captured is not None else {}
        self.streams: dict[str, Stream[Any]] = {}
        self.redirected: dict[str, list[Stream[Any]]] = {}
        # The run dead letters belong to: the recovery lineage's id, else this execution's.
        self.run_id = os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex
        self.replay = replay
        self.replayed: set[str] | None = None  # with replay: the steps that run
        if replay is not None:
            if replay[0] not in self.graph.kinds:
                msg = f"no step {replay[0]!r} in the workflow"
                raise KeyError(msg)
            self.replayed = self.downstream(replay[0])

    def ctx(self, kind: registry.Kind, cid: str, comp: Any) -> registry.BuildContext:
        return registry.BuildContext(
            step_id=cid,
            kind=kind,
            component=comp,
            config=comp.config,
            workflow=self.wf,
            base_dir=self.v.base_dir,
            options={"test": self.test_inputs is not None},
        )

    def _origin(self, cid: str) -> Provenance:
        """The run's id, and the one source whose records reach ``cid`` (if only one does)."""
        found: set[str] = set()
        todo, seen = [cid], {cid}
        while todo:
            for ref in self.graph.inputs.get(todo.pop(), []):
                up = self.graph.upstream(ref)
                if up in seen:
                    continue
                seen.add(up)
                if self.graph.kinds.get(up) == "sources":
                    found.add(up)
                else:
                    todo.append(up)
        return Provenance(self.run_id, found.pop() if len(found) == 1 else None)

    def spec(self, kind: registry.Kind, comp: Any) -> registry.ComponentSpec:
        spec = registry.lookup(kind, comp.type)
        assert spec is not None and spec.build is not None, comp.type
        return spec

    def downstream(self, cid: str) -> set[str]:
        """``cid``, the steps that read it, directly or not, and where they redirect to."""
        consumers = self.graph.consumers()
        redirects: dict[str, set[str]] = {}
        for section in ("sources", "transformations", "destinations"):
            for other, comp in getattr(self.wf, section).items():
                targets = {v for f, v in comp.config if f.endswith("_to") and isinstance(v, str)}
                if comp.error_handling.redirect_to:
                    targets.add(comp.error_handling.redirect_to)
                redirects[other] = targets
        out, todo = {cid}, [cid]
        while todo:
            step = todo.pop()
            for nxt in [*consumers.get(step, []), *redirects.get(step, set())]:
                if nxt not in out:
                    out.add(nxt)
                    todo.append(nxt)
        return out

    def replay_input(self, cid: str) -> list[Stream[Any]] | None:
        """The replayed records as the input of ``cid``, if it is the replayed step."""
        if self.replay is None or self.replay[0] != cid:
            return None
        records = self.replay[1]
        return [op.input("replay", self.flow, TestingSource([records] if records else []))]

    def compile(self) -> Dataflow:
        flow = self.flow = Dataflow(_flow_id(self.v))
        for cid in self.graph.order():
            section = self.graph.kinds[cid]
            if self.replayed is not None and cid not in self.replayed:
                continue
            if section == "sources":
                self.source(flow, cid)
            elif section == "transformations":
                self.transformation(cid)
        self.destinations()
        return flow

    def redirect(self, target: str | None, stream: Stream[Any] | None) -> None:
        if target and stream is not None:
            self.redirected.setdefault(target, []).append(stream)

    def keep(self, cid: str, ports: _MultiStream[str], eh: ErrorHandling) -> None:
        for key, stream in ports.streams.items():
            if key == "":
                self.streams[cid] = stream
            elif key.startswith("port:"):
                self.streams[f"{cid}.{key[5:]}"] = stream
        self.redirect(eh.redirect_to, ports.streams.get(_DEAD))

    def source(self, flow: Dataflow, cid: str) -> None:
        comp = self.wf.sources[cid]
        if self.replay is not None:
            source: Source[Any] = TestingSource([self.replay[1]] if self.replay[1] else [])
        elif self.test_inputs is not None:
            records = [
                {**r, META: {"test_input": cid, "index": i, **(r.get(META) or {})}}
                if isinstance(r, dict) else r
                for i, r in enumerate(self.test_inputs.get(cid, []))
            ]
            source = TestingSource([records] if records else [])
        else:
            source = self.spec("source", comp).build(self.ctx("source", cid, comp))  # type: ignore[misc]
        check = OutputSchemaCheck.of(cid, comp)
        ports = source_component(cid, flow, source, cid, comp.error_handling, check,
                                 masker(self.wf.data_protection), self.run_id)
        self.keep(cid, ports, comp.error_handling)

    def with_source_time_unit(self, comp: Any) -> Any:
        """``comp`` whose unset ``time_unit`` comes from its sources' (when they agree)."""
        config = comp.config
        if "time_unit" not in type(config).model_fields or "time_unit" in config.model_fields_set:
            return comp
        sources = self.wf.upstream_sources(comp.inputs)
        units = {self.wf.sources[s].time_unit for s in sources} - {None}
        if len(units) != 1:
            return comp
        config = config.model_copy(update={"time_unit": units.pop()})
        return comp.model_copy(update={"config": config})

    def transformation(self, cid: str) -> None:
        comp = self.with_source_time_unit(self.wf.transformations[cid])
        spec = self.spec("transformation", comp)
        ups = self.replay_input(cid) or [self.streams[r] for r in comp.inputs if r in self.streams]
        ctx = self.ctx("transformation", cid, comp)
        ports = transformation_component(cid, spec, ctx, self._origin(cid), *ups)
        self.keep(cid, ports, comp.error_handling)
        config = comp.config
        for field in type(config).model_fields:
            if field.endswith("_to") and f"port:{field[:-3]}" in ports.streams:
                self.redirect(getattr(config, field), ports.streams[f"port:{field[:-3]}"])

    def destinations(self) -> None:
        pending = dict(self.wf.destinations)
        mask = masker(self.wf.data_protection)
        while pending:
            ready = [
                cid for cid in pending
                if not any(d.error_handling.redirect_to == cid
                           for other, d in pending.items() if other != cid)
            ]
            if not ready:
                cycle = ", ".join(sorted(pending))
                msg = f"destinations redirect their errors to each other in a cycle: {cycle}"
                raise ValueError(msg)
            for cid in ready:
                self.destination(cid, pending.pop(cid), mask)

    def destination(self, cid: str, comp: Any, mask: Callable[[Any], Any] | None) -> None:
        if self.replayed is not None and cid not in self.replayed:
            return
        ups = self.replay_input(cid) or [self.streams[r] for r in comp.inputs if r in self.streams]
        ups += self.redirected.get(cid, [])
        if not ups:
            return
        ctx = self.ctx("destination", cid, comp)
        if self.test_inputs is not None:
            sink = self.captured.setdefault(cid, [])

            def build(ctx: registry.BuildContext, up: Stream[Any]) -> None:
                op.output("capture", up, TestingSink(sink))
        else:
            build = self.spec("destination", comp).build  # type: ignore[assignment]
        prepare = _prepare(comp.filter, mask)
        ports = destination_component(cid, build, ctx, prepare, self._origin(cid), *ups)
        self.keep(cid, ports, comp.error_handling)
