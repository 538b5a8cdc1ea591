"""The workflow DAG as Mermaid or Graphviz dot text (``dataflare graph``)."""

from __future__ import annotations

from dataflare.dsl_compiler.graph import redirect_targets
from dataflare.dsl_compiler.validate import Validated

_SHAPES = {
    "mermaid": {"sources": "([{}])", "transformations": "[{}]", "destinations": "[({})]"},
    "dot": {"sources": "ellipse", "transformations": "box", "destinations": "cylinder"},
}


def render(validated: Validated, fmt: str = "mermaid") -> str:
    """Text of the DAG: nodes labelled ``id: type``, edges from inputs, dashed redirects."""
    assert validated.graph is not None
    g = validated.graph
    raw = validated.document.data["workflow"]
    redirects = [(loc[2], target, loc[-1]) for loc, target in redirect_targets(raw)]
    if fmt == "dot":
        lines = ["digraph workflow {", "  rankdir=LR;"]
        for cid, section in g.kinds.items():
            shape = _SHAPES["dot"][section]
            lines.append(f'  "{cid}" [shape={shape}, label="{cid}\\n{g.types[cid]}"];')
        for cid, refs in g.inputs.items():
            for ref in refs:
                up, _, port = ref.partition(".")
                label = f' [label="{port}"]' if port else ""
                lines.append(f'  "{up}" -> "{cid}"{label};')
        for src, target, what in redirects:
            lines.append(f'  "{src}" -> "{target}" [style=dashed, label="{what}"];')
        lines.append("}")
        return "\n".join(lines)
    lines = ["flowchart LR"]
    for cid, section in g.kinds.items():
        shape = _SHAPES["mermaid"][section].format(f'"{cid}<br/><i>{g.types[cid]}</i>"')
        lines.append(f"  {cid}{shape}")
    for cid, refs in g.inputs.items():
        for ref in refs:
            up, _, port = ref.partition(".")
            arrow = f" -->|{port}| " if port else " --> "
            lines.append(f"  {up}{arrow}{cid}")
    for src, target, what in redirects:
        lines.append(f"  {src} -. {what} .-> {target}")
    return "\n".join(lines)
