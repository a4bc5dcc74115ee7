"""The hash chains, on SQLite and PostgreSQL: appends, verification after a round trip through
each store's JSON, and tampering done directly in SQL (altered, deleted, truncated) caught."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import raw_sql
from sqlalchemy.engine import Connection

from relay.logstore import LogStore
from relay.store.chain import GENESIS, plain

T0 = 1_900_000_000.123456


async def _seed(store: LogStore) -> None:
    details = {"float": 0.1 + 0.2, "big": 1e300, "tiny": 5e-324, "whole": 2.0, "nested": {"b": [1, "x"], "a": None}}
    for i in range(5):
        await store.audit(actor=f"ann{i}", ip="192.0.2.1", action="signin", target="", details=details, now=T0 + i / 3)
    case = await store.open_case(title="Invoice", queue_ids=(), actor="ann", incident="jane bounced")
    await store.add_case_entry(case.id, "interaction", {"channel": "phone", "summary": "called"}, actor="ann")


async def test_verify_passes_after_a_round_trip(store: LogStore) -> None:
    await _seed(store)
    report = await store.verify_chains()
    assert report.ok, report.text()
    assert report.counts == {"audit": 5 + 1 + 2, "cases": 2}
    assert report.heads["audit"] != GENESIS
    entries, _ = await store.audit_entries(limit=100)
    assert report.heads["audit"] == entries[0].hash
    assert report.text().startswith("ok: 8 audit entries, 2 case entries; heads audit=")


async def test_empty_store_verifies(store: LogStore) -> None:
    report = await store.verify_chains()
    assert report.ok
    assert report.counts == {"audit": 0, "cases": 0}


async def _tamper(url: str, *statements: str) -> None:
    def run(conn: Connection) -> None:
        for sql in statements:
            conn.execute(sa.text(sql))

    await raw_sql(url, run, write=True)


async def _broken(store: LogStore) -> tuple[str, int, str]:
    report = await store.verify_chains()
    assert not report.ok
    assert report.broken is not None
    assert report.text().startswith(f"broken: {report.broken.chain} entry {report.broken.entry_id}: ")
    return report.broken.chain, report.broken.entry_id, report.broken.why


# Tampering done directly in SQL: (statement, the chain and entry verify must name, words of the why).
TAMPERING = [
    ("UPDATE audit_log SET details = {json_set} WHERE id = 3", "audit", 3, "altered"),
    ("UPDATE case_entries SET actor = 'mallory' WHERE id = 2", "cases", 2, "altered"),
    ("UPDATE case_entries SET details = {json_set} WHERE id = 1", "cases", 1, "altered"),
    ("UPDATE audit_log SET at = at + 0.000001 WHERE id = 1", "audit", 1, "altered"),
    ("UPDATE audit_log SET action = 'signout' WHERE id = 8", "audit", 8, "altered"),
    ("DELETE FROM audit_log WHERE id = 2", "audit", 3, "deleted"),
    ("DELETE FROM case_entries WHERE id = 1", "cases", 2, "deleted"),
    ("DELETE FROM audit_log WHERE id = (SELECT max(id) FROM audit_log)", "audit", 8, "end"),
    ("DELETE FROM case_entries", "cases", 2, "end"),
    ("UPDATE chain_heads SET hash = '{zeros}' WHERE name = 'audit'", "audit", 8, "does not match"),
]


async def test_tampering_is_caught(store: LogStore, url: str) -> None:
    """Each change is caught at the right entry; once the tables are restored, verify passes again."""
    await _seed(store)
    pg = url.startswith("postgresql")
    json_set = "jsonb_set(details, '{float}', '0.3')" if pg else "json_set(details, '$.float', 0.3)"
    tables = ("audit_log", "case_entries", "chain_heads")
    await _tamper(url, *(f"CREATE TABLE copy_{t} AS SELECT * FROM {t}" for t in tables))
    restore = [s for t in tables for s in (f"DELETE FROM {t}", f"INSERT INTO {t} SELECT * FROM copy_{t}")]
    for sql, chain, entry_id, why in TAMPERING:
        await _tamper(url, sql.format(json_set=json_set, zeros=GENESIS))
        broken = await _broken(store)
        assert broken[:2] == (chain, entry_id), (sql, broken)
        assert why in broken[2], (sql, broken)
        await _tamper(url, *restore)
        assert (await store.verify_chains()).ok, sql


async def test_recomputed_chain_shows_only_in_the_head(store: LogStore, url: str) -> None:
    """The limit of tamper evidence: an altered entry whose hash (and every later one, and the
    head) is recomputed verifies; only the head hash kept elsewhere tells."""
    from relay.store import chain as chain_mod

    await store.audit(actor="ann", ip="", action="signin", now=T0)
    before = (await store.verify_chains()).heads["audit"]
    forged = chain_mod.link(GENESIS, "audit", {"id": 1, "at": T0, "actor": "eve", "ip": "", "action": "signin",
                                                "target": "", "details": {}})  # fmt: skip
    await _tamper(url, f"UPDATE audit_log SET actor = 'eve', hash = '{forged}' WHERE id = 1")
    await _tamper(url, f"UPDATE chain_heads SET hash = '{forged}' WHERE name = 'audit'")
    report = await store.verify_chains()
    assert report.ok
    assert report.heads["audit"] != before


async def test_concurrent_appends_from_two_stores_never_fork(store: LogStore, url: str) -> None:
    """Two stores (two processes' worth of connections) append at once, to both chains: one
    chain each, every link intact, and the head at the last entry."""
    other = await LogStore.open(url)
    try:
        case = await store.open_case(title="race", actor="ann")

        async def burst(s: LogStore, who: str) -> None:
            for i in range(15):
                await asyncio.gather(
                    s.audit(actor=who, ip="", action="view_body", target=f"Q{i}"),
                    s.add_case_entry(case.id, "interaction", {"channel": "chat", "summary": f"{who} {i}"}, actor=who),
                )

        async def verifying() -> None:  # verify while appends commit: never a false alarm
            while not done.is_set():
                report = await store.verify_chains()
                assert report.ok, report.text()
                checks.append(report.counts["audit"])

        done, checks = asyncio.Event(), []
        checker = asyncio.create_task(verifying())
        await asyncio.gather(burst(store, "a"), burst(other, "b"), burst(store, "c"), burst(other, "d"))
        done.set()
        await checker
        assert checks
    finally:
        await other.close()
    report = await store.verify_chains()
    assert report.ok, report.text()
    assert report.counts == {"audit": 1 + 4 * 15 * 2, "cases": 4 * 15}


REFUSED: list[tuple[Any, str]] = [
    ({"x": float("nan")}, "NaN"),
    ({"x": float("inf")}, "NaN or infinity"),
    ({1: "x"}, "keys must be strings"),
    ({"x": b"bytes"}, "cannot hold a bytes"),
    ({"x": "a\x00"}, "NUL"),
    ({"a\x00": 1}, "NUL"),
    ({"x": "\udc80"}, "not valid Unicode"),
    ({"x": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}, "nested too deeply"),
]


async def test_details_that_cannot_round_trip_are_refused(store: LogStore) -> None:
    for details, message in REFUSED:
        with pytest.raises(ValueError, match=message):
            await store.audit(actor="ann", ip="", action="signin", details=details)
    with pytest.raises(ValueError, match="1 to 32"):
        await store.audit(actor="ann", ip="", action="x" * 33)
    with pytest.raises(ValueError, match="NUL"):
        await store.audit(actor="a\x00", ip="", action="signin")
    assert (await store.verify_chains()).counts == {"audit": 0, "cases": 0}


def test_plain_makes_whole_floats_ints() -> None:
    assert plain({"a": 2.0, "b": 1e300, "c": [0.5, True, None]}) == {"a": 2, "b": int(1e300), "c": [0.5, True, None]}
    assert plain(None) == {}


# -- retention: the audit's oldest entries purged, the chain anchored where they ended


async def _purged(store: LogStore, url: str) -> None:
    """Ten audit lines, six of them 500 days old; retention purges those six in two batches (two
    retention.purge lines, the anchor at entry 6)."""
    from relay.config import RetentionConfig

    for i in range(10):
        await store.audit(actor=f"ann{i}", ip="192.0.2.1", action="signin", now=T0 - (500 if i < 6 else 1) * 86400 + i)
    await _tamper(url, "CREATE TABLE old_audit AS SELECT * FROM audit_log WHERE id <= 6")
    only_audit = RetentionConfig(bodies=0, messages=0, webhook_deliveries=0, audit=400 * 86400)
    result = await store.retention_run(only_audit, now=T0, batch=4)
    assert result is not None
    assert result[-1].rows == 6


async def test_verify_passes_after_retention_purged_the_oldest_entries(store: LogStore, url: str) -> None:
    await _purged(store, url)
    report = await store.verify_chains()
    assert report.ok, report.text()
    assert report.counts["audit"] == 4 + 2
    assert report.base is not None
    assert report.base[0] == 6
    assert report.to_json()["audit_base"] == {"last_id": 6, "hash": report.base[1]}
    assert report.text().endswith(f"; audit entries up to 6 purged by retention (anchor {report.base[1]})")


# Tampering after a purge: (statement, the entry verify must name, words of the why).
AFTER_RETENTION = [
    ("DELETE FROM audit_log WHERE id = (SELECT min(id) FROM audit_log)", 8, "deleted"),  # the oldest remaining
    ("DELETE FROM audit_log WHERE id IN (7, 8)", 9, "deleted"),
    ("DELETE FROM chain_heads WHERE name = 'audit_base'", 7, "after the start"),  # the anchor removed
    # Purging by hand: entry 7 deleted and the anchor moved onto it.
    ("UPDATE chain_heads SET last_id = 7, hash = (SELECT hash FROM audit_log WHERE id = 7) WHERE name = 'audit_base';"
     " DELETE FROM audit_log WHERE id = 7", 12, "newest retention.purge"),
    ("INSERT INTO audit_log SELECT * FROM old_audit WHERE id = 3", 3, "before the retention anchor"),  # put back
    ("UPDATE audit_log SET details = {json_set} WHERE action = 'retention.purge' AND id = 12", 12, "altered"),
    ("DELETE FROM audit_log WHERE id = 12", 11, "newest retention.purge"),  # the newest purge line (the last entry)
    ("DELETE FROM audit_log WHERE action = 'retention.purge'", 6, "no retention.purge line"),
]  # fmt: skip


async def test_tampering_after_retention_is_still_caught(store: LogStore, url: str) -> None:
    await _purged(store, url)
    assert (await store.verify_chains()).ok
    pg = url.startswith("postgresql")
    json_set = """jsonb_set(details, '{through_id}', '5')""" if pg else "json_set(details, '$.through_id', 5)"
    tables = ("audit_log", "chain_heads")
    await _tamper(url, *(f"CREATE TABLE copy_{t} AS SELECT * FROM {t}" for t in tables))
    restore = [s for t in tables for s in (f"DELETE FROM {t}", f"INSERT INTO {t} SELECT * FROM copy_{t}")]
    for sql, entry_id, why in AFTER_RETENTION:
        await _tamper(url, *sql.format(json_set=json_set).split("; "))
        chain, broken_id, text = await _broken(store)
        assert (chain, broken_id) == ("audit", entry_id), (sql, text)
        assert why in text, (sql, text)
        await _tamper(url, *restore)
        assert (await store.verify_chains()).ok, sql
