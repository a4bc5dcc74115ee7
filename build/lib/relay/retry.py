"""The retry policy: what an attempt's reply means for a recipient.

A pure value (``RetryPolicy``), no I/O: given the reply, the attempt number and the times, it
decides (``Decision``) whether the recipient is delivered, bounced, expired, or deferred until when.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.errors import Reply
from relay.model import BOUNCED, DEFERRED, DELIVERED, EXPIRED, EventType


@dataclass(frozen=True, slots=True)
class Decision:
    status: EventType  # delivered | deferred | bounced | expired
    next_attempt_at: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """What an attempt's reply means for a recipient.

    2xx: delivered. 5xx: bounced. Anything else is temporary: retry after the schedule step
    for this attempt (the last step repeats), but never later than received_at + max_age;
    an attempt that fails at or after that moment expires the recipient."""

    schedule: tuple[float, ...]
    max_age: float

    def decide(self, reply: Reply, *, attempt: int, received_at: float, now: float) -> Decision:
        if reply.ok:
            return Decision(DELIVERED)
        if reply.permanent:
            return Decision(BOUNCED)
        deadline = received_at + self.max_age
        if now >= deadline:
            return Decision(EXPIRED)
        delay = self.schedule[min(attempt, len(self.schedule)) - 1]
        return Decision(DEFERRED, min(now + delay, deadline))
