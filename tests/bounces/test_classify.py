"""The bounce classifier: real bounce texts from sisimai's set-of-emails get sisimai's reasons,
the text outranks the code, the hard rule, Relay's own replies, and no input makes it raise."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.bounces.classify import REASONS, RULES, STATUS, Classification, classify, expired

CORPUS = Path(__file__).parent / "corpus" / "sisimai.jsonl"
ROWS: list[dict[str, Any]] = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]


def _param(row: dict[str, Any]) -> Any:
    marks = [pytest.mark.xfail(reason=row["xfail"], strict=True)] if "xfail" in row else []
    return pytest.param(row, id=f"{row['source'].rsplit('/', 1)[-1]}-{row['reason']}", marks=marks)


# -- the corpus -------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", [_param(row) for row in ROWS])
def test_corpus_row_gets_sisimais_reason(row: dict[str, Any]) -> None:
    got = classify(row["code"], row["enhanced"], row["text"], command=row["command"])
    assert (got.reason, got.hard) == (row["reason"], row["hard"]), got.rule


def test_corpus_covers_the_mta_families() -> None:
    families = Counter(row["family"] for row in ROWS)
    assert len(ROWS) >= 60
    for family in ("postfix", "exim", "exchange", "gmail", "yahoo", "qmail", "sendmail"):
        assert families[family] >= 5, family
    assert sum(1 for row in ROWS if "xfail" in row) <= len(ROWS) // 10
    for row in ROWS:
        assert row["reason"] in REASONS
        assert row["source"].startswith("sisimai set-of-emails/")


def test_corpus_rows_still_pass_without_the_command_where_the_text_names_it() -> None:
    # A DSN parser may not know the command; "(in reply to RCPT TO command)" says it.
    text = "host mx.example.jp[192.0.2.1] said: 550 5.1.1 <kijitora@example.jp>: Recipient address rejected: "
    got = classify(None, None, text + "User unknown in local recipient table (in reply to RCPT TO command)")
    assert (got.reason, got.hard) == ("userunknown", True)


# -- the names --------------------------------------------------------------------------------------


def test_reasons_are_exactly_the_33_names() -> None:
    assert REASONS == (
        "userunknown", "hostunknown", "hasmoved", "mailboxfull", "notaccept", "blocked", "spamdetected",
        "policyviolation", "ratelimited", "emailtoolarge", "contenterror", "securityerror", "authfailure",
        "badreputation", "requireptr", "norelaying", "rejected", "filtered", "suspend", "systemerror",
        "systemfull", "networkerror", "failedstarttls", "notcompliantrfc", "mailererror", "syntaxerror",
        "virusdetected", "expired", "onhold", "feedback", "vacation", "suppressed", "undefined",
    )  # fmt: skip
    assert len(set(REASONS)) == 33


def test_every_reason_in_the_tables_is_a_reason() -> None:
    assert {rule.reason for rule in RULES} <= set(REASONS)
    assert set(STATUS.values()) <= set(REASONS)
    for rule in RULES:
        assert rule.phrases or rule.pieces or rule.statuses or rule.codes, rule
        # The text is lower-cased and its whitespace collapsed to single spaces before matching.
        for phrase in rule.phrases + tuple(piece for pieces in rule.pieces for piece in pieces):
            assert phrase == phrase.lower(), phrase
            assert "  " not in phrase, phrase
            assert phrase == phrase.replace("\t", "").replace("\n", ""), phrase


# -- the text outranks the code ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enhanced", "text", "reason"),
    [
        ("5.1.1", "Mailbox is full", "mailboxfull"),
        ("5.1.1", "Relay access denied", "norelaying"),
        ("5.1.1", "Client host rejected: blocked using zen.spamhaus.org", "blocked"),
        ("5.1.1", "This account has been temporarily suspended", "suspend"),
        ("5.1.1", "user@example.com has been replaced by other@example.org", "hasmoved"),
        ("5.2.2", "Message too large", "mailboxfull"),  # mailboxfull comes first, as in sisimai
        ("5.7.1", "Relay access denied", "norelaying"),
        ("5.1.2", "Host or domain name not found", "hostunknown"),
        ("5.7.1", "SPF check: fail", "authfailure"),
    ],
)
def test_the_text_outranks_the_status(enhanced: str, text: str, reason: str) -> None:
    assert classify(550, enhanced, text, command="RCPT").reason == reason


def test_the_status_decides_where_the_text_is_silent() -> None:
    assert classify(550, "5.1.1", "go elsewhere", command="RCPT").reason == "userunknown"
    assert classify(552, "5.2.2", "no", command="RCPT").reason == "mailboxfull"
    assert classify(550, "5.7.1", "no", command="RCPT").reason == "securityerror"
    assert classify(554, "5.6.9", "no").reason == "contenterror"  # x.6.x not in the table
    assert classify(554, "5.7.99", "no").reason == "securityerror"  # x.7.x not in the table
    assert classify(501, "5.0.0", "no").reason == "syntaxerror"  # x.0.0 says nothing; 501 does
    assert classify(550, "5.0.0", "no").reason == "onhold"
    assert classify(None, None, "").reason == "undefined"


def test_codes_are_read_from_the_text_when_not_given() -> None:
    got = classify(None, None, "550 5.1.1 <x@example.com>: Recipient address rejected: User unknown", command="RCPT")
    assert (got.reason, got.hard) == ("userunknown", True)
    assert classify(None, None, "smtp; 552 5.2.2 over the limit").reason == "mailboxfull"
    assert classify(None, None, "said: 552-5.2.2 over the limit").rule == "status 5.2.2"
    assert classify(None, None, "host 192.0.2.4.5.1 said no").reason == "onhold"  # an address is no status


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "command", "reason"),
    [
        (421, "4.7.0", "Try again later, closing connection. (EHLO) a1-20020a.10 - gsmtp", "EHLO", "blocked"),
        (452, "4.2.2", "The email account that you tried to reach is over quota.", "RCPT", "mailboxfull"),
        (451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77714)", "RCPT", "systemerror"),
        (451, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
         "MAIL", "badreputation"),
        (550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281)", "RCPT", "userunknown"),
        (421, "4.7.0", "Too many concurrent SMTP connections; please try again later.", None, "ratelimited"),
    ],
)  # fmt: skip
def test_provider_texts(code: int, enhanced: str, text: str, command: str | None, reason: str) -> None:
    # Texts from sisimai's Google and Microsoft modules, as a direct delivery sees them.
    assert classify(code, enhanced, text, command=command).reason == reason


# -- hard and soft ----------------------------------------------------------------------------------


def test_hard_only_for_a_dead_address() -> None:
    assert classify(550, "5.1.1", "User unknown", command="RCPT").hard
    assert classify(550, "5.1.2", "Host or domain name not found").hard
    assert classify(550, "5.1.6", "moved").hard
    assert classify(556, "5.1.10", "example.com does not accept mail (nullMX)").hard
    assert not classify(450, "4.3.2", "System not accepting network messages").hard  # notaccept, 4xx
    assert classify(450, "4.3.2", "System not accepting network messages").reason == "notaccept"
    assert classify(521, None, "no mail here").reason == "notaccept"
    assert classify(521, None, "no mail here").hard
    for code, enhanced in ((550, "5.7.1"), (554, None), (421, "4.7.0")):
        got = classify(code, enhanced, "Client host rejected: blocked using zen.spamhaus.org")
        assert (got.reason, got.hard) == ("blocked", False)
    assert not classify(552, "5.2.2", "Mailbox full").hard


def test_user_unknown_after_data_is_a_filter_and_soft() -> None:
    got = classify(550, "5.0.0", "Unknown user kijitora@example.net", command="DATA")
    assert (got.reason, got.hard) == ("filtered", False)


# -- the rule says what matched ---------------------------------------------------------------------


def test_rule_names_the_matched_text() -> None:
    assert classify(550, "5.1.1", "Mailbox is full", command="RCPT").rule == 'mailboxfull: "mailbox is full"'
    assert classify(550, "5.1.1", "go elsewhere", command="RCPT").rule == "status 5.1.1"
    assert classify(525, None, "go elsewhere").rule == "code 525"
    assert classify(503, None, "bad sequence").rule == "code 503"
    assert classify(421, None, "closing").rule == "no rule matched"
    pieces = classify(550, None, "The domain example.net is blacklisted")
    assert pieces.rule == 'blocked: "the domain ... is blacklisted"'


def test_details_are_a_plain_dict() -> None:
    got = classify(550, "5.1.1", "User unknown", command="RCPT")
    assert got.details() == {"reason": "userunknown", "hard": True, "rule": 'userunknown: "user unknown"'}
    json.dumps(got.details())


def test_expired() -> None:
    assert expired() == Classification("expired", False, "max_age")
    assert expired("queued for 5d").details() == {"reason": "expired", "hard": False, "rule": "max_age: queued for 5d"}


# -- Relay's own replies ----------------------------------------------------------------------------

MX = "mx.example.com [192.0.2.1]:25"


@pytest.mark.parametrize(
    ("enhanced", "text", "reason", "hard"),
    [
        # relay/mx.py
        ("5.1.10", "example.com does not accept mail (null MX)", "notaccept", True),
        ("5.1.2", "Host or domain name not found: nx.example.com (NXDOMAIN)", "hostunknown", True),
        ("5.1.2", "Bad domain name: a..b", "hostunknown", True),
        ("4.4.3", "DNS lookup of example.com MX failed: SERVFAIL", "networkerror", False),
        ("4.4.3", "DNS lookup of example.com MX timed out", "networkerror", False),
        ("4.4.3", "DNS lookup of example.com A failed: OSError", "networkerror", False),
        # relay/transport.py
        ("4.4.1", "no usable address for example.com", "networkerror", False),
        ("5.4.6", "mail for example.com loops back to myself", "systemerror", False),
        ("4.4.3", "route host smtp.example.net has no address", "networkerror", False),
        ("5.1.2", "example.com has no MX and no address records", "hostunknown", True),
        ("4.4.3", "no address for the mail exchangers of example.com", "networkerror", False),
        ("4.7.4", "TLS is required, but the server did not offer STARTTLS", "failedstarttls", False),
        ("4.7.0", "refusing to send credentials without TLS", "securityerror", False),
        ("4.7.0", f"{MX} offers no AUTH PLAIN or LOGIN", "securityerror", False),
        ("5.6.7", "SMTPUTF8 is required, but was not offered by the server", "contenterror", False),
        ("4.5.0", f"{MX} sent a malformed reply: HTTP/1.1 400 Bad Request", "networkerror", False),
        ("4.7.8", f"{MX} refused our credentials: 535 5.7.8 Error: authentication failed", "securityerror", False),
        ("4.4.1", f"connection to {MX} timed out", "networkerror", False),
        ("4.4.1", f"connection to {MX} failed: Connection refused", "networkerror", False),
        ("4.4.1", f"connection to {MX} failed: No route to host", "networkerror", False),
        ("4.7.5", f"TLS with {MX} failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", "failedstarttls",
         False),
        ("4.4.2", f"{MX} timed out", "networkerror", False),
        ("4.4.2", f"{MX} dropped the connection", "networkerror", False),
        ("4.4.2", f"{MX}: OSError: [Errno 101] Network is unreachable", "networkerror", False),
        # relay/delivery.py
        ("4.4.2", "delivery attempt interrupted: Relay is shutting down", "systemerror", False),
        ("4.3.0", "could not read the message from the store", "systemerror", False),
        ("4.3.0", "Relay failed during the attempt (ValueError)", "systemerror", False),
        ("5.3.0", "message body missing from the store", "systemerror", False),
        ("4.4.7", "delivery attempt gave up after 300s", "systemerror", False),
    ],
)  # fmt: skip
def test_relays_own_replies(enhanced: str, text: str, reason: str, hard: bool) -> None:
    got = classify(None, enhanced, text)
    assert (got.reason, got.hard) == (reason, hard), got.rule


def test_a_servers_words_relayed_by_relay_keep_their_reason() -> None:
    said = f"{MX} said: 5.7.1 Service unavailable; Client host [192.0.2.9] blocked using zen.spamhaus.org"
    got = classify(550, None, said)
    assert got.reason == "blocked"
    got = classify(421, None, f"{MX} greeted with: 421 4.7.0 Try again later, too many connections")
    assert got.reason == "ratelimited"


# -- hostile input ----------------------------------------------------------------------------------


@given(
    st.one_of(st.none(), st.integers(-(2**70), 2**70)),
    st.one_of(st.none(), st.text(max_size=12), st.from_regex(r"\A[245]\.\d{1,3}\.\d{1,3}\Z")),
    st.text(max_size=600),
    st.one_of(st.none(), st.sampled_from(["MAIL", "RCPT", "DATA", "rcpt", "EHLO", ""]), st.text(max_size=8)),
)
@settings(max_examples=400, deadline=None)
def test_never_raises(code: int | None, enhanced: str | None, text: str, command: str | None) -> None:
    got = classify(code, enhanced, text, command=command)
    assert got.reason in REASONS
    assert isinstance(got.hard, bool)
    assert got.rule
    assert got.rule != "classifier error"  # nothing was caught: it did not raise inside either


@given(st.lists(st.sampled_from([p for rule in RULES for p in rule.phrases] + ["550", "5.1.1", " ", "<"]), max_size=30))
@settings(max_examples=200, deadline=None)
def test_never_raises_on_phrase_soup(parts: list[str]) -> None:
    got = classify(None, None, " ".join(parts))
    assert got.reason in REASONS
    assert got.rule != "classifier error"


def test_wrong_types_do_not_raise() -> None:
    got = classify("550", 5.11, None, command=7)  # type: ignore[arg-type]
    assert (got.reason, got.rule) == ("undefined", "no code and no text")
    assert classify(True, "5.1.1", "User unknown", command="RCPT").reason == "userunknown"  # type: ignore[arg-type]


@pytest.mark.parametrize("unit", ["x", "bad ", "user ", "550 5.1.1 ", "<a@b> ", "\x00\u202e", "mailbox "])
def test_two_megabytes_of_text_is_fine(unit: str) -> None:
    got = classify(550, None, unit * (2_000_000 // len(unit)))
    assert got.reason in REASONS
    assert got.rule != "classifier error"
