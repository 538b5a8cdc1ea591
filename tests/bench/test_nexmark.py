"""The Nexmark workflows of ``bench/nexmark``: each one's output equals DuckDB's SQL.

Correctness only (no timing): a small generated input, each workflow run by
``dataflare.run``, its output compared as a multiset with the same query in DuckDB SQL
over the same files; the raw-loop references are checked the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import dataflare

NEXMARK = Path(__file__).resolve().parents[2] / "bench" / "nexmark"
sys.path.insert(0, str(NEXMARK))

import generator  # noqa: E402
import queries  # noqa: E402

STATEFUL = ("q3", "q4", "q5", "q7", "q8")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4,000 events at 200 events/s: 20 s of event time, so several q5, q7, q8 windows."""
    path = tmp_path_factory.mktemp("nexmark")
    counts = generator.write(path, 4_000, seed=3, rate=200)
    assert counts == {"person": 80, "auction": 240, "bid": 3_680}
    return path


def test_generator_follows_the_specification(tmp_path: Path) -> None:
    events = list(generator.Generator(5_000, seed=5, rate=1_000))
    kinds = [k for k, _ in events]
    assert kinds[:50] == ["person"] + ["auction"] * 3 + ["bid"] * 46
    assert (kinds.count("person"), kinds.count("auction"), kinds.count("bid")) == (100, 300, 4_600)
    times = [r["dateTime"] for _, r in events]
    assert times == sorted(times) and times[-1] - times[0] == 4_999  # 1 ms apart at 1,000/s
    people = {r["id"] for k, r in events if k == "person"}
    auctions = [r for k, r in events if k == "auction"]
    assert all(a["seller"] in people for a in auctions)  # sellers are people seen so far
    assert all(a["dateTime"] < a["expires"] for a in auctions)
    # The same seed gives the same events; another seed others.
    assert list(generator.Generator(500, seed=5, rate=1_000)) == events[:500]
    assert list(generator.Generator(500, seed=6, rate=1_000)) != events[:500]


@pytest.mark.parametrize(
    ("query", "workers"),
    [(q, 1) for q in queries.QUERIES] + [(q, 2) for q in STATEFUL],
)
def test_workflow_output_equals_duckdb(
    query: str, workers: int, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = queries.canonical(queries.duckdb_result(query, data))
    assert want, f"{query}: DuckDB found no rows; the input is too small to test it"
    monkeypatch.setenv("NEXMARK_DATA", str(data))
    monkeypatch.setenv("NEXMARK_OUT", str(tmp_path))
    result = dataflare.run(queries.workflow(query), workers=workers, quiet=True)
    assert result.ok, result.error
    assert queries.canonical(queries.dataflare_rows(query, tmp_path)) == want


@pytest.mark.parametrize("query", queries.QUERIES)
def test_raw_loop_equals_duckdb(query: str, data: Path, tmp_path: Path) -> None:
    want = queries.canonical(queries.duckdb_result(query, data))
    assert queries.canonical(queries.RAW[query](data, tmp_path)) == want
