"""The component registry: every source, transformation and destination, by ``type:`` name.

A component module declares its name, its config model and its builder in one place::

    @source("file", config=FileSourceConfig, description="Files: jsonl, csv, json, parquet.")
    def build_file_source(ctx: BuildContext) -> bytewax.inputs.Source: ...

The compiler only looks names up here. Builders receive a :class:`BuildContext`:

- a **source** builder returns a bytewax ``Source`` whose items are batches
  (``list``) of records and :class:`~dataflare.records.Failed` entries (undecodable input);
- a **transformation** builder receives its input streams (of batches; one merged
  stream unless it registered ``merge_inputs=False``) and returns :class:`Outputs`;
- a **destination** builder receives its input stream and adds the bytewax output step;
  it may return a stream of ``list[Failed]`` for records it could not prepare.

Third-party packages add components through the ``dataflare.components`` entry-point
group: each entry names a module that registers components when imported.
"""

from __future__ import annotations

import builtins
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from bytewax.dataflow import Stream
from pydantic import BaseModel

from dataflare.lineage import DatasetsHook
from dataflare.record_schema import SchemaHook

Kind = Literal["source", "transformation", "destination"]
UNBOUNDED = frozenset({"streaming", "cdc", "hybrid"})
"""Source modes that never end by themselves (for ``advise`` hooks)."""
KINDS: tuple[Kind, ...] = ("source", "transformation", "destination")
SECTION: dict[Kind, str] = {
    "source": "sources",
    "transformation": "transformations",
    "destination": "destinations",
}

BUILTIN_MODULES = (
    "dataflare.connectors.file",
    "dataflare.connectors.stdout",
    "dataflare.connectors.generator",
    "dataflare.connectors.kafka",
    "dataflare.connectors.postgres",
    "dataflare.connectors.postgres_destination",
    "dataflare.connectors.mysql",
    "dataflare.connectors.rest_api",
    "dataflare.connectors.duckdb",
    "dataflare.connectors.redis",
    "dataflare.connectors.http",
    "dataflare.connectors.snowflake",
    "dataflare.connectors.s3",
    "dataflare.operators.mapping",
    "dataflare.operators.filter",
    "dataflare.operators.route",
    "dataflare.operators.window",
    "dataflare.operators.aggregation",
    "dataflare.operators.join",
    "dataflare.operators.dedupe",
    "dataflare.operators.quality",
    "dataflare.operators.enrich",
    "dataflare.operators.plugin",
    "dataflare.operators.sql",
    "dataflare.operators.window_analytics",
    "dataflare.operators.ml",
)


@dataclass(frozen=True)
class Outputs:
    """What a transformation builder returns: its main stream, named outputs and errors."""

    down: Stream[Any] | None = None
    errs: Stream[Any] | None = None
    named: Mapping[str, Stream[Any]] = field(default_factory=dict)


C = TypeVar("C")


@dataclass(frozen=True)
class BuildContext(Generic[C]):
    """Everything a builder may use: its component, typed config and the workflow.

    ``BuildContext[MyConfig]`` types ``ctx.config`` as the component's config model.
    """

    step_id: str
    kind: Kind
    component: Any
    config: C
    workflow: Any
    base_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    read_downstream: frozenset[str] | None = None
    """The top-level fields of this step's output that later steps read (``None``: all)."""

    def path(self, value: str | Path) -> Path:
        """A path from the workflow, resolved against the workflow file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


@dataclass(frozen=True)
class ComponentSpec:
    """A registered component type."""

    kind: Kind
    type: str
    config: builtins.type[BaseModel]
    build: Callable[..., Any] | None
    description: str
    inputs: tuple[int, int | None] = (1, None)
    stateful: bool = False
    serves: bool = False  # a stateful step whose state ``serve: true`` makes readable
    named_outputs: Callable[[Any], list[str]] | None = None
    main_output: bool = True
    merge_inputs: bool = True
    advise: Callable[[Any, list[set[str]]], list[str]] | None = None
    planned: str = ""
    blocks: frozenset[str] | None = None
    # The blocks acted on under a given config, when they depend on it (overrides blocks).
    blocks_for: Callable[[Any], frozenset[str]] | None = None
    requires: tuple[str, ...] = ()  # import names of the packages it needs
    extra: str = ""  # the dataflare extra that installs them
    schema: SchemaHook | None = None  # its reads and output schema (record_schema)
    datasets: DatasetsHook | None = None  # the datasets it reads or writes (lineage)
    # A destination's records carry ``_meta.input`` (their input) when this says so.
    input_names: Callable[[Any], bool] | None = None

    def missing(self) -> list[str]:
        """The packages this type needs that are not installed."""
        import importlib.util

        def absent(name: str) -> bool:
            try:
                return importlib.util.find_spec(name) is None
            except ModuleNotFoundError:  # a dotted name whose parent package is absent
                return True

        return [m for m in self.requires if absent(m)]

    @property
    def available(self) -> bool:
        """Whether this type can run (some types are declared for validation only)."""
        return self.build is not None


_REGISTRY: dict[tuple[Kind, str], ComponentSpec] = {}
_loaded = False


def register(spec: ComponentSpec) -> ComponentSpec:
    """Add (or replace) a component type."""
    _REGISTRY[(spec.kind, spec.type)] = spec
    return spec


def _decorator(kind: Kind, type_name: str, **kw: Any) -> Callable[[Callable[..., Any]], Any]:
    def deco(build: Callable[..., Any]) -> Callable[..., Any]:
        register(ComponentSpec(kind=kind, type=type_name, build=build, **kw))
        return build

    return deco


# The component-level blocks that only some types act on; a type declares the ones it acts
# on (``blocks=``), and ``validate`` warns about the others given (they would have no effect).
TYPE_BLOCKS: dict[str, tuple[str, ...]] = {
    "source": ("mode", "incremental", "cdc", "hybrid"),
    "destination": ("write_mode", "batch"),
    "transformation": ("plugin",),
}


def source(
    type_name: str,
    *,
    config: type[BaseModel],
    description: str,
    requires: tuple[str, ...] = (),
    extra: str = "",
    blocks: tuple[str, ...] | None = None,
    schema: SchemaHook | None = None,
    datasets: DatasetsHook | None = None,
) -> Callable[..., Any]:
    """Register a source builder under ``type_name``.

    ``requires`` names the packages it imports (``extra`` installs them): a workflow using
    the type without them fails at validate with the ``pip install`` line to run.
    ``blocks`` lists the blocks of :data:`TYPE_BLOCKS` the type acts on (``None``: not
    declared, nothing is checked); ``name=type`` when it acts on those of one type only
    (``write_mode=append``). ``schema`` is the hook giving the schema of its records when
    the config says it (:mod:`dataflare.record_schema`); ``datasets`` the hook naming the
    datasets it reads (:mod:`dataflare.lineage`).
    """
    return _decorator("source", type_name, config=config, description=description, inputs=(0, 0),
                      requires=requires, extra=extra, schema=schema, datasets=datasets,
                      blocks=None if blocks is None else frozenset(blocks))


def transformation(
    type_name: str,
    *,
    config: type[BaseModel],
    description: str,
    inputs: tuple[int, int | None] = (1, None),
    stateful: bool = False,
    serves: bool = False,
    named_outputs: Callable[[Any], list[str]] | None = None,
    main_output: bool = True,
    merge_inputs: bool = True,
    advise: Callable[[Any, list[set[str]]], list[str]] | None = None,
    blocks: tuple[str, ...] = (),
    schema: SchemaHook | None = None,
) -> Callable[..., Any]:
    """Register a transformation builder under ``type_name``.

    ``named_outputs`` lists the outputs read as ``<id>.<name>``; a type without a main
    output (``main_output=False``, like ``route``) can only be read that way. Several
    inputs reach the builder merged into one stream, unless ``merge_inputs=False`` (a join
    takes its inputs apart). ``advise(config, input_modes)`` (per input, the modes of the
    sources feeding it) returns warnings about a configuration that is valid but unlikely
    to do what the user wants. ``blocks`` lists
    the blocks of :data:`TYPE_BLOCKS` the type acts on (``plugin``). ``serves``: its state
    can be read during a run (``serve: true``, :mod:`dataflare.views`). ``schema`` is the hook
    naming the fields the step reads and deriving its output schema from its inputs'
    (:mod:`dataflare.record_schema`); without it the output schema is unknown.
    """
    return _decorator(
        "transformation",
        type_name,
        config=config,
        description=description,
        inputs=inputs,
        stateful=stateful,
        serves=serves,
        named_outputs=named_outputs,
        main_output=main_output,
        merge_inputs=merge_inputs,
        advise=advise,
        blocks=frozenset(blocks),
        schema=schema,
    )


def destination(
    type_name: str,
    *,
    config: type[BaseModel],
    description: str,
    requires: tuple[str, ...] = (),
    extra: str = "",
    blocks: tuple[str, ...] | None = None,
    schema: SchemaHook | None = None,
    datasets: DatasetsHook | None = None,
    input_names: Callable[[Any], bool] | None = None,
    blocks_for: Callable[[Any], tuple[str, ...]] | None = None,
) -> Callable[..., Any]:
    """Register a destination builder (``requires``, ``blocks``, ``datasets`` as for sources).

    ``schema`` names the fields its config reads (templates, keys); its return is unused.
    ``input_names(config)``: whether records reach the builder with ``_meta.input`` naming
    the input they come from (an id of ``inputs``, or the step that redirected them).
    ``blocks_for(config)``: the blocks it acts on when they depend on its config.
    """
    return _decorator("destination", type_name, config=config, description=description,
                      requires=requires, extra=extra, schema=schema, datasets=datasets,
                      input_names=input_names,
                      blocks_for=None if blocks_for is None else (
                          lambda cfg: frozenset(blocks_for(cfg))),
                      blocks=None if blocks is None else frozenset(blocks))


def planned(
    kind: Kind,
    type_name: str,
    *,
    config: type[BaseModel],
    description: str,
    inputs: tuple[int, int | None] = (1, None),
    note: str = "not available yet",
    datasets: DatasetsHook | None = None,
) -> None:
    """Declare a type whose config validates but which cannot run yet."""
    register(
        ComponentSpec(
            kind=kind,
            type=type_name,
            config=config,
            build=None,
            description=description,
            inputs=(0, 0) if kind == "source" else inputs,
            planned=note,
            datasets=datasets,
        )
    )


def load() -> None:
    """Import the built-in component modules and the ``dataflare.components`` entry points."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    for ep in entry_points(group="dataflare.components"):
        ep.load()


def lookup(kind: Kind, type_name: str) -> ComponentSpec | None:
    """The registered component ``type_name`` of ``kind``, if any."""
    load()
    return _REGISTRY.get((kind, type_name))


def names(kind: Kind) -> list[str]:
    """All registered type names of ``kind``, sorted."""
    load()
    return sorted(t for (k, t) in _REGISTRY if k == kind)


def specs(kind: Kind) -> list[ComponentSpec]:
    """All registered components of ``kind``, sorted by name."""
    load()
    return [_REGISTRY[(kind, t)] for t in names(kind)]
