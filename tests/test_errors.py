"""An SMTP reply is one value, ``Reply``, whether a server sent it or an exception carries it."""

from __future__ import annotations

import pytest

from relay.errors import DeliveryFailure, InvalidMessage, PermanentFailure, Reply, TemporaryFailure, TooManyHops


def test_an_exception_carries_its_reply_and_prints_the_wire_line() -> None:
    exc = TooManyHops()
    assert exc.reply == Reply(554, "5.4.6", "Too many hops")
    assert str(exc.reply) == str(exc) == "554 5.4.6 Too many hops"
    assert exc.reply.permanent
    assert str(InvalidMessage(554, "5.6.0", "Message is not RFC 5322")) == "554 5.6.0 Message is not RFC 5322"


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        (Reply(250, "2.0.0", "Ok"), "250 2.0.0 Ok"),
        (Reply(421, None, "closing"), "421 closing"),
        (Reply(None, "4.4.1", "connection refused"), "4.4.1 connection refused"),
        (Reply(None, None, "nothing"), "nothing"),
    ],
)
def test_the_wire_line_joins_the_parts_that_are_present(reply: Reply, line: str) -> None:
    assert str(reply) == line


def test_parse_splits_the_enhanced_code_off_and_folds_whitespace() -> None:
    assert Reply.parse(550, "5.1.1  no such\r\n user") == Reply(550, "5.1.1", "no such user")
    assert Reply.parse(250, "ok") == Reply(250, None, "ok")
    assert Reply.parse(250, "2.0.0 ok").ok
    assert not Reply.parse(451, "4.3.0 later").permanent


def test_a_delivery_failure_reply_is_temporary_unless_the_failure_is_permanent() -> None:
    temporary = TemporaryFailure(535, "5.7.8", "refused")
    assert temporary.reply == Reply(535, "5.7.8", "refused", temporary=True)
    assert not temporary.reply.permanent
    assert not temporary.permanent
    assert str(temporary) == "535 5.7.8 refused"
    assert DeliveryFailure(None, "5.0.0", "unknown").reply.temporary
    permanent = PermanentFailure(None, "5.1.10", "null MX")
    assert permanent.reply == Reply(None, "5.1.10", "null MX")
    assert permanent.reply.permanent
