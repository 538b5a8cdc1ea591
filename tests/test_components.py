"""A third-party component, written against dataflare.components alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

COMPONENT = '''
import json
import sys

import bytewax.operators as op
from bytewax.connectors.files import FileSink
from pydantic import Field

from dataflare.components import BuildContext, Strict, destination

assert not any(m.startswith("dataflare.dsl_compiler") for m in sys.modules), "compiler loaded"


class UpperConfig(Strict):
    """Write each record's name in capitals, one per line."""

    path: str = Field(description="Output file.")


@destination("upper_names", config=UpperConfig, description="Names in capitals.")
def build(ctx: BuildContext[UpperConfig], up):
    names = op.flat_map("names", up, lambda batch: [r["name"].upper() for r in batch])
    names = op.key_on("one_file", names, lambda _name: "out")
    op.output("write", names, FileSink(ctx.path(ctx.config.path)))
'''

RUN = '''
import upper_component  # registers the type, without the compiler
import dataflare

result = dataflare.run("wf.yaml", quiet=True)
assert result.ok, result
'''


def test_a_component_registered_through_the_component_api_runs(tmp_path: Path) -> None:
    (tmp_path / "upper_component.py").write_text(COMPONENT)
    (tmp_path / "in.jsonl").write_text('{"name": "ann"}\n{"name": "bob"}\n')
    (tmp_path / "wf.yaml").write_text("""
workflow:
  sources: {people: {type: file, config: {path: in.jsonl}}}
  destinations: {names: {type: upper_names, inputs: [people], config: {path: out.txt}}}
""")
    out = subprocess.run([sys.executable, "-c", RUN], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted((tmp_path / "out.txt").read_text().split()) == ["ANN", "BOB"]


def test_a_planned_type_validates_with_a_warning_and_stops_run() -> None:
    from pydantic import Field

    from dataflare.config import Strict
    from dataflare.dsl_compiler import validate_text
    from dataflare.registry import planned

    class FutureConfig(Strict):
        table: str = Field(description="Table.")

    planned("destination", "future_warehouse", config=FutureConfig,
            description="Not built yet.", note="planned (not available yet)")
    v = validate_text("""\
workflow:
  sources:
    s: {type: generator, config: {preset: orders, count: 1}}
  destinations:
    w: {type: future_warehouse, inputs: [s], config: {table: t}}
""")
    assert not v.errors()
    assert any("destination type 'future_warehouse' is planned" in p.render(for_run=True)
               for p in v.errors(for_run=True))
