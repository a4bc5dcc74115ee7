"""Delivery to servers that offer PIPELINING (RFC 2920): MAIL, every RCPT and DATA go in one
write, and the replies are read however the server cuts them. A server that says more than it
was asked never has its extra words taken for a later reply, and a kept connection the server
closed meanwhile is replaced without a deferral, since nothing of the message was sent on it."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import running_relay
from helpers.delivery import attempts, delivery_config, final, status, submit
from helpers.hostile import RawPeer
from helpers.peers import Zone


@dataclass
class PipelinePeer(RawPeer):
    """A raw-socket server that answers the envelope only once it has all of it (so a client
    that waits for each reply never gets one), in pieces of 1-3 bytes."""

    ip: str = "127.0.0.2"
    refuse: set[str] = field(default_factory=set)  # recipients answered 550
    extra_after_data: bytes = b""  # said after the reply to the content
    data_354_always: bool = False  # 354 even when no recipient was accepted
    tired_after: int = 0  # after this many messages, 421 to the next MAIL and close (0: never)
    delivered: list[tuple[str, list[str]]] = field(default_factory=list)
    connections: int = 0
    groups: list[list[str]] = field(default_factory=list)  # the commands answered together

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await self._session(reader, writer)
        writer.close()

    async def _say(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        i = 0
        while i < len(data):
            n = random.randint(1, 3)
            writer.write(data[i : i + n])
            await writer.drain()
            await asyncio.sleep(0)
            i += n

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 pipe.test ESMTP\r\n")
        done = 0
        while line := await reader.readline():
            verb = line[:4].decode().upper()
            if verb == "EHLO":
                writer.write(b"250-pipe.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                return
            elif verb == "RSET":
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == "MAIL":
                group = [line.decode().strip()]
                while not group[-1].upper().startswith("DATA"):
                    group.append((await reader.readline()).decode().strip())
                self.groups.append(group)
                if self.tired_after and done >= self.tired_after:  # its idle timeout, found only now
                    await self._say(writer, b"421 4.4.2 pipe.test idle too long, closing\r\n")
                    return
                rcpts = [c.partition(":")[2].strip("<> ") for c in group[1:-1]]
                ok = [r for r in rcpts if r not in self.refuse]
                replies = b"250 2.1.0 Ok\r\n" + b"".join(
                    b"550 5.1.1 no such user\r\n" if r in self.refuse else b"250 2.1.5 Ok\r\n" for r in rcpts
                )
                go = bool(ok) or self.data_354_always
                await self._say(writer, replies + (b"354 go ahead\r\n" if go else b"554 5.5.1 no valid recipients\r\n"))
                if not go:
                    continue
                await reader.readuntil(b"\r\n.\r\n")
                if not ok:  # content for nobody: a client must never send it
                    self.delivered.append(("<content for nobody>", []))
                    continue
                self.delivered.append((group[0], ok))
                await self._say(writer, b"250 2.0.0 Ok: queued\r\n" + self.extra_after_data)
                done += 1
            else:
                writer.write(b"502 5.5.2 Command not recognized\r\n")
            await writer.drain()


@pytest.fixture
async def pipe(zone: Zone) -> AsyncIterator[PipelinePeer]:
    peer = await PipelinePeer().start()
    zone.a("pipe.example", "127.0.0.2")
    try:
        yield peer
    finally:
        await peer.close()


async def test_the_envelope_goes_in_one_write_and_replies_cut_anywhere_are_read(
    tmp_path: Path, zone: Zone, pipe: PipelinePeer
) -> None:
    pipe.refuse.add("gone@pipe.example")
    async with running_relay(delivery_config(tmp_path, zone, pipe.port), deliver=True) as relay:
        first = await final(relay, await submit(relay, ["jane@pipe.example", "gone@pipe.example"]))
        second = await final(relay, await submit(relay, ["john@pipe.example"]))
    assert status(first) == {"jane@pipe.example": "delivered", "gone@pipe.example": "bounced"}
    assert attempts(first, "gone@pipe.example")[0]["enhanced_code"] == "5.1.1"
    assert status(second) == {"john@pipe.example": "delivered"}
    assert [len(g) for g in pipe.groups] == [4, 3]  # MAIL, the RCPTs and DATA, answered together
    assert pipe.connections == 1  # the connection was kept for the second message
    assert [r for _, r in pipe.delivered] == [["jane@pipe.example"], ["john@pipe.example"]]


async def test_a_reply_nobody_asked_for_is_never_taken_for_a_later_one(
    tmp_path: Path, zone: Zone, pipe: PipelinePeer
) -> None:
    """The extra line would read as "250" to the next MAIL and shift every reply after it: a
    refused recipient would pass for accepted. The connection is dropped instead."""
    pipe.extra_after_data = b"250 2.0.0 and one more thing\r\n"
    pipe.refuse.add("gone@pipe.example")
    async with running_relay(delivery_config(tmp_path, zone, pipe.port), deliver=True) as relay:
        first = await final(relay, await submit(relay, ["jane@pipe.example"]))
        second = await final(relay, await submit(relay, ["gone@pipe.example", "john@pipe.example"]))
    assert status(first) == {"jane@pipe.example": "delivered"}
    assert status(second) == {"gone@pipe.example": "bounced", "john@pipe.example": "delivered"}
    assert pipe.connections == 2
    assert [r for _, r in pipe.delivered] == [["jane@pipe.example"], ["john@pipe.example"]]


async def test_a_kept_connection_the_server_closed_is_replaced_without_a_deferral(
    tmp_path: Path, zone: Zone, pipe: PipelinePeer
) -> None:
    pipe.tired_after = 1
    async with running_relay(delivery_config(tmp_path, zone, pipe.port), deliver=True) as relay:
        msgs = [await final(relay, await submit(relay, [f"u{i}@pipe.example"])) for i in range(3)]
    for i, msg in enumerate(msgs):
        assert status(msg) == {f"u{i}@pipe.example": "delivered"}
        assert len(attempts(msg)) == 1  # no deferral on the way
    assert [r for _, r in pipe.delivered] == [[f"u{i}@pipe.example"] for i in range(3)]
    assert pipe.connections == 3


async def test_content_is_never_sent_when_no_recipient_was_accepted(
    tmp_path: Path, zone: Zone, pipe: PipelinePeer
) -> None:
    """A broken server answers DATA with 354 although it refused every recipient: Relay sends
    nothing (RFC 2920 section 3.1) and the refusals stand."""
    pipe.data_354_always = True
    pipe.refuse.update({"a@pipe.example", "b@pipe.example"})
    async with running_relay(delivery_config(tmp_path, zone, pipe.port), deliver=True) as relay:
        msg = await final(relay, await submit(relay, ["a@pipe.example", "b@pipe.example"]))
        later = await final(relay, await submit(relay, ["c@pipe.example"]))
    assert status(msg) == {"a@pipe.example": "bounced", "b@pipe.example": "bounced"}
    assert status(later) == {"c@pipe.example": "delivered"}
    assert [r for _, r in pipe.delivered] == [["c@pipe.example"]]  # no content for nobody
