"""`relay serve` as a real process: durability under SIGKILL, graceful SIGTERM, and the CLI."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiosmtplib
from helpers import NOWHERE, ServeProcess, queue_id_of, relay_cli, send_to, serve_config, write_config

from relay.logstore import LogStore


def _config(tmp_path: Path, extra: str = "") -> Path:
    return serve_config(
        tmp_path,
        f"""shutdown_grace = "3s"
{extra}
{NOWHERE}""",
    )


async def test_sigkill_after_250_loses_nothing(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    server = await ServeProcess(cfg).start()
    accepted: list[str] = []
    stop = asyncio.Event()

    async def sender(worker: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                accepted.append(await _send_one(server.smtp_port, worker * 100_000 + i))
            except (aiosmtplib.SMTPException, OSError, AssertionError):
                return  # the server died mid-session: that message was never acknowledged
            i += 1

    senders = [asyncio.create_task(sender(w)) for w in range(8)]
    while len(accepted) < 60:
        await asyncio.sleep(0.01)
    server.kill()  # while the senders are still mid-flight
    stop.set()
    await asyncio.gather(*senders)
    assert await server.wait() != 0

    server = await ServeProcess(cfg).start()  # restart on the same store
    try:
        store = await LogStore.open(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'relay.db'}")
        try:
            for qid in accepted:
                (msg,) = await store.lookup(qid)
                assert msg.recipients[0].status in ("queued", "deferred", "sending")
                assert (await store.load_bodies([qid]))[qid]
        finally:
            await store.close()
        code, out, err = await relay_cli("log", accepted[-1], "--json", "--config", str(cfg))
        assert code == 0, err
        assert json.loads(out)["messages"][0]["id"] == accepted[-1]
    finally:
        server.terminate()
        assert await server.wait() == 0


async def test_sigterm_exits_zero_and_lets_a_transaction_finish(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    server = await ServeProcess(cfg).start()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.smtp_port, start_tls=False, timeout=10)
    await client.connect()
    await client.ehlo()
    await client.mail("app@example.com")
    await client.rcpt("jane@example.com")
    server.terminate()  # mid-transaction: it may finish
    await asyncio.sleep(0.2)
    reply = await client.data(b"Subject: late\r\n\r\nstill accepted\r\n")
    assert reply.code == 250
    assert await server.wait() == 0
    assert any("stopped" in line for line in server.log)
    code, out, _ = await relay_cli("log", queue_id_of(reply.message), "--config", str(cfg))
    assert code == 0
    assert "late" in out


async def test_log_cli_prints_a_timeline_and_json(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    server = await ServeProcess(cfg).start()
    try:
        qid = await _send_one(server.smtp_port, 1)
    finally:
        server.terminate()
        await server.wait()

    code, out, _ = await relay_cli("log", "user1@example.com", "--config", str(cfg))
    assert code == 0
    assert qid in out
    assert "received" in out
    assert "user1@example.com" in out

    code, out, _ = await relay_cli("log", qid, "--json", "--config", str(cfg))
    assert code == 0
    (msg,) = json.loads(out)["messages"]
    assert set(msg) == {"id", "message_id", "mail_from", "subject", "size", "tags", "user", "client_ip",
                        "received_at", "recipients", "events"}  # fmt: skip
    assert set(msg["recipients"][0]) == {"address", "status", "attempts", "next_attempt_at", "last_response"}
    assert msg["received_at"].endswith("Z")
    event = msg["events"][0]
    assert {"at", "type", "recipient"} <= set(event)
    assert event["type"] == "received"

    code, out, err = await relay_cli("log", "nobody@nowhere.example", "--config", str(cfg))
    assert code == 1
    assert out == ""
    assert "no message matches" in err


async def test_users_cli(tmp_path: Path) -> None:
    cfg = str(_config(tmp_path))
    assert (await relay_cli("db", "upgrade", "--config", cfg))[0] == 0  # only serve and db upgrade create a store
    assert (await relay_cli("users", "add", "app", "--password-stdin", "--config", cfg, stdin=b"pw one\n"))[0] == 0
    code, _, err = await relay_cli("users", "add", "app", "--password-stdin", "--config", cfg, stdin=b"x\n")
    assert code == 1
    assert "exists" in err
    code, out, _ = await relay_cli("users", "list", "--config", cfg)
    assert code == 0
    assert out.startswith("app\t")
    assert "pw one" not in out
    assert (await relay_cli("users", "remove", "app", "--config", cfg))[0] == 0
    assert (await relay_cli("users", "remove", "app", "--config", cfg))[0] == 1
    code, _, err = await relay_cli("users", "add", "bad name", "--password-stdin", "--config", cfg, stdin=b"x\n")
    assert code == 2


async def test_bad_config_names_the_key_and_exits_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "bad.toml", '[smtp]\nmax_message_size = "big"\n')
    code, _, err = await relay_cli("queue", "--config", str(cfg))
    assert code == 2
    assert err.strip().splitlines() == ["relay: config error: smtp.max_message_size: expected an integer, got 'big'"]

    cfg = write_config(tmp_path / "typo.toml", "[smtp]\nlisten_on = []\n")
    code, _, err = await relay_cli("serve", "--config", str(cfg))
    assert code == 2
    assert "smtp.listen_on: unknown key" in err

    code, _, err = await relay_cli("queue", "--config", str(tmp_path / "missing.toml"))
    assert code == 2
    assert "no such file" in err


async def _send_one(port: int, i: int) -> str:
    return await send_to(port, f"user{i}@example.com", f"Subject: n{i}\r\n\r\nbody {i}\r\n".encode())


def _running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie nobody reaped has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_workers_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    server = await ServeProcess(_config(tmp_path), "--processes", "2").start()
    started = next(line for line in server.log if "started 2 worker processes" in line)
    workers = [int(pid) for pid in started.rpartition(": ")[2].split(", ")]
    assert all(_running(pid) for pid in workers)
    port = server.smtp_port
    server.kill()  # SIGKILL: the parent cannot pass anything on
    await server.wait()
    for _ in range(200):  # each worker hears SIGTERM from the kernel and stops gracefully (grace 3 s)
        if not any(_running(pid) for pid in workers):
            break
        await asyncio.sleep(0.1)
    assert not [pid for pid in workers if _running(pid)]
    with socket.create_server(("127.0.0.1", port)):  # the listener went with them
        pass
