"""The DSL reference, generated from the models: JSON Schema and Markdown."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from dataflare import config, registry
from dataflare.dsl_compiler import models
from dataflare.dsl_compiler.validate import DESTINATION_BLOCKS, SOURCE_BLOCKS

_KIND_DEF = {"source": "Source", "transformation": "Transformation", "destination": "Destination"}


def json_schema() -> dict[str, Any]:
    """JSON Schema of a workflow file, each component's ``config`` checked by its ``type``."""
    schema = models.WorkflowFile.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.setdefault("$defs", {})
    for kind, name in _KIND_DEF.items():
        rules = []
        types = []
        for spec in registry.specs(kind):  # type: ignore[arg-type]
            ref = f"{kind}.{spec.type}"
            sub = spec.config.model_json_schema(ref_template=f"#/$defs/{ref}.{{model}}")
            for sub_name, sub_def in sub.pop("$defs", {}).items():
                defs[f"{ref}.{sub_name}"] = sub_def
            defs[ref] = sub
            types.append(spec.type)
            rules.append({
                "if": {"properties": {"type": {"const": spec.type}}},
                "then": {"properties": {"config": {"$ref": f"#/$defs/{ref}"}}},
            })
        defs[name]["properties"]["type"]["enum"] = types
        defs[name]["allOf"] = rules
    # Blocks the DSL also accepts inside `config:` (the seed writes them both ways).
    for name, blocks in (("Source", SOURCE_BLOCKS), ("Destination", DESTINATION_BLOCKS)):
        for ref in [k for k in defs if k.startswith(f"{name.lower()}.") and k.count(".") == 1]:
            props = defs[ref].setdefault("properties", {})
            for block in blocks:
                props.setdefault(block, defs[name]["properties"][block])
    return schema


def json_schema_text() -> str:
    """The JSON Schema as indented text."""
    return json.dumps(json_schema(), indent=2, default=str)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return f"map[{_type_name(args[1])}]" if len(args) > 1 else "map"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _is_duration(annotation: Any, metadata: list[Any]) -> bool:
    """Whether a field holds a :data:`~dataflare.config.Duration` (written '30s', '5m'...)."""
    marks = [*metadata, *(m for a in typing.get_args(annotation)
                          if typing.get_origin(a) is typing.Annotated
                          for m in typing.get_args(a)[1:])]
    return any(getattr(getattr(m, "func", None), "__name__", "") == "_duration" for m in marks)


def _fields(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        key = info.alias or name
        if info.is_required():
            default = "required"
        elif info.default_factory is not None:
            default = "-"
        elif info.default is PydanticUndefined:
            default = "-"
        else:
            default = f"`{info.default!r}`"
        desc = (info.description or "").replace("|", "\\|")
        kind = _type_name(info.annotation)
        if _is_duration(info.annotation, info.metadata):
            kind = kind.replace("float", "duration")
        rows.append(f"| `{key}` | {kind} | {default} | {desc} |")
    return rows


def markdown() -> str:
    """The DSL reference in Markdown."""
    out = ["# DSL reference", ""]
    out += ["Generated from the models by `dataflare schema --markdown`.", ""]
    blocks: list[type[BaseModel]] = [
              models.Workflow, models.Source, models.Transformation, models.Destination,
              models.ErrorHandling, models.WriteMode, models.BatchSettings, models.Incremental,
              models.Cdc, models.Streaming, models.Hybrid, models.WorkflowConfig, models.Retry,
              config.Backoff, models.Schedule, models.Plugin, models.DataProtection,
              models.MaskingRule, models.TestCase]
    out += ["## Workflow blocks", ""]
    shown: set[type[BaseModel]] = set(blocks)
    for model in blocks:
        out += [f"### {model.__name__}", "", (model.__doc__ or "").strip(), "", *_fields(model), ""]
        out += _nested_blocks(model, shown, "####")
    out += _expressions()
    for kind in registry.KINDS:
        out += [f"## {registry.SECTION[kind].capitalize()}", ""]
        for spec in registry.specs(kind):
            state = "" if spec.available else f" *({spec.planned})*"
            out += [f"### `{spec.type}`{state}", "", spec.description, ""]
            out += [*_fields(spec.config), ""]
            out += _nested_blocks(spec.config, {spec.config}, "####", f"`{spec.type}` ")
            out += _extra_blocks(spec.type)
    return "\n".join(out)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation holds (through lists, maps, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [m for m in _models_in(arg) if m not in found]
    return found


def _nested_blocks(
    model: type[BaseModel], shown: set[type[BaseModel]], level: str, prefix: str = ""
) -> list[str]:
    """A section for every block nested in ``model`` (depth first), each shown once."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        for sub in _models_in(info.annotation):
            if sub in shown:
                continue
            shown.add(sub)
            doc = (sub.__doc__ or "").strip()
            out += [f"{level} {prefix}`{info.alias or name}`: {sub.__name__}", "", doc, ""]
            out += [*_fields(sub), ""]
            out += _nested_blocks(sub, shown, level, prefix)
    return out


def _extra_blocks(type_name: str) -> list[str]:
    """Settings a type reads that no annotation reaches (the mapping's transform settings)."""
    if type_name != "mapping":
        return []
    from dataflare.operators.transforms import PARAMETERISED

    out = ["#### `mapping` transforms with settings", "",
           "Written `{name: {settings}}` in a `transform` list, e.g. "
           "`transform: [trim, {regex_extract: {pattern: 'id=(\\d+)'}}, to_int]`.", ""]
    for name, model in PARAMETERISED.items():
        out += [f"##### `{name}`", "", (model.__doc__ or "").strip(), "", *_fields(model), ""]
    return out


def _expressions() -> list[str]:
    """The expression language's functions, each with an example."""
    from dataflare.expr import FUNCTIONS
    from dataflare.expr_functions import EXAMPLES

    out = ["## Expressions", "", (expr_doc() or "").strip(), ""]
    out += ["| function | arguments | example | result |", "|---|---|---|---|"]
    for name, (_fn, least, most) in sorted(FUNCTIONS.items()):
        example, result = EXAMPLES[name]
        arity = str(least) if least == most else f"{least}-{most}"
        cells = [f"`{name}`", arity, f"`{example}`", result.replace("|", "\\|")]
        out.append("| " + " | ".join(cells) + " |")
    return [*out, ""]


def expr_doc() -> str | None:
    """The module documentation of the expression language."""
    from dataflare import expr, expr_functions

    return f"{expr.__doc__}\n{expr_functions.__doc__}"
