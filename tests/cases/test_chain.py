"""The hash chains, on SQLite and PostgreSQL: appends, verification after a round trip through
each store's JSON, and tampering done directly in SQL (altered, deleted, truncated) caught."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from helpers import raw_sql

from relay.logstore import LogStore
from relay.store.chain import GENESIS

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


async def _tamper(url: str, sql: str) -> None:
    await raw_sql(url, lambda c: c.execute(sa.text(sql)), write=True)


async def _broken(store: LogStore) -> tuple[str, int, str]:
    report = await store.verify_chains()
    assert not report.ok
    assert report.broken is not None
    assert report.text().startswith(f"broken: {report.broken.chain} entry {report.broken.entry_id}: ")
    return report.broken.chain, report.broken.entry_id, report.broken.why


async def test_altered_details_are_caught(store: LogStore, url: str) -> None:
    await _seed(store)
    json_set = (
        "jsonb_set(details, '{float}', '0.3')" if url.startswith("postgresql") else "json_set(details, '$.float', 0.3)"
    )
    await _tamper(url, f"UPDATE audit_log SET details = {json_set} WHERE id = 3")
    chain, entry_id, why = await _broken(store)
    assert (chain, entry_id) == ("audit", 3)
    assert "altered" in why


async def test_altered_actor_is_caught(store: LogStore, url: str) -> None:
    await _seed(store)
    await _tamper(url, "UPDATE case_entries SET actor = 'mallory' WHERE id = 2")
    assert (await _broken(store))[:2] == ("cases", 2)


async def test_altered_time_is_caught(store: LogStore, url: str) -> None:
    await _seed(store)
    await _tamper(url, "UPDATE audit_log SET at = at + 0.000001 WHERE id = 1")
    assert (await _broken(store))[:2] == ("audit", 1)


async def test_deleted_entry_is_caught(store: LogStore, url: str) -> None:
    await _seed(store)
    await _tamper(url, "DELETE FROM audit_log WHERE id = 2")
    chain, entry_id, why = await _broken(store)
    assert (chain, entry_id) == ("audit", 3)
    assert "deleted" in why


async def test_deleted_first_entry_is_caught(store: LogStore, url: str) -> None:
    await _seed(store)
    await _tamper(url, "DELETE FROM case_entries WHERE id = 1")
    assert (await _broken(store))[:2] == ("cases", 2)


async def test_deleted_last_entry_is_caught(store: LogStore, url: str) -> None:
    await _seed(store)
    await _tamper(url, "DELETE FROM audit_log WHERE id = (SELECT max(id) FROM audit_log)")
    chain, entry_id, why = await _broken(store)
    assert (chain, entry_id) == ("audit", 8)
    assert "end" in why


async def test_emptied_chain_is_caught(store: LogStore, url: str) -> None:
    await _seed(store)
    await _tamper(url, "DELETE FROM case_entries")
    assert (await _broken(store))[:2] == ("cases", 2)


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

        await asyncio.gather(burst(store, "a"), burst(other, "b"), burst(store, "c"), burst(other, "d"))
    finally:
        await other.close()
    report = await store.verify_chains()
    assert report.ok, report.text()
    assert report.counts == {"audit": 1 + 4 * 15 * 2, "cases": 4 * 15}
