"""Hold mode and resend with a running Relay that delivers for real, to sinks on loopback:
held mail never reaches a sink until released, then once; discard ends it; ``hold_users``
holds only its users' mail (SMTP AUTH, and the API token's); a resend to a corrected address
is delivered and confirms its case."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import make_config, metric, running_relay, send, smtp_client, wait_for
from helpers.delivery import final, submit
from helpers.peers import Sink, SinkBehaviour, Zone, sinks

from relay.auth import hash_password
from relay.logstore import LogStore
from relay.model import MessageView
from relay.service.lifecycle import Relay

TOKEN = "actions-delivery-token-0123456789"
LABEL = "api:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12]  # what the API records as the user
MSG = b"From: app@example.com\r\nSubject: Staging\r\n\r\nHello from staging\r\n"


def _config(tmp_path: Path, zone: Zone, sink: Sink, tls: tuple[str, str], **delivery: Any) -> Any:
    cert, key = tls
    return make_config(
        tmp_path,
        smtp={"tls_cert": cert, "tls_key": key},
        http={"listen": "127.0.0.1:0", "api_tokens": [TOKEN]},
        delivery={"port": sink.port, "retry_schedule": ["1h"], "connect_timeout": "2s", "command_timeout": "5s",
                  **delivery},
        dns={"nameservers": [f"127.0.0.1:{zone.port}"], "timeout": "1s"},  # type: ignore[attr-defined]
    )  # fmt: skip


@pytest.fixture
async def sink(zone: Zone) -> AsyncIterator[Sink]:
    behaviour = SinkBehaviour(rcpt={"jane@exmaple.net": "550 5.1.1 no such user"})
    async with sinks("127.0.0.2", behaviour=behaviour) as (s,):
        for domain in ("example.net", "exmaple.net"):
            zone.a(domain, "127.0.0.2")
        yield s


def _api(relay: Relay) -> httpx.AsyncClient:
    assert relay.http_address is not None
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{relay.http_address.port}", timeout=10,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip


async def _state(store: LogStore, qid: str) -> dict[str, str]:
    v = await store.get_message(qid)
    assert v is not None
    return {r.address: r.status for r in v.recipients}


async def _until(store: LogStore, qid: str, want: str) -> MessageView:
    async def reached() -> MessageView | None:
        v = await store.get_message(qid)
        return v if v is not None and all(r.status == want for r in v.recipients) else None

    return await wait_for(reached, 15)


async def test_held_mail_waits_for_release_then_goes_once(
    tmp_path: Path, zone: Zone, sink: Sink, server_tls_files: tuple[str, str]
) -> None:
    async with running_relay(_config(tmp_path, zone, sink, server_tls_files, hold=True), deliver=True) as relay:
        assert relay.store is not None
        store = relay.store
        first = await submit(relay, ["a@example.net"], MSG)  # SMTP still answers 250: stored
        second = await submit(relay, ["b@example.net"], MSG)
        assert await _state(store, first) == {"a@example.net": "held"}
        async with _api(relay) as api:
            scrape = (await api.get("/metrics")).text
            assert metric(scrape, "relay_queue_recipients", state="held") == 2
            assert metric(scrape, "relay_queue_oldest_age_seconds") == 0  # staging holds raise no queue-age alert
            r = await api.post(f"/api/v1/messages/{first}/release")
            assert r.status_code == 200, r.text
            assert r.json() == {"id": first, "action": "release", "count": 1}
        await final(relay, first)
        assert await _state(store, first) == {"a@example.net": "delivered"}
        assert sink.rcpts == ["a@example.net"]  # the other one, submitted alongside, is still held
        assert await _state(store, second) == {"b@example.net": "held"}
        assert await store.discard(second, by="sam") == 1
        assert await _state(store, second) == {"b@example.net": "cancelled"}
        assert await store.release(second, by="sam") == 0
        # a released message is delivered once, however often release is asked for
        assert await store.release(first, by="sam") == 0
        third = await submit(relay, ["c@example.net"], MSG)
        await store.release(third, by="sam")
        await final(relay, third)
        assert sorted(sink.rcpts) == ["a@example.net", "c@example.net"]


async def test_hold_users_holds_only_their_mail(
    tmp_path: Path, zone: Zone, sink: Sink, server_tls_files: tuple[str, str], client_tls: ssl.SSLContext
) -> None:
    config = _config(tmp_path, zone, sink, server_tls_files, hold_users=["staging", LABEL])
    async with running_relay(config, deliver=True) as relay:
        assert relay.store is not None
        store = relay.store
        await store.add_user("staging", hash_password("s3cret pass"))
        async with smtp_client(relay, tls=client_tls) as client:
            await client.auth_plain("staging", "s3cret pass")
            code, text = await send(client, "app@example.com", ["held@example.net"], MSG)
            assert code == 250, text
        held_smtp = text.rsplit(" ", 1)[-1]
        async with _api(relay) as api:
            r = await api.post(
                "/api/v1/messages",
                json={"from": "app@example.com", "to": ["api@example.net"], "subject": "x", "text": "hi"},
            )
            assert r.status_code == 201, r.text
            held_api = r.json()["id"]
        free = await submit(relay, ["free@example.net"], MSG)  # no AUTH: nobody's mail, not held
        await final(relay, free)
        assert sink.rcpts == ["free@example.net"]
        assert await _state(store, held_smtp) == {"held@example.net": "held"}
        assert await _state(store, held_api) == {"api@example.net": "held"}
        await store.release(held_smtp, by="sam")
        await final(relay, held_smtp)
        assert sorted(sink.rcpts) == ["free@example.net", "held@example.net"]
        assert await _state(store, held_api) == {"api@example.net": "held"}


async def test_resend_to_a_corrected_address_is_delivered_and_confirms_the_case(
    tmp_path: Path, zone: Zone, sink: Sink, server_tls_files: tuple[str, str]
) -> None:
    async with running_relay(_config(tmp_path, zone, sink, server_tls_files), deliver=True) as relay:
        assert relay.store is not None
        store = relay.store
        old = await submit(relay, ["jane@exmaple.net"], MSG)
        await _until(store, old, "bounced")
        case = await store.open_case(title="Jane's invoice", queue_ids=[old], actor="sam")
        async with _api(relay) as api:
            r = await api.post(
                f"/api/v1/messages/{old}/resend",
                json={"address": "jane@exmaple.net", "new_address": "jane@example.net", "reason": "typo",
                      "case_id": case.id},
            )  # fmt: skip
            assert r.status_code == 201, r.text
            new = r.json()["new_id"]
        await _until(store, new, "delivered")
        (got,) = sink.messages
        assert got.rcpts == ["jane@example.net"]
        assert got.data == await store.raw_message(new) == await store.raw_message(old)
        old_view, new_view = await store.get_message(old), await store.get_message(new)
        assert old_view is not None
        assert new_view is not None
        assert [e.details["new_queue_id"] for e in old_view.events if e.type == "resent"] == [new]
        assert new_view.events[0].details["resend_of"] == old

        async def confirmed() -> bool:
            await store.confirm_cases()
            c = await store.case(case.id, sla=3600)
            return c is not None and c.state == "confirmed"

        await wait_for(confirmed, 15)
