"""Expression functions, property-tested against a reference computation (hypothesis)."""

import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflare.dsl_compiler import validate_text
from dataflare.expr import FUNCTIONS, ExpressionError, compile_expression
from dataflare.expr_functions import EXAMPLES
from dataflare.records import RecordError

ROOT = Path(__file__).resolve().parents[1]
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
words = st.text(alphabet="abc-_ ", max_size=20)
ints = st.integers(-40, 40)
moments = st.datetimes(datetime(1971, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)).map(
    lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))  # timestamps keep ms
zones = st.sampled_from(["UTC", "Europe/Paris", "Asia/Kolkata", "America/New_York",
                         "Australia/Lord_Howe", "Pacific/Chatham"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=10,
)
fast = settings(max_examples=60, deadline=None)


def ev(expression, **record):
    return compile_expression(expression)(record)


@fast
@given(c=st.booleans(), a=ints, b=ints)
def test_if_then_else(c, a, b):
    assert ev("if c then a else b", c=c, a=a, b=b) == (a if c else b)
    assert ev("if c then a", c=c, a=a) == (a if c else None)
    # only the chosen branch runs: the other would divide by zero
    assert ev("if c then 1 else 1 / 0", c=True) == 1


@fast
@given(s=text, start=ints, end=ints)
def test_substring_and_slice(s, start, end):
    assert ev("substring(s, start, end)", s=s, start=start, end=end) == s[start:end]
    assert ev("substring(s, start)", s=s, start=start) == s[start:]
    items = list(s)
    assert ev("slice(items, start, end)", items=items, start=start, end=end) == items[start:end]


@fast
@given(s=words, old=st.text(alphabet="ab-", min_size=1, max_size=3), new=words)
def test_replace_split_join(s, old, new):
    assert ev("replace(s, old, new)", s=s, old=old, new=new) == s.replace(old, new)
    assert ev("split(s, old)", s=s, old=old) == s.split(old)
    assert ev("join(split(s, old), old)", s=s, old=old) == s
    assert ev("join(items, ',')", items=[s, None, 3]) == f"{s},3"


@fast
@given(s=words, pattern=st.sampled_from([r"\w+", r"(a+)b", r"^-", r"(?P<x>c)c?", r"\s"]),
       repl=st.sampled_from(["*", r"<\g<0>>", ""]))
def test_regex_functions(s, pattern, repl):
    compiled = re.compile(pattern)
    m = compiled.search(s)
    assert ev(f"regex_match(s, '{pattern}')", s=s) == (m is not None)
    want = None if m is None else m.group(1 if compiled.groups else 0)
    assert ev(f"regex_extract(s, '{pattern}')", s=s) == want
    assert ev("regex_extract(s, p, 0)", s=s, p=pattern) == (m and m.group(0))
    assert ev(f"regex_replace(s, '{pattern}', r)", s=s, r=repl) == compiled.sub(repl, s)


def test_a_literal_pattern_is_compiled_once_and_a_bad_one_located_at_validate(monkeypatch):
    import dataflare.expr_functions as functions

    fn = compile_expression(r"regex_match(s, 'x\d')")
    with monkeypatch.context() as patch:
        patch.setattr(functions, "regex", None)  # no compile per record
        assert [fn({"s": f"x{i}"}) for i in range(3)] == [True, True, True]
    with pytest.raises(ExpressionError, match=r"expression '\(a': .* at column 16"):
        compile_expression("regex_match(s, '(a')")
    v = validate_text("""\
workflow:
  sources:
    g: {type: generator, config: {preset: orders, count: 1}}
  transformations:
    f: {type: filter, inputs: [g], config: {condition: "regex_match(id, '[a')"}}
  destinations:
    o: {type: stdout, inputs: [f]}
""")
    [problem] = v.errors()
    assert (problem.line, problem.path) == (5, "transformations.f.config.condition")
    assert "invalid regular expression '[a'" in problem.message
    with pytest.raises(RecordError, match="invalid regular expression"):
        ev("regex_match(s, p)", s="a", p="(")


@fast
@given(moment=moments, tz=zones)
def test_timezones_and_formats(moment, tz):
    iso = moment.isoformat().replace("+00:00", "Z")
    local = moment.astimezone(ZoneInfo(tz))
    got = ev("to_timezone(ts, tz)", ts=iso, tz=tz)
    assert datetime.fromisoformat(got) == moment
    assert datetime.fromisoformat(got).utcoffset() == local.utcoffset()
    assert ev("format_timestamp(ts, '%Y-%m-%d %H:%M', tz)", ts=moment.timestamp(), tz=tz) == (
        local.strftime("%Y-%m-%d %H:%M"))
    wall = local.replace(microsecond=0).strftime("%d/%m/%Y %H:%M:%S")
    parsed = ev("parse_timestamp(t, '%d/%m/%Y %H:%M:%S', tz)", t=wall, tz=tz)
    want = datetime.strptime(wall, "%d/%m/%Y %H:%M:%S").replace(tzinfo=ZoneInfo(tz))
    # As instants: an ambiguous wall time (the hour repeated when clocks go back) means
    # its first occurrence, and never compares equal across zones (PEP 495).
    assert datetime.fromisoformat(parsed).timestamp() == want.timestamp()


def test_format_timestamp_repeats_give_the_same_text_per_value_type_and_zone():
    fmt = "'%Y-%m-%d %H:%M:%S %Z'"
    for _ in range(2):  # the second round is answered from the recent results
        assert ev(f"format_timestamp(t, {fmt})", t=60) == "1970-01-01 00:01:00 UTC"
        assert ev(f"format_timestamp(t, {fmt})", t=60.0) == "1970-01-01 00:01:00 UTC"
        assert ev(f"format_timestamp(t, {fmt}, 'Asia/Tokyo')", t=60) == (
            "1970-01-01 09:01:00 JST")
        assert ev(f"format_timestamp(t, {fmt})", t="1970-01-01T00:02:00Z") == (
            "1970-01-01 00:02:00 UTC")
        with pytest.raises(RecordError):
            ev(f"format_timestamp(t, {fmt})", t=True)  # not taken for 1
    before = ev("format_timestamp('now', '%Y-%m-%dT%H:%M:%S.%f')")
    assert ev("format_timestamp('now', '%Y-%m-%dT%H:%M:%S.%f')") > before  # never cached


@fast
@given(a=moments, days=st.integers(-3000, 3000), seconds=st.integers(0, 86399))
def test_days_between(a, days, seconds):
    b = a + timedelta(days=days, seconds=seconds if days >= 0 else -seconds)
    assert ev("days_between(a, b)", a=a.isoformat(), b=b.timestamp()) == int(
        (b - a).total_seconds() / 86400)
    assert ev("days_between(a, 'now')", a=datetime.now(UTC).isoformat()) == 0


@fast
@given(value=json_values)
def test_json_round_trip(value):
    assert ev("parse_json(to_json(v))", v=value) == value
    assert ev("to_json(v)", v=value) == json.dumps(value, sort_keys=True,
                                                   separators=(",", ":"), ensure_ascii=False)


@fast
@given(s=text, key=text)
def test_sha256_and_hmac(s, key):
    assert ev("sha256(s)", s=s) == hashlib.sha256(s.encode()).hexdigest()
    assert ev("hmac(s, k)", s=s, k=key) == hmac.new(key.encode(), s.encode(),
                                                    hashlib.sha256).hexdigest()


@fast
@given(items=st.lists(st.integers(-1000, 1000) | st.none(), max_size=8))
def test_list_functions(items):
    assert ev("len(xs)", xs=items) == len(items)
    assert ev("first(xs)", xs=items) == (items[0] if items else None)
    assert ev("last(xs)", xs=items) == (items[-1] if items else None)
    assert ev("sum(xs)", xs=items) == sum(i for i in items if i is not None)
    assert ev("contains(xs, 7)", xs=items) == (7 in items)


@fast
@given(n=st.integers(-10**12, 10**12), f=st.floats(-1e9, 1e9, allow_nan=False))
def test_casts(n, f):
    assert ev("int(s)", s=str(n)) == n
    assert ev("float(s)", s=repr(f)) == f
    assert ev("string(n)", n=n) == str(n)
    assert ev("bool(b)", b="yes") is True
    assert ev("int(missing)") is None


@pytest.mark.parametrize(("expression", "message"), [
    ("substring(n, 0)", "substring() expects a string, got int (5)"),
    ("sum(['a'])", "sum() expects a list of numbers, got an item str ('a')"),
    ("parse_timestamp('x', '%Y')", "parse_timestamp(): 'x' does not match the format '%Y'"),
    ("parse_json('{')", "parse_json(): not JSON"),
    ("int('1.5')", "to_int: 1.5 is not a whole number"),
])
def test_wrong_values_are_record_errors(expression, message):
    with pytest.raises(RecordError, match=re.escape(message)):
        ev(expression, n=5)


def test_a_bad_literal_time_zone_is_located():
    with pytest.raises(ExpressionError, match="unknown time zone 'Mars/Base' at column 17"):
        compile_expression("to_timezone(ts, 'Mars/Base')")


def test_every_function_has_an_example_that_parses_and_is_in_the_reference():
    reference = (ROOT / "docs" / "reference.md").read_text()
    for name in FUNCTIONS:
        example, _ = EXAMPLES[name]
        compile_expression(example.replace("'${HASH_KEY}'", "'k'"))
        assert f"| `{name}` |" in reference
