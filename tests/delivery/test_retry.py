"""The retry policy: a pure decision from a reply, the attempt number and the times."""

from __future__ import annotations

from relay.errors import PermanentFailure, Reply, TemporaryFailure
from relay.retry import RetryPolicy


def test_retry_policy_is_a_pure_decision() -> None:
    policy = RetryPolicy(schedule=(60.0, 300.0), max_age=3600.0)
    temp = Reply(451, "4.3.0", "later")
    assert policy.decide(Reply(250, "2.0.0", "ok"), attempt=1, received_at=0, now=10).status == "delivered"
    assert policy.decide(Reply(550, "5.1.1", "no"), attempt=1, received_at=0, now=10).status == "bounced"
    assert policy.decide(Reply(None, "5.1.2", "nx"), attempt=1, received_at=0, now=10).status == "bounced"
    first = policy.decide(temp, attempt=1, received_at=0, now=10)
    assert (first.status, first.next_attempt_at) == ("deferred", 70.0)
    assert policy.decide(temp, attempt=2, received_at=0, now=100).next_attempt_at == 400.0
    assert policy.decide(temp, attempt=9, received_at=0, now=1000).next_attempt_at == 1300.0  # the last step repeats
    assert policy.decide(temp, attempt=9, received_at=0, now=3500).next_attempt_at == 3600.0  # never past max_age
    assert policy.decide(temp, attempt=10, received_at=0, now=3600).status == "expired"


def test_a_failure_decides_by_its_kind_not_its_code() -> None:
    policy = RetryPolicy(schedule=(60.0,), max_age=3600.0)
    # a smarthost refusing our credentials with 535: our problem, so try again later
    refused = TemporaryFailure(535, "5.7.8", "bad credentials").reply
    assert policy.decide(refused, attempt=1, received_at=0, now=10).status == "deferred"
    nxdomain = PermanentFailure(None, "5.1.2", "Host or domain name not found").reply
    assert policy.decide(nxdomain, attempt=1, received_at=0, now=10).status == "bounced"
