"""The ``mapping`` transformation: build records field by field."""

from __future__ import annotations

from typing import Annotated, Any

from bytewax.dataflow import Stream
from pydantic import Field, WithJsonSchema, field_validator, model_validator

from dataflare.config import Strict
from dataflare.expr import compile_expression
from dataflare.operators.records import map_records
from dataflare.operators.transforms import (
    NEEDS,
    PARAMETERISED,
    RESULT_KIND,
    TRANSFORMS,
    TransformSpec,
    chain,
    check_transform,
    transform_name,
)
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import META, getter, set_path
from dataflare.registry import BuildContext, Outputs, transformation

_ONE_TRANSFORM = {"anyOf": [{"type": "string"}, {"type": "object", "minProperties": 1,
                                                  "maxProperties": 1}]}
_TRANSFORMS_SCHEMA = {"anyOf": [_ONE_TRANSFORM, {"type": "array", "items": _ONE_TRANSFORM}]}


class FieldMapping(Strict):
    """One output field: from a source path or an expression, through transforms."""

    source: str | None = Field(None, description="Dotted path read from the input record.")
    expression: str | None = Field(None, description="Expression computing the value instead.")
    destination: str = Field(description="Dotted path written in the output record.")
    transform: Annotated[list[TransformSpec], WithJsonSchema(_TRANSFORMS_SCHEMA)] = Field(
        default_factory=list,
        description=f"Transform name or list applied in order: {', '.join(TRANSFORMS)}; or "
        f"with settings, `{{name: {{...}}}}`: {', '.join(PARAMETERISED)}.",
    )
    default: Any = Field(None, description="Value used when the source is missing or null.")

    @field_validator("transform", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        names = [v] if isinstance(v, str | dict) else v
        for name in names if isinstance(names, list) else []:
            check_transform(name)
        return names

    @field_validator("expression")
    @classmethod
    def _expr(cls, v: str | None) -> str | None:
        if v is not None:
            compile_expression(v)
        return v

    @model_validator(mode="after")
    def _one_input(self) -> FieldMapping:
        if (self.source is None) == (self.expression is None):
            msg = "give exactly one of 'source' and 'expression'"
            raise ValueError(msg)
        return self


class MappingConfig(Strict):
    """Settings of a ``mapping`` transformation."""

    mappings: list[FieldMapping] = Field(description="Output fields, written in order.")
    keep_unmapped: bool = Field(
        False, description="Keep the input's other fields too (default: only mapped fields)."
    )
    drop: list[str] = Field(default_factory=list, description="With keep_unmapped: fields "
                            "of the input left out (dotted paths reach nested fields).")

    @field_validator("mappings")
    @classmethod
    def _apart(cls, mappings: list[FieldMapping]) -> list[FieldMapping]:
        """Refuse a destination inside another: one would overwrite the other's value."""
        for i, outer in enumerate(mappings):
            for j, inner in enumerate(mappings):
                if inner.destination.startswith(outer.destination + "."):
                    msg = (f"mappings[{i}] writes {outer.destination!r} and mappings[{j}] "
                           f"writes {inner.destination!r} inside it: the later one would "
                           "overwrite the other's value")
                    raise ValueError(msg)
        return mappings


def _reader(m: FieldMapping) -> Any:
    return getter(m.source) if m.source is not None else compile_expression(m.expression or "")


def mapper(config: MappingConfig) -> Any:
    """The per-record function of a mapping."""
    return _generated(config) or _interpreted(config)


def _interpreted(config: MappingConfig) -> Any:
    """The general mapper: ``set_path`` per field, in order."""
    steps = [(_reader(m), chain(m.transform), m.destination, m.default) for m in config.mappings]
    keep = config.keep_unmapped
    drop = tuple(d for d in config.drop if "." not in d)
    nested = [d.split(".") for d in config.drop if "." in d]

    def apply(record: dict[str, Any]) -> dict[str, Any]:
        if keep:
            out = {k: v for k, v in record.items() if k not in drop}
            for path in nested:
                _drop_nested(out, path)
        else:
            out = {META: record[META]} if META in record else {}
        for read, transform, dest, default in steps:
            value = read(record)
            if value is None:
                value = default
            set_path(out, dest, transform(value))
        return out

    return apply


def _drop_nested(record: dict[str, Any], path: list[str]) -> None:
    """Remove ``path`` from ``record``, copying the dicts on the way (the input's are shared)."""
    head, *rest = path
    inner = record.get(head)
    if not isinstance(inner, dict):
        return
    if rest[1:]:
        record[head] = inner = dict(inner)
        _drop_nested(inner, rest)
    elif rest[0] in inner:
        record[head] = {k: v for k, v in inner.items() if k != rest[0]}


def _generated(config: MappingConfig) -> Any:
    """A mapper specialised to ``config`` (about 5x faster), when the output is a fresh record.

    The generated code only reads fields, calls the prepared readers and transforms, and
    builds one dict literal; the only text taken from the workflow is field names, written
    as ``repr`` string literals. Returns ``None`` when the general mapper is needed
    (``keep_unmapped``, or a destination inside another destination's value).
    """
    if config.keep_unmapped:
        return None
    tree: dict[str, Any] = {}
    for i, m in enumerate(config.mappings):
        node, parts = tree, m.destination.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                return None
            node = child
        if isinstance(node.get(parts[-1]), dict):
            return None
        node[parts[-1]] = i

    def literal(node: dict[str, Any]) -> str:
        items = (f"{k!r}: {literal(v) if isinstance(v, dict) else f'v{v}'}"
                 for k, v in node.items())
        return "{" + ", ".join(items) + "}"

    env: dict[str, Any] = {"META": META}
    lines = ["def apply(r):"]
    for i, m in enumerate(config.mappings):
        if m.source is not None and "." not in m.source:
            lines.append(f"    v{i} = r.get({m.source!r})")
        else:
            env[f"read{i}"] = _reader(m)
            lines.append(f"    v{i} = read{i}(r)")
        if m.default is not None:
            env[f"default{i}"] = m.default
            lines.append(f"    if v{i} is None: v{i} = default{i}")
        if m.transform:
            env[f"transform{i}"] = chain(m.transform)
            lines.append(f"    if v{i} is not None: v{i} = transform{i}(v{i})")
    lines += [f"    out = {literal(tree)}", "    if META in r: out[META] = r[META]",
              "    return out"]
    exec("\n".join(lines), env)  # noqa: S102 - generated from field names only, see above
    return env["apply"]


def mapping_schema(ctx: SchemaContext[MappingConfig]) -> FieldType:
    """Only the mapped fields (with ``keep_unmapped``: the input's too, less ``drop``)."""
    cfg = ctx.config
    out = FieldType.record({})
    if cfg.keep_unmapped:
        out = ctx.input
        for name in cfg.drop:
            out = out.without(name)
    for i, m in enumerate(cfg.mappings):
        first = transform_name(m.transform[0]) if m.transform else ""
        if m.source is not None:
            value = ctx.read(("mappings", i, "source"), m.source, want=NEEDS.get(first))
        else:
            value = ctx.read_expression(("mappings", i, "expression"), m.expression)
        if m.transform:
            kind = RESULT_KIND.get(transform_name(m.transform[-1]), "any")
            value = FieldType.of(kind, value.all_origins())  # type: ignore[arg-type]
        elif m.default is not None and value.kind == "null":
            value = FieldType.of("any", value.all_origins())
        out = out.with_path(m.destination, value)
    return out


@transformation(
    "mapping",
    config=MappingConfig,
    description="Rename, restructure and convert fields (`source` -> `destination`).",
    schema=mapping_schema,
)
def build_mapping(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build a mapping step."""
    up = ups[0]
    out = map_records("map", up, mapper(ctx.config), ctx.step_id)
    return Outputs(down=out.down, errs=out.errs)
