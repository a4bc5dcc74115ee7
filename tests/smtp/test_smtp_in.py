"""SMTP intake over real SMTP: policy, limits, replies, and what lands in the log."""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import ssl
from pathlib import Path

import aiosmtpd
import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP
from helpers import command, make_config, queue_id_of, raw_smtp, raw_sql, running_relay, send, smtp_client

from relay.auth import hash_password
from relay.config import Config
from relay.model import NewMessage
from relay.service.lifecycle import Relay
from relay.smtp_in import RelaySMTP, SessionTemplate

SIMPLE = b"From: App <app@example.com>\r\nTo: jane@example.com\r\nSubject: Password reset\r\n\r\nHello Jane\r\n"


async def message_count(relay: Relay) -> int:
    assert relay.store is not None
    summary = await relay.store.queue_summary()
    return sum(summary.counts.values())


async def test_accepted_mail_is_in_the_log(relay: Relay) -> None:
    async with smtp_client(relay) as client:
        code, text = await send(client, "app@example.com", ["jane@example.com", "bob@example.org"], SIMPLE)
    assert code == 250
    assert text.startswith("2.0.0 Ok: queued as ")
    qid = queue_id_of(text)
    assert relay.store is not None

    (msg,) = await relay.store.lookup(qid)
    assert msg.queue_id == qid
    assert msg.mail_from == "app@example.com"
    assert msg.subject == "Password reset"
    assert msg.client_ip == "127.0.0.1"
    assert [r.address for r in msg.recipients] == ["jane@example.com", "bob@example.org"]
    assert all(r.status == "queued" and r.attempts == 0 for r in msg.recipients)
    assert [e.type for e in msg.events] == ["received"]
    assert msg.events[0].details["client_ip"] == "127.0.0.1"

    by_rcpt = await relay.store.lookup("JANE@example.com")
    assert [m.queue_id for m in by_rcpt] == [qid]
    assert [m.queue_id for m in await relay.store.lookup(msg.message_id)] == [qid]
    assert [m.queue_id for m in await relay.store.lookup(f"<{msg.message_id}>")] == [qid]

    body = (await relay.store.load_bodies([qid]))[qid]
    assert body.startswith(
        b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (Relay) with ESMTP id " + qid.encode()
    )
    assert body.endswith(b"\r\n\r\nHello Jane\r\n")


async def test_message_id_added_when_missing_and_kept_when_present(relay: Relay) -> None:
    assert relay.store is not None
    async with smtp_client(relay) as client:
        _, text = await send(client, "app@example.com", ["jane@example.com"], SIMPLE)
        qid = queue_id_of(text)
        _, text2 = await send(
            client, "app@example.com", ["jane@example.com"], b"Message-ID: <abc.123@app.example>\r\n" + SIMPLE
        )
        qid2 = queue_id_of(text2)
    (added,) = await relay.store.lookup(qid)
    assert added.message_id == f"{qid}@relay.test"
    body = (await relay.store.load_bodies([qid]))[qid]
    assert f"\r\nMessage-ID: <{qid}@relay.test>\r\n".encode() in body
    assert b"\r\nDate: " in body

    (kept,) = await relay.store.lookup("abc.123@app.example")
    assert kept.queue_id == qid2
    body2 = (await relay.store.load_bodies([qid2]))[qid2]
    assert body2.count(b"Message-ID:") == 1


async def test_tags_are_recorded_and_stripped(relay: Relay) -> None:
    assert relay.store is not None
    data = b"X-Relay-Tag: password-reset, auth\r\nX-RELAY-TAG: auth, eu\r\n" + SIMPLE
    async with smtp_client(relay) as client:
        _, text = await send(client, "app@example.com", ["jane@example.com"], data)
    qid = queue_id_of(text)
    (msg,) = await relay.store.lookup(qid)
    assert msg.tags == ("password-reset", "auth", "eu")
    body = (await relay.store.load_bodies([qid]))[qid]
    assert b"x-relay-tag" not in body.lower()
    assert b"Subject: Password reset\r\n" in body


async def test_ehlo_advertises_the_extensions(relay: Relay) -> None:
    async with smtp_client(relay) as client:
        ext = client.esmtp_extensions
    for name in ("size", "8bitmime", "pipelining", "smtputf8", "enhancedstatuscodes", "auth"):
        assert name in ext, name
    assert "starttls" not in ext  # no certificate configured
    assert ext["auth"].split() == ["PLAIN", "LOGIN"]
    assert ext["size"] == "26214400"


async def test_untrusted_client_without_auth_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, smtp={"trusted_networks": ["127.0.0.1/32"]})
    async with running_relay(config) as relay, smtp_client(relay, source="127.0.0.2") as client:
        code, text = await command(client, "MAIL FROM:<app@example.com>")
        assert (code, text) == (530, "5.7.0 Authentication required")
        code, text = await command(client, "RCPT TO:<jane@example.com>")
        assert code == 503
        assert text.startswith("5.5.1 ")
        assert await message_count(relay) == 0


def _tls_only(tmp_path: Path, tls_files: tuple[str, str]) -> Config:
    """STARTTLS offered, no trusted network: AUTH only after STARTTLS."""
    cert, key = tls_files
    return make_config(tmp_path, smtp={"trusted_networks": [], "tls_cert": cert, "tls_key": key})


async def test_auth_before_starttls_is_refused(tmp_path: Path, server_tls_files: tuple[str, str]) -> None:
    config = _tls_only(tmp_path, server_tls_files)
    async with running_relay(config) as relay, smtp_client(relay) as client:
        assert "starttls" in client.esmtp_extensions
        token = base64.b64encode(b"\0app\0secret").decode()
        assert await command(client, f"AUTH PLAIN {token}") == (
            538,
            "5.7.11 Encryption required for requested authentication mechanism",
        )


async def test_auth_over_starttls(
    tmp_path: Path, server_tls_files: tuple[str, str], client_tls: ssl.SSLContext
) -> None:
    config = _tls_only(tmp_path, server_tls_files)
    async with running_relay(config) as relay:
        assert relay.store is not None
        await relay.store.add_user("app", hash_password("s3cret pass"))

        async with smtp_client(relay, tls=client_tls) as client:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
                await client.auth_plain("app", "wrong")
            assert (err.value.code, err.value.message) == (535, "5.7.8 Authentication credentials invalid")
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.auth_login("nobody", "s3cret pass")

        async with smtp_client(relay, tls=client_tls) as client:
            reply = await client.auth_plain("app", "s3cret pass")
            assert (reply.code, reply.message) == (235, "2.7.0 Authentication successful")
            code, text = await send(client, "app@example.com", ["jane@example.com"], SIMPLE)
            assert code == 250

        async with smtp_client(relay, tls=client_tls) as client:
            await client.auth_login("app", "s3cret pass")  # and LOGIN
            code, _ = await send(client, "app@example.com", ["jane@example.com"], SIMPLE)
            assert code == 250

        (msg,) = await relay.store.lookup(queue_id_of(text))
        assert msg.user == "app"
        details = msg.events[0].details
        assert details["protocol"] == "ESMTPSA"
        assert details["tls"].startswith("TLSv1.")
        body = (await relay.store.load_bodies([msg.queue_id]))[msg.queue_id]
        assert b"with ESMTPSA id" in body


async def test_auth_garbage_gets_a_precise_reply(
    tmp_path: Path, server_tls_files: tuple[str, str], client_tls: ssl.SSLContext
) -> None:
    config = _tls_only(tmp_path, server_tls_files)
    async with running_relay(config) as relay, smtp_client(relay, tls=client_tls) as client:
        # PLAIN and LOGIN read their first response the same way, from the AUTH line or a 334 challenge.
        assert await command(client, "AUTH PLAIN !!!notbase64") == (501, "5.5.2 Cannot decode base64")
        assert await command(client, "AUTH LOGIN !!!notbase64") == (501, "5.5.2 Cannot decode base64")
        assert await command(client, "AUTH PLAIN") == (334, "")
        assert await command(client, "*") == (501, "5.7.0 Auth aborted")
        assert await command(client, "AUTH LOGIN") == (334, base64.b64encode(b"Username:").decode())
        assert await command(client, "!!!notbase64") == (501, "5.5.2 Can't decode base64")  # aiosmtpd's wording
        assert await command(client, "AUTH PLAIN " + base64.b64encode(b"only-one-part").decode()) == (
            501,
            "5.5.2 Malformed AUTH PLAIN response",
        )
        assert (await command(client, "AUTH CRAM-MD5"))[0] == 504


async def test_oversize_message_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, smtp={"max_message_size": 1000})
    async with running_relay(config) as relay, smtp_client(relay) as client:
        assert await command(client, "MAIL FROM:<app@example.com> SIZE=5000") == (
            552,
            "5.3.4 Message size exceeds fixed maximum message size",
        )
        code, text = await send(
            client,
            "app@example.com",
            ["jane@example.com"],
            SIMPLE + b"x" * 70 + b"\r\n" * 20 + (b"y" * 76 + b"\r\n") * 20,
        )
        assert (code, text) == (552, "5.3.4 Message size exceeds fixed maximum message size")
        assert await message_count(relay) == 0
        code, _ = await send(client, "app@example.com", ["jane@example.com"], SIMPLE)  # the session goes on
        assert code == 250


async def test_too_many_recipients(tmp_path: Path) -> None:
    config = make_config(tmp_path, smtp={"max_recipients": 2})
    async with running_relay(config) as relay, smtp_client(relay) as client:
        await command(client, "MAIL FROM:<app@example.com>")
        assert (await command(client, "RCPT TO:<a@example.com>"))[0] == 250
        assert (await command(client, "RCPT TO:<b@example.com>"))[0] == 250
        assert await command(client, "RCPT TO:<c@example.com>") == (452, "4.5.3 Too many recipients")
        assert (await command(client, "RCPT TO:<A@example.com>"))[0] == 250  # a duplicate, not a third
        reply = await client.data(SIMPLE)
        assert reply.code == 250
        (msg,) = await relay.store.lookup(queue_id_of(reply.message))  # type: ignore[union-attr]
        assert [r.address for r in msg.recipients] == ["a@example.com", "b@example.com"]


@pytest.mark.parametrize(
    ("line", "code", "enhanced"),
    [
        ("MAIL FROM:<no-at-sign>", 553, "5.1.3"),
        ("MAIL FROM:<a b@example.com>", 553, "5.1.3"),
        ("MAIL FROM:<app@exa mple.com>", 553, "5.1.3"),
        ("MAIL FROM:<app@-bad-.com>", 501, "5.1.3"),
        ("MAIL FROM:app@example.com>", 553, "5.1.3"),
        ("MAIL FROM:<app@example.com> BOGUS=1", 555, "5.5.4"),
        ("MAIL TO:<app@example.com>", 501, "5.5.4"),
    ],
)
async def test_malformed_sender(relay: Relay, line: str, code: int, enhanced: str) -> None:
    async with smtp_client(relay) as client:
        got_code, text = await command(client, line)
        assert (got_code, text.split()[0]) == (code, enhanced), text
    assert await message_count(relay) == 0


@pytest.mark.parametrize(
    ("rcpt", "code"),
    [
        ("<jane@>", 553),
        ("<@example.com>", 553),
        ("<jane..doe@example.com>", 501),
        ("<jane@exa_mple..com>", 501),
        ("<" + "x" * 65 + "@example.com>", 501),
        ("<jane@[300.1.1.1]>", 501),
        ("<jane@example.com", 553),
    ],
)
async def test_malformed_recipient(relay: Relay, rcpt: str, code: int) -> None:
    async with smtp_client(relay) as client:
        await command(client, "MAIL FROM:<app@example.com>")
        got_code, text = await command(client, f"RCPT TO:{rcpt}")
        assert got_code == code, text
        assert text.startswith("5.1.3 "), text


async def test_commands_out_of_order(relay: Relay) -> None:
    async with smtp_client(relay, ehlo=False) as client:
        assert (await command(client, "MAIL FROM:<app@example.com>"))[0] == 503
        await client.ehlo()
        code, text = await command(client, "RCPT TO:<jane@example.com>")
        assert (code, text.split()[0]) == (503, "5.5.1")
        code, text = await command(client, "DATA")
        assert (code, text.split()[0]) == (503, "5.5.1")
        await command(client, "MAIL FROM:<app@example.com>")
        code, text = await command(client, "MAIL FROM:<app@example.com>")
        assert (code, text.split()[0]) == (503, "5.5.1")
        code, text = await command(client, "FOO bar")
        assert (code, text.split()[0]) == (500, "5.5.2")


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"Subject: x\r\nBroken line without colon\r\n\r\nbody\r\n", "5.6.0 Malformed header field on line 2"),
        (
            b" continuation first\r\nSubject: x\r\n\r\nbody\r\n",
            "5.6.0 Malformed header section: continuation line first",
        ),
        (b"Subject: x\r\n\r\nnul \x00 here\r\n", "5.6.0 Message contains NUL characters"),
        (b"Message-ID: <a@b>\r\nMessage-ID: <c@d>\r\n\r\nbody\r\n", "5.6.0 More than one Message-ID header"),
        (b"Message-ID: two words\r\n\r\nbody\r\n", "5.6.0 Malformed Message-ID header"),
        (
            b"X-Relay-Tag: " + b"t" * 101 + b"\r\n\r\nbody\r\n",
            "5.6.0 Invalid X-Relay-Tag: at most 100 printable characters each",
        ),
        (
            b"X-Relay-Tag: " + b",".join(b"t%d" % i for i in range(21)) + b"\r\n\r\nbody\r\n",
            "5.6.0 Too many X-Relay-Tag values (at most 20)",
        ),
        (b"X-Relay-Tag: \xff\xfe\r\n\r\nbody\r\n", "5.6.0 Invalid X-Relay-Tag: not UTF-8"),
        (b"Bad Name: x\r\n\r\nbody\r\n", "5.6.0 Malformed header field on line 1"),
    ],
)
async def test_hostile_or_broken_content_is_refused(relay: Relay, data: bytes, text: str) -> None:
    async with smtp_client(relay) as client:
        assert await send(client, "app@example.com", ["jane@example.com"], data) == (554, text)
        assert await message_count(relay) == 0
        code, _ = await send(client, "app@example.com", ["jane@example.com"], SIMPLE)
        assert code == 250


async def test_bare_line_feed_in_headers_is_refused(relay: Relay) -> None:
    payload = (
        b"EHLO client.test\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<jane@example.com>\r\nDATA\r\n"
        b"Subject: x\nBcc: injected@example.net\r\n\r\nbody\r\n.\r\n"
    )
    replies = await raw_smtp(relay, payload, 5)
    assert replies[-1] == "554 5.6.0 Malformed header section: bare CR or LF"
    assert await message_count(relay) == 0


async def test_long_line_is_refused(relay: Relay) -> None:
    async with smtp_client(relay) as client:
        code, text = await send(client, "app@example.com", ["jane@example.com"], SIMPLE + b"z" * 2000 + b"\r\n")
        assert code == 500
        assert text.startswith("5.5.2 Line too long")
    assert await message_count(relay) == 0


async def _fail_inserts_of(relay: Relay, address: str, error: str) -> None:
    """Plant a trigger, from outside Relay, that aborts the insert of this recipient."""
    await raw_sql(
        relay.config.store.url,
        lambda conn: conn.exec_driver_sql(
            f"CREATE TRIGGER fail_rcpt BEFORE INSERT ON recipients WHEN NEW.address = '{address}' "
            f"BEGIN SELECT RAISE(ABORT, '{error}'); END"
        ),
        write=True,
    )


async def test_store_failure_gives_451_and_stores_nothing(relay: Relay) -> None:
    assert relay.store is not None
    # A real failure inside the real transaction: the recipient insert aborts after the
    # message row was written, so only a rollback leaves nothing behind.
    await _fail_inserts_of(relay, "fail@example.com", "disk on fire")
    async with smtp_client(relay) as client:
        code, text = await send(client, "app@example.com", ["ok@example.com", "fail@example.com"], SIMPLE)
        assert (code, text) == (451, "4.3.0 Temporary failure storing the message, try again later")
        assert "disk" not in text
        assert await message_count(relay) == 0
        assert await relay.store.lookup("ok@example.com") == []
        code, _ = await send(client, "app@example.com", ["ok@example.com"], SIMPLE)
        assert code == 250


async def test_one_bad_message_does_not_fail_others_in_the_same_commit(relay: Relay) -> None:
    assert relay.store is not None
    await _fail_inserts_of(relay, "fail@example.com", "boom")

    async def one(rcpt: str) -> int:
        async with smtp_client(relay) as client:
            return (await send(client, "app@example.com", [rcpt], SIMPLE))[0]

    codes = await asyncio.gather(*(one("fail@example.com" if i == 7 else f"u{i}@example.com") for i in range(20)))
    assert codes.count(250) == 19
    assert codes[7] == 451
    assert await message_count(relay) == 19


async def test_many_sessions_at_once_all_get_their_own_commit(relay: Relay) -> None:
    async def one(i: int) -> str:
        async with smtp_client(relay) as client:
            code, text = await send(client, "app@example.com", [f"user{i}@example.com"], SIMPLE)
            assert code == 250
            return queue_id_of(text)

    ids = await asyncio.gather(*(one(i) for i in range(40)))
    assert len(set(ids)) == 40
    assert await message_count(relay) == 40
    assert ids == sorted(ids) or len(ids) == 40  # ULIDs: unique; sortable by time


async def test_unexpected_errors_do_not_leak(relay: Relay) -> None:
    assert relay.smtp is not None
    reply = await relay.smtp.handler.handle_exception(RuntimeError("password=hunter2 at /srv/secret.py"))
    assert reply == "451 4.3.0 Internal error, try again later"


async def test_sigterm_style_shutdown_closes_idle_sessions(tmp_path: Path) -> None:
    relay = Relay(make_config(tmp_path))
    await relay.startup()
    async with smtp_client(relay) as client:
        await relay.shutdown()
        with pytest.raises(aiosmtplib.SMTPException):
            await client.noop()


async def test_pipelined_transactions_and_dot_stuffing(relay: Relay) -> None:
    assert relay.store is not None
    one = b"Subject: one\r\n\r\n..leading dot\r\n.\r\n"
    two = b"Subject: two\r\n\r\nbody\r\n.\r\n"
    payload = (
        b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" + one
        + b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n" + two + b"QUIT\r\n"
    )  # fmt: skip
    replies = await raw_smtp(relay, payload, 10)
    queued = [r for r in replies if r.startswith("250 2.0.0 Ok: queued as ")]
    assert len(queued) == 2
    assert replies[-1].startswith("221")
    first = queued[0].rsplit(" ", 1)[1]
    body = (await relay.store.load_bodies([first]))[first]
    assert body.endswith(b"\r\n\r\n.leading dot\r\n")


async def test_end_of_data_split_across_packets(relay: Relay) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_addresses[0].port)
    try:
        await reader.readline()
        writer.write(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        for _ in range(4):
            await reader.readline()
        for piece in (b"Subject: x\r\n\r\nbody\r", b"\n.", b"\r", b"\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        reply = (await asyncio.wait_for(reader.readline(), 5)).decode()
        assert reply.startswith("250 2.0.0 Ok: queued as ")
    finally:
        writer.close()


async def test_empty_message_is_accepted_with_headers_added(relay: Relay) -> None:
    assert relay.store is not None
    replies = await raw_smtp(
        relay, b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n.\r\n", 5
    )
    qid = replies[-1].rsplit(" ", 1)[1]
    body = (await relay.store.load_bodies([qid]))[qid]
    assert body.startswith(b"Received: ")
    assert b"Message-ID: <" in body


async def test_a_raising_post_commit_callback_still_gets_250(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    """One write path: once the transaction has committed, the message is Relay's. A callback
    run after the commit (the wake-up on enqueue) that raises is logged, and the client still
    gets its 250."""
    assert relay.store is not None

    def on_fire(msg: NewMessage) -> None:
        raise RuntimeError(f"callback on fire for {msg.queue_id}")

    relay.store.on_enqueued.append(on_fire)
    with caplog.at_level(logging.WARNING):
        async with smtp_client(relay) as client:
            code, text = await send(client, "app@example.com", ["jane@example.com"], SIMPLE)
            assert code == 250, text
            (msg,) = await relay.store.lookup(queue_id_of(text))
            assert [r.address for r in msg.recipients] == ["jane@example.com"]
            code, text = await send(client, "app@example.com", ["bob@example.org"], SIMPLE)  # the session goes on
            assert code == 250, text
    assert await message_count(relay) == 2
    logged = [r for r in caplog.records if "callback on fire" in r.getMessage() + str(r.exc_info and r.exc_info[1])]
    assert logged, "the raising callback was not logged"


def _attributes(obj: object) -> set[str]:
    """The instance attributes ``obj`` holds: its __dict__, and any slot that is set."""
    names = set(vars(obj))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names.update(n for n in ((slots,) if isinstance(slots, str) else slots) if hasattr(obj, n))
    return names


async def test_sessions_get_every_attribute_aiosmtpd_sets(relay: Relay) -> None:
    """RelaySMTP sets SMTP.__init__'s attributes itself (the hot path skips aiosmtpd's
    introspection): an aiosmtpd that sets one more would break sessions in ways no other test
    may show, so the pin in pyproject.toml moves only together with RelaySMTP.__init__."""
    assert relay.smtp is not None
    handler, options = relay.smtp.handler, relay.smtp.session_options()
    theirs = SMTP(handler, loop=asyncio.get_running_loop(), **options)
    ours = RelaySMTP(SessionTemplate(handler, **options), sessions=set(), per_ip=collections.Counter())
    missing = sorted(_attributes(theirs) - _attributes(ours))
    assert not missing, (
        f"aiosmtpd {aiosmtpd.__version__}'s SMTP.__init__ sets {', '.join(missing)}, "
        "which RelaySMTP.__init__ (relay/smtp_in.py) does not"
    )
