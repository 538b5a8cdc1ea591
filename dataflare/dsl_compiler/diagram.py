"""The workflow DAG as Mermaid or Graphviz dot text, or an SVG picture (``dataflare graph``)."""

from __future__ import annotations

from html import escape

from dataflare.dsl_compiler.graph import redirect_targets
from dataflare.dsl_compiler.validate import Validated

_SHAPES = {
    "mermaid": {"sources": "([{}])", "transformations": "[{}]", "destinations": "[({})]"},
    "dot": {"sources": "ellipse", "transformations": "box", "destinations": "cylinder"},
}


def render(validated: Validated, fmt: str = "mermaid") -> str:
    """Text of the DAG: nodes labelled ``id: type``, edges from inputs, dashed redirects."""
    assert validated.graph is not None
    if fmt == "svg":
        return svg(validated)
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


_FILL = {"sources": "#dbeafe", "transformations": "#fef3c7", "destinations": "#dcfce7"}


def svg(validated: Validated) -> str:
    """The DAG as a self-contained SVG: one column per depth, left to right."""
    assert validated.graph is not None
    g = validated.graph
    depth: dict[str, int] = {}

    def level(cid: str) -> int:
        if cid not in depth:
            depth[cid] = 0  # cycles are refused earlier; this guards the recursion
            ups = [r.partition(".")[0] for r in g.inputs.get(cid, [])]
            depth[cid] = 1 + max((level(u) for u in ups if u in g.kinds), default=-1)
        return depth[cid]

    columns: dict[int, list[str]] = {}
    for cid in g.kinds:
        columns.setdefault(level(cid), []).append(cid)
    w, h, gap_x, gap_y = 170, 44, 60, 18
    pos = {cid: (20 + d * (w + gap_x), 20 + i * (h + gap_y))
           for d, ids in columns.items() for i, cid in enumerate(ids)}
    width = 40 + len(columns) * (w + gap_x) - gap_x
    height = 40 + max(len(ids) for ids in columns.values()) * (h + gap_y) - gap_y
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12" class="dag">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
           'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>']
    for cid, refs in g.inputs.items():
        for ref in refs:
            up = ref.partition(".")[0]
            if up in pos and cid in pos:
                (x1, y1), (x2, y2) = pos[up], pos[cid]
                out.append(f'<line x1="{x1 + w}" y1="{y1 + h // 2}" x2="{x2}" y2="{y2 + h // 2}" '
                           f'stroke="#555" marker-end="url(#arrow)"/>')
    for cid, (x, y) in pos.items():
        section = g.kinds[cid]
        out.append(f'<g class="node" data-id="{escape(cid)}"><rect x="{x}" y="{y}" width="{w}" '
                   f'height="{h}" rx="8" fill="{_FILL[section]}" stroke="#333"/>'
                   f'<text x="{x + 8}" y="{y + 18}" font-weight="bold">{escape(cid)}</text>'
                   f'<text x="{x + 8}" y="{y + 34}" fill="#555">{escape(g.types[cid])}</text></g>')
    out.append("</svg>")
    return "\n".join(out)
