"""The ``generator`` source: seeded synthetic records for demos, tests and benchmarks.

Records are a pure function of ``seed`` and their index, so a resumed run (the state is
the next index) and a rerun produce the same records.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pydantic import Field, model_validator

from dataflare.config import Duration, Strict
from dataflare.connectors.schema import discoverer, infer_schema
from dataflare.record_schema import FieldType, SchemaContext, from_json_schema
from dataflare.records import META, Batch, iso_utc, to_epoch_seconds
from dataflare.registry import BuildContext, source


class FieldSpec(Strict):
    """How one field of the generated records is made."""

    type: Literal["sequence", "int", "float", "choice", "timestamp", "text", "bool", "constant",
                  "uuid"] = Field(description="Kind of value.")
    start: Any = Field(0, description="sequence: first value; timestamp: first time.")
    step: Any = Field(1, description="sequence: increment; timestamp: a duration per record.")
    min: float = Field(0, description="int/float/text: least random number.")
    max: float = Field(100, description="int/float/text: greatest random number.")
    decimals: int | None = Field(None, ge=0, description="float: digits after the point.")
    values: list[Any] = Field(default_factory=list, description="choice: the values.")
    weights: list[float] | None = Field(None, description="choice: relative weights.")
    template: str = Field("{n}", description="text: '{n}' is replaced by a random int.")
    unit: Literal["iso", "s", "ms"] = Field("iso", description="timestamp: ISO text or epoch.")
    value: Any = Field(None, description="constant: the value.")
    null_rate: float = Field(0.0, ge=0, le=1, description="Share of records where it is null.")

    @model_validator(mode="after")
    def _check(self) -> FieldSpec:
        if self.type == "choice" and not self.values:
            msg = "a choice field needs 'values'"
            raise ValueError(msg)
        if self.weights is not None and len(self.weights) != len(self.values):
            msg = "'weights' must have one weight per value"
            raise ValueError(msg)
        return self


EPOCH_2024 = "2024-01-01T00:00:00Z"
PRESETS: dict[str, dict[str, FieldSpec]] = {
    "clickstream": {
        "id": FieldSpec(type="sequence"),
        "user_id": FieldSpec(type="text", template="u{n}", min=0, max=9999),
        "event": FieldSpec(type="choice", values=["view", "click", "add_to_cart", "purchase"]),
        "amount": FieldSpec(type="float", min=0, max=100, decimals=2),
        "ts": FieldSpec(type="timestamp", start=EPOCH_2024, step="10ms", unit="ms"),
    },
    "orders": {
        "order_id": FieldSpec(type="sequence"),
        "user_id": FieldSpec(type="text", template="u{n}", min=0, max=9999),
        "total": FieldSpec(type="float", min=5, max=500, decimals=2),
        "items": FieldSpec(type="int", min=1, max=5),
        "ts": FieldSpec(type="timestamp", start=EPOCH_2024, step="50ms", unit="ms"),
    },
}


class GeneratorConfig(Strict):
    """Settings of a ``generator`` source."""

    count: int | None = Field(1000, ge=0, description="Records in all; null: unbounded.")
    rate: float | None = Field(None, gt=0, description="Records per second (default: no limit).")
    seed: int = Field(42, description="Random seed.")
    batch_size: int = Field(1000, ge=1, description="Records per batch.")
    partitions: int = Field(1, ge=1, description="Partitions, spread over workers.")
    preset: Literal["clickstream", "orders"] | None = Field(
        None, description="A ready-made record shape (fields below are added to it)."
    )
    fields: dict[str, FieldSpec] = Field(default_factory=dict, description="Fields by name.")
    start_delay: Duration = Field(0.0, description="Wait before the first record.")

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        if not self.preset and not self.fields:
            msg = "give a 'preset' or 'fields'"
            raise ValueError(msg)
        return self


Maker = Callable[[int, random.Random], Any]


def _maker(spec: FieldSpec) -> Maker:
    lo, hi = spec.min, spec.max
    make: Maker
    if spec.type == "sequence":
        start, step = spec.start, spec.step
        make = lambda i, rng: start + i * step  # noqa: E731
    elif spec.type == "int":
        make = lambda i, rng: rng.randint(int(lo), int(hi))  # noqa: E731
    elif spec.type == "float":
        digits = spec.decimals
        if digits is None:
            make = lambda i, rng: rng.uniform(lo, hi)  # noqa: E731
        else:
            make = lambda i, rng: round(rng.uniform(lo, hi), digits)  # noqa: E731
    elif spec.type == "choice":
        values, weights = spec.values, spec.weights
        if weights:
            make = lambda i, rng: rng.choices(values, weights)[0]  # noqa: E731
        else:
            make = lambda i, rng: values[rng.randrange(len(values))]  # noqa: E731
    elif spec.type == "timestamp":
        from dataflare.records import parse_duration

        t0, dt = to_epoch_seconds(spec.start), parse_duration(spec.step)
        if spec.unit == "ms":
            make = lambda i, rng: int(round((t0 + i * dt) * 1000))  # noqa: E731
        elif spec.unit == "s":
            make = lambda i, rng: t0 + i * dt  # noqa: E731
        else:
            make = lambda i, rng: iso_utc(t0 + i * dt)  # noqa: E731
    elif spec.type == "text":
        template = spec.template
        make = lambda i, rng: template.replace("{n}", str(rng.randint(int(lo), int(hi))))  # noqa: E731
    elif spec.type == "bool":
        make = lambda i, rng: rng.random() < 0.5  # noqa: E731
    elif spec.type == "uuid":
        make = lambda i, rng: str(uuid.UUID(int=rng.getrandbits(128), version=4))  # noqa: E731
    else:
        value = spec.value
        make = lambda i, rng: value  # noqa: E731
    if spec.null_rate:
        inner, rate = make, spec.null_rate
        make = lambda i, rng: None if rng.random() < rate else inner(i, rng)  # noqa: E731
    return make


def record_maker(config: GeneratorConfig) -> Callable[[int, random.Random], dict[str, Any]]:
    """The function making record ``i``."""
    fields = {**PRESETS.get(config.preset or "", {}), **config.fields}
    makers = [(name, _maker(spec)) for name, spec in fields.items()]
    return lambda i, rng: {name: make(i, rng) for name, make in makers}


BLOCK = 1024


def make_records(make: Callable[[int, random.Random], dict[str, Any]], seed: int, start: int,
                 n: int) -> list[dict[str, Any]]:
    """Records ``start`` to ``start + n``; each block of 1024 has its own seeded generator."""
    out: list[dict[str, Any]] = []
    i, stop = start, start + n
    while i < stop:
        block = i // BLOCK
        rng = random.Random(seed * 1_000_003 + block)
        for j in range(block * BLOCK, i):
            make(j, rng)
        end = min(stop, (block + 1) * BLOCK)
        out.extend(make(k, rng) for k in range(i, end))
        i = end
    return out


class _GeneratorPartition(StatefulSourcePartition[Batch, int]):
    def __init__(self, step: str, config: GeneratorConfig, part: int, state: int | None):
        self.step, self.config, self.part = step, config, part
        total, parts = config.count, config.partitions
        self.first = 0 if total is None else total * part // parts
        self.end = None if total is None else total * (part + 1) // parts
        self.next = self.first if state is None else state
        self.make = record_maker(config)
        self.rate = None if config.rate is None else config.rate / parts
        self.started = datetime.now(UTC) + timedelta(seconds=config.start_delay)
        self.emitted = 0

    def next_batch(self) -> Batch:
        if self.end is not None and self.next >= self.end:
            raise StopIteration
        n = self.config.batch_size
        if self.rate is not None:
            elapsed = (datetime.now(UTC) - self.started).total_seconds()
            n = min(n, int(elapsed * self.rate) - self.emitted)
            if n <= 0:
                return []
        if self.end is not None:
            n = min(n, self.end - self.next)
        out = make_records(self.make, self.config.seed, self.next, n)
        for i, rec in enumerate(out, self.next):
            rec[META] = {"generator": self.step, "index": i}
        self.next += n
        self.emitted += n
        return [out]

    def next_awake(self) -> datetime | None:
        if self.rate is None:
            return self.started if self.started > datetime.now(UTC) else None
        return self.started + timedelta(seconds=(self.emitted + 1) / self.rate)

    def snapshot(self) -> int:
        return self.next


class GeneratorSource(FixedPartitionedSource[Batch, int]):
    """Synthetic records, split into contiguous index ranges, one per partition."""

    def __init__(self, step: str, config: GeneratorConfig) -> None:
        self.step, self.config = step, config

    def list_parts(self) -> list[str]:
        """Partition names ``0`` to ``partitions - 1``."""
        return [str(i) for i in range(self.config.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> Any:
        """The generator of one index range, resuming at ``resume_state``."""
        return _GeneratorPartition(self.step, self.config, int(for_part), resume_state)


def generator_schema(ctx: SchemaContext[GeneratorConfig]) -> FieldType:
    """The fields of the generated records, each typed by a value it makes."""
    from dataflare.connectors.schema import infer_value_schema

    cfg = ctx.config
    fields = {**PRESETS.get(cfg.preset or "", {}), **cfg.fields}
    sample = {name: _maker(spec.model_copy(update={"null_rate": 0.0}))(0, random.Random(0))
              for name, spec in fields.items()}
    return from_json_schema(infer_value_schema(sample))


@source(
    "generator",
    config=GeneratorConfig,
    description="Seeded synthetic records (presets clickstream and orders), by count or rate.",
    blocks=(),
    schema=generator_schema,
)
def build_generator(ctx: BuildContext) -> GeneratorSource:
    """Build a generator source."""
    return GeneratorSource(ctx.step_id, ctx.config)


@discoverer("generator")
def discover_generator(ctx: BuildContext, sample: int = 100) -> dict[str, Any]:
    """A JSON Schema inferred from the first generated records."""
    records = make_records(record_maker(ctx.config), ctx.config.seed, 0, sample)
    return {"type": "generator", "sampled": sample, "json_schema": infer_schema(records)}
