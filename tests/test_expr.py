"""The expression language: values, null semantics, errors with columns."""

import re

import pytest

from dataflare.expr import ExpressionError, compile_expression
from dataflare.records import RecordError

RECORD = {"a": 5, "s": "Hi", "c": {"d": 0.8}, "e": "click", "tags": ["x", "y"], "z": None}


@pytest.mark.parametrize(("text", "value"), [
    ("a > 3 and s == 'Hi'", True),
    ('c.d >= 0.8', True),
    ("e in ['click', 'view']", True),
    ("e not in ['click']", False),
    ("'x' in tags", True),
    ("missing == null", True),
    ("z != null", False),
    ("missing > 1", False),
    ("missing + 1", None),
    ("a * 2 + 1 - 3 / 3", 10.0),
    ("a % 2", 1),
    ("-a", -5),
    ("not (a < 1) or false", True),
    ("lower(s) == 'hi' and upper(e) == 'CLICK'", True),
    ("coalesce(missing, z, 7)", 7),
    ("len(tags) == 2 and starts_with(s, 'H')", True),
    ("round(c.d * 10)", 8),
    ("5m == 300 and 100ms < 1s and 2h > 1d", False),
    ("\"quoted \\\" text\"", 'quoted " text'),
])
def test_values(text, value):
    assert compile_expression(text)(RECORD) == value


@pytest.mark.parametrize(("text", "message"), [
    ("a >", "unexpected end of expression at column 4"),
    ("a b", "expected end of expression, found 'b' at column 3"),
    ("lowr(s)", "unknown function 'lowr' (did you mean 'lower'?) at column 1"),
    ("a == 'x", "unexpected character \"'\" at column 6"),
    ("(a", "expected ')', found end of expression at column 3"),
    ("lower(a, b)", "lower() takes 1-1 arguments, got 2 at column 1"),
])
def test_parse_errors_name_the_column(text, message):
    with pytest.raises(ExpressionError) as info:
        compile_expression(text)
    assert str(info.value) == message


@pytest.mark.parametrize(("text", "message"), [
    ("s > 1", "cannot compare str ('Hi') > int (1)"),
    ("s - 1", "cannot apply - to str ('Hi') and int (1)"),
    ("a / 0", "division by zero (5 / 0)"),
    ("lower(a)", "lower() expects a string, got int (5)"),
])
def test_record_errors(text, message):
    with pytest.raises(RecordError) as info:
        compile_expression(text)(RECORD)
    assert str(info.value) == message


@pytest.mark.parametrize(("text", "record"), [
    ("a * 2", {"a": "150"}),        # no string repetition
    ("a % 2", {"a": "v=%d"}),       # no printf formatting
    ("a * 3", {"a": [1]}),
    ("a + 1", {"a": "1"}),
    ("a - 1", {"a": True}),
    ("a > 0", {"a": True}),         # booleans are not numbers
])
def test_arithmetic_and_ordering_take_numbers_only(text, record):
    with pytest.raises(RecordError, match="cannot"):
        compile_expression(text)(record)


def test_plus_joins_strings_and_lists():
    assert compile_expression("a + b")({"a": "x", "b": "y"}) == "xy"
    assert compile_expression("a + a")({"a": [1]}) == [1, 1]
    assert compile_expression("a * 2 + 0.5")({"a": 3}) == 6.5


def test_true_is_not_one():
    assert compile_expression("a == 1")({"a": True}) is False
    assert compile_expression("a != 1")({"a": True}) is True
    assert compile_expression("a == true")({"a": True}) is True
    assert compile_expression("a == 1")({"a": 1.0}) is True


def test_a_numbers_exact_text_says_how_to_read_it_as_a_number():
    # A JSON number a float would round comes as its text: "cannot compare str" said no more.
    hint = ("a number's text: convert it (to_float), or, for a JSON number a float would "
            "round (kept as its exact text), set the source's decimal_handling: float")
    for text in ("v > 1", "v * 2"):
        with pytest.raises(RecordError, match=re.escape(hint)):
            compile_expression(text)({"v": "1.12345678901234567"})
    with pytest.raises(RecordError) as info:
        compile_expression("v > 1")({"v": "abc"})
    assert "decimal_handling" not in str(info.value)
    from dataflare.operators.aggregates import BadValue, _bad

    with pytest.raises(BadValue, match=re.escape(hint)):
        _bad("v", "12345678901234567890", "sum/avg", "a number")
