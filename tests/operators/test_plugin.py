"""Plugins: a real WASM module (sandboxed, limits, trap isolation) and a native function."""

from pathlib import Path

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
    [reject] = read_jsonl(tmp_path / "rejects.jsonl")
    assert reject["error"]["message"] == "plugin 'shout' timed out after 0.3s"
    assert read_jsonl(tmp_path / "out.jsonl") == [{"A": "FINE"}]

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
    (tmp_path / "in.jsonl").write_text('{"amount": 2}\n{"amount": -1}\n{"amount": 5, "skip": 1}\n')
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
    [reject] = read_jsonl(tmp_path / "rejects.jsonl")
    assert {k: reject["error"][k] for k in ("step", "type", "message")} == {
        "step": "scored", "type": "ValueError", "message": "negative amount -1"}
