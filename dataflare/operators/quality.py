"""The ``data_quality`` transformation: check and standardize fields, per named rule.

Each ``validations`` entry names a field and its rules, checked in order. A rule other
than ``not_null`` and ``not_empty`` passes on a missing or null value (combine it with
``not_null`` to require the field). ``standardize_format`` rewrites the value: a phone
number as E.164 (``default_region`` for numbers without a country code), an e-mail
trimmed and lowercased; it fails when the value is neither.

A record that fails a rule is handled by ``on_failure``: ``quarantine`` (default) sends a
dead letter of ``type: quality`` with ``error.rules: [{field, rule}]`` to ``quarantine_to``
(else to the step's error policy, so to its ``redirect_to``); ``drop`` drops it; ``flag``
keeps every record with ``_quality: {passed, failed}``; ``fail`` stops the run. A value a
rule cannot judge (an e-mail or phone number that is not a string) is an error of the step
and follows ``error_handling``. Every check is counted in ``dataflare_quality_checks``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from pydantic import Field, field_validator

from dataflare import metrics
from dataflare.config import Strict
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import (
    META,
    Batch,
    Failed,
    Mask,
    Record,
    RecordError,
    a_or_an,
    getter,
    set_path,
)
from dataflare.registry import BuildContext, Outputs, transformation

SIMPLE_RULES = ("not_null", "not_empty", "is_email", "is_phone_number",
                "standardize_format", "is_number", "is_date")
PARAM_RULES = ("range", "regex", "in", "max_length")


@dataclass(slots=True)
class QualityFailed(Failed):
    """A record that failed quality rules: its dead letter lists them in ``error.rules``."""

    rules: list[dict[str, str]] = field(default_factory=list)

    def as_record(self, mask: Mask | None = None, **envelope: Any) -> Record:
        """The dead letter, with ``error.rules``."""
        out = Failed.as_record(self, mask, **envelope)
        out["error"]["rules"] = self.rules
        return out


def _check_rule(rule: Any) -> Any:
    if isinstance(rule, str):
        if rule not in SIMPLE_RULES + PARAM_RULES:
            msg = f"unknown rule {rule!r} (known: {', '.join(SIMPLE_RULES + PARAM_RULES)})"
            raise ValueError(msg)
        if rule in PARAM_RULES:
            msg = f"rule {rule!r} takes parameters, e.g. {{{rule}: ...}}"
            raise ValueError(msg)
        return rule
    if not isinstance(rule, dict) or len(rule) != 1:
        msg = f"a rule is a name or a one-key mapping {{name: params}}, got {rule!r}"
        raise ValueError(msg)
    (name, params), = rule.items()
    if name not in PARAM_RULES:
        msg = f"rule {name!r} takes no parameters (parameterised: {', '.join(PARAM_RULES)})"
        raise ValueError(msg)
    if name == "range":
        ok = isinstance(params, dict) and params and set(params) <= {"min", "max"} and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in params.values()
        )
        if not ok:
            msg = f"range takes {{min, max}} numbers, got {params!r}"
            raise ValueError(msg)
    elif name == "regex":
        if not isinstance(params, str):
            msg = f"regex takes a pattern string, got {params!r}"
            raise ValueError(msg)
        try:
            re.compile(params)
        except re.error as exc:
            msg = f"invalid regex {params!r}: {exc}"
            raise ValueError(msg) from None
    elif name == "in":
        if not isinstance(params, list):
            msg = f"in takes a list of values, got {params!r}"
            raise ValueError(msg)
    elif not isinstance(params, int) or isinstance(params, bool) or params < 0:
        msg = f"max_length takes a non-negative integer, got {params!r}"
        raise ValueError(msg)
    return rule


class Validation(Strict):
    """Rules checked on one field."""

    field: str = Field(description="Field path.")
    rules: list[str | dict[str, Any]] = Field(
        description=(
            "Rules, checked in order: not_null, not_empty, is_email, is_phone_number, "
            "standardize_format, is_number, is_date, or {range: {min, max}}, {regex: pattern}, "
            "{in: [values]}, {max_length: n}."
        ),
    )

    @field_validator("rules")
    @classmethod
    def _rules(cls, v: list[Any]) -> list[Any]:
        return [_check_rule(r) for r in v]


class DataQualityConfig(Strict):
    """Settings of a ``data_quality`` transformation."""

    validations: list[Validation] = Field(description="Checks per field.")
    on_failure: Literal["quarantine", "drop", "flag", "fail"] = Field(
        "quarantine", description="What happens to a record failing a rule."
    )
    quarantine_to: str | None = Field(
        None,
        description="Destination id of quarantined records (else the step's error policy).",
    )
    default_region: str = Field(
        "US", description="Region of phone numbers written without a country code (ISO "
        "3166 two letters)."
    )

    @field_validator("default_region")
    @classmethod
    def _region(cls, v: str) -> str:
        import phonenumbers

        region = v.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:  # every number failed with it
            msg = f"unknown phone region {v!r} (ISO 3166 two letters, e.g. US, GB, DE)"
            raise ValueError(msg)
        return region


def _rule_name(rule: Any) -> str:
    return rule if isinstance(rule, str) else next(iter(rule))


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (
        isinstance(v, list | dict) and not v
    )


def _need_str(step: str, fld: str, rule: str, v: Any) -> str:
    if not isinstance(v, str):
        msg = (f"step {step!r}: field {fld!r} is {a_or_an(type(v).__name__)}, rule {rule} "
               "needs a string")
        raise RecordError(msg)
    return v


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return math.isfinite(v)
    if isinstance(v, str):
        try:
            return math.isfinite(float(v))
        except ValueError:
            return False
    return False


def _is_date(v: Any) -> bool:
    if isinstance(v, date):
        return True
    if not isinstance(v, str):
        return False
    try:
        datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


# A check returns (passed, new value); the new value is written when it differs.
Check = Callable[[Any], tuple[bool, Any]]


def _make_check(step: str, fld: str, rule: Any, region: str) -> Check:  # noqa: C901, PLR0911
    name = _rule_name(rule)
    if name == "not_null":
        return lambda v: (v is not None, v)
    if name == "not_empty":
        return lambda v: (not _empty(v), v)
    if name in ("is_email", "is_phone_number", "standardize_format"):
        return _make_text_check(step, fld, name, region)
    if name == "is_number":
        return lambda v: (v is None or _is_number(v), v)
    if name == "is_date":
        return lambda v: (v is None or _is_date(v), v)
    params = rule[name]
    if name == "range":
        lo, hi = params.get("min", -math.inf), params.get("max", math.inf)

        def in_range(v: Any) -> tuple[bool, Any]:
            if v is None:
                return True, v
            return _is_number(v) and lo <= float(v) <= hi, v

        return in_range
    if name == "regex":
        pattern = re.compile(params)
        return lambda v: (v is None or (isinstance(v, str) and bool(pattern.fullmatch(v))), v)
    if name == "in":
        # true is not 1, nor false 0, as JSON has them (Python's == says they are)
        allowed = [(a.__class__ is bool, a) for a in params]
        return lambda v: (v is None or (v.__class__ is bool, v) in allowed, v)
    limit = int(params)
    return lambda v: (v is None or not hasattr(v, "__len__") or len(v) <= limit, v)


def _make_text_check(step: str, fld: str, name: str, region: str) -> Check:
    import phonenumbers
    from email_validator import EmailNotValidError, validate_email

    def email_ok(text: str) -> bool:
        try:
            validate_email(text.strip(), check_deliverability=False)
        except EmailNotValidError:
            return False
        return True

    def phone(text: str) -> Any:
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            return None
        return number if phonenumbers.is_valid_number(number) else None

    def check(v: Any) -> tuple[bool, Any]:
        if v is None:
            return True, v
        text = _need_str(step, fld, name, v)
        if name == "is_email":
            return email_ok(text), v
        if name == "is_phone_number":
            return phone(text) is not None, v
        if "@" in text:
            ok = email_ok(text)
            return ok, text.strip().lower() if ok else v
        number = phone(text)
        if number is None:
            return False, v
        return True, phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

    return check


class _Checker:
    """Applies the validations of one step to batches; counts every check."""

    def __init__(self, step: str, cfg: DataQualityConfig) -> None:
        self.step, self.cfg = step, cfg
        self.fields: list[tuple[str, Callable[[Any], Any], list[tuple[str, Check, Any, Any]]]] = []
        for val in cfg.validations:
            checks = []
            for rule in val.rules:
                name = _rule_name(rule)
                counter = metrics.QUALITY_CHECKS
                checks.append((
                    name,
                    _make_check(step, val.field, rule, cfg.default_region),
                    counter.labels(step, val.field, name, "passed"),
                    counter.labels(step, val.field, name, "failed"),
                ))
            self.fields.append((val.field, getter(val.field), checks))

    def check(self, record: Record) -> tuple[Record, list[dict[str, str]]]:
        """The record (standardized, copied when changed) and its failed rules."""
        failed: list[dict[str, str]] = []
        out = record
        for path, get, checks in self.fields:
            value = get(out)
            for name, check, passed_c, failed_c in checks:
                ok, new = check(value)
                if ok:
                    passed_c.inc()
                else:
                    failed_c.inc()
                    failed.append({"field": path, "rule": name})
                if new is not value:
                    if out is record:
                        out = dict(record)
                    set_path(out, path, new)
                    value = new
        return out, failed


def _message(failed: list[dict[str, str]]) -> str:
    return "failed quality rules: " + ", ".join(f"{f['field']} {f['rule']}" for f in failed)


@dataclass(frozen=True)
class QualityOut:
    """Checked records, quarantined dead letters and failures (each as batches)."""

    down: Stream[Batch]
    quarantine: Stream[list[Failed]]
    errs: Stream[list[Failed]]


@operator
def data_quality(
    step_id: str, up: Stream[Batch], cfg: DataQualityConfig, name: str
) -> QualityOut:
    """Check a stream of batches against ``cfg`` as step ``name``; see the module's doc."""
    from dataflare.dsl_compiler.compiler import StepFailed

    checker = _Checker(name, cfg)
    mode = cfg.on_failure

    def apply(batch: Batch) -> tuple[Batch, list[Failed], list[Failed]]:
        good: Batch = []
        quarantined: list[Failed] = []
        bad: list[Failed] = []
        for record in batch:
            try:
                out, failed = checker.check(record)
            except Exception as exc:  # noqa: BLE001 - every failure goes to the error policy
                bad.append(Failed.of(name, exc, record))
                continue
            if mode == "flag":
                out = dict(out) if out is record else out
                out["_quality"] = {"passed": not failed, "failed": failed}
                good.append(out)
            elif not failed:
                good.append(out)
            elif mode == "quarantine":
                meta = record.get(META, {}) if isinstance(record, dict) else {}
                quarantined.append(
                    QualityFailed(name, "quality", _message(failed), record, meta, failed)
                )
            elif mode == "fail":
                where = Failed.of(name, RecordError(""), record).position()
                msg = f"step {name!r} failed on the record at {where}: {_message(failed)}"
                raise StepFailed(msg)
        return good, quarantined, bad

    parts = op.map("check", up, apply)
    return QualityOut(
        op.filter_map("down", parts, lambda p: p[0] or None),
        op.filter_map("quarantine", parts, lambda p: p[1] or None),
        op.filter_map("errs", parts, lambda p: p[2] or None),
    )


def quality_schema(ctx: SchemaContext[DataQualityConfig]) -> FieldType:
    """The records pass (``standardize_format`` writes text; ``flag`` adds ``_quality``)."""
    out = ctx.input
    for i, v in enumerate(ctx.config.validations):
        t = ctx.read(("validations", i, "field"), v.field)
        if "standardize_format" in [_rule_name(r) for r in v.rules] and out.kind == "object":
            out = out.with_path(v.field, FieldType.of("string", t.all_origins()))
    if ctx.config.on_failure == "flag":
        out = out.with_path("_quality", FieldType.record(
            {"passed": FieldType.of("boolean"), "failed": FieldType.of("array")}))
    return out


@transformation("data_quality", config=DataQualityConfig,
                description="Validate and standardize fields.", schema=quality_schema)
def build_data_quality(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build a data_quality step."""
    cfg: DataQualityConfig = ctx.config
    out = data_quality("data_quality", ups[0], cfg, ctx.step_id)
    if cfg.quarantine_to is None:
        errs = op.merge("failures", out.errs, out.quarantine)
        return Outputs(down=out.down, errs=errs)
    from dataflare.dsl_compiler.compiler import masker, single_source

    mask, source = masker(ctx.workflow.data_protection), single_source(ctx)
    letters = op.map("dead_letters", out.quarantine,
                     lambda b: [f.as_record(mask, component=source) for f in b])
    return Outputs(down=out.down, errs=out.errs, named={"quarantine": letters})
