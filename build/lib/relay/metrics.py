"""Prometheus metrics: the names dashboards and alert rules rely on (the only prometheus_client
import). Counters and histograms are updated where things happen; the queue gauges are read
from the store at scrape time, so they are exact and the same whichever process answers.

With ``serve --processes N`` the parent sets PROMETHEUS_MULTIPROC_DIR before the workers
start; each worker writes its own values there and ``/metrics`` merges them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from relay.model import ACTIVE_STATES, CASE_STATES, QueueSummary

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

SESSIONS = Gauge("relay_smtp_sessions_active", "SMTP sessions open now", multiprocess_mode="livesum")
RECEIVED = Counter("relay_smtp_messages_received", "Messages accepted (250 after the commit)")
REJECTIONS = Counter("relay_smtp_rejections", "SMTP replies that refused something, by reason", ["reason"])
ATTEMPTS = Counter("relay_delivery_attempts", "Delivery attempts per recipient, by result", ["result"])
FINAL = Counter("relay_recipients_final", "Recipients that reached a final state", ["status"])
ATTEMPT_SECONDS = Histogram(
    "relay_delivery_attempt_duration_seconds",
    "One SMTP transaction (DNS, connection and all), in seconds",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
ACCEPT_TO_DELIVERY = Histogram(
    "relay_accept_to_delivery_seconds",
    "From the 250 at intake to the remote server's 250, in seconds",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400),
)
TRACKING = Counter("relay_tracking_events", "Opens and clicks recorded", ["type", "machine"])
TRACKING_COALESCED = Counter(
    "relay_tracking_hits_coalesced", "Tracking hits that repeated a recent one (same token, IP, User-Agent): not logged"
)

BOUNCES = Counter(
    "relay_bounces",
    "Bounces by kind (sync: refused in the SMTP transaction; async: a report after delivery) and reason",
    ["kind", "reason"],
)  # fmt: skip
COMPLAINTS = Counter("relay_complaints", "Spam complaints (ARF reports) matched to a recipient")
SUPPRESSED = Counter(
    "relay_suppressed", "Recipients not attempted: their address is suppressed, by the entry's reason", ["reason"]
)
BOUNCE_REPORTS = Counter("relay_bounce_reports", "Reports that came to the bounce listener, by result", ["result"])
WEBHOOK_DELIVERIES = Counter(
    "relay_webhook_deliveries",
    "Webhook deliveries that ended an attempt: delivered, failed (for good), disabled (the endpoint answered 410)",
    ["result"],
)
CASE_TIME_TO_CONFIRMATION = Histogram(
    "relay_case_time_to_confirmation_seconds",
    "Cases confirmed automatically: from the case's opening to the last delivery of what it retried or resent",
    buckets=(60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400),
)

REJECTION_REASONS: Final = (
    "auth_required", "auth_failed", "tls_required", "message_size", "too_many_recipients", "bad_address",
    "bad_sequence", "bad_content", "bad_command", "temporary_failure", "shutdown", "other",
    "too_many_connections", "too_many_commands", "too_many_hops", "policy",
)  # fmt: skip

for _result in ("delivered", "deferred", "bounced"):
    ATTEMPTS.labels(_result)
for _status in ("delivered", "bounced", "expired", "suppressed"):
    FINAL.labels(_status)
for _kind in ("open", "click"):
    for _machine in ("true", "false"):
        TRACKING.labels(_kind, _machine)
for _reason in REJECTION_REASONS:
    REJECTIONS.labels(_reason)
for _reason in ("hard_bounce", "complaint", "manual"):
    SUPPRESSED.labels(_reason)
for _result in ("matched", "unmatched", "not_a_bounce"):
    BOUNCE_REPORTS.labels(_result)
_WEBHOOK = {r: WEBHOOK_DELIVERIES.labels(r) for r in ("delivered", "failed", "disabled")}


def webhook_delivery(result: str) -> None:
    """Count a webhook delivery's result: delivered, failed (for good) or disabled (410 Gone)."""
    _WEBHOOK[result].inc()


_RESULT = {"delivered": "delivered", "bounced": "bounced"}  # anything else was a temporary failure
_ATTEMPT = {r: ATTEMPTS.labels(r) for r in ("delivered", "deferred", "bounced")}
_FINAL = {s: FINAL.labels(s) for s in ("delivered", "bounced", "expired", "suppressed")}


def attempt(status: str, since_received: float) -> None:
    """Count one recipient's attempt and, when it ends the recipient, its final state."""
    _ATTEMPT[_RESULT.get(status, "deferred")].inc()
    final = _FINAL.get(status)
    if final is not None:
        final.inc()
    if status == "delivered":
        ACCEPT_TO_DELIVERY.observe(since_received)


def rejection_reason(code: int, enhanced: str | None, text: str) -> str:  # noqa: PLR0911 -- a flat table
    """Which rejection an SMTP reply is, for relay_smtp_rejections_total{reason}."""
    if code == 421:
        for words, reason in (
            ("Too many connections", "too_many_connections"),
            ("Too many commands", "too_many_commands"),
        ):
            if words in text:
                return reason
    by_enhanced = {"5.4.6": "too_many_hops", "5.7.1": "policy"}  # policy: domain literals, the null sender
    if enhanced in by_enhanced:
        return by_enhanced[enhanced]
    by_code = {530: "auth_required", 535: "auth_failed", 538: "tls_required", 552: "message_size",
               452: "too_many_recipients", 503: "bad_sequence", 451: "temporary_failure", 421: "shutdown"}  # fmt: skip
    if code in by_code:
        return by_code[code]
    if enhanced == "5.1.3":
        return "bad_address"
    if (enhanced or "").startswith("5.6.") or "Line too long" in text:
        return "bad_content"
    if code in (500, 501, 502, 504, 555):
        return "bad_command"
    return "other"


@dataclass(frozen=True, slots=True)
class WebhookGauges:
    """The webhook outbox, as read from the store at scrape time."""

    pending: int = 0
    oldest_pending_at: float | None = None  # when the oldest pending delivery was written
    endpoints_disabled: int = 0


class _Queue:
    def __init__(
        self,
        summary: QueueSummary,
        suppression_entries: int,
        webhooks: WebhookGauges,
        cases: Mapping[str, int] | None = None,
    ) -> None:
        self.summary = summary
        self.suppression_entries = suppression_entries
        self.webhooks = webhooks
        self.cases = cases or {}

    def collect(self) -> list[GaugeMetricFamily]:
        states = GaugeMetricFamily("relay_queue_recipients", "Recipients in the queue, by state", labels=["state"])
        for state in ACTIVE_STATES:
            states.add_metric([state], self.summary.counts.get(state, 0))
        oldest = self.summary.oldest_queued_at
        age = GaugeMetricFamily(
            "relay_queue_oldest_age_seconds", "Age of the oldest message with a recipient still in the queue"
        )
        age.add_metric([], 0.0 if oldest is None else max(0.0, time.time() - oldest))
        entries = GaugeMetricFamily("relay_suppression_entries", "Suppression list entries in force")
        entries.add_metric([], self.suppression_entries)
        cases = GaugeMetricFamily("relay_cases", "Support cases, by state", labels=["state"])
        for state in CASE_STATES:
            cases.add_metric([state], self.cases.get(state, 0))
        return [states, age, entries, cases, *self._webhook_gauges()]

    def _webhook_gauges(self) -> list[GaugeMetricFamily]:
        w = self.webhooks
        pending = GaugeMetricFamily("relay_webhook_pending", "Webhook deliveries waiting to be sent (or retried)")
        pending.add_metric([], w.pending)
        oldest = GaugeMetricFamily(
            "relay_webhook_oldest_pending_seconds", "Age of the oldest webhook delivery still pending"
        )
        oldest.add_metric([], 0.0 if w.oldest_pending_at is None else max(0.0, time.time() - w.oldest_pending_at))
        disabled = GaugeMetricFamily(
            "relay_webhook_endpoints_disabled", "Webhook endpoints disabled by a 410 Gone (`relay webhooks enable URL`)"
        )
        disabled.add_metric([], w.endpoints_disabled)
        return [pending, oldest, disabled]


def render(
    queue: QueueSummary,
    suppression_entries: int = 0,
    webhooks: WebhookGauges | None = None,
    cases: Mapping[str, int] | None = None,
) -> bytes:
    """The exposition text: this process's (or all workers') metrics, and the gauges read from
    the store (the queue, the suppression list, the webhook outbox, cases per state)."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    gauges = CollectorRegistry()
    gauges.register(_Queue(queue, suppression_entries, webhooks or WebhookGauges(), cases))
    return generate_latest(registry) + generate_latest(gauges)
