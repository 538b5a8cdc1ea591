"""The ``plugin`` and ``custom`` transformations: records through a registered plugin.

A plugin is declared once under ``plugins:`` and used by id::

    plugins:
      shout: {type: wasm, path: plugins/shout.wasm, config: {memory_limit: 64MB, timeout: 2s}}
    transformations:
      loud: {type: plugin, plugin: shout, inputs: [orders], config: {mode: upper}}

**WASM** (sandboxed, no host access): the module exports ``memory``, ``alloc(size) -> ptr``
and ``process(ptr, len) -> i64``, optionally ``configure(ptr, len) -> i32`` (0 = accepted)
and ``dealloc(ptr, size)``. ``configure`` receives the JSON of the plugin's extra config
keys merged with the transformation's ``config``. ``process`` receives a JSON array of
records (without ``_meta``) and returns ``ptr << 32 | len`` of a JSON array of the same
length: each element is the output record, ``null`` to drop the record, or
``{"$error": "message"}`` to fail it. A batch that traps is retried record by record, so
only the records that make the plugin trap fail; a pointer from ``alloc`` or ``process``
outside the module's memory is such a failure too. ``memory_limit`` caps the module's
memory, ``timeout`` (or ``config.timeout``) one call (by epoch interruption; default 10 s,
so an endless loop fails its records instead of hanging the run). A batch that timed out
fails as a whole: it is not retried record by record (that would wait the limit once per
record).

**native**: ``path: "package.module:function"``, a Python function ``(record, config) ->
record | None``, given the record without ``_meta`` (its position comes back after); an
exception, or a result that is not an object, fails that record.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Stream
from pydantic import model_validator

from dataflare.config import Open
from dataflare.connectors.schema import json_bytes, json_loader
from dataflare.dsl_compiler.models import Plugin
from dataflare.operators.records import map_records
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import META, Batch, Failed, RecordError, a_or_an, without_meta
from dataflare.registry import BuildContext, Outputs, transformation

_SIZES = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2,
          "GIB": 1024**3}


class PluginCallConfig(Open):
    """Settings handed to the plugin (merged over the plugin's own extra settings).

    Without a defined plugin, ``formula`` and ``output_field`` make a built-in formula step
    (see :mod:`dataflare.operators.formula`).
    """

    @model_validator(mode="after")
    def _formula(self) -> PluginCallConfig:
        formula = (self.model_extra or {}).get("formula")
        if formula is not None:
            from dataflare.operators.formula import compile_formula

            if not isinstance(formula, str):
                msg = f"formula must be a string, got {formula!r}"
                raise ValueError(msg)
            compile_formula(formula)
        return self


class PluginError(RuntimeError):
    """A call that failed: the records of the call fail (the step's error policy applies)."""


class PluginTimeout(PluginError):
    """A call that ran past the plugin's time limit."""


class PluginSetupError(RuntimeError):
    """A plugin that cannot be loaded or configured: the run stops."""


def parse_size(text: str) -> int:
    """Bytes in a size such as ``256MB`` or ``64MiB``."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]+)\s*", text)
    if not m or m.group(2).upper() not in _SIZES:
        msg = f"invalid size {text!r}"
        raise ValueError(msg)
    return int(m.group(1)) * _SIZES[m.group(2).upper()]


class _Ticker:
    """Advances an engine's epoch every ``period`` seconds, for call timeouts."""

    def __init__(self, engine: Any, period: float) -> None:
        self.engine, self.period = engine, period
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="wasm-epoch").start()

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            self.engine.increment_epoch()


DEFAULT_WASM_TIMEOUT = 10.0
_LOADS = json_loader()


class WasmPlugin:
    """A compiled WASM module with one sandboxed instance per thread (bytewax worker)."""

    TICKS = 10

    def __init__(self, name: str, path: Path, config: dict[str, Any],
                 memory_limit: int | None, timeout: float | None) -> None:
        import wasmtime

        self.name, self.config = name, config
        self.memory_limit, self.timeout = memory_limit, timeout
        engine_config = wasmtime.Config()
        engine_config.epoch_interruption = timeout is not None
        self.engine = wasmtime.Engine(engine_config)
        try:
            if path.suffix == ".wat":
                self.module = wasmtime.Module(self.engine, path.read_text())
            else:
                self.module = wasmtime.Module.from_file(self.engine, str(path))
        except (OSError, wasmtime.WasmtimeError) as exc:
            msg = f"plugin {name!r}: cannot load {path}: {exc}"
            raise PluginSetupError(msg) from None
        exports = {e.name for e in self.module.exports}
        missing = {"memory", "alloc", "process"} - exports
        if missing:
            msg = f"plugin {name!r}: {path} does not export {', '.join(sorted(missing))}"
            raise PluginSetupError(msg)
        self.ticker = _Ticker(self.engine, timeout / self.TICKS) if timeout else None
        self.local = threading.local()

    def check(self) -> None:
        """Instantiate and configure once, so a bad module or config stops before the run."""
        import wasmtime

        try:
            self._instantiate()
        except (wasmtime.WasmtimeError, wasmtime.Trap, PluginError) as exc:
            lines = str(exc).splitlines() or [""]  # a trap: its backtrace, then the cause
            said = next((x.strip() for x in lines if x.strip().startswith("wasm trap:")),
                        lines[0])
            if isinstance(exc, wasmtime.Trap) and exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                said = f"its set-up ran longer than the timeout ({self.timeout:g}s)"
            msg = f"plugin {self.name!r} cannot start: {said}"
            if "memory" in said and self.memory_limit is not None:
                msg += f" (memory_limit is {self.memory_limit} bytes)"
            raise PluginSetupError(msg) from None

    def _instance(self) -> Any:
        inst = getattr(self.local, "instance", None)
        if inst is None:
            inst = self._instantiate()
            self.local.instance = inst
        return inst

    def _instantiate(self) -> dict[str, Any]:
        import wasmtime

        store = wasmtime.Store(self.engine)
        if self.memory_limit is not None:
            store.set_limits(memory_size=self.memory_limit)
        linker = wasmtime.Linker(self.engine)
        if any(i.module.startswith("wasi") for i in self.module.imports):
            linker.define_wasi()
            store.set_wasi(wasmtime.WasiConfig())  # no files, no network, no environment
        self._deadline(store)
        instance = linker.instantiate(store, self.module)
        exports = instance.exports(store)
        inst: dict[str, Any] = {"store": store, **{name: exports[name] for name in
                                   ("memory", "alloc", "process", "configure", "dealloc")
                                   if name in exports}}
        if "configure" in inst:
            self._deadline(store)
            code = self._with_bytes(inst, orjson.dumps(self.config),
                                    lambda ptr, n: inst["configure"](store, ptr, n))
            if code != 0:
                msg = f"plugin {self.name!r} rejected its configuration (code {code})"
                raise PluginSetupError(msg)
        return inst

    def _deadline(self, store: Any) -> None:
        if self.ticker is not None:
            store.set_epoch_deadline(self.TICKS)

    def _span(self, inst: dict[str, Any], ptr: int, n: int, what: str) -> None:
        """Refuse a region ``[ptr, ptr + n)`` the module gave that lies outside its memory."""
        size = inst["memory"].data_len(inst["store"])
        if ptr < 0 or ptr + n > size:
            msg = (f"plugin {self.name!r}: {what} returned an out-of-bounds pointer "
                   f"({ptr} for {n} bytes; its memory has {size} bytes)")
            raise PluginError(msg)

    def _with_bytes(self, inst: dict[str, Any], data: bytes, call: Callable[[int, int], Any]
                    ) -> Any:
        store = inst["store"]
        ptr = inst["alloc"](store, len(data)) & 0xFFFFFFFF
        self._span(inst, ptr, len(data), "alloc")
        inst["memory"].write(store, data, ptr)
        try:
            return call(ptr, len(data))
        finally:
            if "dealloc" in inst:
                inst["dealloc"](store, ptr, len(data))

    def call(self, records: list[Any]) -> list[Any]:
        """Run ``process`` on a list of records; the plugin's list of results."""
        import wasmtime

        inst = self._instance()
        store = inst["store"]
        self._deadline(store)

        def run(ptr: int, n: int) -> bytes:
            packed = inst["process"](store, ptr, n) & 0xFFFFFFFFFFFFFFFF
            out_ptr, out_len = packed >> 32, packed & 0xFFFFFFFF
            self._span(inst, out_ptr, out_len, "process")
            data = bytes(inst["memory"].read(store, out_ptr, out_ptr + out_len))
            if "dealloc" in inst:
                inst["dealloc"](store, out_ptr, out_len)
            return data

        try:
            sent = json_bytes(records)
        except RecordError as exc:  # nested too deeply: retried record by record
            msg = f"plugin {self.name!r}: {exc}"
            raise PluginError(msg) from None
        try:
            data = self._with_bytes(inst, sent, run)
        except PluginError:
            self.local.instance = None  # its allocator may be broken: start anew
            raise
        except wasmtime.Trap as exc:
            self.local.instance = None  # a trapped instance may be inconsistent: start anew
            if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                msg = f"plugin {self.name!r} timed out after {self.timeout:g}s"
                raise PluginTimeout(msg) from None
            msg = f"plugin {self.name!r} trapped: {exc.message}"
            raise PluginError(msg) from None
        except wasmtime.WasmtimeError as exc:
            self.local.instance = None
            msg = f"plugin {self.name!r} failed: {exc}"
            raise PluginError(msg) from None
        try:
            out = _LOADS(data)  # a number a float would round: its text, as sources give
        except orjson.JSONDecodeError as exc:
            msg = f"plugin {self.name!r} returned invalid JSON: {exc}"
            raise PluginError(msg) from None
        if not isinstance(out, list) or len(out) != len(records):
            got = f"{len(out)} results" if isinstance(out, list) else type(out).__name__
            msg = f"plugin {self.name!r} returned {got} for {len(records)} records"
            raise PluginError(msg)
        return out


def _result(step: str, plugin: str, record: Any, out: Any) -> Any:
    """The output record for one plugin result (``None``: dropped), or a ``Failed``."""
    meta = record.get(META) if isinstance(record, dict) else None
    if out is None:
        return None
    if isinstance(out, dict) and "$error" in out:
        return Failed(step, "PluginError", f"plugin {plugin!r}: {out['$error']}", record,
                      meta or {})
    if not isinstance(out, dict):
        got = a_or_an(type(out).__name__)
        return Failed(step, "PluginError", f"plugin {plugin!r} returned {got}, expected an object",
                      record, meta or {})
    if meta is not None:
        out[META] = meta
    return out


def wasm_batches(step: str, plugin: WasmPlugin) -> Callable[[Batch], tuple[Batch, list[Failed]]]:
    """The per-batch function: one call per batch, record by record when a batch fails.

    A batch that timed out is not retried record by record: each record would wait for the
    time limit again. Its records fail with the timeout (a batch of one record is the
    record's own timeout).
    """

    def fail_all(batch: Batch, exc: PluginError) -> list[Failed]:
        return [Failed(step, "PluginError", str(exc), record,
                       record.get(META, {}) if isinstance(record, dict) else {})
                for record in batch]

    def apply(batch: Batch) -> tuple[Batch, list[Failed]]:
        good: Batch = []
        bad: list[Failed] = []
        bodies = [without_meta(r) for r in batch]
        try:
            pairs = list(zip(batch, plugin.call(bodies), strict=True))
        except PluginTimeout as exc:
            return [], fail_all(batch, exc)
        except PluginError:
            pairs = []
            for record, body in zip(batch, bodies, strict=True):
                try:
                    pairs.append((record, plugin.call([body])[0]))
                except PluginError as exc:
                    meta = record.get(META, {}) if isinstance(record, dict) else {}
                    bad.append(Failed(step, "PluginError", str(exc), record, meta))
        for record, out in pairs:
            result = _result(step, plugin.name, record, out)
            if isinstance(result, Failed):
                bad.append(result)
            elif result is not None:
                good.append(result)
        return good, bad

    return apply


def native_function(name: str, path: str) -> Callable[..., Any]:
    """The Python function ``module:function`` of a native plugin."""
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        msg = f"plugin {name!r}: cannot import {path!r}: {exc}"
        raise PluginSetupError(msg) from None
    if not callable(fn):
        msg = f"plugin {name!r}: {path!r} is not callable"
        raise PluginSetupError(msg)
    return fn


def _settings(plugin: Plugin, call_config: Any) -> dict[str, Any]:
    extra = dict(plugin.config.model_extra or {})
    return {**extra, **dict(call_config.model_extra or {})}


def build_plugin_step(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build a ``plugin`` / ``custom`` step around the plugin its ``plugin:`` names."""
    name = ctx.component.plugin
    plugin = ctx.workflow.plugins.get(name) if name else None
    if plugin is None and "formula" in (ctx.config.model_extra or {}):
        from dataflare.operators.formula import build_formula_step

        return build_formula_step(ctx, ups, dict(ctx.config.model_extra or {}))
    if plugin is None:
        msg = f"step {ctx.step_id!r}: plugin {name!r} is not defined in 'plugins'"
        raise PluginSetupError(msg)
    up = ups[0]
    settings = _settings(plugin, ctx.config)
    if plugin.type == "native":
        fn = native_function(name, plugin.path or "")
        step = ctx.step_id

        def call(record: Any) -> Any:  # the contract of every plugin kind (see _result)
            try:
                out = fn(without_meta(record), settings)
            except SystemExit as exc:  # a library's sys.exit() ends the record, not the run
                msg = f"plugin {name!r} called exit({exc.code!r})"
                raise PluginError(msg) from None
            result = _result(step, name, record, out)
            if isinstance(result, Failed):
                raise PluginError(result.message)
            return result

        out = map_records("call", up, call, step)
        return Outputs(down=out.down, errs=out.errs)
    if plugin.type == "remote":
        from dataflare.operators.remote_plugin import build_remote_step

        return build_remote_step(ctx, ups, name, plugin, settings, _result)
    if plugin.type != "wasm":
        msg = f"step {ctx.step_id!r}: {plugin.type} plugins are not available yet"
        raise PluginSetupError(msg)
    limits = plugin.config
    wasm = WasmPlugin(
        name, ctx.path(plugin.path or ""), settings,
        parse_size(limits.memory_limit) if limits.memory_limit else None,
        plugin.call_timeout(DEFAULT_WASM_TIMEOUT),
    )
    wasm.check()
    pairs = op.map("call", up, wasm_batches(ctx.step_id, wasm))
    down = op.filter_map("down", pairs, lambda p: p[0] or None)
    errs = op.filter_map("errs", pairs, lambda p: p[1] or None)
    return Outputs(down=down, errs=errs)


def plugin_schema(ctx: SchemaContext[PluginCallConfig]) -> FieldType | None:
    """A formula step's schema; a plugin's output is unknown."""
    plugins = ctx.workflow.get("plugins")
    defined = isinstance(plugins, dict) and ctx.component.get("plugin") in plugins
    extra = dict(ctx.config.model_extra or {})
    if not defined and "formula" in extra:
        from dataflare.operators.formula import formula_schema

        return formula_schema(ctx, extra)
    return None


for _type, _what in (("plugin", "Call a plugin (WASM or native Python) on each record."),
                     ("custom", "A transformation implemented by a plugin.")):
    transformation(_type, config=PluginCallConfig, description=_what, blocks=("plugin",),
                   schema=plugin_schema)(build_plugin_step)

