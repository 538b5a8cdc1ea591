"""Compiler: a validated workflow -> a bytewax ``Dataflow``.

Every component becomes one bytewax operator whose step id is the component id, so
recovery state survives recompiles. Builders come from the registry; the compiler only
wires streams: fan-in, fan-out, named outputs (``router.route``), ``*_to`` redirects and
each step's error policy.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream, _MultiStream, operator
from bytewax.inputs import Source
from bytewax.testing import TestingSink, TestingSource

from dataflare import metrics, registry, secrets, views
from dataflare.connectors.schema import OutputSchemaCheck
from dataflare.dsl_compiler.models import DataProtection, ErrorHandling, WriteMode
from dataflare.dsl_compiler.problems import WorkflowError
from dataflare.dsl_compiler.projection import read_downstream
from dataflare.dsl_compiler.validate import Validated, validate_file
from dataflare.encryption import field_cipher
from dataflare.expr import compile_expression
from dataflare.live import tapper
from dataflare.masking import Masker
from dataflare.operators.keyed import shard_builders
from dataflare.operators.records import map_records, separate_failed
from dataflare.records import INPUT, META, Batch, Failed
from dataflare.stopping import stoppable

log = logging.getLogger(__name__)
_DEAD = "dead_letter"
_REPLAY = "<replay>"  # the stream of replayed records into a transformation or destination


class StepFailed(RuntimeError):
    """A step stopped the run under its ``fail`` policy (or past ``max_errors``)."""


def compile_file(path: str | Path, env: Mapping[str, str] | None = None) -> Dataflow:
    """Compile a workflow file into a bytewax dataflow.

    Usable as ``python -m bytewax.run "dataflare.dsl_compiler:compile_file('flow.yaml')"``.
    Raises :class:`~dataflare.dsl_compiler.problems.WorkflowError` listing every problem;
    the warnings (e.g. settings without effect yet) are logged.
    """
    validated = validate_file(path, env)
    for problem in validated.problems:
        if not problem.is_error(for_run=True):
            log.warning("%s", problem.render(for_run=True))
    return compile_validated(validated)


def compile_validated(
    validated: Validated,
    *,
    test_inputs: Mapping[str, list[Any]] | None = None,
    captured: dict[str, list[Any]] | None = None,
    replay: tuple[str, Source[Any]] | None = None,
    source_records: Mapping[str, list[Any]] | None = None,
) -> Dataflow:
    """Compile a validated workflow.

    With ``test_inputs`` every source is replaced by the given records (none when absent)
    and every destination writes into ``captured[destination id]`` instead of its system.
    With ``source_records`` only the sources it names read its records instead of their
    systems (a demo's stand-in for a database it cannot start); destinations write as usual.
    With ``replay=(step, source)`` only ``step`` and what is downstream of it run, ``step``
    reading ``source`` (dead letters, unwrapped) instead of its inputs.
    """
    stopping = validated.errors(for_run=True)
    if test_inputs is not None:  # a test replaces every source and destination: their
        # settings that only a run needs (an unset variable holding a password) do not stop it
        stopping = [p for p in stopping if p.severity == "error"
                    or not p.path.startswith(("sources.", "destinations."))]
    if stopping or validated.workflow is None or validated.graph is None:
        raise WorkflowError(validated.problems)
    secrets.install_logging()  # no secret of this workflow in any log line
    flow = _Compiler(validated, test_inputs, captured, replay, source_records).compile()
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


def _count(name: str, counter: Any, tap: Callable[[str, Batch], None]
           ) -> Callable[[str, Batch], None]:
    """Count a step's batches (records, last-record time) and publish them to its taps."""
    child = counter.labels(name)
    last = metrics.LAST_RECORD.labels(name)

    def count(step: str, batch: Batch) -> None:
        if batch:
            child.inc(len(batch))
            metrics.touch(name, last)
            tap(step, batch)

    return count


def _tapped(tap: Callable[[str, Batch], None]) -> Callable[[str, Batch], None]:
    """Publish a step's batches to its taps, uncounted."""

    def publish(step: str, batch: Batch) -> None:
        if batch:
            tap(step, batch)

    return publish


_LISTED = 10  # failed records named one by one per step (skip, redirect)


def _policy(
    name: str, eh: ErrorHandling, mask: Masker | None, source: str | None = None
) -> Callable[[list[Failed]], Batch | None]:
    errors = metrics.ERRORS.labels(name, eh.strategy)
    seen = [0]

    def handle(batch: list[Failed]) -> Batch | None:
        errors.inc(len(batch))
        for f in batch:
            metrics.ERRORS_BY_TYPE.labels(name, f.type).inc()
        first = batch[0]
        # Messages quote values: they are shown as the dead letter has them (masked).
        dead = [f.as_record(mask, component=source) for f in batch]
        message = dead[0]["error"]["message"]
        if eh.strategy == "fail":
            msg = (
                f"step {first.step!r} failed on the record at {first.position()}: "
                f"{first.type}: {message}"
            )
            raise StepFailed(msg)
        seen[0] += len(batch)
        if eh.max_errors is not None and seen[0] > eh.max_errors:
            msg = (
                f"step {name!r}: {seen[0]} failed records, more than max_errors "
                f"{eh.max_errors}; last at {batch[-1].position()}: "
                f"{dead[-1]['error']['message']}"
            )
            raise StepFailed(msg)
        before, did = seen[0] - len(batch), "skipped" if eh.strategy == "skip" else "redirected"
        for f, d in zip(batch[:max(0, _LISTED - before)], dead, strict=False):
            log.warning("step %r: %s record at %s: %s: %s", f.step, did, f.position(), f.type,
                        d["error"]["message"],
                        extra={"component": f.step, "position": f.position()})
        if before <= _LISTED < seen[0]:  # once: with the batch that goes past the ten
            log.warning("step %r: more records %s than the first %d listed; the run's summary "
                        "counts them all", first.step, did, _LISTED,
                        extra={"component": first.step})
        return dead if eh.strategy == "redirect" else None

    return handle


def _guard(
    name: str, eh: ErrorHandling, errs: list[Stream[Any]], mask: Masker | None,
    source: str | None = None,
) -> Stream[Any] | None:
    """Apply the error policy to a component's failure streams; the dead letters, if any.

    ``mask`` (the workflow's masking rules) applies to the records dead letters carry;
    ``source`` is the one source feeding the component, when only one does.
    """
    if not errs:
        return None
    stream = errs[0] if len(errs) == 1 else op.merge("errors", *errs)
    dead = op.filter_map(f"on_error_{eh.strategy}", stream, _policy(name, eh, mask, source))
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
    mask: Masker | None,
) -> _MultiStream[str]:
    """A source: read batches, check ``output_schema``, separate failures, apply the policy."""
    items = op.input("read", flow, stoppable(source))
    if check is not None:
        items = op.map("output_schema", items, check.check)
    parts = separate_failed("decode", items)
    op.inspect("count", parts.down, _count(name, metrics.RECORDS_OUT, tapper(name, mask)))
    # A source's failures name it as the dead letter's source component.
    errs = op.map("source_component", parts.errs, lambda batch: [
        dataclasses.replace(f, meta={**f.meta, "source": name}) for f in batch])
    return _ports(parts.down, {}, _guard(name, eh, [errs], mask))


@operator
def transformation_component(
    step_id: str, spec: registry.ComponentSpec, ctx: registry.BuildContext, *ups: Stream[Any]
) -> _MultiStream[str]:
    """A transformation: its inputs (merged), the registered builder, counts, error policy."""
    streams = list(ups)
    if spec.merge_inputs and len(streams) > 1:
        streams = [op.merge("inputs", *streams)]
    assert spec.build is not None
    out: registry.Outputs = spec.build(ctx, streams)
    mask = masker(ctx.workflow.data_protection)
    if out.down is not None:
        op.inspect("count", out.down, _count(ctx.step_id, metrics.RECORDS_OUT,
                                             tapper(ctx.step_id, mask)))
    for port, stream in out.named.items():
        # Late records are counted apart (dataflare_late_records_total), not as output.
        tap = tapper(f"{ctx.step_id}.{port}", mask)
        op.inspect(f"count_{port}", stream, _tapped(tap) if port == "late"
                   else _count(ctx.step_id, metrics.RECORDS_OUT, tap))
    dead = _guard(ctx.step_id, ctx.component.error_handling, [out.errs] if out.errs else [],
                  masker(ctx.workflow.data_protection), single_source(ctx))
    return _ports(out.down, out.named, dead)


def single_source(ctx: registry.BuildContext) -> str | None:
    """The source feeding a component, when exactly one does (a dead letter's origin)."""
    sources = ctx.workflow.upstream_sources(list(getattr(ctx.component, "inputs", [])))
    return sources[0] if len(sources) == 1 else None


@operator
def destination_component(
    step_id: str,
    build: Callable[..., Any],
    ctx: registry.BuildContext,
    prepare: Callable[[Any], Any] | None,
    *ups: Stream[Any],
) -> _MultiStream[str]:
    """A destination: merge its inputs, filter and mask, then the registered sink."""
    up = ups[0] if len(ups) == 1 else op.merge("inputs", *ups)
    errs: list[Stream[Any]] = []
    if prepare is not None:
        prepared = map_records("prepare", up, prepare, ctx.step_id)
        up = prepared.down
        errs.append(prepared.errs)
    # A destination's tap shows what it writes: already masked by ``prepare``.
    op.inspect("count", up, _count(ctx.step_id, metrics.RECORDS_WRITTEN,
                                   tapper(ctx.step_id, None)))
    sink_errs = build(ctx, up)
    if sink_errs is not None:
        errs.append(sink_errs)
    return _ports(None, {}, _guard(ctx.step_id, ctx.component.error_handling, errs,
                                   masker(ctx.workflow.data_protection), single_source(ctx)))


def _tag_input(name: str, batch: Batch) -> Batch:
    """``batch`` with ``_meta.input`` naming the input component it comes from."""
    out: Batch = []
    for r in batch:
        if isinstance(r, dict):
            meta = r.get(META)
            r = {**r, META: {**meta, INPUT: name} if isinstance(meta, dict) else {INPUT: name}}
        out.append(r)
    return out


def masker(protection: DataProtection | None) -> Masker | None:
    """The masking rules of ``data_protection`` as one :class:`~dataflare.masking.Masker`."""
    cipher = field_cipher(protection)
    if protection is None or not (protection.masking_rules or cipher):
        return None
    key = protection.hash_key.get_secret_value().encode() if protection.hash_key else None
    return Masker(protection.masking_rules, key, cipher)


def _prepare(
    filter_text: str | None, mask: Masker | None
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
        replay: tuple[str, Source[Any]] | None = None,
        source_records: Mapping[str, list[Any]] | None = None,
    ) -> None:
        assert validated.workflow is not None and validated.graph is not None
        self.v = validated
        self.wf = validated.workflow
        self.graph = validated.graph
        self.test_inputs = test_inputs
        self.source_records = source_records or {}
        self.captured = captured if captured is not None else {}
        self.streams: dict[str, Stream[Any]] = {}
        self.redirected: dict[str, list[tuple[str, Stream[Any]]]] = {}  # (from step, stream)
        self.replay = replay
        self.running = self._downstream(replay[0]) if replay else set(self.graph.kinds)

    def _downstream(self, step: str) -> set[str]:
        """``step`` and every component fed by it, directly or not."""
        out = {step}
        changed = True
        while changed:
            changed = False
            for cid, refs in self.graph.inputs.items():
                if cid not in out and any(r.split(".", 1)[0] in out for r in refs):
                    out.add(cid)
                    changed = True
        return out

    def ctx(self, kind: registry.Kind, cid: str, comp: Any) -> registry.BuildContext:
        return registry.BuildContext(
            step_id=cid,
            kind=kind,
            component=comp,
            config=comp.config,
            workflow=self.wf,
            base_dir=self.v.base_dir,
            options={"test": self.test_inputs is not None},
            read_downstream=self._read_downstream(kind, cid, comp),
        )

    def _read_downstream(self, kind: registry.Kind, cid: str, comp: Any) -> frozenset[str] | None:
        """What later steps read of a transformation's output.

        All of it when its records are looked at whole: a test run comparing them, a view.
        """
        if (kind != "transformation" or self.test_inputs is not None
                or getattr(comp, "serve", False) or self.v.types is None):
            return None
        return read_downstream(self.graph, self.v.types, cid)

    def spec(self, kind: registry.Kind, comp: Any) -> registry.ComponentSpec:
        spec = registry.lookup(kind, comp.type)
        assert spec is not None and spec.build is not None, comp.type
        return spec

    def compile(self) -> Dataflow:
        flow = self.flow = Dataflow(_flow_id(self.v))
        if self.replay is not None and self.graph.kinds[self.replay[0]] != "sources":
            self.streams[_REPLAY] = op.input("replay", flow, self.replay[1])
        for cid in self.graph.order():
            if cid not in self.running:
                continue
            section = self.graph.kinds[cid]
            if section == "sources":
                self.source(flow, cid)
            elif section == "transformations":
                self.transformation(cid)
        self.destinations()
        return flow

    def redirect(self, target: str | None, stream: Stream[Any] | None, origin: str) -> None:
        if target and stream is not None:
            self.redirected.setdefault(target, []).append((origin, stream))

    def keep(self, cid: str, ports: _MultiStream[str], eh: ErrorHandling) -> None:
        for key, stream in ports.streams.items():
            if key == "":
                self.streams[cid] = stream
            elif key.startswith("port:"):
                self.streams[f"{cid}.{key[5:]}"] = stream
        self.redirect(eh.redirect_to, ports.streams.get(_DEAD), cid)

    def source(self, flow: Dataflow, cid: str) -> None:
        comp = self.wf.sources[cid]
        if self.replay is not None and cid == self.replay[0]:
            source: Source[Any] = self.replay[1]
        elif self.test_inputs is not None or cid in self.source_records:
            given = (self.test_inputs or {}).get(cid) or self.source_records.get(cid, [])
            records = [
                {**r, META: {"test_input": cid, "index": i, **(r.get(META) or {})}}
                if isinstance(r, dict) else r
                for i, r in enumerate(given)
            ]
            source = TestingSource([records] if records else [])
        else:
            source = self.spec("source", comp).build(self.ctx("source", cid, comp))  # type: ignore[misc]
        check = OutputSchemaCheck.of(cid, comp)
        ports = source_component(cid, flow, source, cid, comp.error_handling, check,
                                 masker(self.wf.data_protection))
        self.keep(cid, ports, comp.error_handling)

    def with_source_defaults(self, comp: Any) -> Any:
        """``comp`` whose unset ``time_unit`` and ``allowed_lateness`` come from its sources.

        A source's ``time_unit`` and ``streaming.watermark_delay`` are the defaults of the
        windows, joins and dedupes downstream (used when every upstream source agrees, or
        the largest delay).
        """
        config = comp.config
        fields = type(config).model_fields
        sources = [self.wf.sources[s] for s in self.wf.upstream_sources(comp.inputs)]
        update: dict[str, Any] = {}
        if "time_unit" in fields and "time_unit" not in config.model_fields_set:
            units = {s.time_unit for s in sources} - {None}
            if len(units) == 1:
                update["time_unit"] = units.pop()
        if "allowed_lateness" in fields and "allowed_lateness" not in config.model_fields_set:
            delays = [s.streaming.watermark_delay for s in sources
                      if s.streaming is not None and s.streaming.watermark_delay is not None]
            if delays:
                update["allowed_lateness"] = max(delays)
        if not update:
            return comp
        return comp.model_copy(update={"config": config.model_copy(update=update)})

    def transformation(self, cid: str) -> None:
        comp = self.with_source_defaults(self.wf.transformations[cid])
        spec = self.spec("transformation", comp)
        if self.replay is not None and cid == self.replay[0]:
            ups = [self.streams[_REPLAY]]
        else:  # in a replay, inputs that are not downstream of the replayed step are left out
            ups = [self.streams[ref] for ref in comp.inputs if ref in self.streams]
        ctx = self.ctx("transformation", cid, comp)
        ports = transformation_component(cid, spec, ctx, *ups)
        self.keep(cid, ports, comp.error_handling)
        if comp.serve:
            self.serve(cid)
        config = comp.config
        for field in type(config).model_fields:
            if field.endswith("_to") and f"port:{field[:-3]}" in ports.streams:
                self.redirect(getattr(config, field), ports.streams[f"port:{field[:-3]}"], cid)

    def serve(self, cid: str) -> None:
        """Publish the state of step ``cid`` to its live view (``serve: true``)."""
        view = views.serve(cid, masker(self.wf.data_protection))
        for builder in shard_builders(self.flow, f"{self.flow.flow_id}.{cid}.").values():
            builder.view = view

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

    def destination(self, cid: str, comp: Any, mask: Masker | None) -> None:
        if self.replay is not None and cid == self.replay[0]:  # its own dead letters, again
            named = [(comp.inputs[0] if comp.inputs else cid, self.streams[_REPLAY])]
        else:  # in a replay, inputs that are not downstream of the replayed step are left out
            named = [(ref, self.streams[ref]) for ref in comp.inputs
                     if self.replay is None or ref in self.streams]
        named += self.redirected.get(cid, [])
        if not named:
            return
        one_file = comp.type == "file" and not comp.config.partitioned()
        if self.replay is not None and (comp.write_mode.type == "overwrite" or (
                one_file and "write_mode" not in comp.model_fields_set)):
            # A replay adds its records: a destination that empties its table or file at
            # the start of a run (overwrite; one file without write_mode) would lose the rest.
            comp = comp.model_copy(update={"write_mode": WriteMode(type="append")})
            if self.test_inputs is None:
                log.warning("replay: destination %r adds the replayed records to what it "
                            "holds (a run of the workflow rewrites it)", cid)
        ctx = self.ctx("destination", cid, comp)
        spec = registry.lookup("destination", comp.type)
        if spec is not None and spec.input_names is not None and spec.input_names(comp.config):
            # The records say which input they came from (``{{source}}`` of a path template).
            ups = [op.map(f"input_{i}", s, partial(_tag_input, name))
                   for i, (name, s) in enumerate(named)]
        else:
            ups = [s for _, s in named]
        if self.test_inputs is not None:
            sink = self.captured.setdefault(cid, [])

            def build(ctx: registry.BuildContext, up: Stream[Any]) -> None:
                op.output("capture", up, TestingSink(sink))
        else:
            build = self.spec("destination", comp).build  # type: ignore[assignment]
        prepare = _prepare(comp.filter, mask)
        ports = destination_component(cid, build, ctx, prepare, *ups)
        self.keep(cid, ports, comp.error_handling)
