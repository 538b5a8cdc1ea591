"""The plugin SDK: the example plugin built from source, `dataflare plugin test`, in a run."""

from __future__ import annotations

import json
import random
import re
import shutil
import string
import subprocess
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from tests.fixtures.workflows import ROOT, read_jsonl, run_cli

PLUGINS = ROOT / "flows" / "plugins"


def build(name: str, out_dir: Path) -> Path:
    """Compile flows/plugins/NAME.wat to a .wasm binary (wasmtime's wat2wasm, from PyPI)."""
    out = out_dir / f"{name}.wasm"
    out.write_bytes(wasmtime.wat2wasm((PLUGINS / f"{name}.wat").read_text()))
    return out


def masked(value: Any) -> Any:
    """The example's job, computed independently: digits in strings (and keys) become '#'."""
    if isinstance(value, str):
        return re.sub(r"[0-9]", "#", value)
    if isinstance(value, list):
        return [masked(v) for v in value]
    if isinstance(value, dict):
        return {masked(k): masked(v) for k, v in value.items()}
    return value


def random_records(n: int = 300) -> list[dict[str, Any]]:
    rnd = random.Random(5)
    chars = string.ascii_letters + string.digits + ' "\\/-+.éü€'

    def text() -> str:
        return "".join(rnd.choice(chars) for _ in range(rnd.randrange(0, 20)))

    return [
        {"id": i, "card": f"{rnd.randrange(10**15, 10**16)}", "note": text(),
         "amount": rnd.uniform(-1e6, 1e6), "tags": [text(), rnd.randrange(100)],
         "nested": {"phone": f"+1 555 {rnd.randrange(1000, 9999)}", "ok": rnd.random() < 0.5,
                    "none": None}}
        for i in range(n)
    ]


def test_example_built_from_source_matches_an_independent_computation(tmp_path):
    wasm = build("redact_digits", tmp_path)
    records = random_records()
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_cli("plugin", "test", str(wasm), "--input", str(tmp_path / "in.jsonl"),
                     "--batch-size", "37")
    assert result.code == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert got == [masked(r) for r in records]
    assert any("#" in r["card"] for r in got)


def test_assemblyscript_example_built_with_npm_matches_the_same_computation(tmp_path):
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (the AssemblyScript toolchain comes from npm)")
    src = tmp_path / "as"
    shutil.copytree(PLUGINS / "redact_digits_as", src,
                    ignore=shutil.ignore_patterns("node_modules", "build"))
    for step in (["install", "--no-audit", "--no-fund"], ["run", "build"]):
        done = subprocess.run([npm, *step], cwd=src, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    records = random_records()
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_cli("plugin", "test", str(src / "build" / "redact_digits.wasm"),
                     "--input", str(tmp_path / "in.jsonl"), "--memory-limit", "16MiB")
    assert result.code == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        masked(r) for r in records]


def test_template_returns_records_unchanged(tmp_path):
    wasm = build("template", tmp_path)
    records = random_records(50)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_cli("plugin", "test", str(wasm), "--input", str(tmp_path / "in.jsonl"))
    assert result.code == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == records


def test_failures_are_reported_with_file_and_line(tmp_path):
    shout = ROOT / "tests" / "operators" / "plugins" / "shout.wat"
    src = tmp_path / "in.jsonl"
    src.write_text('{"a": "x"}\n{"a": "boom!"}\nnot json\n{"a": "y"}\n')
    result = run_cli("plugin", "test", str(shout), "--input", str(src))
    assert result.code == 1
    assert [json.loads(line) for line in result.stdout.splitlines()] == [{"A": "X"}, {"A": "Y"}]
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{src}:2: plugin 'shout' trapped") for line in lines)
    assert any(line.startswith(f"{src}:3: not JSON") for line in lines)
    (tmp_path / "loop.jsonl").write_text('{"a": "x"}\n{"a": "~"}\n')
    slow = run_cli("plugin", "test", str(shout), "--input", str(tmp_path / "loop.jsonl"),
                   "--timeout", "1s", "--batch-size", "1")
    assert slow.code == 1 and json.loads(slow.stdout) == {"A": "X"}
    assert "loop.jsonl:2: plugin 'shout' timed out after 1s" in slow.stderr
    missing = run_cli("plugin", "test", str(tmp_path / "nope.wasm"), "--input", str(src))
    assert missing.code == 2 and "cannot load" in missing.stderr


def test_native_plugin_with_config(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"amount": 2}\n{"amount": -1}\n{"amount": 3, "skip": true}\n')
    result = run_cli("plugin", "test", "tests.operators.plugins.native:score",
                     "--input", str(src), "--config", '{"weight": 10}')
    assert result.code == 1
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"amount": 2, "score": 20}]
    assert f"{src}:2: negative amount -1" in result.stderr


def test_example_runs_in_a_workflow(tmp_path):
    wasm = build("redact_digits", tmp_path)
    records = random_records(40)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  plugins:
    redact: {{type: wasm, path: {wasm}, config: {{memory_limit: 16MiB, timeout: 5s}}}}
  sources:
    src: {{type: file, config: {{path: in.jsonl}}}}
  transformations:
    clean: {{type: plugin, plugin: redact, inputs: [src]}}
  destinations:
    out: {{type: file, inputs: [clean], config: {{path: out.jsonl}}}}
""")
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [masked(r) for r in records]


def test_records_are_read_as_a_workflows_file_source_reads_them(tmp_path):
    # orjson alone read a 23-digit number as 1e+23: not what the plugin gets in a run.
    from dataflare.plugin_sdk import read_records

    (tmp_path / "in.jsonl").write_text('{"n": 99999999999999999999123, "f": 0.5}\n')
    [record], problems = read_records(tmp_path / "in.jsonl")
    assert problems == []
    assert (record["n"], record["f"]) == ("99999999999999999999123", 0.5)
