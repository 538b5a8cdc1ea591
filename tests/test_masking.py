"""Masking rules: keyed hashes, dead letters of undecodable input, log lines quoting records."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from dataflare.dsl_compiler import validate_text
from tests.fixtures.workflows import read_jsonl, run_cli

KEY = "m4sk-K3y-for-tests"
EMAIL, CARD = "alice@example.com", "4111111111111111"


def _flow(tmp_path: Path, lines: str, source_policy: str = "") -> Path:
    (tmp_path / "in.jsonl").write_text(lines)
    flow = tmp_path / "flow.yaml"
    flow.write_text(f"""\
workflow:
  id: masked
  data_protection:
    hash_key: "${{MASK_KEY}}"
    masking_rules:
      - {{field: email, method: hash}}
      - {{field: card, method: partial, show_chars: 4}}
  sources:
    src:
      type: file
      config: {{path: in.jsonl}}
      {source_policy}
  transformations:
    m:
      inputs: [src]
      type: mapping
      config:
        keep_unmapped: true
        mappings: [{{source: card, destination: card, transform: to_int}}]
      error_handling: {{strategy: redirect, redirect_to: errs}}
  destinations:
    o: {{type: file, inputs: [m], config: {{path: o.jsonl}}}}
    errs: {{type: file, config: {{path: errs.jsonl}}}}
""")
    return flow


def test_hash_is_a_keyed_hmac(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASK_KEY", KEY)
    flow = _flow(tmp_path, json.dumps({"email": EMAIL, "card": "41"}) + "\n")
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 0, result.stderr
    (out,) = read_jsonl(tmp_path / "o.jsonl")
    keyed = hmac.new(KEY.encode(), EMAIL.encode(), hashlib.sha256).hexdigest()
    assert out["email"] == keyed
    assert out["email"] != hashlib.sha256(EMAIL.encode()).hexdigest()
    assert out["card"] == "41****"


def test_hash_without_a_key_is_refused() -> None:
    v = validate_text("""\
workflow:
  data_protection:
    masking_rules: [{field: email, method: hash}]
  sources: {s: {type: file, config: {path: in.jsonl}}}
  destinations: {o: {type: file, inputs: [s], config: {path: o.jsonl}}}
""")
    assert any("needs data_protection.hash_key" in p.message for p in v.errors())


def test_dead_letters_and_log_lines_are_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MASK_KEY", KEY)
    broken = '{"email": "' + EMAIL + '", "card": "' + CARD + '", oops\n'
    quoted = json.dumps({"email": "bob@example.com", "card": "4222 2222 2222 2222"}) + "\n"
    flow = _flow(tmp_path, broken + quoted,
                 "error_handling: {strategy: redirect, redirect_to: errs}")
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 0, result.stderr
    dead = read_jsonl(tmp_path / "errs.jsonl")
    assert len(dead) == 2
    assert "redirected record" in result.stderr  # the warnings quoting records were printed
    everything = result.stderr + result.stdout + (tmp_path / "errs.jsonl").read_text()
    for clear in (EMAIL, CARD, "bob@example.com", "4222 2222 2222 2222"):
        assert clear not in everything
    raw = next(d for d in dead if d["error"]["step"] == "src")
    assert isinstance(raw["record"], str) and '"card": "4111****"' in raw["record"]
    keyed = hmac.new(KEY.encode(), EMAIL.encode(), hashlib.sha256).hexdigest()
    assert keyed in raw["record"]


def test_a_key_read_from_a_field_masking_makes_alike_is_refused() -> None:
    # alice@ and alfred@ both became 'al****': one overwrote the other in a Redis hash and
    # in a merge, without a word.
    v = validate_text("""\
workflow:
  data_protection:
    masking_rules:
      - {field: email, method: partial, show_chars: 2}
      - {field: name, method: hash}
  sources:
    src: {type: file, config: {path: in.jsonl}}
  destinations:
    r: {type: redis, inputs: [src], config: {key_template: "u:{{email}}"}}
    l: {type: redis, inputs: [src], config: {key_template: "u:{{email}}", data_structure: list}}
    m:
      type: postgres
      inputs: [src]
      config: {dsn: "postgresql://127.0.0.1/test", table: t}
      write_mode: {type: merge, merge_key: [email]}
    n:
      type: postgres
      inputs: [src]
      config: {dsn: "postgresql://127.0.0.1/test", table: t}
      write_mode: {type: merge, merge_key: [name]}
""", "w.yaml")
    assert [(p.severity, p.path) for p in v.problems if "masked (" in p.message] == [
        ("error", "destinations.r.config.key_template"),
        ("warning", "destinations.l.config.key_template"),
        ("error", "destinations.m.write_mode.merge_key"),
    ]
