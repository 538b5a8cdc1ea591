"""REST API source against a local HTTP server (tests/fixtures/http_server.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, run_main
from pydantic import ValidationError

from dataflare import secrets
from dataflare.connectors.rest_api import (
    RestApiSourceConfig,
    TokenBucket,
    build_rest_api_source,
)
from dataflare.connectors.schema import discover
from dataflare.dsl_compiler import validate_text
from dataflare.dsl_compiler.models import Source, Workflow
from dataflare.records import META, Failed
from dataflare.registry import BuildContext, lookup
from dataflare.retry import retry_after_seconds
from dataflare.runner import error_text

RETRY = {"max_attempts": 4, "backoff": {"initial": "1ms", "max": "20ms"}}


def make_ctx(
    step: str, config: dict[str, Any], retry: dict[str, Any] | None = None, **component: Any
) -> BuildContext:
    cfg = RestApiSourceConfig.model_validate(config)
    comp = Source.model_validate({"type": "rest_api", "config": cfg, **component})
    wf = Workflow.model_validate({"config": {"retry": retry or RETRY}})
    return BuildContext(step, "source", comp, cfg, wf, Path("."))


def run(ctx: BuildContext, recovery: Path | None = None) -> list[Any]:
    out: list[Any] = []
    flow = Dataflow("rest")
    op.output("out", op.input(ctx.step_id, flow, build_rest_api_source(ctx)), TestingSink(out))
    rc = RecoveryConfig(str(recovery)) if recovery else None
    run_main(flow, epoch_interval=timedelta(0), recovery_config=rc)
    assert all(isinstance(b, list) and b for b in out)
    return [r for b in out for r in b]


def drain(ctx: BuildContext, state: dict[str, Any] | None = None,
          pages: int = 20) -> tuple[list[Any], dict[str, Any]]:
    """The records of the source's partition until its input ends, and its final state."""
    src = build_rest_api_source(ctx)
    part = src.build_part(ctx.step_id, src.list_parts()[0], state)
    out: list[Any] = []
    try:
        for _ in range(pages):
            out.extend(r for b in part.next_batch() for r in b)
    except StopIteration:
        return out, part.snapshot()
    finally:
        part.close()
    pytest.fail(f"the input did not end after {pages} pages: {out}")


def polled(api: Any, step: str, records: list[dict[str, Any]], **incremental: Any
           ) -> BuildContext:
    """A catch-up run (``stop_at_end``) polling ``records`` (``/page``: not filtered)."""
    api.items = records
    config = {"url": api.url + "/page", "records_path": "data.items",
              "incremental_param": "updated_since", "stop_at_end": True}
    return make_ctx(step, config, mode="incremental",
                    incremental={"cursor_field": "updated_at", "interval": "10ms", **incremental})


def chain(exc: BaseException | None) -> str:
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_seed_snippet_validates() -> None:
    spec = lookup("source", "rest_api")
    assert spec is not None and spec.config is RestApiSourceConfig
    raw = {
        "url": "https://api.example.com/products",
        "method": "GET",
        "pagination": {
            "type": "page_number",
            "page_param": "page",
            "size_param": "size",
            "size": 100,
        },
    }
    cfg = RestApiSourceConfig.model_validate(raw)
    Source.model_validate({"type": "rest_api", "mode": "full", "config": cfg})
    with pytest.raises(ValidationError, match="must start with http"):
        RestApiSourceConfig.model_validate({"url": "ftp://x"})
    with pytest.raises(ValidationError, match="pagenation"):
        RestApiSourceConfig.model_validate({"url": "http://x", "pagenation": {}})
    secret = RestApiSourceConfig.model_validate(
        {"url": "http://x", "auth": {"type": "bearer", "token": "tok-123"}}
    )
    assert "tok-123" not in repr(secret) and "tok-123" not in str(secret.model_dump())


STYLES = [
    (
        "page_number",
        {
            "url": "/page",
            "records_path": "data.items",
            "pagination": {"type": "page_number", "size_param": "size", "size": 7},
        },
    ),
    (
        "offset",
        {"url": "/offset", "records_path": "results", "pagination": {"type": "offset", "size": 6}},
    ),
    (
        "cursor",
        {
            "url": "/cursor",
            "records_path": "items",
            "pagination": {"type": "cursor", "cursor_path": "meta.next", "size": 8},
        },
    ),
    ("link_header", {"url": "/link", "pagination": {"type": "link_header"}}),
]


@pytest.mark.parametrize(("style", "config"), STYLES, ids=[s for s, _ in STYLES])
def test_every_pagination_style_through_429s_and_500s(
    api: Any, style: str, config: dict[str, Any]
) -> None:
    api.reset(43)
    api.faults.extend([(429, "0"), (500, None), (503, None)])
    ctx = make_ctx(f"api_{style}", {**config, "url": api.url + config["url"]}, mode="full")
    records = run(ctx)
    assert [r["id"] for r in records] == list(range(1, 44))
    assert records[0][META]["page"] == 0 and records[0][META]["url"].startswith(api.url)
    # three failed answers, then the pages (plus, for page/offset, the empty last one)
    statuses_left = len(api.faults)
    assert statuses_left == 0 and len(api.requests) >= 3 + 43 // 10


def test_too_many_failures_fail_the_step(api: Any) -> None:
    api.reset(5)
    api.faults.extend([(500, None)] * 4)
    # The error names the page asked for, the attempts and the answer (it said only
    # "GET <url> returned 503": where the walk stopped was not told).
    config = {"url": api.url + "/page", "records_path": "data.items",
              "pagination": {"type": "page_number"}}
    with pytest.raises(Exception) as info:
        run(make_ctx("api_down", config, mode="full"))
    assert "TransientError: GET " + api.url + "/page?page=1 returned 500" in chain(info.value)
    assert error_text(info.value) == (
        f"step 'api_down': giving up after 4 attempt(s): GET {api.url}/page?page=1 returned "
        """500: '{"error": "injected"}'""")


def test_client_errors_are_terminal_and_name_the_step(api: Any) -> None:
    ctx = make_ctx("api_404", {"url": api.url + "/missing"}, mode="full")
    with pytest.raises(Exception) as info:
        run(ctx)
    assert f"step 'api_404': GET {api.url}/missing returned 404" in chain(info.value)
    assert len(api.requests) == 1  # not retried


def test_retry_after_is_honoured_as_the_wait() -> None:
    assert retry_after_seconds("3") == 3.0
    later = (datetime.now(UTC) + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    wait = retry_after_seconds(later)
    assert wait is not None and 25 <= wait <= 30
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_retry_after_drives_the_backoff(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataflare.retry as retry

    waits: list[float] = []
    real = retry.call_with_retry

    def spy(*args: Any, **kw: Any) -> Any:
        return real(*args, **kw, sleep=waits.append)

    monkeypatch.setattr("dataflare.connectors.rest_api.call_with_retry", spy)
    api.reset(3)
    api.faults.extend([(429, "7"), (502, None)])
    slow = {"max_attempts": 3, "backoff": {"initial": "1s", "max": "10s"}}
    ctx = make_ctx("api_wait", {"url": api.url + "/link"}, retry=slow, mode="full")
    assert [r["id"] for r in run(ctx)] == [1, 2, 3]
    assert waits[0] == 7.0  # Retry-After: 7 beats the 1s backoff
    assert 1.6 <= waits[1] <= 2.4  # then 2s, with jitter of +-20%


@pytest.mark.parametrize(
    "auth",
    [
        ({"type": "bearer", "token": "s3cret"}, "bearer"),
        ({"type": "basic", "username": "ann", "password": "pw"}, "basic"),
        ({"type": "api_key", "key": "k1", "header": "X-Key"}, "key"),
        ({"type": "api_key", "key": "k2", "query_param": "api_key"}, "key_query"),
    ],
    ids=["bearer", "basic", "api_key_header", "api_key_query"],
)
def test_auth_schemes(api: Any, auth: tuple[dict[str, Any], str]) -> None:
    settings, mode = auth
    ctx = make_ctx(
        "api_auth",
        {"url": api.url + "/secure", "params": {"mode": mode}, "auth": settings},
        mode="full",
    )
    assert [(r["id"], r["auth"]) for r in run(ctx)] == [(1, mode)]
    wrong = make_ctx(
        "api_auth", {"url": api.url + "/secure", "params": {"mode": mode}}, mode="full"
    )
    with pytest.raises(Exception) as info:
        run(wrong)
    assert "returned 401" in chain(info.value)


@pytest.mark.parametrize(("key", "sent"), [
    ({"auth": {"type": "api_key", "key": "k2", "query_param": "api_key"}}, "api_key"),
    ({"params": {"api_key": "k2"}}, "api_key"),  # a parameter named like a secret
    ({"query": "?api_key=k2"}, "api_key"),  # or written in the URL
    ({"params": {"key": "k2-registered"}}, "key"),  # or holding a secret's value
])
def test_next_links_keep_their_query_and_no_key_is_kept(api: Any, key: dict[str, Any],
                                                        sent: str) -> None:
    # An API key sent as a query parameter replaced the next link's own query (page=2):
    # page 1 was read again and again, without end. The key was also in each record's
    # _meta.url and, echoed by the API in the next link, in the recovery state (and so
    # in an http destination's buffered records there).
    api.reset(25)
    secrets.register("k2-registered")  # ${GOOGLE_API_KEY}: a variable named like a secret
    value = key.get("params", {}).get("key", "k2")
    config = {"url": api.url + "/link" + key.pop("query", ""),
              "pagination": {"type": "link_header"}, **key}
    ctx = make_ctx("api_link", config, mode="full")
    src = build_rest_api_source(ctx)
    part = src.build_part("api_link", src.list_parts()[0], None)
    part.next_batch()
    state = part.snapshot()
    part.close()
    assert state["walk"]["url"] == api.url + "/link?page=2" and "k2" not in repr(state)
    assert "k2" not in src.list_parts()[0]  # the partition's name is in the state too
    api.reset(25)
    records = run(ctx)
    assert [r["id"] for r in records] == list(range(1, 26))
    assert [q for _, q, _ in api.requests] == [
        {sent: value}, {"page": "2", sent: value}, {"page": "3", sent: value}]
    assert {r[META]["url"] for r in records} == {
        api.url + "/link", api.url + "/link?page=2", api.url + "/link?page=3"}


def test_credentials_are_not_sent_to_another_host(api: Any) -> None:
    # A next link (or a redirect) to another host got the API's token and key.
    api.reset(20)
    config = {"url": api.url + "/away", "pagination": {"type": "link_header"},
              "headers": {"X-API-Key": "k2-header", "X-Trace": "t"},
              "params": {"access_token": "k2-query"},
              "auth": {"type": "bearer", "token": "k2-bearer"}}
    records = run(make_ctx("api_away", config, mode="full"))
    assert [r["id"] for r in records] == list(range(1, 21))
    (_, home_q, home_h), (_, away_q, away_h) = api.requests
    assert home_h["Host"].startswith("127.0.0.1") and away_h["Host"].startswith("localhost")
    assert home_q == {"access_token": "k2-query"} and home_h["X-API-Key"] == "k2-header"
    assert home_h["Authorization"] == "Bearer k2-bearer"
    assert away_q == {"page": "2"} and away_h["X-Trace"] == "t"
    assert "X-API-Key" not in away_h and "Authorization" not in away_h


def test_the_urls_own_query_is_kept_beside_the_page_parameters(api: Any) -> None:
    # httpx replaces a URL's query with the params given: `url: ...?size=4` lost its
    # filter as soon as a page number was sent (an API filter lost: every record read).
    api.reset(10)
    config = {"url": api.url + "/page?size=4", "records_path": "data.items",
              "pagination": {"type": "page_number"}}
    records = run(make_ctx("api_query", config, mode="full"))
    assert [r["id"] for r in records] == list(range(1, 11))
    assert [q for _, q, _ in api.requests] == [
        {"size": "4", "page": str(n)} for n in (1, 2, 3, 4)]


def test_post_with_headers_and_body(api: Any) -> None:
    ctx = make_ctx(
        "api_post",
        {
            "url": api.url + "/echo",
            "method": "POST",
            "headers": {"X-Trace": "t1"},
            "body": {"q": [1, 2]},
        },
        mode="full",
    )
    assert [{k: v for k, v in r.items() if k != META} for r in run(ctx)] == [
        {"method": "POST", "body": {"q": [1, 2]}}
    ]
    assert api.requests[0][2]["X-Trace"] == "t1"


def test_undecodable_and_missing_records_become_failed_entries(api: Any) -> None:
    bad = run(make_ctx("api_text", {"url": api.url + "/text"}, mode="full"))
    assert len(bad) == 1 and isinstance(bad[0], Failed)
    assert bad[0].record == "<html>not json</html>"
    assert bad[0].message.endswith("is not JSON: unexpected character, expected a JSON value, "
                                   "at column 1 of the response")
    assert bad[0].step == "api_text" and bad[0].meta["url"] == api.url + "/text"
    api.reset(2)
    missing = run(make_ctx("api_path", {"url": api.url + "/offset", "records_path": "data"},
                           mode="full"))
    assert isinstance(missing[0], Failed) and "has no 'data' (records_path)" in missing[0].message


@pytest.mark.parametrize("body", [b'{"data": null}', b"", b"  \n"])
def test_a_null_list_or_no_content_is_a_page_of_no_records(api: Any, body: bytes) -> None:
    # {"data": null} (an empty list as Go writes it) and an empty body (204) failed the
    # walk's last page: "has no 'data'", "is not JSON".
    api.raw = body
    assert run(make_ctx("api_null", {"url": api.url + "/raw", "records_path": "data"},
                        mode="full")) == []


def test_a_page_that_is_not_json_is_walked_past_or_stops_the_run(api: Any) -> None:
    # A page answered in HTML (a gateway's hiccup) ended the walk: with skip or redirect
    # the pages after it were never asked for, and the run succeeded (15 of 25 lost).
    api.reset(6)
    api.broken = {2}
    config = {"url": api.url + "/page", "records_path": "data.items",
              "pagination": {"type": "page_number", "size_param": "size", "size": 2}}
    got = run(make_ctx("api_html", config, mode="full"))
    assert [r["id"] for r in got if not isinstance(r, Failed)] == [1, 2, 5, 6]
    [failed] = [r for r in got if isinstance(r, Failed)]
    assert failed.meta["url"] == api.url + "/page?page=2&size=2"
    assert [q["page"] for _, q, _ in api.requests] == ["1", "2", "3", "4"]
    api.broken = {2, 3, 4}  # pages in a row: a wrong records_path, or an outage
    with pytest.raises(Exception) as info:
        run(make_ctx("api_html", config, mode="full"))
    assert "3 pages in a row had no records to read" in chain(info.value)
    # Incremental: the cursor stays where it was, so a later walk reads the page again.
    api.reset()
    api.items = [{"id": i, "updated_at": f"2024-01-01T00:00:0{i}Z"} for i in range(1, 7)]
    api.broken = {2}
    polled = make_ctx("api_html_inc", {**config, "stop_at_end": True}, mode="incremental",
                      incremental={"cursor_field": "updated_at", "cursor_type": "timestamp"})
    first, state = drain(polled)  # a catch-up run: it walks until a walk finds nothing new
    assert [r["id"] for r in first if not isinstance(r, Failed)] == [1, 2, 5, 6]
    assert len([r for r in first if isinstance(r, Failed)]) == 2
    api.broken = set()
    again, _ = drain(polled, state)
    assert [r["id"] for r in again] == [3, 4]
    # A next link is in the page: the walk cannot go past it, so the run stops (and a
    # resume asks for the page again).
    api.reset(25)
    api.broken = {2}
    link = {"url": api.url + "/link", "pagination": {"type": "link_header"}}
    with pytest.raises(Exception) as info:
        run(make_ctx("api_link", link, mode="full"))
    assert "the next page is named in this response (link_header pagination), so the " \
        "walk cannot go on past it" in chain(info.value)


def test_incremental_polls_by_cursor_without_duplicates(api: Any, tmp_path: Path) -> None:
    api.reset(25)
    init_db_dir(tmp_path, 1)
    ctx = make_ctx(
        "api_inc",
        {
            "url": api.url + "/since",
            "incremental_param": "updated_since",
            "stop_at_end": True,
            "pagination": {"type": "page_number", "size_param": "size", "size": 10},
        },
        mode="incremental",
        incremental={
            "cursor_field": "updated_at",
            "start_value": "2024-01-01T00:00:05Z",
            "interval": "10ms",
        },
    )
    first = run(ctx, tmp_path)
    assert [r["id"] for r in first] == list(range(5, 26))
    # The server answers `>=` the cursor: the records at the cursor come back and are dropped;
    # a new record sharing the cursor value is kept, as are newer ones.
    with api.lock:
        api.items.append({"id": 26, "name": "tie", "updated_at": "2024-01-01T00:00:25Z"})
        api.items.append({"id": 27, "name": "new", "updated_at": "2024-01-01T00:00:40Z"})
    api.requests.clear()
    second = run(ctx, tmp_path)
    assert [r["id"] for r in second] == [26, 27]
    assert api.requests[0][1]["updated_since"] == "2024-01-01T00:00:25Z"
    assert run(ctx, tmp_path) == []


def test_an_api_without_a_since_parameter_is_synced_by_walking_it_whole(
    api: Any, tmp_path: Path
) -> None:
    # mode incremental needed config.incremental_param, so an endpoint without a "since"
    # parameter (most small APIs) could not be synced at all.
    api.reset(12)
    init_db_dir(tmp_path, 1)
    ctx = make_ctx("api_whole", {"url": api.url + "/link", "stop_at_end": True,
                                 "pagination": {"type": "link_header"}},
                   mode="incremental", incremental={"cursor_field": "updated_at"})
    assert [r["id"] for r in run(ctx, tmp_path)] == list(range(1, 13))
    with api.lock:
        api.items[0] = {**api.items[0], "name": "changed", "updated_at": "2024-01-01T00:01:00Z"}
        api.items.append({"id": 13, "name": "new", "updated_at": "2024-01-01T00:00:50Z"})
    api.requests.clear()
    assert [(r["id"], r["name"]) for r in run(ctx, tmp_path)] == [(1, "changed"), (13, "new")]
    assert all(set(query) <= {"page"} for _, query, _ in api.requests)  # no cursor sent
    with pytest.raises(ValueError, match="'api_none': mode incremental needs incremental."
                                         "cursor_field: the field of the records"):
        build_rest_api_source(make_ctx("api_none", {"url": api.url + "/link"},
                                       mode="incremental", incremental={"interval": "1m"}))


def test_full_walk_resumes_mid_way_from_its_state(api: Any) -> None:
    api.reset(30)
    ctx = make_ctx(
        "api_resume",
        {
            "url": api.url + "/cursor",
            "records_path": "items",
            "pagination": {"type": "cursor", "cursor_path": "meta.next", "size": 10},
        },
        mode="full",
    )
    src = build_rest_api_source(ctx)
    (name,) = src.list_parts()
    part = src.build_part("api_resume", name, None)
    first = [r["id"] for b in part.next_batch() for r in b]
    state = part.snapshot()
    part.close()
    resumed = src.build_part("api_resume", name, state)
    rest: list[int] = []
    with pytest.raises(StopIteration):
        while True:
            rest.extend(r["id"] for b in resumed.next_batch() for r in b)
    assert first == list(range(1, 11)) and rest == list(range(11, 31))
    assert api.requests[1][1]["cursor"] == "10"


def test_token_bucket_spaces_requests_with_next_awake(api: Any) -> None:
    bucket = TokenBucket(rate=2.0, burst=2)
    t0 = bucket.stamp
    assert bucket.take(t0) is None and bucket.take(t0) is None
    wait = bucket.take(t0)
    assert wait is not None and abs((wait - t0).total_seconds() - 0.5) < 1e-6
    assert bucket.take(t0 + timedelta(seconds=0.5)) is None

    api.reset(30)
    ctx = make_ctx(
        "api_rate",
        {
            "url": api.url + "/link",
            "pagination": {"type": "link_header"},
            "rate_limit": {"requests_per_second": 0.01, "burst": 1},
        },
        mode="full",
    )
    src = build_rest_api_source(ctx)
    part = src.build_part("api_rate", src.list_parts()[0], None)
    assert part.next_batch()  # the one token
    assert part.next_batch() == [] and part.next_awake() is not None  # waits, no sleep
    assert len(api.requests) == 1
    part.close()


def test_discover_infers_a_schema(api: Any) -> None:
    api.reset(3)
    api.items[2]["tags"] = ["x"]
    ctx = make_ctx("api_disc", {"url": api.url + "/link"}, mode="full")
    found = discover(ctx)
    assert found["sampled"] == 3 and found["type"] == "rest_api"
    schema = found["json_schema"]
    assert schema["properties"]["id"] == {"type": "integer"}
    assert schema["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert schema["required"] == ["id", "name", "updated_at"]


def test_connection_failures_are_retried_then_fail(api: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = make_ctx("api_refused", {"url": f"http://127.0.0.1:{port}/x"}, mode="full")
    with pytest.raises(Exception) as info:
        run(ctx)
    text = chain(info.value)
    assert f"TransientError: GET http://127.0.0.1:{port}/x: ConnectError" in text


def test_a_record_without_its_cursor_value_is_a_located_error_once(api: Any) -> None:
    api.reset(2)
    ctx = polled(api, "api_nocursor", [*api.items, {"id": 3, "name": "no cursor"},
                                       {"id": 4, "updated_at": None}])
    records, state = drain(ctx)  # a second walk finds nothing new: the run ends
    assert [r["id"] for r in records if not isinstance(r, Failed)] == [1, 2]
    failed = [r for r in records if isinstance(r, Failed)]
    assert [(f.record["id"], f.type, f.step) for f in failed] == [
        (3, "CursorError", "api_nocursor"), (4, "CursorError", "api_nocursor")]
    assert failed[0].message == (
        "source 'api_nocursor': cursor field 'updated_at' is missing or null")
    assert failed[0].meta == {"url": api.url + "/page", "page": 0}  # where it was read
    assert drain(ctx, state)[0] == []  # reported once, not at every poll
    api.requests.clear()
    only_bad, _ = drain(polled(api, "api_nocursor", [{"id": 5}]))
    assert [type(r) for r in only_bad] == [Failed]
    assert len(api.requests) == 1  # an error is not news: stop_at_end ends after one walk


def test_a_catch_up_run_walks_again_at_once_and_ends_without_waiting(api: Any) -> None:
    # It waited incremental.interval (10 s by default) between walks and before ending.
    api.reset(2)
    ctx = polled(api, "api_catchup", list(api.items), interval="1h")
    src = build_rest_api_source(ctx)
    part = src.build_part(ctx.step_id, src.list_parts()[0], None)
    awakes, records = [], []
    with pytest.raises(StopIteration):
        for _ in range(10):
            records += [r for b in part.next_batch() for r in b]
            awakes.append(part.next_awake())
    part.close()
    assert [r["id"] for r in records] == [1, 2]
    assert awakes and set(awakes) == {None}


def test_timestamp_cursors_compare_as_instants(api: Any) -> None:
    ctx = polled(api, "api_ts", [
        {"id": 1, "updated_at": "2024-01-01T17:59:59Z"},  # older than the start
        {"id": 2, "updated_at": "2024-01-01T17:30:00-02:00"},  # 19:30Z
        {"id": 3, "updated_at": "2024-01-01 20:00:00+00:00"},
        {"id": 4, "updated_at": "2024-01-01T19:00:00"},  # naive: UTC
        {"id": 5, "updated_at": 1704133800},  # epoch seconds: 18:30Z
        {"id": 6, "updated_at": "yesterday"},
    ], cursor_type="timestamp", start_value="2024-01-01T18:00:00Z")
    records, _ = drain(ctx)
    assert [r["id"] for r in records if not isinstance(r, Failed)] == [2, 3, 4, 5]
    (bad,) = [r for r in records if isinstance(r, Failed)]
    assert bad.record["id"] == 6 and bad.message.startswith(
        "source 'api_ts': cursor field 'updated_at' is not a timestamp: timestamp 'yesterday'")
    sent = [q.get("updated_since") for _, q, _ in api.requests]
    assert sent == ["2024-01-01T18:00:00Z", "2024-01-01 20:00:00+00:00"]  # as read
    with pytest.raises(ValueError, match="'api_ts': incremental.start_value is not a timestamp"):
        build_rest_api_source(polled(api, "api_ts", [], cursor_type="timestamp",
                                     start_value="soon"))
    # An unquoted YAML timestamp is a datetime: it was sent as "2024-01-01 18:00:00+00:00".
    api.requests.clear()
    drain(polled(api, "api_ts", [], cursor_type="timestamp",
                 start_value=datetime(2024, 1, 1, 18, tzinfo=UTC)))
    assert api.requests[0][1]["updated_since"] == "2024-01-01T18:00:00Z"


def test_integer_and_string_cursors(api: Any) -> None:
    ctx = polled(api, "api_int", [{"id": 1, "updated_at": "9"}, {"id": 2, "updated_at": "10"},
                                  {"id": 3, "updated_at": 12}, {"id": 4, "updated_at": 1.5}],
                 cursor_type="integer", start_value=9)
    records, _ = drain(ctx)
    assert [r["id"] for r in records if not isinstance(r, Failed)] == [1, 2, 3]
    assert [r.message for r in records if isinstance(r, Failed)] == [
        "source 'api_int': cursor field 'updated_at' is a float (1.5), expected an integer"]
    api.requests.clear()
    text = polled(api, "api_str", [{"id": 1, "updated_at": "b"}, {"id": 2, "updated_at": 5}],
                  cursor_type="string", start_value="a")
    records, _ = drain(text)
    assert [r["id"] for r in records if not isinstance(r, Failed)] == [1]
    assert [r.message for r in records if isinstance(r, Failed)] == [
        "source 'api_str': cursor field 'updated_at' is an int (5), expected text"]


def test_a_record_a_shifted_page_repeats_is_emitted_once(api: Any) -> None:
    # A record inserted before the walk's place pushes the last record of a page onto the
    # next one: the walk emitted it twice (only records of walks before were dropped).
    api.items = [{"id": i, "updated_at": f"2024-01-01T00:00:0{i}Z"} for i in range(1, 7)]
    config = {"url": api.url + "/page", "records_path": "data.items", "stop_at_end": True,
              "pagination": {"type": "page_number", "size_param": "size", "size": 2}}
    ctx = make_ctx("api_shift", config, mode="incremental",
                   incremental={"cursor_field": "updated_at", "cursor_type": "timestamp"})
    src = build_rest_api_source(ctx)
    part = src.build_part("api_shift", src.list_parts()[0], None)
    ids = [r["id"] for b in part.next_batch() for r in b]
    with api.lock:  # updated while the walk goes on: now first in the API's order
        api.items.insert(0, {"id": 0, "updated_at": "2024-01-01T00:00:09Z"})
    with pytest.raises(StopIteration):
        for _ in range(20):
            ids += [r["id"] for b in part.next_batch() for r in b]
    part.close()
    assert ids == [1, 2, 3, 4, 5, 6, 0]  # the next walk finds 0


@pytest.mark.parametrize(("key", "emitted"), [(None, [1, 2, 3, 3]), (["id"], [1, 2, 3])])
def test_a_record_changing_at_each_answer_ends_a_catch_up_run(
        api: Any, key: list[str] | None, emitted: list[int]) -> None:
    # A field the API changes at each answer (a signed link, a timestamp) made the record
    # at the cursor new at each walk: stop_at_end never ended, and emitted it each time.
    api.reset(3)
    config = {"url": api.url + "/vol", "incremental_param": "updated_since",
              "stop_at_end": True, **({"primary_key": key} if key else {})}
    ctx = make_ctx("api_vol", config, mode="incremental",
                   incremental={"cursor_field": "updated_at", "cursor_type": "timestamp"})
    records, _ = drain(ctx)
    assert [r["id"] for r in records] == emitted  # with a key, the record read again is known
    if key:  # records without their key were all one record: the first only was emitted
        api.reset(3)
        for item in api.items:
            item.pop("id")
        records, _ = drain(ctx)
        assert [r.message for r in records] == [
            "source 'api_vol': primary_key field 'id' is missing or null"] * 3


def test_lookback_re_reads_a_window_and_emits_only_late_records(api: Any) -> None:
    ctx = polled(api, "api_back", [{"id": 1, "updated_at": "2024-01-01T10:00:00Z"},
                                   {"id": 2, "updated_at": "2024-01-01T12:00:00Z"}],
                 cursor_type="timestamp", lookback="1h")
    first, state = drain(ctx)
    assert [r["id"] for r in first] == [1, 2]
    with api.lock:
        api.items.append({"id": 3, "updated_at": "2024-01-01T11:30:00Z"})  # late, in the window
        api.items.append({"id": 4, "updated_at": "2024-01-01T10:30:00Z"})  # before the window
    api.requests.clear()
    second, _ = drain(ctx, state)
    assert [r["id"] for r in second] == [3]
    assert {q["updated_since"] for _, q, _ in api.requests} == {"2024-01-01T11:00:00Z"}
    api.reset()
    api.requests.clear()
    drain(ctx, {"cursor": 1704132000})  # an epoch cursor stays a number
    assert api.requests[0][1]["updated_since"] == "1704128400"
    with pytest.raises(ValueError, match="'api_back': incremental.lookback needs incremental."
                                         "cursor_type timestamp, got none"):
        build_rest_api_source(polled(api, "api_back", [], lookback="1h"))


def test_settings_without_effect_in_mode_full_are_refused(api: Any) -> None:
    with pytest.raises(ValueError, match="source 'api_full': incremental has no effect in "
                                         "mode full, which reads the endpoint once"):
        build_rest_api_source(make_ctx("api_full", {"url": api.url + "/page"}, mode="full",
                                       incremental={"cursor_field": "updated_at"}))
    with pytest.raises(ValueError, match="source 'api_full': config.incremental_param, "
                                         "config.stop_at_end has no effect in mode full"):
        build_rest_api_source(make_ctx("api_full", {
            "url": api.url + "/page", "incremental_param": "since", "stop_at_end": True}))
    v = validate_text("""\
workflow:
  sources:
    api:
      type: rest_api
      config:
        url: http://api.example.com/items
        body: {q: 1}
  destinations:
    out:
      type: file
      inputs: [api]
      config: {path: out.jsonl, format: jsonl}
""", "flow.yaml")
    assert [(p.line, p.message) for p in v.errors()] == [
        (7, "body is sent with method POST only, the method is GET")]


def test_numbers_a_float_would_round_come_exact_per_decimal_handling(api: Any) -> None:
    # The response was read with the stdlib's json: 12345678901234567890.12 came as
    # 1.2345678901234567e19, a different amount, without a word.
    api.raw = (b'[{"id": 12345678901234567890123, "amount": 12345678901234567890.12, '
               b'"price": 2.50, "n": 7}]')

    def read(**handling: str) -> dict[str, Any]:
        (rec,) = run(make_ctx("nums", {"url": api.url + "/raw", **handling}, mode="full"))
        return {k: v for k, v in rec.items() if k != META}

    assert read() == {"id": "12345678901234567890123", "amount": "12345678901234567890.12",
                      "price": 2.5, "n": 7}
    assert read(decimal_handling="string") == {
        "id": "12345678901234567890123", "amount": "12345678901234567890.12", "price": "2.50",
        "n": 7}
    assert read(decimal_handling="float")["amount"] == 1.2345678901234567e19


@pytest.mark.parametrize(("path", "config"), [
    ("/page", {"records_path": "data.items",
               "pagination": {"type": "page_number", "size_param": "size", "size": 4}}),
    ("/offset", {"records_path": "results", "pagination": {"type": "offset", "size": 4}}),
], ids=["page_number", "offset"])
def test_a_page_shorter_than_asked_does_not_end_the_walk(
    api: Any, path: str, config: dict[str, Any]
) -> None:
    # An API capping its pages at 3 records (as GitHub caps per_page at 100) ended the walk
    # at its first page when `size` asked for 4: 7 of 10 records lost, without a word.
    api.reset(10)
    api.cap = 3
    records = run(make_ctx("capped", {"url": api.url + path, **config}, mode="full"))
    assert [r["id"] for r in records] == list(range(1, 11))


def test_an_api_ignoring_the_page_parameter_ends_the_walk_with_a_warning(
    api: Any, caplog: pytest.LogCaptureFixture
) -> None:
    api.raw = b'[{"id": 1}, {"id": 2}]'  # the same list whatever the page
    config = {"url": api.url + "/raw", "pagination": {"type": "page_number", "size": 5}}
    records = run(make_ctx("same", config, mode="full"))
    assert [r["id"] for r in records] == [1, 2]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"step 'same': page 2 of {api.url}/raw repeats the page before: the API ignores "
        "'page'; the walk ends there"]
