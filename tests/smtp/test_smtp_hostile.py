"""Hostile SMTP clients against the real listener: loops, smuggling, odd bytes, floods and limits.

Each refusal is checked for its exact reply and for an untouched store."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosmtplib
import pytest
from helpers import (
    ServeProcess,
    command,
    make_config,
    queue_id_of,
    running_relay,
    send,
    serve_config,
    smtp_client,
    smtp_port,
    wait_for,
)
from prometheus_client import REGISTRY

from relay.auth import Throttle, hash_password
from relay.service.lifecycle import Relay

SIMPLE = b"From: App <app@example.com>\r\nTo: jane@example.com\r\nSubject: Hello\r\n\r\nHello Jane\r\n"


async def message_count(relay: Relay) -> int:
    assert relay.store is not None
    summary = await relay.store.queue_summary()
    return sum(summary.counts.values())


def rejections(reason: str) -> float:
    return REGISTRY.get_sample_value("relay_smtp_rejections_total", {"reason": reason}) or 0.0


class Raw:
    """A client that writes exactly the bytes it is given and reads whole replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: str) -> None:
        self.reader, self.writer, self.greeting = reader, writer, greeting

    async def reply(self) -> str:
        """The last line of the next (possibly multi-line) reply; "" at EOF."""
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode().rstrip("\r\n")
            if not line or line[3:4] != "-":
                return line

    async def cmd(self, data: bytes) -> str:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def closed(self) -> bool:
        """True once the server has closed the connection (EOF, or a reset)."""
        try:
            return await asyncio.wait_for(self.reader.read(), 10) == b""
        except ConnectionError:
            return True


@asynccontextmanager
async def raw(port: int, source: str = "127.0.0.1") -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        greeting = (await asyncio.wait_for(reader.readline(), 10)).decode().rstrip("\r\n")
        yield Raw(reader, writer, greeting)
    finally:
        writer.close()


# -- point 2: hop count


async def test_too_many_hops_is_refused_at_data(relay: Relay) -> None:
    hop = b"Received: from a.example ([192.0.2.1]) by b.example; Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    before = rejections("too_many_hops")
    async with smtp_client(relay) as client:
        code, text = await send(client, "app@example.com", ["jane@example.com"], hop * 51 + SIMPLE)
        assert (code, text) == (554, "5.4.6 Too many hops")
        assert await message_count(relay) == 0
        # Folded Received fields count once each; 50 is still within the limit.
        folded = b"Received: from a.example\r\n\tby b.example; Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        code, text = await send(client, "app@example.com", ["jane@example.com"], folded * 50 + SIMPLE)
        assert code == 250, text
    assert rejections("too_many_hops") == before + 1
    assert await message_count(relay) == 1


async def test_max_hops_is_configurable(tmp_path: Path) -> None:
    hop = b"Received: from a.example by b.example; Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    async with running_relay(make_config(tmp_path, smtp={"max_hops": 2})) as relay, smtp_client(relay) as client:
        assert (await send(client, "a@example.com", ["b@example.com"], hop * 3 + SIMPLE)) == (
            554,
            "5.4.6 Too many hops",
        )
        assert (await send(client, "a@example.com", ["b@example.com"], hop * 2 + SIMPLE))[0] == 250


# -- point 6: domain literals


@pytest.mark.parametrize("rcpt", ["jane@[192.0.2.1]", "jane@[IPv6:2001:db8::1]", '"j d"@[127.0.0.1]'])
async def test_domain_literal_recipient_is_refused(relay: Relay, rcpt: str) -> None:
    before = rejections("policy")
    async with smtp_client(relay) as client:
        assert (await command(client, "MAIL FROM:<app@example.com>"))[0] == 250
        assert await command(client, f"RCPT TO:<{rcpt}>") == (550, "5.7.1 Domain literals are not accepted")
        assert (await command(client, "DATA"))[0] == 503  # no recipient was taken
    assert rejections("policy") == before + 1
    assert await message_count(relay) == 0


# -- point 21: the null sender


@pytest.mark.parametrize("line", ["MAIL FROM:<>", "MAIL FROM:<> BODY=8BITMIME", "MAIL FROM: <>"])
async def test_null_sender_is_refused(relay: Relay, line: str) -> None:
    async with smtp_client(relay) as client:
        assert await command(client, line) == (550, "5.7.1 Null sender not accepted")
        assert (await command(client, "RCPT TO:<jane@example.com>"))[0] == 503
    assert await message_count(relay) == 0


# -- point 7: CR, LF and bytes that are not UTF-8


@pytest.mark.parametrize(
    "address",
    [b"a\rb@example.com", b"a\nb@example.com", b'"a\rb"@example.com', b'"a\\\rb"@example.com', b'"a\\\nb"@example.com',
     b"ab@exa\rmple.com", b"a@example.com\r"],
)  # fmt: skip
async def test_cr_or_lf_in_an_address_is_refused(relay: Relay, address: bytes) -> None:
    async with raw(smtp_port(relay)) as c:
        assert (await c.cmd(b"EHLO client.test\r\n")).startswith("250 ")
        assert await c.cmd(b"MAIL FROM:<" + address + b">\r\n") == "501 5.1.3 Bad sender address syntax"
        assert await c.cmd(b"MAIL FROM:<app@example.com>\r\n") == "250 2.1.0 Ok"
        assert await c.cmd(b"RCPT TO:<" + address + b">\r\n") == "501 5.1.3 Bad recipient address syntax"
        assert await c.cmd(b"DATA\r\n") == "503 5.5.1 need RCPT command"
    assert await message_count(relay) == 0


@pytest.mark.parametrize("address", [b"\xff@example.com", b"j\xc3@example.com", b"jane@ex\xe9mple.com"])
async def test_address_not_utf8_is_refused(relay: Relay, address: bytes) -> None:
    async with raw(smtp_port(relay)) as c:
        await c.cmd(b"EHLO client.test\r\n")
        assert await c.cmd(b"MAIL FROM:<" + address + b">\r\n") == "501 5.5.2 Argument is not valid UTF-8"
        assert await c.cmd(b"MAIL FROM:<app@example.com>\r\n") == "250 2.1.0 Ok"
        assert await c.cmd(b"RCPT TO:<" + address + b">\r\n") == "501 5.5.2 Argument is not valid UTF-8"
        assert await c.cmd(b"RCPT TO:<jane@example.com>\r\n") == "250 2.1.5 Ok"
        assert await c.cmd(b"RSET\r\n") == "250 2.0.0 OK"
    assert await message_count(relay) == 0


async def test_commands_end_at_crlf_only(relay: Relay) -> None:
    """A bare LF does not end a command: what follows it cannot smuggle a second command."""
    async with raw(smtp_port(relay)) as c:
        await c.cmd(b"EHLO client.test\r\n")
        reply = await c.cmd(b"MAIL FROM:<app@example.com>\nRCPT TO:<victim@example.com>\r\n")
        assert reply == "501 5.1.3 Bad sender address syntax"
        assert await c.cmd(b"MAIL FROM:<app@example.com>\r\n") == "250 2.1.0 Ok"
        reply = await c.cmd(b"RCPT TO:<jane@example.com>\rDATA\r\n")
        assert reply == "501 5.1.3 Bad recipient address syntax"
        # End-of-data is CRLF.CRLF only: "\n.\r\n" inside the content smuggles nothing out of it.
        await c.cmd(b"RCPT TO:<jane@example.com>\r\n")
        assert (await c.cmd(b"DATA\r\n")).startswith("354")
        smuggled = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: evil\r\n\r\nx\r\n"
        reply = await c.cmd(b"Subject: one\r\n\r\nbody\n.\r\n" + smuggled + b"\r\n.\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        assert await c.cmd(b"NOOP\r\n") == "250 2.0.0 OK"
    assert relay.store is not None
    assert [m.recipients[0].address for m in await relay.store.lookup(queue_id_of(reply))] == ["jane@example.com"]
    assert await message_count(relay) == 1


@pytest.mark.parametrize("helo", [b"evil\rInjected: yes", b"evil\nInjected: yes", b"ev\x00il", b"ev\x1bil"])
async def test_ehlo_with_line_breaks_or_controls_is_refused(relay: Relay, helo: bytes) -> None:
    async with raw(smtp_port(relay)) as c:
        assert await c.cmd(b"EHLO " + helo + b"\r\n") == "501 5.5.4 Bad EHLO/HELO hostname"
        assert await c.cmd(b"HELO " + helo + b"\r\n") == "501 5.5.4 Bad EHLO/HELO hostname"
        assert await c.cmd(b"EHLO \xff\xfe\r\n") == "501 5.5.2 Argument is not valid UTF-8"
        assert await c.cmd(b"MAIL FROM:<app@example.com>\r\n") == "503 5.5.1 send HELO first"
    assert await message_count(relay) == 0


async def test_stored_headers_never_carry_a_bare_cr_or_lf(
    tmp_path: Path, server_tls_files: tuple[str, str], client_tls: ssl.SSLContext
) -> None:
    cert, key = server_tls_files
    config = make_config(tmp_path, smtp={"trusted_networks": [], "tls_cert": cert, "tls_key": key})
    async with running_relay(config) as relay:
        assert relay.store is not None
        await relay.store.add_user("app", hash_password("s3cret pass"))
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=smtp_port(relay), local_hostname="we(ird)[host]:name_", timeout=10
        )
        await client.connect(start_tls=False)
        await client.starttls(tls_context=client_tls)
        await client.ehlo()
        await client.auth_plain("app", "s3cret pass")
        code, text = await send(client, "app@example.com", ['"odd\\ name"@example.com'], SIMPLE)
        await client.quit()
        assert code == 250, text
        qid = queue_id_of(text)
        body = (await relay.store.load_bodies([qid]))[qid]
    header = body[: body.index(b"\r\n\r\n") + 2]
    assert b"\r" not in header.replace(b"\r\n", b"")
    assert b"\n" not in header.replace(b"\r\n", b"")
    assert header.startswith(b"Received: from weird[host]:name_ ([127.0.0.1])\r\n\t(using TLSv1.")
    assert b"with ESMTPSA id " + qid.encode() in header


# -- point 8: AUTH offered only after STARTTLS (or to trusted networks)


async def test_auth_is_advertised_only_after_starttls(
    tmp_path: Path, server_tls_files: tuple[str, str], client_tls: ssl.SSLContext
) -> None:
    cert, key = server_tls_files
    config = make_config(tmp_path, smtp={"trusted_networks": ["127.0.0.1/32"], "tls_cert": cert, "tls_key": key})
    async with running_relay(config) as relay:
        async with smtp_client(relay, source="127.0.0.2") as client:
            assert "starttls" in client.esmtp_extensions
            assert "auth" not in client.esmtp_extensions
            token = base64.b64encode(b"\0app\0secret").decode()
            assert await command(client, f"AUTH PLAIN {token}") == (
                538,
                "5.7.11 Encryption required for requested authentication mechanism",
            )
        async with smtp_client(relay, source="127.0.0.2", tls=client_tls) as client:
            assert client.esmtp_extensions["auth"] == "PLAIN LOGIN"
        async with smtp_client(relay, source="127.0.0.1") as client:  # trusted: plain text is fine
            assert client.esmtp_extensions["auth"] == "PLAIN LOGIN"


# -- point 9: limits


async def test_connections_over_the_per_ip_limit_get_421(tmp_path: Path) -> None:
    config = make_config(tmp_path, smtp={"max_sessions_per_ip": 2, "max_sessions": 3})
    before = rejections("too_many_connections")
    async with running_relay(config) as relay:
        port = smtp_port(relay)
        async with raw(port) as one, raw(port):
            assert one.greeting.startswith("220 ")
            async with raw(port) as third:
                assert third.greeting == "421 4.7.0 Too many connections"
                assert await third.closed()
            async with raw(port, source="127.0.0.2") as other:  # another IP still gets in...
                assert other.greeting.startswith("220 ")
                async with raw(port, source="127.0.0.3") as fourth:  # ...up to max_sessions in total
                    assert fourth.greeting == "421 4.7.0 Too many connections"
                    assert await fourth.closed()
            assert await one.cmd(b"NOOP\r\n") == "250 2.0.0 OK"  # the admitted sessions are untouched
        assert rejections("too_many_connections") == before + 2

        async def admitted() -> bool:  # once the sessions above are gone, there is room again
            async with raw(port) as c:
                return c.greeting.startswith("220 ")

        assert await wait_for(admitted)


async def test_connection_limit_under_uvloop(tmp_path: Path) -> None:
    """`relay serve` runs on uvloop: the 421 still arrives before the close, and shutdown's
    421 reaches idle sessions too (close_now)."""
    proc = await ServeProcess(serve_config(tmp_path, "max_sessions_per_ip = 1\n")).start()
    try:
        async with raw(proc.smtp_port) as first:
            assert first.greeting.startswith("220 ")
            async with raw(proc.smtp_port) as second:
                assert second.greeting == "421 4.7.0 Too many connections"
                assert await second.closed()
            proc.terminate()
            assert await first.reply() == "421 4.3.2 Service shutting down, closing transmission channel"
            assert await first.closed()
        assert await proc.wait() == 0
    finally:
        if proc.proc is not None and proc.proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_too_many_junk_commands_get_421(tmp_path: Path) -> None:
    config = make_config(tmp_path, smtp={"max_junk_commands": 4})
    before = rejections("too_many_commands")
    async with running_relay(config) as relay, raw(smtp_port(relay)) as c:
        await c.cmd(b"EHLO client.test\r\n")
        for line in (b"NOOP\r\n", b"RSET\r\n", b"VRFY jane@example.com\r\n", b"HELP\r\n"):
            assert (await c.cmd(line)).startswith("2")
        # MAIL starts counting again; a message is still accepted after junk.
        assert await c.cmd(b"MAIL FROM:<app@example.com>\r\n") == "250 2.1.0 Ok"
        for _ in range(3):
            assert await c.cmd(b"NOOP\r\n") == "250 2.0.0 OK"
        await c.cmd(b"RCPT TO:<jane@example.com>\r\n")
        await c.cmd(b"DATA\r\n")
        assert (await c.cmd(SIMPLE + b".\r\n")).startswith("250 2.0.0 Ok: queued as ")
        for _ in range(4):
            assert await c.cmd(b"NOOP\r\n") == "250 2.0.0 OK"
        assert await c.cmd(b"NOOP\r\n") == "421 4.7.0 Too many commands"
        assert await c.closed()
    assert rejections("too_many_commands") == before + 1


async def test_slow_upload_that_keeps_sending_is_not_cut_off(tmp_path: Path) -> None:
    """The idle timeout applies to each read: DATA that takes several timeouts in total but never
    pauses for one is accepted; a pause longer than the timeout closes the session."""
    async with running_relay(make_config(tmp_path, smtp={"timeout": "1s"})) as relay:
        async with raw(smtp_port(relay)) as c:
            await c.cmd(b"EHLO client.test\r\n")
            await c.cmd(b"MAIL FROM:<app@example.com>\r\n")
            await c.cmd(b"RCPT TO:<jane@example.com>\r\n")
            assert (await c.cmd(b"DATA\r\n")).startswith("354")
            c.writer.write(b"Subject: slow\r\n\r\n")
            for _ in range(12):  # about 3 s in all, a line every 0.25 s
                await asyncio.sleep(0.25)
                c.writer.write(b"still sending\r\n")
                await c.writer.drain()
            assert (await c.cmd(b".\r\n")).startswith("250 2.0.0 Ok: queued as ")
        assert await message_count(relay) == 1
        async with raw(smtp_port(relay)) as idle:
            assert await idle.closed()  # nothing sent: closed after the timeout


# -- point 10: AUTH floods


def test_throttle_counts_per_ip_and_per_user() -> None:
    now = [0.0]
    throttle = Throttle(clock=lambda: now[0])
    assert throttle.failed("192.0.2.1", "bob") == 0.0
    assert throttle.failed("192.0.2.1", "carol") == 1.0  # the IP's second failure, whatever the name
    assert throttle.failed("198.51.100.7", "bob") == 1.0  # bob's second failure, from another IP
    assert throttle.failed("203.0.113.9", "bob") == 2.0
    # A success for alice clears neither bob's failures nor those of alice's IP.
    throttle.succeeded("192.0.2.1", "alice")
    assert throttle.failed("192.0.2.1", "dave") == 2.0
    assert throttle.failed("203.0.113.50", "bob") == 4.0
    # bob's own success clears bob only.
    throttle.succeeded("203.0.113.50", "bob")
    assert throttle.failed("203.0.113.51", "bob") == 0.0  # a new IP, and bob's count starts again
    now[0] += 901  # the window has passed
    assert throttle.failed("192.0.2.1", "carol") == 0.0


def test_throttle_stays_bounded_under_a_spray_of_names() -> None:
    throttle = Throttle(max_entries=100)
    for i in range(1000):
        throttle.failed(f"192.0.2.{i % 250}", f"user{i}")
    assert len(throttle) <= 101


async def test_auth_flood_does_not_starve_intake(tmp_path: Path) -> None:
    """20 sessions from one IP send wrong passwords as fast as they are answered; a trusted
    client's messages are still accepted meanwhile."""
    config = make_config(tmp_path, smtp={"trusted_networks": ["127.0.0.0/8"]})
    async with running_relay(config) as relay:
        assert relay.store is not None
        await relay.store.add_user("app", hash_password("s3cret pass"))
        stop = asyncio.Event()
        refused = 0

        async def attacker(n: int) -> None:
            nonlocal refused
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=smtp_port(relay), source_address=("127.0.0.2", 0), timeout=30
            )
            await client.connect(start_tls=False)
            try:
                await client.ehlo()
                while not stop.is_set():
                    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                        await client.auth_plain("app" if n % 2 else f"user{n}", "wrong")
                    refused += 1
            finally:
                client.close()  # no QUIT: the server may be sleeping out a throttle delay

        attackers = [asyncio.create_task(attacker(n)) for n in range(20)]
        try:
            # Failures from one IP back off (1 s, 2 s, ... 8 s), so most of the 20 are waiting on a
            # throttle delay or a hashing slot from here on: exactly when intake must still work.
            await wait_for(lambda: refused >= 2, timeout=60)
            async with smtp_client(relay) as client:
                for _ in range(5):
                    code, text = await send(client, "app@example.com", ["jane@example.com"], SIMPLE)
                    assert code == 250, text
        finally:
            stop.set()
            for task in attackers:
                task.cancel()
            await asyncio.gather(*attackers, return_exceptions=True)
        assert await message_count(relay) == 5
