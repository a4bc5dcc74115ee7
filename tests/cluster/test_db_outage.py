"""Losing the database under load: a real `relay serve` on a private PostgreSQL (helpers.pgserver)
that the test stops, restarts, or cuts off while SMTP and HTTP clients send without pause.

While the database is down every message gets ``451 4.3.0`` (the API 503 with Retry-After),
never a 250, a 5xx or a dropped connection; /healthz stays alive, /readyz and /metrics say 503.
When it is back, intake answers 250 again and delivery resumes without a restart, and every
message a client was told 250 for is delivered exactly once, its attempt recorded once, its
webhook sent. The log says once that the database is lost and once that it is back, with no
traceback. (Outages longer than the lease, and a stop while down: test_db_outage_lease.py.)
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path

import pytest
from helpers import command, make_config, raw_sql, running_relay, smtp_client, wait_for
from helpers.outage import (
    LOST,
    OUTAGE,
    STORE_FAILED,
    TOKEN,
    Answer,
    Load,
    check_answers,
    check_log,
    check_nothing_lost,
    recipients,
    reply,
    rig,
    status,
)
from helpers.pgserver import pg_server
from sqlalchemy.engine import Connection

from relay.auth import hash_password


async def test_database_stopped_under_load(tmp_path: Path) -> None:
    """PostgreSQL stopped twice while four SMTP clients and an API client send: first ``fast`` (backends told to
    exit), then ``immediate`` (every process killed, crash recovery at the next start) while
    another client is in the middle of sending a message's content."""
    async with rig(tmp_path) as r:
        load = Load(r, smtp=4, api=1)
        await wait_for(lambda: sum(a.accepted for a in load.answers) >= 30, timeout=20)

        # -- first outage: a fast stop
        await asyncio.to_thread(r.pg.stop, "fast")
        down = time.monotonic()
        # Down: every message refused with 451 4.3.0, the process alive and saying so.
        await wait_for(lambda: len(load.since(down)) >= 40 and time.monotonic() - down > OUTAGE, timeout=20)
        assert await status(r.http, "/healthz") == 200  # alive: nothing a restart would fix
        ready = await r.http.get("/readyz")
        assert ready.status_code == 503
        assert "store unreachable" in ready.json()["problems"]
        assert await status(r.http, "/metrics") == 503
        auth = {"Authorization": f"Bearer {TOKEN}"}
        message = {"from": "app@example.com", "to": ["api@example.com"], "subject": "x", "text": "x"}
        api = await r.http.post("/api/v1/messages", json=message, headers=auth)
        assert api.status_code == 503, api.text
        assert api.headers["retry-after"] == "5"
        assert (await r.http.get("/api/v1/messages", headers=auth)).status_code == 503  # any route: 503, not 500
        up = time.monotonic()
        during = [a for a in load.answers if a.started >= down and a.ended <= up]
        assert during
        assert all(a.code == (503 if a.api else 451) for a in during), [a for a in during if not a.accepted][:5]
        assert any(a.api for a in during)

        await asyncio.to_thread(r.pg.start)
        started = time.monotonic()
        # Back: 250 again without a restart, within a bound (each connection is checked
        # before use; the bound is generous for a shared 2-core machine).
        await wait_for(lambda: any(a.accepted for a in load.since(started)), timeout=15)
        recovered = min(a.ended for a in load.since(started) if a.accepted) - started
        await wait_for(lambda: sum(a.accepted for a in load.since(started)) >= 30, timeout=20)
        await wait_for(lambda: any(a.accepted and a.api for a in load.since(started)), timeout=15)
        assert await status(r.http, "/readyz") == 200
        assert await status(r.http, "/metrics") == 200

        # -- second outage: killed while a client is in the middle of DATA
        reader, writer = await asyncio.open_connection("127.0.0.1", r.server.smtp_port)
        try:
            assert (await reply(reader)).startswith("220")
            body = b"Subject: mid-data\r\n\r\n" + b"line of the body\r\n" * 2000
            for line, code in ((b"EHLO client.test", "250"), (b"MAIL FROM:<app@example.com>", "250"),
                               (b"RCPT TO:<mid@example.com>", "250"), (b"DATA", "354")):  # fmt: skip
                writer.write(line + b"\r\n")
                assert (await reply(reader)).startswith(code)
            writer.write(body[:20000])
            await writer.drain()
            await asyncio.to_thread(r.pg.stop, "immediate")
            down2 = time.monotonic()
            writer.write(body[20000:] + b".\r\n")
            assert await reply(reader) == "451 " + STORE_FAILED
            await wait_for(lambda: len(load.since(down2)) >= 20, timeout=20)
            up2 = time.monotonic()
            await asyncio.to_thread(r.pg.start)
            started2 = time.monotonic()
            # The client tries again in the same session, as a well-behaved client would.
            for line, code in ((b"MAIL FROM:<app@example.com>", "250"), (b"RCPT TO:<mid@example.com>", "250"),
                               (b"DATA", "354"), (body + b".", "250")):  # fmt: skip
                writer.write(line + b"\r\n")
                answer = await reply(reader)
                assert answer.startswith(code), answer
        finally:
            writer.close()
        during = [a for a in load.answers if a.started >= down2 and a.ended <= up2]
        assert during
        assert all(a.code == (503 if a.api else 451) for a in during), [a for a in during if not a.accepted][:5]
        await wait_for(lambda: sum(a.accepted for a in load.since(started2)) >= 10, timeout=20)
        await load.stop()

        check_answers(load.answers)
        mid = Answer("mid@example.com", 250, "sent again in the same session", started2, time.monotonic())
        figures = await check_nothing_lost(r, [*load.answers, mid])
        assert r.sink.rcpts.count("mid@example.com") == 1
        rows = await raw_sql(r.pg.url(), recipients)
        assert [st for a, st, _, _ in rows if a == "mid@example.com"] == ["delivered"]
        check_log(r.log, outages=2)
        print(f"down {up - down:.1f}s, first 250 {recovered:.2f}s after the start; {figures}")
        r.server.terminate()
        assert await r.server.wait() == 0


def _slow_inserts(conn: Connection) -> None:
    """Every message row takes 50 ms to insert: a cut now lands inside a transaction."""
    conn.exec_driver_sql(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$"
    )
    conn.exec_driver_sql("CREATE TRIGGER slow BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION slow()")


async def test_connections_cut_under_load(tmp_path: Path) -> None:
    """Every connection cut (pg_terminate_backend) six times while SMTP and API clients send,
    inserts slowed so that the cuts land inside transactions: answers are 250/201 or 451/503,
    nothing accepted is lost or delivered twice, the process goes on."""
    async with rig(tmp_path) as r:
        await raw_sql(r.pg.url(), _slow_inserts, write=True)
        load = Load(r, smtp=3, api=2)
        await wait_for(lambda: sum(a.accepted for a in load.answers) >= 10, timeout=20)
        cut = 0
        for _ in range(6):
            cut += await asyncio.to_thread(r.pg.terminate_backends)
            mark = time.monotonic()
            await wait_for(lambda: sum(a.accepted for a in load.since(mark)) >= 5, timeout=15)
        await load.stop()
        assert cut >= 6  # the pool's connections were there to cut
        check_answers(load.answers)
        figures = await check_nothing_lost(r, load.answers)
        check_log(r.log)
        assert await status(r.http, "/readyz") == 200
        # A cut transaction is run once more on a new connection (relay/store/engine.py), so a
        # cut alone refuses nothing; a refusal could only be a commit cut before its answer came
        # back, which is stored (and counted above).
        assert figures["refused"] == figures["stored_after_refusal"], figures
        outages = sum(LOST in line for line in r.log)
        print(f"cut {cut} connections, {outages} outages seen: {figures}")


async def test_auth_while_the_database_is_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """AUTH needs the users table: while the database is down it answers 454 4.7.0 (RFC 4954's
    temporary failure: the password is neither right nor wrong), never 535, and the log has no
    traceback for it; when the database is back the same login works."""
    with pg_server() as pg:
        config = make_config(tmp_path, store={"url": pg.url()})
        async with running_relay(config) as relay:
            assert relay.store is not None
            await relay.store.add_user("app", hash_password("s3cret pass"))
            await asyncio.to_thread(pg.stop, "fast")
            async with smtp_client(relay) as client:
                code, text = await command(client, "AUTH PLAIN " + base64.b64encode(b"\0app\0s3cret pass").decode())
                assert (code, text) == (454, "4.7.0 Temporary authentication failure")
                code, text = await command(client, "AUTH PLAIN " + base64.b64encode(b"\0app\0wrong").decode())
                assert code == 454
            await asyncio.to_thread(pg.start)
            async with smtp_client(relay) as client:
                code, _ = await command(client, "AUTH PLAIN " + base64.b64encode(b"\0app\0s3cret pass").decode())
                assert code == 235
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
