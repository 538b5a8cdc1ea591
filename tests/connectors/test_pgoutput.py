"""pgoutput decoding: hand-built messages of every kind, then a real server's stream."""

from __future__ import annotations

import logging
import struct
from datetime import UTC, datetime
from typing import Any

import pytest

from dataflare.connectors.pgoutput import (
    UNCHANGED,
    Begin,
    Binary,
    ChangeDecoder,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    ProtocolError,
    Relation,
    Truncate,
    Type,
    Update,
    ValueDecoder,
    decode_message,
    int_to_lsn,
    lsn_to_int,
)
from dataflare.connectors.schema import UnconvertibleValue, json_value
from dataflare.records import META, Failed

TS = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
TS_MICROS = int((TS - datetime(2000, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def tuple_data(*values: Any) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        elif isinstance(v, Binary):
            out += b"b" + struct.pack("!i", len(v.data)) + v.data
        else:
            raw = v.encode()
            out += b"t" + struct.pack("!i", len(raw)) + raw
    return out


def begin(final_lsn: int, xid: int) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, TS_MICROS, xid)


def commit(commit_lsn: int, end_lsn: int) -> bytes:
    return b"C" + struct.pack("!bQQq", 0, commit_lsn, end_lsn, TS_MICROS)


def relation(
    oid: int, ns: str, name: str, cols: list[tuple[int, str, int]], ident: str = "d"
) -> bytes:
    out = b"R" + struct.pack("!I", oid) + s(ns) + s(name) + ident.encode()
    out += struct.pack("!h", len(cols))
    for flags, col, type_oid in cols:
        out += struct.pack("!b", flags) + s(col) + struct.pack("!Ii", type_oid, -1)
    return out


ITEMS = relation(
    16400,
    "public",
    "items",
    [
        (1, "id", 23),
        (0, "name", 25),
        (0, "price", 1700),
        (0, "at", 1184),
        (0, "tags", 1009),
        (0, "doc", 3802),
        (0, "ok", 16),
    ],
)


def test_lsn_text_round_trip() -> None:
    assert lsn_to_int("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert int_to_lsn(lsn_to_int("16/B374D848")) == "16/B374D848"
    assert int_to_lsn(0) == "0/0"


def test_decode_every_message_kind() -> None:
    assert decode_message(begin(0x100, 7)) == Begin(0x100, TS, 7)
    assert decode_message(commit(0x100, 0x130)) == Commit(0, 0x100, 0x130, TS)
    assert decode_message(b"O" + struct.pack("!Q", 5) + s("upstream")) == Origin(5, "upstream")
    rel = decode_message(ITEMS)
    assert isinstance(rel, Relation) and rel.qualified_name == "public.items"
    assert [(c.name, c.type_oid, c.key) for c in rel.columns][:3] == [
        ("id", 23, True),
        ("name", 25, False),
        ("price", 1700, False),
    ]
    assert rel.replica_identity == "d"
    assert decode_message(b"Y" + struct.pack("!I", 99) + s("public") + s("mood")) == Type(
        99, "public", "mood"
    )
    ins = decode_message(b"I" + struct.pack("!I", 16400) + b"N" + tuple_data("1", None))
    assert ins == Insert(16400, (b"1", None))
    upd = decode_message(b"U" + struct.pack("!I", 16400) + b"N" + tuple_data("1", UNCHANGED))
    assert upd == Update(16400, None, None, (b"1", UNCHANGED))
    upd_k = decode_message(
        b"U" + struct.pack("!I", 16400) + b"K" + tuple_data("1", None) + b"N" + tuple_data("2", "x")
    )
    assert upd_k == Update(16400, "K", (b"1", None), (b"2", b"x"))
    upd_o = decode_message(
        b"U" + struct.pack("!I", 16400) + b"O" + tuple_data("1", "a") + b"N" + tuple_data("1", "b")
    )
    assert isinstance(upd_o, Update) and upd_o.old_kind == "O" and upd_o.old == (b"1", b"a")
    assert decode_message(b"D" + struct.pack("!I", 16400) + b"K" + tuple_data("1")) == Delete(
        16400, "K", (b"1",)
    )
    assert decode_message(b"D" + struct.pack("!I", 1) + b"O" + tuple_data("1", "z")) == Delete(
        1, "O", (b"1", b"z")
    )
    tr = decode_message(b"T" + struct.pack("!ibII", 2, 3, 16400, 16401))
    assert tr == Truncate((16400, 16401), cascade=True, restart_identity=True)
    msg = decode_message(
        b"M" + struct.pack("!bQ", 1, 0x200) + s("app") + struct.pack("!i", 5) + b"hello"
    )
    assert msg == LogicalMessage(True, 0x200, "app", b"hello")
    binary = decode_message(
        b"I" + struct.pack("!I", 1) + b"N" + tuple_data(Binary(b"\x00\x00\x00\x2a"))
    )
    assert binary == Insert(1, (Binary(b"\x00\x00\x00\x2a"),))


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "empty pgoutput message"),
        (b"Z", "unknown pgoutput message type 'Z'"),
        (b"B" + b"\x00" * 5, "message ends after 6 bytes"),
        (b"I" + struct.pack("!I", 1) + b"X", "insert message without a new tuple"),
        (b"D" + struct.pack("!I", 1) + b"N" + tuple_data("1"), "delete message with tuple kind"),
        (b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"q", "unknown tuple"),
        (b"O" + struct.pack("!Q", 5) + b"no-terminator", "unterminated string"),
    ],
)
def test_malformed_messages_are_protocol_errors(data: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_message(data)


def test_change_decoder_builds_records_per_transaction() -> None:
    dec = ChangeDecoder("items_cdc")
    assert dec.feed(ITEMS) is None  # a relation may come before the transaction
    assert dec.feed(begin(0x500, 42)) is None
    row = ("1", "apple", "1.25", "2024-05-01 10:00:00+00", '{a,"b c"}', '{"k": [1]}', "t")
    dec.feed(b"I" + struct.pack("!I", 16400) + b"N" + tuple_data(*row), 0x480)
    dec.feed(
        b"U"
        + struct.pack("!I", 16400)
        + b"N"
        + tuple_data("1", "apple", "1.50", None, UNCHANGED, UNCHANGED, "f"),
        0x490,
    )
    dec.feed(
        b"D"
        + struct.pack("!I", 16400)
        + b"K"
        + tuple_data("1", None, None, None, None, None, None),
        0x4A0,
    )
    dec.feed(  # the key changed: the old key comes along ('K'), only key columns
        b"U"
        + struct.pack("!I", 16400)
        + b"K"
        + tuple_data("1", None, None, None, None, None, None)
        + b"N"
        + tuple_data("9", "apple", "1.50", None, None, None, "f"),
        0x4A8,
    )
    dec.feed(b"T" + struct.pack("!ibI", 1, 0, 16400), 0x4B0)
    tx = dec.feed(commit(0x500, 0x530), 0x500)
    assert tx is not None and (tx.xid, tx.commit_lsn, tx.end_lsn) == (42, 0x500, 0x530)
    ins, upd, dele, rekey, trunc = tx.records
    assert rekey["id"] == 9 and rekey[META]["old"] == {"id": 1}
    assert {k: v for k, v in ins.items() if k != META} == {
        "id": 1,
        "name": "apple",
        "price": 1.25,
        "at": "2024-05-01T10:00:00+00:00",
        "tags": ["a", "b c"],
        "doc": {"k": [1]},
        "ok": True,
    }
    assert ins[META] == {
        "op": "insert",
        "table": "public.items",
        "lsn": "0/480",
        "commit_ts": TS.isoformat(),
        "xid": 42,
    }
    assert upd["price"] == 1.5 and upd["at"] is None and "tags" not in upd and not upd["ok"]
    assert upd[META]["unchanged"] == ["tags", "doc"]
    assert {k: v for k, v in dele.items() if k != META} == {"id": 1}  # the key only
    assert dele[META]["op"] == "delete"
    assert trunc == {
        META: {
            "op": "truncate",
            "table": "public.items",
            "lsn": "0/4B0",
            "commit_ts": TS.isoformat(),
            "xid": 42,
        }
    }


def test_a_dropped_or_renamed_column_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    # A mirror kept the dropped column's stale values, and a renamed one was NULL in the
    # rows not changed since, without a word.
    dec = ChangeDecoder("items_cdc")
    dec.feed(ITEMS)
    renamed = relation(16400, "public", "items", [(1, "id", 23), (0, "title", 25),
                                                 (0, "price", 1700)])
    with caplog.at_level(logging.WARNING, logger="dataflare.connectors.sql_source"):
        dec.feed(ITEMS)  # sent again by a new session: no change
        dec.feed(renamed)
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("step 'items_cdc': table public.items no longer has column(s) "
                           "name, at, tags, doc, ok (new: title): a mirror keeps")


def test_change_decoder_filters_tables_skips_delivered_and_fails_bad_values() -> None:
    other = relation(16500, "public", "other", [(1, "id", 23)])
    dec = ChangeDecoder("s", tables={"public.items"})
    dec.feed(ITEMS)
    dec.feed(other)
    dec.feed(begin(0x600, 1))
    dec.feed(b"I" + struct.pack("!I", 16500) + b"N" + tuple_data("5"))
    dec.feed(
        b"I"
        + struct.pack("!I", 16400)
        + b"N"
        + tuple_data("x-not-int", "n", None, None, None, None, None),
        0x5F0,
    )
    tx = dec.feed(commit(0x600, 0x630))
    assert tx is not None and len(tx.records) == 1
    (failed,) = tx.records
    assert isinstance(failed, Failed) and failed.step == "s"
    assert "cannot convert column 'id' of public.items (insert at lsn 0/5F0)" in failed.message
    assert failed.record["id"] == "x-not-int" and failed.meta["op"] == "insert"
    assert failed.meta["commit_ts"] == TS.isoformat()
    dec.skip_below = 0x700
    dec.feed(begin(0x650, 2))
    dec.feed(b"I" + struct.pack("!I", 16400) + b"N" + tuple_data("not even decoded"))
    skipped = dec.feed(commit(0x650, 0x680))
    assert skipped is not None and skipped.records == []
    with pytest.raises(ProtocolError, match="relation oid 1 before its relation message"):
        dec.feed(begin(0x800, 3))
        dec.feed(b"I" + struct.pack("!I", 1) + b"N" + tuple_data("1"))


def test_dates_python_lacks_load_as_text_and_a_bad_value_as_unconvertible() -> None:
    values = ValueDecoder()
    assert values.decode(1184, b"infinity") == "infinity"  # timestamptz
    assert values.decode(1114, b"-infinity") == "-infinity"  # timestamp
    assert values.decode(1182, b"{infinity,2024-01-02}") == ["infinity", "2024-01-02"]  # date[]
    assert values.decode(1082, b"0100-01-01 BC") == "0100-01-01 BC"  # before year 1
    assert values.decode(1114, b"10000-01-01 00:00:00") == "10000-01-01 00:00:00"
    assert values.decode(1184, b"0044-03-15 12:00:00+00 BC") == "0044-03-15 12:00:00+00 BC"
    bad = values.load(1186, b"100000000 years")  # an interval no timedelta holds
    assert isinstance(bad, UnconvertibleValue) and bad.text == "100000000 years"
    assert "can't parse interval" in str(bad) and type(bad.cause).__name__ == "DataError"


def test_numeric_values_per_decimal_handling() -> None:
    values = ValueDecoder()
    assert values.decode(1700, b"123456789012345678901234567890") == (
        "123456789012345678901234567890"
    )
    assert values.decode(1700, b"1.5") == 1.5 and values.decode(1700, b"NaN") == "NaN"
    assert ValueDecoder(decimals="string").decode(1700, b"2.50") == "2.50"
    assert ValueDecoder(decimals="float").decode(1700, b"2.50") == 2.5


def test_insert_outside_a_transaction_is_a_protocol_error() -> None:
    dec = ChangeDecoder("s")
    dec.feed(ITEMS)
    with pytest.raises(ProtocolError, match="insert message outside a transaction"):
        dec.feed(b"I" + struct.pack("!I", 16400) + b"N" + tuple_data("1"))


# -- a real server's stream ----------------------------------------------------------------

ALL_TYPES = """
CREATE TABLE pgo_types (
    id bigint PRIMARY KEY, i2 smallint, i4 integer, f4 real, f8 double precision,
    num numeric(10,3), num_int numeric, b boolean, t text, vc varchar(10), ch char(3),
    ts timestamp, tstz timestamptz, d date, tm time, iv interval, u uuid, j json, jb jsonb,
    by bytea, ia int[], ta text[], mood pgo_mood, ip inet, big text
)
"""


def peek(conn: Any, slot: str, pub: str, messages: bool = False) -> list[tuple[int, bytes]]:
    rows = conn.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
        "'proto_version', '1', 'publication_names', %s, 'messages', %s)",
        (slot, pub, "true" if messages else "false"),
    ).fetchall()
    return [(lsn_to_int(r[0]), bytes(r[1])) for r in rows]


def test_real_stream_decodes_every_type_like_a_query(pg_private: Any) -> None:
    conn = pg_private.connect()
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute("DROP TABLE IF EXISTS pgo_types")
    conn.execute("DROP TYPE IF EXISTS pgo_mood")
    conn.execute("CREATE TYPE pgo_mood AS ENUM ('sad', 'happy')")
    conn.execute(ALL_TYPES)
    conn.execute("ALTER TABLE pgo_types REPLICA IDENTITY FULL")
    conn.execute("DROP PUBLICATION IF EXISTS pgo_pub")
    conn.execute("CREATE PUBLICATION pgo_pub FOR TABLE pgo_types")
    conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = 'pgo_slot'"
    )
    conn.execute("SELECT pg_create_logical_replication_slot('pgo_slot', 'pgoutput')")
    conn.execute(
        "INSERT INTO pgo_types VALUES (1, -2, 40000, 1.5, 2.25, 12.345, 10, true, 'héllo', "
        "'vc', 'ab', '2024-01-02 03:04:05.678', '2024-01-02 03:04:05+02', '2024-02-29', "
        "'13:14:15', '1 day 2 hours', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1]}', "
        "'{\"b\": {\"c\": null}}', '\\x00ff', '{1,NULL,3}', '{x,\"y z\"}', 'happy', "
        "'10.0.0.1/32', "
        "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 4000) g))"
    )
    conn.execute("INSERT INTO pgo_types (id) VALUES (2)")  # nulls everywhere
    conn.execute("UPDATE pgo_types SET i2 = 7 WHERE id = 1")  # big: unchanged TOAST
    conn.execute("DELETE FROM pgo_types WHERE id = 2")
    conn.execute("SELECT pg_logical_emit_message(true, 'dataflare', 'marker')")
    cur = conn.execute("SELECT * FROM pgo_types WHERE id = 1")
    names = [d.name for d in cur.description]
    expected = dict(zip(names, [json_value(v) for v in cur.fetchone()], strict=True))

    dec = ChangeDecoder("pgo", ValueDecoder(conn))
    txs = []
    for lsn, data in peek(conn, "pgo_slot", "pgo_pub", messages=True):
        tx = dec.feed(data, lsn)
        if tx is not None:
            txs.append(tx)
    records = [r for tx in txs for r in tx.records]
    ops = [r[META]["op"] for r in records]
    assert ops == ["insert", "insert", "update", "delete"]
    ins, nulls, upd, dele = records
    body = {k: v for k, v in ins.items() if k != META}
    assert body == {**expected, "i2": -2}
    assert (
        body["tstz"] == "2024-01-02T01:04:05+00:00" and body["ts"] == "2024-01-02T03:04:05.678000"
    )
    assert body["num"] == 12.345 and body["num_int"] == 10 and body["iv"] == 93600.0
    assert body["by"] == "\\x00ff" and body["ia"] == [1, None, 3] and body["mood"] == "happy"
    assert body["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" and body["jb"] == {"b": {"c": None}}
    assert all(v is None for k, v in nulls.items() if k not in ("id", META))
    assert upd["i2"] == 7 and "big" not in upd and upd[META]["unchanged"] == ["big"]
    assert upd[META]["old"]["i2"] == -2  # REPLICA IDENTITY FULL sends the old row
    assert dele["id"] == 2 and dele[META]["op"] == "delete"
    assert all(lsn_to_int(r[META]["lsn"]) > 0 for r in records)
    assert txs[0].end_lsn > txs[0].commit_lsn
    conn.execute("SELECT pg_drop_replication_slot('pgo_slot')")
    conn.close()
