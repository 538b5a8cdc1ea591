"""Mapping: transforms, nested destinations, keep_unmapped, copy-on-write."""

import pytest
from pydantic import ValidationError

from dataflare.operators.mapping import MappingConfig, mapper
from dataflare.operators.transforms import TRANSFORMS
from dataflare.records import RecordError


def m(**config):
    return mapper(MappingConfig.model_validate(config))


def test_mappings_build_only_mapped_fields_and_keep_meta():
    fn = m(mappings=[
        {"source": "name", "destination": "customer.fullName", "transform": "trim"},
        {"source": "email", "destination": "customer.email", "transform": ["trim", "lowercase"]},
        {"expression": "price * qty", "destination": "total"},
        {"source": "missing", "destination": "flag", "default": False, "transform": "to_bool"},
    ])
    rec = {"name": " Ada ", "email": " A@B.C ", "price": 2.5, "qty": 4, "_meta": {"line": 1}}
    assert fn(rec) == {"customer": {"fullName": "Ada", "email": "a@b.c"}, "total": 10.0,
                       "flag": False, "_meta": {"line": 1}}


def test_keep_unmapped_copies_instead_of_mutating_shared_records():
    fn = m(keep_unmapped=True, drop=["secret"],
           mappings=[{"source": "a.b", "destination": "a.c", "transform": "to_int"}])
    rec = {"a": {"b": "7"}, "secret": 1, "x": 2}
    out = fn(rec)
    assert out == {"a": {"b": "7", "c": 7}, "x": 2}
    assert rec == {"a": {"b": "7"}, "secret": 1, "x": 2}


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("to_int", "42", 42), ("to_int", " 7.0 ", 7), ("to_float", "1.5", 1.5),
    ("to_string", True, "true"), ("to_bool", "Yes", True), ("to_bool", 0, False),
    ("to_timestamp", 0, "1970-01-01T00:00:00Z"),
    ("to_timestamp", "2024-05-01T12:00:00+02:00", "2024-05-01T10:00:00Z"),
    ("uppercase", "ab", "AB"), ("to_string", {"a": [1, "x"]}, '{"a":[1,"x"]}'),
    ("sha256", "a", "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"),
])
def test_transforms(name, value, expected):
    assert TRANSFORMS[name](value) == expected


@pytest.mark.parametrize(("name", "value"), [
    ("to_int", "1.5"), ("to_int", "x"), ("to_int", True), ("to_float", "x"),
    ("to_bool", "maybe"), ("trim", 5), ("to_timestamp", "yesterday"),
    ("to_int", "1_000"), ("to_float", "1_000"), ("to_float", "NaN"), ("to_float", "inf"),
    ("to_float", float("nan")), ("to_timestamp", 1_700_000_000_000_000),
])
def test_bad_values_are_record_errors(name, value):
    with pytest.raises(RecordError):
        TRANSFORMS[name](value)


def test_null_passes_through_transforms():
    assert m(mappings=[{"source": "x", "destination": "y", "transform": ["to_int"]}])({}) == {
        "y": None}


def test_config_errors():
    with pytest.raises(ValidationError, match="unknown transform 'trimm' \\(did you mean 'trim'"):
        MappingConfig.model_validate({"mappings": [{"source": "a", "destination": "b",
                                                    "transform": "trimm"}]})
    with pytest.raises(ValidationError, match="exactly one of 'source' and 'expression'"):
        MappingConfig.model_validate({"mappings": [{"destination": "b"}]})


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dataflare.operators.mapping import _generated, _interpreted  # noqa: E402

PATHS = st.sampled_from(["a", "b", "a.x", "c.d.e", "c.d.f", "z"])
VALUES = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3), st.booleans())
RECORDS = st.recursive(
    st.dictionaries(st.sampled_from(["a", "b", "c", "d", "x", "z", "_meta"]), VALUES, max_size=5),
    lambda inner: st.dictionaries(st.sampled_from(["a", "c", "d", "x"]), inner, max_size=3),
    max_leaves=8,
)
RULES = st.lists(
    st.fixed_dictionaries(
        {"source": PATHS, "destination": PATHS},
        optional={"transform": st.sampled_from(["to_string", ["to_string", "uppercase"]]),
                  "default": st.integers(0, 3)},
    ),
    min_size=1, max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(RULES, RECORDS)
def test_generated_mapper_equals_the_general_one(rules, record):
    config = MappingConfig.model_validate({"mappings": rules})
    fast = _generated(config)
    if fast is None:
        return
    assert fast(record) == _interpreted(config)(record)
