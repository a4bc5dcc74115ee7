"""relay.cases, the pure rules: what each entry kind must hold, the state machine, and the
incident summary built from messages."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import cases as rules
from relay.errors import Conflict
from relay.model import CASE_STATES, CLOSED_CASE_STATES, ENTRY_KINDS, EventView, MessageView, RecipientView

OPEN_STATES = [s for s in CASE_STATES if s not in CLOSED_CASE_STATES]


@pytest.mark.parametrize(
    ("kind", "details", "expected"),
    [
        ("interaction", {"channel": "phone", "summary": " called "}, {"channel": "phone", "summary": "called"}),
        ("escalation", {"to": "mail team", "why": "MX"}, {"to": "mail team", "why": "MX"}),
        ("resolution", {"summary": "fixed"}, {"summary": "fixed"}),
        ("confirmation", {"how": "by phone"}, {"automatic": False, "how": "by phone"}),
        ("feedback", {"score": 4, "comment": ""}, {"score": 4, "comment": ""}),
        ("feedback", {"score": "5"}, {"score": 5, "comment": ""}),
        ("incident", {"summary": "bounced"}, {"summary": "bounced"}),
        ("action", {"action": "resend", "queue_id": "Q", "new_queue_id": "R", "to": 1}, None),
    ],
)
def test_valid_details(kind: str, details: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert rules.validate(kind, details) == (details if expected is None else expected)


@pytest.mark.parametrize(
    ("kind", "details", "message"),
    [
        ("interaction", {"channel": "fax", "summary": "x"}, "channel must be one of email, phone, chat, internal"),
        ("interaction", {"channel": "email"}, "summary is required"),
        ("interaction", {"channel": "email", "summary": "   "}, "summary is required"),
        ("interaction", {"channel": "email", "summary": "x", "extra": 1}, "has no field extra"),
        ("escalation", {"to": "x" * 201, "why": "y"}, "to is longer than 200"),
        ("resolution", {"summary": "a\x00b"}, "summary cannot contain NUL"),
        ("resolution", {"summary": 12}, "summary must be text"),
        ("resolution", {"summary": "\ud800"}, "summary is not valid Unicode"),
        ("resolution", {"summary": "x" * 4001}, "longer than 4000"),
        ("feedback", {"score": 0}, "score must be a whole number from 1 to 5"),
        ("feedback", {"score": 6}, "from 1 to 5"),
        ("feedback", {"score": True}, "from 1 to 5"),
        ("feedback", {"score": 2.5}, "from 1 to 5"),
        ("feedback", {"score": 3, "comment": "\x00"}, "comment cannot contain NUL"),
        ("action", {"action": "delete_everything"}, "action must be one of"),
        ("action", {"action": "note", "text": "\x00"}, "NUL"),
        ("close", {}, "unknown entry kind"),
    ],
)
def test_invalid_details(kind: str, details: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rules.validate(kind, details)


@given(st.sampled_from(ENTRY_KINDS), st.dictionaries(st.text(max_size=10), st.text(max_size=30) | st.integers()))
def test_validate_only_ever_raises_value_error(kind: str, details: dict[str, Any]) -> None:
    try:
        out = rules.validate(kind, details)
    except ValueError:
        return
    assert all("\x00" not in v for v in out.values() if isinstance(v, str))


def test_transitions() -> None:
    assert rules.after("open", "action") == "action_taken"
    assert rules.after("action_taken", "resolution") == "resolved"
    assert rules.after("resolved", "confirmation") == "confirmed"
    assert rules.after("escalated", "action") == "action_taken"
    assert rules.after("resolved", "action") == "action_taken"
    for state in OPEN_STATES:
        assert rules.after(state, "escalation") == "escalated"
        assert rules.after(state, "interaction") == state
        assert rules.after(state, "incident") == state
        assert rules.after(state, "feedback") == state
        assert rules.close(state) == "closed_unresolved"
    for state in CLOSED_CASE_STATES:
        assert rules.after(state, "feedback") == state
        for kind in ENTRY_KINDS:
            if kind != "feedback":
                with pytest.raises(Conflict, match="only feedback"):
                    rules.after(state, kind)
        with pytest.raises(Conflict):
            rules.close(state)


def test_case_fields() -> None:
    assert rules.case_fields(" T ", "", "sam", ["A", "B", "A"]) == ("T", "", "sam", ["A", "B"])
    with pytest.raises(ValueError, match="queue_ids must be a list"):
        rules.case_fields("t", "", "", "ABC")
    with pytest.raises(ValueError, match="at most 500"):
        rules.case_fields("t", "", "", [f"Q{i}" for i in range(501)])
    with pytest.raises(ValueError, match="a queue id is longer than 32"):
        rules.case_fields("t", "", "", ["Q" * 33])


def _view(qid: str, recipients: list[tuple[str, str, str | None]], events: list[EventView]) -> MessageView:
    return MessageView(
        queue_id=qid, message_id="m@x", mail_from="app@example.com", subject="Invoice", size=10, tags=(), user=None,
        client_ip="127.0.0.1", received_at=1.0,
        recipients=tuple(RecipientView(a, s, 1, None, r) for a, s, r in recipients), events=tuple(events),
    )  # fmt: skip


def test_incident_summary() -> None:
    m1 = _view(
        "Q1",
        [("jane@example.com", "bounced", "550 5.1.1 unknown"), ("joe@example.com", "delivered", "250 ok"),
         ("ann@example.com", "deferred", "451 try later"), ("kim@example.com", "delivered", "250 ok")],
        [EventView(2.0, "bounced", "jane@example.com", {"reason": "userunknown", "rule": "5.1.1"}),
         EventView(3.0, "complained", "kim@example.com", {"reason": "feedback", "rule": "feedback-type: abuse"})],
    )  # fmt: skip
    m2 = _view("Q2", [("bob@example.com", "expired", None)], [])
    assert rules.incident_summary([m1, m2]).splitlines() == [
        "Q1 to jane@example.com: bounced; last response: 550 5.1.1 unknown; reason: userunknown (5.1.1)",
        "Q1 to ann@example.com: deferred; last response: 451 try later",
        "Q1 to kim@example.com: complained; last response: 250 ok; reason: feedback (feedback-type: abuse)",
        "Q2 to bob@example.com: expired",
    ]
    assert rules.incident_summary([_view("Q3", [("a@b", "delivered", "250")], [])]) == ""
    many = [_view(f"Q{i}", [("x" * 100 + "@example.com", "bounced", "550 " + "y" * 300)], []) for i in range(200)]
    assert len(rules.incident_summary(many)) <= rules.MAX_INCIDENT
