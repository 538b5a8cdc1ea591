"""Which fields of a step's records are read downstream: what a join needs to hold.

A windowed or relational join holds every record of its inputs until its window closes
(with a day of lateness, a day of records). When everything downstream of the join is
known to read only some top-level fields, the join holds only those: a mapping reads its
sources and expressions and passes nothing else on (unless ``keep_unmapped``); a filter
reads its condition and passes the whole record on. Anything else downstream (a
destination, a window, a router, a plugin...) counts as reading every field, so the
projection only ever applies where the reads are known exactly.

:func:`read_downstream` derives it from the type flow's reads (the same reads ``validate``
checks against the schemas).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataflare.record_schema import META_FIELD

if TYPE_CHECKING:
    from dataflare.dsl_compiler.graph import Graph
    from dataflare.dsl_compiler.types import TypeFlow

Fields = frozenset[str] | None
"""Top-level field names, or ``None``: every field."""


def read_downstream(graph: Graph, flow: TypeFlow, step: str) -> Fields:
    """The top-level fields of ``step``'s main output that any step after it reads."""
    consumers = graph.consumers()
    memo: dict[str, Fields] = {}

    def needed_out(cid: str) -> Fields:
        if cid not in memo:
            memo[cid] = frozenset()
            needs: set[str] = set()
            for reader in consumers.get(cid, []):
                if cid not in graph.inputs.get(reader, []):
                    continue  # reads a named output only (a join's late records)
                got = needed_in(reader)
                if got is None:
                    memo[cid] = None
                    return None
                needs |= got
            memo[cid] = frozenset(needs)
        return memo[cid]

    def needed_in(cid: str) -> Fields:
        if graph.kinds.get(cid) != "transformations":
            return None
        reads = flow.reads.get(cid)
        kind, config = graph.types.get(cid), graph.configs.get(cid)
        if reads is None or config is None or any(r.schema is not None for r in reads):
            return None
        heads = {r.path.split(".", 1)[0] for r in reads}
        if kind == "mapping" and not config.keep_unmapped:
            out = needed_out(cid)  # the mapping passes _meta on
            return frozenset(heads | ({META_FIELD} if out is None or META_FIELD in out else set()))
        if kind == "filter":
            out = needed_out(cid)
            return None if out is None else frozenset(heads | out)
        return None

    return needed_out(step)
