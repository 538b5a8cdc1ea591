"""Mapping: transforms, nested destinations, keep_unmapped, copy-on-write."""

import re

import pytest
import yaml
from pydantic import ValidationError

from dataflare.dsl_compiler import validate_text
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


def test_drop_reaches_nested_fields_and_leaves_the_input_alone():
    # `drop: [customer.email]` did nothing: the (personal) field was written on.
    mapper_ = m(mappings=[{"source": "a", "destination": "a2"}], keep_unmapped=True,
                drop=["customer.email", "x", "c.d.e", "nowhere.at.all"])
    record = {"a": 1, "x": 2, "customer": {"email": "e@x", "id": 3},
              "c": {"d": {"e": 1, "f": 2}}}
    assert mapper_(record) == {"a": 1, "a2": 1, "customer": {"id": 3}, "c": {"d": {"f": 2}}}
    assert record["customer"] == {"email": "e@x", "id": 3} and record["c"]["d"]["e"] == 1


def test_config_errors():
    with pytest.raises(ValidationError, match="unknown transform 'trimm' \\(did you mean 'trim'"):
        MappingConfig.model_validate({"mappings": [{"source": "a", "destination": "b",
                                                    "transform": "trimm"}]})
    with pytest.raises(ValidationError, match="exactly one of 'source' and 'expression'"):
        MappingConfig.model_validate({"mappings": [{"destination": "b"}]})
    # A destination inside another: one overwrote the other's value without a word.
    with pytest.raises(ValidationError, match=re.escape(
            "mappings[1] writes 'out' and mappings[0] writes 'out.ts' inside it: the later "
            "one would overwrite the other's value")):
        MappingConfig.model_validate({"mappings": [{"source": "t", "destination": "out.ts"},
                                                   {"source": "s", "destination": "out"}]})


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
    try:
        config = MappingConfig.model_validate({"mappings": rules})
    except ValidationError:  # a destination inside another ("a" and "a.x"): refused
        return
    fast = _generated(config)
    if fast is None:
        return
    assert fast(record) == _interpreted(config)(record)


def test_transforms_with_settings():
    mapper_ = m(mappings=[
        {"source": "url", "destination": "id",
         "transform": [{"regex_extract": {"pattern": r"id=(\d+)"}}, "to_int"]},
        {"source": "url", "destination": "page",
         "transform": {"regex_extract": {"pattern": r"/(?P<page>\w+)\?", "group": "page"}}},
        {"source": "phone", "destination": "phone",
         "transform": [{"regex_replace": {"pattern": r"\D", "replacement": ""}}]},
        {"source": "ts", "destination": "local",
         "transform": {"to_timezone": {"timezone": "Asia/Shanghai"}}},
        {"source": "day", "destination": "day",
         "transform": [{"parse_timestamp": {"format": "%d/%m/%Y %H:%M",
                                            "timezone": "Europe/Paris"}}]},
        {"expression": "round(haversine(a.lat, a.lon, b.lat, b.lon), 1)", "destination": "km"},
    ])
    record = {"url": "/cart?id=42", "phone": "+1 (555) 010-9999", "ts": "2024-01-01T00:00:00Z",
              "day": "01/07/2024 10:30", "a": {"lat": 48.8566, "lon": 2.3522},
              "b": {"lat": 51.5074, "lon": -0.1278}}
    assert mapper_(record) == {
        "id": 42, "page": "cart", "phone": "15550109999", "local": "2024-01-01T08:00:00+08:00",
        "day": "2024-07-01T08:30:00Z", "km": 343.6,
    }
    assert mapper_({"url": "/x", "day": None})["id"] is None  # no match: null


@pytest.mark.parametrize(("transform", "message"), [
    ({"regex_extract": {"pattern": "(a"}},
     "transform 'regex_extract': pattern: value error, invalid regular expression '(a'"),
    ({"to_timezone": {"timezone": "Mars/Base"}},
     "transform 'to_timezone': timezone: value error, unknown time zone 'Mars/Base'"),
    ({"parse_timestamp": {}}, "transform 'parse_timestamp': format: field required"),
    ({"regex_extrakt": {"pattern": "a"}},
     "unknown transform with settings 'regex_extrakt' (did you mean 'regex_extract'?)"),
    ("to_timezone", "transform 'to_timezone' needs settings: {to_timezone: {...}}"),
])
def test_bad_transform_settings_are_located_at_validate(transform, message):
    v = validate_text(yaml.safe_dump({"workflow": {
        "sources": {"g": {"type": "generator", "config": {"preset": "orders", "count": 1}}},
        "transformations": {"t": {"type": "mapping", "inputs": ["g"], "config": {
            "mappings": [{"source": "id", "destination": "id", "transform": [transform]}]}}},
        "destinations": {"o": {"type": "stdout", "inputs": ["t"]}},
    }}))
    [problem] = v.errors()
    assert problem.path == "transformations.t.config.mappings[0].transform"
    assert message.lower() in problem.message.lower(), problem.message


def test_haversine_against_a_reference():
    import math

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from dataflare.expr import compile_expression

    fn = compile_expression("haversine(lat1, lon1, lat2, lon2, 'm')")
    lat, lon = st.floats(-90, 90), st.floats(-180, 180)

    @settings(max_examples=100, deadline=None)
    @given(lat1=lat, lon1=lon, lat2=lat, lon2=lon)
    def check(lat1, lon1, lat2, lon2):
        # the spherical law of cosines, another formula for the same distance
        p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
        cos = math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(dl)
        want = 6_371_008.8 * math.acos(max(-1.0, min(1.0, cos)))
        got = fn({"lat1": lat1, "lon1": lon1, "lat2": lat2, "lon2": lon2})
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1.0)

    check()
