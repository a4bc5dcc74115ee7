"""Delivery in a real `relay serve` process: kill -9 mid-delivery, and the queue commands."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from helpers import ServeProcess, relay_cli, send_to, serve_config, wait_drained, wait_for
from helpers.hostile import ScriptedPeer
from helpers.peers import Zone, dns_server, sinks

from relay.logstore import LogStore


def _config(tmp_path: Path, zone: Zone, port: int, extra: str = "") -> Path:
    return serve_config(
        tmp_path,
        f"""[delivery]
port = {port}
lease = "2s"
retry_schedule = ["200ms"]
connect_timeout = "2s"
command_timeout = "5s"
shutdown_grace = "1s"
{extra}
[dns]
nameservers = ["127.0.0.1:{zone.port}"]
timeout = "1s"
""",  # type: ignore[attr-defined]
    )


async def test_kill_9_during_delivery_loses_nothing(tmp_path: Path) -> None:
    with dns_server() as zone:
        async with sinks("127.0.0.2") as (sink,):
            sink.behaviour.data_delay = 0.2
            zone.mx("example.com", (10, "mx.example.com"))
            zone.a("mx.example.com", "127.0.0.2")
            cfg = _config(tmp_path, zone, sink.port)
            server = await ServeProcess(cfg).start()
            rcpts = [f"user{i}@example.com" for i in range(30)]
            await asyncio.gather(*(send_to(server.smtp_port, r) for r in rcpts))
            await wait_for(lambda: len(sink.messages) >= 3)
            server.kill()  # transactions are in flight now
            await server.wait()

            server = await ServeProcess(cfg).start()
            store = await LogStore.open(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'relay.db'}")
            try:
                await wait_drained(store)
                summary = await store.queue_summary()
                assert summary.counts["delivered"] == 30
                for rcpt in rcpts:
                    (msg,) = await store.lookup(rcpt)
                    assert msg.recipients[0].status == "delivered"
            finally:
                await store.close()
                server.terminate()
                assert await server.wait() == 0
    assert set(sink.rcpts) == set(rcpts)  # each at least once; a few twice is SMTP's at-least-once


async def test_queue_commands(tmp_path: Path) -> None:
    with dns_server() as zone:
        zone.mx("example.net", (10, "dead.example.net"))
        zone.a("dead.example.net", "127.0.0.9")  # refuses connections: recipients defer
        cfg = _config(tmp_path, zone, 2525, extra='max_age = "3d"\nretry_schedule = ["1h"]')
        text = cfg.read_text().replace('retry_schedule = ["200ms"]\n', "", 1)
        cfg.write_text(text)
        server = await ServeProcess(cfg).start()
        try:
            qid = await send_to(server.smtp_port, "a@example.net")
            qid2 = await send_to(server.smtp_port, "b@example.net")

            async def both_deferred() -> bool:
                code, out, _ = await relay_cli("queue", "--config", str(cfg))
                return code == 0 and "deferred    2" in out

            await wait_for(both_deferred, timeout=30)
            code, out, _ = await relay_cli("queue", "--config", str(cfg))
            assert "oldest queued message:" in out

            code, out, _ = await relay_cli("queue", "retry", qid, "--config", str(cfg))
            assert (code, out.strip()) == (0, "1 recipient(s) due now")
            code, out, _ = await relay_cli("queue", "delete", qid2, "--config", str(cfg))
            assert (code, out.strip()) == (0, "1 recipient(s) cancelled")
            code, out, err = await relay_cli("queue", "delete", "01NOSUCHMESSAGE000000000000", "--config", str(cfg))
            assert code == 1
            assert "no message" in err

            async def retried_and_deferred_again() -> bool:
                _code, out, _ = await relay_cli("log", qid, "--json", "--config", str(cfg))
                events = [e["type"] for e in json.loads(out)["messages"][0]["events"]]
                return events.count("deferred") >= 2 and "retried" in events

            await wait_for(retried_and_deferred_again, timeout=30)
            _, out, _ = await relay_cli("log", qid2, "--json", "--config", str(cfg))
            msg = json.loads(out)["messages"][0]
            assert msg["recipients"][0]["status"] == "cancelled"
            assert msg["events"][-1]["type"] == "cancelled"

            code, out, _ = await relay_cli("queue", "retry", "--all", "--config", str(cfg))
            assert code == 0
            assert out.strip() == "1 recipient(s) due now"
            code, out, _ = await relay_cli("log", qid, "--config", str(cfg))
            assert "retried" in out
            assert "attempt 1 via dead.example.net [127.0.0.9]" in out
        finally:
            server.terminate()
            assert await server.wait() == 0


async def test_several_processes_share_the_listener_and_the_store(tmp_path: Path) -> None:
    with dns_server() as zone:
        async with sinks("127.0.0.2") as (sink,):
            zone.mx("example.com", (10, "mx.example.com"))
            zone.a("mx.example.com", "127.0.0.2")
            cfg = _config(tmp_path, zone, sink.port)
            server = await ServeProcess(cfg, "--processes", "2").start()
            try:
                rcpts = [f"user{i}@example.com" for i in range(40)]
                await asyncio.gather(*(send_to(server.smtp_port, r) for r in rcpts))
                await wait_for(lambda: len(sink.messages) >= 40, timeout=30)
                assert sorted(sink.rcpts) == sorted(rcpts)
                workers = {
                    line.split("delivery running as ")[1].split()[0]
                    for line in server.log
                    if "delivery running as" in line
                }
                assert len(workers) == 2
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports['http']}") as http:

                    async def counted() -> str | None:
                        text = (await http.get("/metrics")).text
                        return text if 'relay_delivery_attempts_total{result="delivered"} 40.0' in text else None

                    text = await wait_for(counted)  # every worker's counts, merged
                assert "relay_smtp_messages_received_total 40.0" in text
                assert 'relay_queue_recipients{state="queued"} 0.0' in text
            finally:
                server.terminate()
                assert await server.wait() == 0
    assert any("stopped" in line for line in server.log)


async def test_a_peer_cannot_forge_log_lines_or_drive_a_terminal(tmp_path: Path) -> None:
    """A remote server's reply is logged, but its control characters come out as \\xNN: one
    record stays one line, and no escape sequence reaches the operator's terminal."""
    with dns_server() as zone:
        peer = await ScriptedPeer("127.0.0.2").start()
        try:
            peer.replies["RCPT"] = b"550 5.1.1 \x1b[2J\x1b[31mno such user\x07\r"
            peer.replies["RCPT"] += b"\x00 2026-01-01 00:00:00,000 INFO relay: forged\r\n"
            zone.mx("example.com", (10, "mx.example.com"))
            zone.a("mx.example.com", "127.0.0.2")
            server = await ServeProcess(_config(tmp_path, zone, peer.port)).start()
            try:
                await send_to(server.smtp_port, "jane@example.com")
                line = await wait_for(lambda: next((t for t in server.log if "to=<jane@example.com>" in t), None))
            finally:
                server.terminate()
                await server.wait()
        finally:
            await peer.close()
    assert "\\x1b[2J\\x1b[31mno such user\\x07" in line
    assert "\\x00 2026-01-01" in line  # CR ends the reply line for the client; what follows stays on ours
    assert not [t for t in server.log if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in t)]
    assert not [t for t in server.log if t.startswith("2026-01-01")]
