"""The automatic confirmation as it runs in the service: a message bounces at a sink, a case is
opened over it, the sink is fixed, the case's retry is delivered, and the case reaches
"confirmed" on its own, with the time observed in relay_case_time_to_confirmation_seconds."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa
from helpers import raw_sql, running_relay, wait_for
from helpers.delivery import delivery_config, final, status, submit
from helpers.peers import SinkBehaviour, Zone, sinks
from prometheus_client import REGISTRY

from relay.store import cases as case_store
from relay.store.engine import Engine

HISTOGRAM = "relay_case_time_to_confirmation_seconds_count"


async def test_a_case_is_confirmed_on_its_own(tmp_path: Path, zone: Zone) -> None:
    behaviour = SinkBehaviour(rcpt={"jane@example.com": "552 5.2.2 mailbox full"})
    zone.mx("example.com", (10, "mx.example.com"))
    zone.a("mx.example.com", "127.0.0.2")
    async with sinks("127.0.0.2", behaviour=behaviour) as (sink,):
        config = delivery_config(tmp_path, zone, sink.port)
        async with running_relay(config, deliver=True) as relay:
            store = relay.store
            assert store is not None
            qid = await submit(relay, ["jane@example.com"])
            assert status(await final(relay, qid)) == {"jane@example.com": "bounced"}
            case = await store.open_case(title="Invoice to Jane", queue_ids=[qid], actor="ann")
            behaviour.rcpt.clear()  # the sink is fixed

            # what a retry from the case does (relay.store.actions): the retry and its action entry
            rid = await raw_sql(config.store.url, lambda c: c.execute(sa.text("SELECT id FROM recipients")).scalar())
            before = REGISTRY.get_sample_value(HISTOGRAM) or 0.0
            engine = Engine(config.store.url)
            try:
                now = time.time()
                await engine.call(lambda conn: case_store.record_action(
                    conn, case.id, actor="ann", ip="", details={"action": "retry", "queue_id": qid},
                    targets=[(int(rid), qid)], at=now,
                ))  # fmt: skip
            finally:
                await engine.dispose()
            await store.retry(qid, by="ann")
            relay.delivery.wake()  # type: ignore[union-attr]

            async def confirmed() -> bool:
                view = await store.case(case.id, sla=86400)
                return view is not None and view.state == "confirmed"

            await wait_for(confirmed, timeout=20)
            view = await store.case(case.id, sla=86400)
            assert view is not None
            assert [e.kind for e in view.entries] == ["incident", "action", "confirmation"]
            assert view.entries[-1].details["automatic"] is True
            assert sink.rcpts == ["jane@example.com"]
            assert (REGISTRY.get_sample_value(HISTOGRAM) or 0.0) == before + 1
            assert (await store.verify_chains()).ok
