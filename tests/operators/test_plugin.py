"""Plugins: a real WASM module (sandboxed, limits, trap isolation) and a native function."""

from pathlib import Path

import pytest

from dataflare.dsl_compiler import validate_text
from tests.fixtures.workflows import read_jsonl, run_cli

SHOUT = Path(__file__).parent / "plugins" / "shout.wat"

FLOW = """\
workflow:
  plugins:
    shout:
      type: wasm
      path: "{path}"
      config: {{memory_limit: "{memory}", timeout: 300ms, style: loud}}
  sources:
    notes: {{type: file, config: {{path: in.jsonl}}}}
  transformations:
    loud:
      type: plugin
      plugin: shout
      inputs: [notes]
      config: {{extra: 1}}
      error_handling: {{strategy: redirect, redirect_to: rejects}}
  destinations:
    out: {{type: file, inputs: [loud], config: {{path: out.jsonl}}}}
    rejects: {{type: file, config: {{path: rejects.jsonl}}}}
"""


def run_flow(tmp_path: Path, lines: list[str], memory: str = "8MiB", path: Path = SHOUT):
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "flow.yaml").write_text(FLOW.format(path=path, memory=memory))
    return run_cli("run", str(tmp_path / "flow.yaml"))


def test_wasm_plugin_transforms_every_record(tmp_path):
    result = run_flow(tmp_path, [
        '{"name": "ada", "tags": ["x", "y"], "ok": true, "n": null, "q": "say \\"hi\\"\\n"}',
        '{"name": "grace", "amount": 1.5e3}',
    ])
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"NAME": "ADA", "TAGS": ["X", "Y"], "OK": True, "N": None, "Q": 'SAY "HI"\n'},
        {"NAME": "GRACE", "AMOUNT": 1500.0},
    ]


def test_a_trapping_record_fails_alone_with_its_position(tmp_path):
    result = run_flow(tmp_path, ['{"a": "one"}', '{"a": "boom!"}', '{"a": "three"}'])
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [{"A": "ONE"}, {"A": "THREE"}]
    [reject] = read_jsonl(tmp_path / "rejects.jsonl")
    assert reject["record"] == {"a": "boom!"}
    assert reject["error"]["type"] == "PluginError"
    assert reject["error"]["message"].startswith("plugin 'shout' trapped")


def test_timeout_and_memory_limit_stop_a_call(tmp_path):
    result = run_flow(tmp_path, ['{"a": "fine"}', '{"a": "spin~"}'])
    assert result.code == 0, result.stderr
    # the batch timed out: its records fail together (no second wait per record)
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert [r["record"] for r in rejects] == [{"a": "fine"}, {"a": "spin~"}]
    assert {r["error"]["message"] for r in rejects} == {"plugin 'shout' timed out after 0.3s"}
    assert read_jsonl(tmp_path / "out.jsonl") == []

    big = '{"a": "' + "x" * 200_000 + '"}'
    result = run_flow(tmp_path, ['{"a": "small"}', big], memory="128KiB")
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [{"A": "SMALL"}]
    [reject] = read_jsonl(tmp_path / "rejects.jsonl")
    assert "trapped" in reject["error"]["message"]


def test_configuration_rejected_or_module_missing_exports(tmp_path):
    module = tmp_path / "picky.wat"
    module.write_text("""(module (memory (export "memory") 1)
      (func (export "alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "configure") (param i32 i32) (result i32) (i32.const 7))
      (func (export "process") (param i32 i32) (result i64) (i64.const 0)))""")
    result = run_flow(tmp_path, ['{"a": 1}'], path=module)
    assert result.code == 1
    assert "plugin 'shout' rejected its configuration (code 7)" in result.stderr
    module.write_text('(module (memory (export "memory") 1))')
    result = run_flow(tmp_path, ['{"a": 1}'], path=module)
    assert result.code == 1
    assert "does not export alloc, process" in result.stderr


def test_native_plugin(tmp_path):
    # A result that was not an object was written as a "record"; the plugin saw _meta, and
    # a new dict it made lost the record's position (dead letters later had none).
    (tmp_path / "in.jsonl").write_text(
        '{"amount": 2}\n{"amount": -1}\n{"amount": 5, "skip": 1}\n{"amount": 101}\n'
        '{"amount": 99}\n')
    (tmp_path / "flow.yaml").write_text("""\
workflow:
  plugins:
    scorer: {type: native, path: "tests.operators.plugins.native:score", config: {weight: 3}}
  sources:
    s: {type: file, config: {path: in.jsonl}}
  transformations:
    scored:
      type: custom
      plugin: scorer
      inputs: [s]
      error_handling: {strategy: redirect, redirect_to: rejects}
  destinations:
    out: {type: file, inputs: [scored], config: {path: out.jsonl}}
    rejects: {type: file, config: {path: rejects.jsonl}}
""")
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [{"amount": 2, "score": 6}]
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert [{k: r["error"][k] for k in ("step", "type", "message")} for r in rejects] == [
        {"step": "scored", "type": "ValueError", "message": "negative amount -1"},
        {"step": "scored", "type": "PluginError",
         "message": "plugin 'scorer' returned a list, expected an object"},
        {"step": "scored", "type": "PluginError", "message": "plugin 'scorer' called exit(3)"}]
    assert [r["source"]["position"]["line"] for r in rejects] == [2, 4, 5]


# alloc hands out a pointer far past the module's one page of memory
BAD_ALLOC = """(module (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 0x7ffffff0))
  (func (export "process") (param i32 i32) (result i64) (i64.const 0)))"""

# process answers with a result region past the end of memory, except for '[{}]'
BAD_RESULT = """(module (memory (export "memory") 1)
  (data (i32.const 16) "[{}]")
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "process") (param $ptr i32) (param $len i32) (result i64)
    (if (result i64) (i32.eq (local.get $len) (i32.const 4))
      (then (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 4)))
      (else (i64.or (i64.shl (i64.const 65000) (i64.const 32)) (i64.const 4096))))))"""


def test_out_of_bounds_pointers_fail_their_records_not_the_run(tmp_path):
    module = tmp_path / "bad_alloc.wat"
    module.write_text(BAD_ALLOC)
    result = run_flow(tmp_path, ['{"a": 1}', '{"a": 2}'], path=module)
    assert result.code == 0, result.stderr
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert [r["record"] for r in rejects] == [{"a": 1}, {"a": 2}]
    message = rejects[0]["error"]["message"]
    assert message.startswith("plugin 'shout': alloc returned an out-of-bounds pointer")
    assert rejects[1]["source"]["position"]["line"] == 2

    module = tmp_path / "bad_result.wat"
    module.write_text(BAD_RESULT)
    result = run_flow(tmp_path, ["{}", '{"a": 2}'], path=module)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [{}]
    [reject] = read_jsonl(tmp_path / "rejects.jsonl")
    assert reject["record"] == {"a": 2}
    assert "process returned an out-of-bounds pointer (65000 for 4096 bytes" in (
        reject["error"]["message"])


SPIN = """(module (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "process") (param i32 i32) (result i64) (loop $forever (br $forever))
    (i64.const 0)))"""


def test_timeouts_have_a_default_and_fail_the_batch_without_per_record_retries(
    tmp_path, monkeypatch
):
    import threading

    from bytewax.testing import run_main

    from dataflare.dsl_compiler import compile_file
    from dataflare.operators import plugin as plugin_module

    module = tmp_path / "spin.wat"
    module.write_text(SPIN)
    (tmp_path / "in.jsonl").write_text("".join(f'{{"n": {i}}}\n' for i in range(50)))
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  plugins:
    spin: {{type: wasm, path: "{module}"}}
  sources:
    s: {{type: file, config: {{path: "{tmp_path}/in.jsonl"}}}}
  transformations:
    p: {{type: plugin, plugin: spin, inputs: [s],
        error_handling: {{strategy: redirect, redirect_to: rejects}}}}
  destinations:
    out: {{type: file, inputs: [p], config: {{path: "{tmp_path}/out.jsonl"}}}}
    rejects: {{type: file, config: {{path: "{tmp_path}/rejects.jsonl"}}}}
""")
    # no 'timeout' given: the default limit (shortened here) stops the endless loop
    monkeypatch.setattr(plugin_module, "DEFAULT_WASM_TIMEOUT", 0.3)
    calls: list[int] = []
    real_call = plugin_module.WasmPlugin.call

    def counted(self, records):
        calls.append(len(records))
        return real_call(self, records)

    monkeypatch.setattr(plugin_module.WasmPlugin, "call", counted)
    flow = compile_file(tmp_path / "flow.yaml")
    runner = threading.Thread(target=run_main, args=(flow,), daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "the endless loop was not interrupted"
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert sorted(r["record"]["n"] for r in rejects) == list(range(50))
    assert {r["error"]["message"] for r in rejects} == {"plugin 'spin' timed out after 0.3s"}
    # one call per batch and none per record after a timeout
    assert sum(calls) == 50


def test_a_result_that_is_not_an_object_fails_its_record_saying_what_came():
    from dataflare.operators.plugin import _result
    from dataflare.records import Failed

    failed = _result("p", "shout", {"x": 1}, 3)
    assert isinstance(failed, Failed)
    assert failed.message == "plugin 'shout' returned an int, expected an object"
    assert _result("p", "shout", {"x": 1}, {"y": 2}) == {"y": 2}
    assert _result("p", "shout", {"x": 1}, None) is None


def test_the_plugins_own_timeout_limits_a_wasm_call(tmp_path):
    # `timeout` beside `path` was read for remote plugins only: a WASM call got 10 s.
    (tmp_path / "in.jsonl").write_text('{"a": "spin~"}\n')
    text = FLOW.format(path=SHOUT, memory="8MiB").replace(
        "config: {memory_limit: \"8MiB\", timeout: 300ms,", "timeout: 300ms\n      config: {")
    (tmp_path / "flow.yaml").write_text(text)
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    [reject] = read_jsonl(tmp_path / "rejects.jsonl")
    assert reject["error"]["message"] == "plugin 'shout' timed out after 0.3s"


def test_an_integer_beyond_64_bits_reaches_a_wasm_plugin_as_its_text(tmp_path):
    # orjson refuses such an integer (to_int makes one) before asking for a fallback: the
    # run stopped, with no step and no record named.
    (tmp_path / "in.jsonl").write_text('{"n": "1"}\n{"n": "99999999999999999999999"}\n')
    text = FLOW.format(path=SHOUT, memory="8MiB").replace("inputs: [notes]", "inputs: [ints]")
    text = text.replace("  transformations:\n", """  transformations:
    ints:
      type: mapping
      inputs: [notes]
      config: {mappings: [{source: n, destination: n, transform: to_int}]}
""")
    (tmp_path / "flow.yaml").write_text(text)
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [{"N": 1}, {"N": "99999999999999999999999"}]


@pytest.mark.parametrize(("plugin", "step", "message"), [
    ("{type: wasm, path: x.wasm}", "{type: plugin, inputs: [src]}",
     "transformations.p: a plugin step needs 'plugin'"),
    ("{type: wasm, path: x.wasm}", "{type: plugin, plugin: nope, inputs: [src]}",
     "transformations.p.plugin: plugin 'nope' is not defined in 'plugins'"),
    ("{type: wasm, path: x.wasm, timeout: 1s, config: {timeout: 2s}}",
     "{type: plugin, plugin: x, inputs: [src]}", "give one of 'timeout' and 'config.timeout'"),
    ("{type: native, path: 'm:f', timeout: 1s}", "{type: plugin, plugin: x, inputs: [src]}",
     "'timeout' has no effect on a native plugin"),
    ("{type: wasm, path: x.wasm, config: {timeout: 0s}}",
     "{type: plugin, plugin: x, inputs: [src]}", "input should be greater than 0"),
])
def test_plugin_steps_validate_refuses_what_the_run_would(plugin, step, message):
    v = validate_text(f"""\
workflow:
  plugins: {{x: {plugin}}}
  sources: {{src: {{type: file, config: {{path: in.jsonl}}}}}}
  transformations: {{p: {step}}}
  destinations: {{out: {{type: stdout, inputs: [p]}}}}
""", "w.yaml")
    assert any(message in p.render() for p in v.errors()), [p.render() for p in v.problems]


def test_a_limit_in_a_steps_config_is_said_to_be_the_plugins_setting():
    # It was handed to the plugin as data; the call's limit stayed 10 s.
    v = validate_text("""\
workflow:
  plugins: {x: {type: wasm, path: x.wasm}}
  sources: {src: {type: file, config: {path: in.jsonl}}}
  transformations: {p: {type: plugin, plugin: x, inputs: [src], config: {timeout: 1s}}}
  destinations: {out: {type: stdout, inputs: [p]}}
""", "w.yaml")
    assert [p.render() for p in v.problems if "handed" in p.message] == [
        "w.yaml:4:74: transformations.p.config.timeout: warning: 'timeout' in a step's config "
        "is a setting handed to the plugin, not a limit of its calls: set it on plugins.x"]


def test_a_module_that_cannot_start_names_its_plugin(tmp_path):
    # wasmtime's own message came alone ("memory minimum size of 1 pages exceeds memory
    # limits"), naming no plugin and no setting.
    result = run_flow(tmp_path, ['{"a": 1}'], memory="10KB")
    assert result.code == 1
    assert result.stderr.splitlines()[-1] == (
        "error: plugin 'shout' cannot start: memory minimum size of 1 pages exceeds memory "
        "limits (memory_limit is 10000 bytes)")
