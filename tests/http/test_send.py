"""Sending over HTTP (POST /api/v1/messages) with a real HTTP client against a running Relay that
delivers to an aiosmtpd sink through the test DNS server, on SQLite and PostgreSQL: a built
message and a raw one arrive as sent, the log says who sent it and how, every bad field is a
422 that names it and stores nothing, and an Idempotency-Key makes retries (and concurrent
twins) send once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import make_config, running_relay, store_url, wait_for
from helpers.delivery import delivery_config, final, status
from helpers.peers import Sink, Zone, sinks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ulid import ULID

from relay.logstore import IdempotencyKey, LogStore
from relay.model import MessageView, NewMessage, Suppression
from relay.service.lifecycle import Relay

TOKEN = "send-api-token-0123456789abcdef"
OTHER_TOKEN = "another-send-api-token-987654321"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_SIZE = 600_000  # above relay.smtp_in.HEAVY_CONTENT: big messages take the worker-thread path
MAX_RCPTS = 5
PDF = bytes(range(256)) * 3 + b"%PDF-1.7\r\n\x00end"


@dataclass
class Api:
    client: httpx.AsyncClient
    store: LogStore
    sink: Sink
    relay: Relay


@pytest.fixture
async def sink(zone: Zone) -> AsyncIterator[Sink]:
    zone.mx("example.net", (10, "mx.example.net"))
    zone.a("mx.example.net", "127.0.0.2")
    async with sinks("127.0.0.2") as (s,):
        yield s


async def _api(stack: AsyncExitStack, tmp_path: Path, zone: Zone, sink: Sink, kind: str) -> Api:
    url = await store_url(kind, tmp_path / "data" / "relay.db", stack)
    config = delivery_config(
        tmp_path, zone, sink.port,
        http={"listen": "127.0.0.1:0", "api_tokens": [TOKEN, OTHER_TOKEN]},
        smtp={"max_message_size": MAX_SIZE, "max_recipients": MAX_RCPTS},
        suppression={"reject_at_rcpt": True},
        store={"url": url},
    )  # fmt: skip
    relay = await stack.enter_async_context(running_relay(config, deliver=True))
    assert relay.http_address is not None
    assert relay.store is not None
    client = await stack.enter_async_context(
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.http_address.port}", headers=AUTH, timeout=20)
    )
    return Api(client, relay.store, sink, relay)


@pytest.fixture(params=["sqlite", "postgres"])
async def api(request: pytest.FixtureRequest, tmp_path: Path, zone: Zone, sink: Sink) -> AsyncIterator[Api]:
    async with AsyncExitStack() as stack:
        yield await _api(stack, tmp_path, zone, sink, request.param)


@pytest.fixture
async def sqlite_api(tmp_path: Path, zone: Zone, sink: Sink) -> AsyncIterator[Api]:
    async with AsyncExitStack() as stack:
        yield await _api(stack, tmp_path, zone, sink, "sqlite")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def structured(**extra: Any) -> dict[str, Any]:
    return {"from": "Shop <shop@example.com>", "to": ["jane@example.net"], "subject": "Hi", "text": "Hello"} | extra


async def delivered(api: Api, queue_id: str) -> MessageView:
    msg = await final(api.relay, queue_id)
    assert set(status(msg).values()) == {"delivered"}, status(msg)
    return msg


async def stored_messages(store: LogStore) -> int:
    views, _ = await store.search(limit=100)
    return len(views)


async def test_a_built_message_is_delivered_as_described(api: Api) -> None:
    r = await api.client.post(
        "/api/v1/messages",
        json={
            "from": "Zoë Shop <shop@example.com>",
            "to": ["Jane Doé <jane@example.net>"],
            "cc": ["bob@example.net"],
            "bcc": ["audit@example.net"],
            "reply_to": "help@example.com",
            "subject": "Your order — ready",
            "text": "Hello Jane,\nyour order is ready.\n",
            "html": "<p>Hello Jane, your order is <b>ready</b>.</p>",
            "headers": {"X-Campaign": "autumn", "In-Reply-To": "<order-1@example.com>"},
            "tags": ["orders", "ready"],
            "attachments": [{"filename": "reçu.pdf", "content_type": "application/pdf", "content": b64(PDF)}],
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    msg = await delivered(api, body["id"])
    assert sorted(m for got in api.sink.messages for m in got.rcpts) == [
        "audit@example.net", "bob@example.net", "jane@example.net",
    ]  # fmt: skip
    data = api.sink.messages[0].data
    assert all(got.data == data for got in api.sink.messages)
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Bcc"] is None
    assert b"audit@" not in data
    assert not [k for k in parsed if k.lower().startswith("x-relay-")]
    assert str(parsed["From"]) == "Zoë Shop <shop@example.com>"
    assert str(parsed["To"]) == "Jane Doé <jane@example.net>"
    assert str(parsed["Cc"]) == "bob@example.net"
    assert str(parsed["Reply-To"]) == "help@example.com"
    assert str(parsed["Subject"]) == "Your order — ready"
    assert parsed["Message-ID"] == f"<{body['message_id']}>"
    assert parsed["Date"] is not None
    assert parsed["X-Campaign"] == "autumn"
    assert parsed["In-Reply-To"] == "<order-1@example.com>"
    assert data.isascii()  # non-ASCII as encoded words and quoted-printable
    assert parsed.get_content_type() == "multipart/mixed"
    alternative, attachment = parsed.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    plain, html = alternative.iter_parts()
    assert plain.get_content().replace("\r\n", "\n") == "Hello Jane,\nyour order is ready.\n"
    assert "<b>ready</b>" in html.get_content()
    assert attachment.get_filename() == "reçu.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == PDF

    (received,) = [e for e in msg.events if e.type == "received"]
    assert received.details["protocol"] == "HTTP"
    assert received.details["token"] == received.details["user"] == msg.user
    assert msg.user is not None
    assert msg.user.startswith("api:")
    assert received.details["client_ip"] == msg.client_ip == "127.0.0.1"
    assert list(msg.tags) == ["orders", "ready"]
    assert msg.subject == "Your order — ready"
    assert msg.mail_from == "shop@example.com"


async def test_a_raw_message_arrives_byte_for_byte(api: Api) -> None:
    raw = (
        b"From: App <app@example.com>\r\nTo: jane@example.net\r\nSubject: raw\r\n"
        b"Message-ID: <raw-1@example.com>\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "Grüße\r\n..a line with dots\r\n.\r\nend\r\n".encode()
    )
    r = await api.client.post(
        "/api/v1/messages", json={"raw": b64(raw), "mail_from": "bounce@example.com", "to": ["jane@example.net"]}
    )
    assert r.status_code == 201, r.text
    assert r.json()["message_id"] == "raw-1@example.com"
    msg = await delivered(api, r.json()["id"])
    (got,) = api.sink.messages
    assert got.mail_from == "bounce@example.com"
    assert got.rcpts == ["jane@example.net"]
    assert got.data.endswith(raw)
    added = got.data[: -len(raw)].decode().split("\r\n")[:-1]
    assert added[0].startswith("Received: from api ([127.0.0.1])")
    assert all(line.startswith(("Received:", " ", "\t")) for line in added), added
    assert "with HTTP id " + msg.queue_id in got.data.decode()


async def test_a_message_over_the_size_limit_is_413(sqlite_api: Api) -> None:
    client = sqlite_api.client
    huge = b"x" * (MAX_SIZE * 2)
    r = await client.post(
        "/api/v1/messages", content=b'{"raw": "' + huge + b'"}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 413, r.text

    async def stream() -> AsyncIterator[bytes]:  # no Content-Length: refused while it streams in
        yield b'{"raw": "'
        for _ in range(20):
            yield b"A" * 100_000

    r = await client.post("/api/v1/messages", content=stream(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    big = b"Subject: big\r\n\r\n" + b"y" * 70 + (b"\r\n" + b"y" * 70) * (MAX_SIZE // 72 + 10)
    r = await client.post(
        "/api/v1/messages", json={"raw": b64(big), "mail_from": "a@example.com", "to": ["b@example.net"]}
    )
    assert r.status_code == 413, r.text
    r = await client.post(
        "/api/v1/messages",
        json=structured(attachments=[{"filename": "a.bin", "content": b64(b"z" * (MAX_SIZE - 100))}]),
    )
    assert r.status_code == 413, r.text
    assert await stored_messages(sqlite_api.store) == 0


async def test_big_messages_are_sent_whole(sqlite_api: Api) -> None:
    blob = bytes(range(256)) * 1200  # 300 KiB: parsed, built and checked in a worker thread
    raw = b"Subject: big raw\r\nMessage-ID: <big@example.com>\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n\r\n"
    raw += (b"z" * 998 + b"\r\n") * 300
    sent = [
        await sqlite_api.client.post(
            "/api/v1/messages", json=structured(attachments=[{"filename": "blob.bin", "content": b64(blob)}])
        ),
        await sqlite_api.client.post(
            "/api/v1/messages", json={"raw": b64(raw), "mail_from": "a@example.com", "to": ["jane@example.net"]}
        ),
    ]
    for r in sent:
        assert r.status_code == 201, r.text
        await delivered(sqlite_api, r.json()["id"])
    built, plain = (got.data for got in sqlite_api.sink.messages)
    parsed = email.message_from_bytes(built, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    (attachment,) = parsed.iter_attachments()
    assert attachment.get_content() == blob
    assert plain.endswith(raw)


BAD_FIELDS: list[tuple[dict[str, Any], list[Any]]] = [
    (structured(**{"from": "not an address"}), ["body", "from"]),
    (structured(**{"from": "Shop <shop@example.com>\r\nBcc: x@example.org"}), ["body", "from"]),
    (structured(to=["jane@[127.0.0.1]"]), ["body", "to", 0]),
    (structured(to=["jane@example.net", "two words@example.net"]), ["body", "to", 1]),
    (structured(cc=["a@b@example.net"]), ["body", "cc", 0]),
    (structured(bcc=["x@example.net\r\nRCPT TO:<y@example.org>"]), ["body", "bcc", 0]),
    (structured(to=[f"r{i}@example.net" for i in range(MAX_RCPTS + 1)]), ["body", "to", MAX_RCPTS]),
    (structured(to=["a@example.net"], bcc=[f"b{i}@example.net" for i in range(MAX_RCPTS)]), ["body", "bcc", 4]),
    (structured(to=[]), ["body", "to"]),
    (structured(reply_to="nobody"), ["body", "reply_to"]),
    (structured(headers={"Bcc": "spy@example.org"}), ["body", "headers", "Bcc"]),
    (structured(headers={"received": "from x"}), ["body", "headers", "received"]),
    (structured(headers={"Content-Type": "text/html"}), ["body", "headers", "Content-Type"]),
    (structured(headers={"DKIM-Signature": "v=1"}), ["body", "headers", "DKIM-Signature"]),
    (structured(headers={"X-Relay-Track": "none"}), ["body", "headers", "X-Relay-Track"]),
    (structured(headers={"X-Note": "a\r\nBcc: spy@example.org"}), ["body", "headers", "X-Note"]),
    (structured(headers={"Bad Name": "x"}), ["body", "headers", "Bad Name"]),
    (
        structured(headers={"Message-ID": "<a@example.com>", "message-id": "<b@example.com>"}),
        ["body", "headers", "message-id"],
    ),
    (structured(attachments=[{"filename": "a.pdf", "content": "not base64!"}]), ["body", "attachments", 0, "content"]),
    (
        structured(attachments=[{"filename": "a", "content_type": "multipart/mixed", "content": "AA=="}]),
        ["body", "attachments", 0, "content_type"],
    ),
    (structured(attachments=[{"filename": "../\r\nx", "content": "AA=="}]), ["body", "attachments", 0, "filename"]),
    (structured(tags=[f"t{i}" for i in range(21)]), ["body", "tags"]),
    (structured(tags=["ok", "a,b"]), ["body", "tags", 1]),
    (structured(tags=["x" * 101]), ["body", "tags", 0]),
    (structured(track="sometimes"), ["body", "track"]),
    (structured(text=None), ["body", "text"]),
    (structured(mail_from="a@example.com"), ["body", "mail_from"]),
    (structured(surprise=1), ["body", "surprise"]),
    ({"raw": "%%%", "mail_from": "a@example.com", "to": ["b@example.net"]}, ["body", "raw"]),
    ({"raw": b64(b"Subject: x\r\n\r\nhi\r\n"), "to": ["b@example.net"]}, ["body", "mail_from"]),
    ({"raw": b64(b"Subject: x\r\n\r\nhi\r\n"), "mail_from": "<>", "to": ["b@example.net"]}, ["body", "mail_from"]),
    (
        {
            "raw": b64(b"Subject: x\r\n\r\nhi\r\n"),
            "mail_from": "a@example.com",
            "to": ["b@example.net"],
            "subject": "x",
        },
        ["body", "subject"],
    ),
    (
        {"raw": b64(b"Bad header line\r\n\r\nhi\r\n"), "mail_from": "a@example.com", "to": ["b@example.net"]},
        ["body", "raw"],
    ),
    (
        {
            "raw": b64(b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n"),
            "mail_from": "a@example.com",
            "to": ["b@example.net"],
        },
        ["body", "raw"],
    ),
    (
        {
            "raw": b64(b"Received: from x\r\n" * 51 + b"\r\nloop\r\n"),
            "mail_from": "a@example.com",
            "to": ["b@example.net"],
        },
        ["body", "raw"],
    ),
    (
        {
            "raw": b64(b"X-Relay-Tag: " + b"x" * 101 + b"\r\n\r\nhi\r\n"),
            "mail_from": "a@example.com",
            "to": ["b@example.net"],
        },
        ["body", "tags"],
    ),
    (
        {"raw": b64(b"Subject: x\r\n\r\nhi\r\n"), "mail_from": "a@example.com", "to": ["b\udc80@example.net"]},
        ["body"],
    ),
]


async def test_each_bad_field_is_a_422_naming_it(sqlite_api: Api) -> None:
    client = sqlite_api.client
    for body, loc in BAD_FIELDS:
        content = json.dumps(body).encode()  # a lone surrogate too, as \udc80 (the JSON parser refuses it)
        r = await client.post("/api/v1/messages", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"][0]["loc"] == loc, (body, r.text)
    for content in (b"not json", b"[1, 2]", b"", b'{"raw": 5}'):
        r = await client.post("/api/v1/messages", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 422, (content, r.text)
        assert r.json()["detail"][0]["loc"][0] == "body"
    r = await client.post("/api/v1/messages", json=structured(), headers={"Idempotency-Key": "k" * 256})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert await stored_messages(sqlite_api.store) == 0
    assert sqlite_api.sink.messages == []


async def test_a_suppressed_recipient_is_422_with_the_reason(api: Api) -> None:
    await api.store.suppress(Suppression("gone@example.net", "hard_bounce", "bounce", None, 1.0e9, None, ""), "test")
    r = await api.client.post("/api/v1/messages", json=structured(cc=["gone@example.net"]))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "cc", 0]
    assert "suppress" in detail["msg"]
    assert "hard_bounce" in detail["msg"]
    assert await stored_messages(api.store) == 0


async def test_a_token_is_required(sqlite_api: Api) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-token-wrong-token"}):
        r = await sqlite_api.client.post("/api/v1/messages", json=structured(), headers=headers)
        assert r.status_code == 401, r.text
    assert await stored_messages(sqlite_api.store) == 0


async def test_an_idempotent_retry_sends_once(api: Api) -> None:
    key = {"Idempotency-Key": "order-1 retry-safe"}
    first = await api.client.post("/api/v1/messages", json=structured(), headers=key)
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    again = await api.client.post("/api/v1/messages", json=structured(), headers=key)
    assert again.status_code == 201, again.text
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    reordered = json.dumps(dict(reversed(structured().items())), indent=2).encode()  # the same request
    again = await api.client.post(
        "/api/v1/messages", content=reordered, headers={**key, "content-type": "application/json"}
    )
    assert again.status_code == 201, again.text
    assert again.json() == first.json()
    other = await api.client.post("/api/v1/messages", json=structured(subject="Different"), headers=key)
    assert other.status_code == 422, other.text
    assert other.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]

    twin = structured(to=["twin@example.net"])
    twins = await asyncio.gather(
        *(api.client.post("/api/v1/messages", json=twin, headers={"Idempotency-Key": "twin"}) for _ in range(5))
    )
    assert {r.status_code for r in twins} == {201}, [r.text for r in twins]
    assert len({r.json()["id"] for r in twins}) == 1
    assert sum(1 for r in twins if "Idempotent-Replayed" not in r.headers) == 1

    for r in (first, twins[0]):
        await delivered(api, r.json()["id"])
    assert await stored_messages(api.store) == 2
    await wait_for(lambda: len(api.sink.messages) >= 2)
    assert sorted(r for m in api.sink.messages for r in m.rcpts) == ["jane@example.net", "twin@example.net"]
    # keys are per token: another token's "twin" is a message of its own
    mine = {"Idempotency-Key": "twin", "Authorization": f"Bearer {OTHER_TOKEN}"}
    r = await api.client.post("/api/v1/messages", json=structured(to=["twin@example.net"]), headers=mine)
    assert r.status_code == 201
    assert "Idempotent-Replayed" not in r.headers
    assert r.json()["id"] != twins[0].json()["id"]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_two_nodes_sending_with_one_key_store_one_message(kind: str, tmp_path: Path) -> None:
    """Two stores on one database (two nodes, or two processes): the key's primary key lets one
    message in, and the other request gets that one's answer."""
    async with AsyncExitStack() as stack:
        url = await store_url(kind, tmp_path / "data" / "relay.db", stack)
        nodes = []
        for _ in range(2):
            node = await LogStore.open(url)
            stack.push_async_callback(node.close)
            nodes.append(node)
        await nodes[0].upgrade()

        def message(n: int) -> NewMessage:
            return NewMessage(
                queue_id=str(ULID()), message_id=f"m{n}@example.com", mail_from="a@example.com",
                recipients=("b@example.net",), subject="", tags=(), user="api:x", client_ip="127.0.0.1",
                received_at=time.time(), raw=b"Subject: x\r\n\r\nhi\r\n",
            )  # fmt: skip

        key = IdempotencyKey("api:x", "key-1", "h" * 64)
        results = await asyncio.gather(*(nodes[n % 2].enqueue(message(n), key) for n in range(6)))
        assert results.count(None) == 1
        answers = {r for r in results if r is not None}
        assert len(answers) == 1
        (answer,) = answers
        views, _ = await nodes[1].search(limit=10)
        assert [v.queue_id for v in views] == [answer.queue_id]
        assert views[0].message_id == answer.message_id
        assert await nodes[0].idempotency_key("api:x", "key-1") == answer
        assert await nodes[0].idempotency_key("api:y", "key-1") is None


# -- hostile bodies: never a 500 (intake only, one Relay for all examples, in a thread of its own)


@pytest.fixture(scope="module")
def relay_in_thread(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = make_config(
        tmp_path_factory.mktemp("send"),
        http={"listen": "127.0.0.1:0", "api_tokens": [TOKEN]},
        smtp={"max_message_size": MAX_SIZE, "max_recipients": MAX_RCPTS},
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = running_relay(config)
    relay = asyncio.run_coroutine_threadsafe(running.__aenter__(), loop).result(60)
    assert relay.http_address is not None
    try:
        yield f"http://127.0.0.1:{relay.http_address.port}"
    finally:
        asyncio.run_coroutine_threadsafe(running.__aexit__(None, None, None), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        with contextlib.suppress(RuntimeError):
            loop.close()


_text = st.text(max_size=60) | st.sampled_from(["", " ", "\r\n", "=?utf-8?q?x?=", "ü" * 80, "a" * 1100])
_address = st.sampled_from(
    ["jane@example.net", "Jane <jane@example.net>", '"Doe, J" <j@example.net>', "jö@exämple.net", "x@[10.0.0.1]",
     "<>", "a@b", '"a b"@example.net', "Ünïcode Näme <u@example.net>"]
) | _text  # fmt: skip
_body = st.fixed_dictionaries(
    {},
    optional={
        "from": _address,
        "to": st.lists(_address, max_size=4),
        "cc": st.lists(_address, max_size=2),
        "bcc": st.lists(_address, max_size=2),
        "reply_to": _address,
        "subject": _text,
        "text": _text,
        "html": _text,
        "headers": st.dictionaries(
            st.sampled_from(["X-A", "Message-ID", "References", "Date", "X B"]) | _text, _text, max_size=3
        ),
        "tags": st.lists(_text, max_size=3),
        "track": st.sampled_from(["opens", "clicks", "opens,clicks", "none"]) | _text,
        "attachments": st.lists(
            st.fixed_dictionaries(
                {"filename": _text, "content": st.binary(max_size=50).map(b64) | _text},
                optional={"content_type": st.sampled_from(["application/pdf", "text/plain", "message/rfc822"]) | _text},
            ),
            max_size=2,
        ),
        "raw": st.binary(max_size=200).map(b64) | _text,
        "mail_from": _address,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_body)
def test_no_body_is_a_server_error(relay_in_thread: str, body: dict[str, Any]) -> None:
    with httpx.Client(base_url=relay_in_thread, headers=AUTH, timeout=20) as client:
        r = client.post("/api/v1/messages", json=body)
    assert r.status_code in (201, 413, 422), (body, r.status_code, r.text)
    if r.status_code == 201:
        assert set(r.json()) == {"id", "message_id"}
