"""data_quality end to end through ``dataflare run``: rules, on_failure modes, the summary."""

from pathlib import Path

import orjson
import pytest

from dataflare.operators.quality import DataQualityConfig, _Checker
from dataflare.records import RecordError
from tests.fixtures.workflows import read_jsonl, run_cli

FLOW = """\
workflow:
  id: quality
  sources:
    customers: {type: file, config: {path: customers.jsonl}}
  transformations:
    cleansing:
      inputs: [customers]
      type: data_quality
      config:
        on_failure: MODE
        QUARANTINE
        default_region: FR
        validations:
          - field: email
            rules: [not_empty, is_email, standardize_format]
          - field: phone
            rules: [is_phone_number, standardize_format]
          - field: age
            rules: [is_number, {range: {min: 0, max: 120}}]
          - field: country
            rules: [{in: [FR, US]}, {max_length: 2}, {regex: "[A-Z]+"}]
          - field: signup
            rules: [not_null, is_date]
      error_handling: {strategy: STRATEGY, redirect_to: dead}
  destinations:
    good: {type: file, inputs: [cleansing], config: {path: out/good.jsonl}}
    dead: {type: file, config: {path: out/dead.jsonl}}
    quarantine: {type: file, config: {path: out/quarantine.jsonl}}
"""

OK = {"id": 1, "email": " Ann@Example.COM ", "phone": "01 42 68 53 00", "age": "34",
      "country": "FR", "signup": "2024-03-01"}
BAD_EMAIL = {**OK, "id": 2, "email": "not-an-email"}
BAD_MANY = {**OK, "id": 3, "phone": "12", "age": 130, "country": "DE", "signup": None}
US_PHONE = {**OK, "id": 4, "phone": "+1 (650) 253-0000", "country": "US"}
NOT_STRING = {**OK, "id": 5, "email": 42}


def write(tmp_path: Path, mode: str, strategy: str = "redirect",
          quarantine_to: bool = False) -> Path:
    rows = [OK, BAD_EMAIL, BAD_MANY, US_PHONE, NOT_STRING]
    (tmp_path / "customers.jsonl").write_text("\n".join(orjson.dumps(r).decode() for r in rows))
    text = FLOW.replace("MODE", mode).replace("STRATEGY", strategy).replace(
        "QUARANTINE", "quarantine_to: quarantine" if quarantine_to else "")
    if not quarantine_to:
        text = "\n".join(ln for ln in text.splitlines() if "out/quarantine" not in ln) + "\n"
    flow = tmp_path / "flow.yaml"
    flow.write_text(text)
    return flow


def test_quarantine_to_destination_standardizes_and_counts(tmp_path):
    flow = write(tmp_path, "quarantine", quarantine_to=True)
    result = run_cli("run", str(flow))
    assert result.code == 0, result.stderr
    good = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "good.jsonl")}
    assert set(good) == {1, 4}
    assert good[1]["email"] == "ann@example.com"
    assert good[1]["phone"] == "+33142685300"
    assert good[4]["phone"] == "+16502530000"
    quarantined = {d["record"]["id"]: d for d in read_jsonl(tmp_path / "out" / "quarantine.jsonl")}
    assert set(quarantined) == {2, 3}
    assert quarantined[2]["error"]["type"] == "quality"
    assert quarantined[2]["error"]["step"] == "cleansing"
    assert quarantined[2]["error"]["rules"] == [
        {"field": "email", "rule": "is_email"}, {"field": "email", "rule": "standardize_format"},
    ]
    assert quarantined[2]["record"]["email"] == "not-an-email"  # the original record
    assert quarantined[2]["source"]["component"] == "customers"  # like other dead letters
    assert quarantined[3]["error"]["rules"] == [
        {"field": "phone", "rule": "is_phone_number"},
        {"field": "phone", "rule": "standardize_format"},
        {"field": "age", "rule": "range"},
        {"field": "country", "rule": "in"},
        {"field": "signup", "rule": "not_null"},
    ]
    # a non-string e-mail is an error of the step (redirected), not a quality failure
    dead = read_jsonl(tmp_path / "out" / "dead.jsonl")
    assert [d["record"]["id"] for d in dead] == [5]
    assert "email" in dead[0]["error"]["message"]
    assert "needs a string" in dead[0]["error"]["message"]
    # the quality table of the run summary
    assert "quality of cleansing" in result.stderr
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("  email is_email"))
    assert line.split() == ["email", "is_email", "4", "1", "75.0%"], result.stderr


def test_quarantine_without_destination_follows_redirect(tmp_path):
    flow = write(tmp_path, "quarantine")
    assert run_cli("run", str(flow)).code == 0
    dead = {d["record"]["id"]: d for d in read_jsonl(tmp_path / "out" / "dead.jsonl")}
    assert set(dead) == {2, 3, 5}
    assert dead[2]["error"]["type"] == "quality"
    assert dead[2]["error"]["rules"][0] == {"field": "email", "rule": "is_email"}


def test_flag_keeps_every_record(tmp_path):
    flow = write(tmp_path, "flag")
    assert run_cli("run", str(flow)).code == 0
    good = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "good.jsonl")}
    assert set(good) == {1, 2, 3, 4}
    assert good[1]["_quality"] == {"passed": True, "failed": []}
    assert good[2]["_quality"]["passed"] is False
    assert {"field": "email", "rule": "is_email"} in good[2]["_quality"]["failed"]


def test_drop(tmp_path):
    flow = write(tmp_path, "drop", strategy="skip")
    result = run_cli("run", str(flow))
    assert result.code == 0, result.stderr
    assert {r["id"] for r in read_jsonl(tmp_path / "out" / "good.jsonl")} == {1, 4}


def test_fail_names_step_and_position(tmp_path):
    flow = write(tmp_path, "fail")
    result = run_cli("run", str(flow))
    assert result.code != 0
    assert "'cleansing'" in result.stderr
    assert "customers.jsonl:2" in result.stderr
    assert "email is_email" in result.stderr


@pytest.mark.parametrize(
    ("rules", "error"),
    [
        (["nope"], "unknown rule 'nope'"),
        (["range"], "takes parameters"),
        ([{"range": {"min": "a"}}], "range takes"),
        ([{"regex": "("}], "invalid regex"),
        ([{"not_null": 1}], "takes no parameters"),
    ],
)
def test_bad_rules_refused(rules, error):
    with pytest.raises(ValueError, match=error):
        DataQualityConfig.model_validate({"validations": [{"field": "x", "rules": rules}]})


def test_rules_directly():
    cfg = DataQualityConfig.model_validate({"validations": [
        {"field": "n", "rules": ["is_number", {"max_length": 3}]},
        {"field": "d", "rules": ["is_date", "not_empty"]},
        {"field": "p", "rules": ["is_phone_number"]},
    ]})
    check = _Checker("s", cfg).check
    assert check({"n": 5, "d": "2024-01-01T10:00:00Z", "p": None})[1] == []
    assert check({"n": "x1234", "d": "yesterday", "p": "+1 650 253 0000"})[1] == [
        {"field": "n", "rule": "is_number"}, {"field": "n", "rule": "max_length"},
        {"field": "d", "rule": "is_date"},
    ]
    assert check({"n": True, "d": " "})[1] == [
        {"field": "n", "rule": "is_number"}, {"field": "d", "rule": "is_date"},
        {"field": "d", "rule": "not_empty"},
    ]
    with pytest.raises(RecordError, match="field 'p' is an int"):
        check({"p": 6502530000})


def test_in_tells_booleans_from_numbers():
    # Python's True == 1 let true pass {in: [1]} and 0 pass {in: [false]}.
    cfg = DataQualityConfig.model_validate({"validations": [
        {"field": "status", "rules": [{"in": [1, "a"]}]},
        {"field": "flag", "rules": [{"in": [False]}]},
    ]})
    check = _Checker("s", cfg).check
    assert check({"status": 1.0, "flag": False})[1] == []
    assert check({"status": True, "flag": 0})[1] == [
        {"field": "status", "rule": "in"}, {"field": "flag", "rule": "in"}]
