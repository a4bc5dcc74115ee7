"""Reports that came to the bounce listener: the raw report, and what it does (events, an
async bounce, suppression entries, DSNs to senders), in one transaction.

Functions of a connection, run by the engine's writer or reader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy.engine import Connection

from relay.model import NewReport, ReportDecision, ReportTarget, header_section
from relay.store import statements as q
from relay.store import suppressions
from relay.store.log import NewEvent, append_events
from relay.store.queue import Enqueue, load_bodies
from relay.store.schema import recipients


def record(
    conn: Connection,
    report: NewReport,
    recipient_ids: Sequence[int],
    decide: Callable[[list[ReportTarget]], ReportDecision],
    *,
    with_headers: bool,
) -> tuple[int, ReportDecision]:
    """Read the recipients the report names, let ``decide`` say what the report does, and
    write all of it with the raw report; returns the report's id and the decision."""
    targets: list[ReportTarget] = []
    if recipient_ids:
        stmt = q.REPORT_TARGETS
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update(of=recipients)  # a second report for one recipient waits for this one
        rows = conn.execute(stmt, {"ids": sorted(set(recipient_ids))}).all()
        bodies = load_bodies(conn, {r.queue_id for r in rows}) if with_headers else {}
        targets = [
            ReportTarget(r.id, r.queue_id, r.address, r.status, r.mail_from, float(r.received_at),
                         header_section(bodies[r.queue_id]) if r.queue_id in bodies else None,
                         conn.scalar(q.REPORT_COUNT, {"qid": r.queue_id, "rcpt": r.address}) or 0)
            for r in rows
        ]  # fmt: skip
    decision = decide(targets)
    if not decision.keep:
        return 0, decision
    at = report.received_at
    report_id = int(
        conn.scalar(
            q.INSERT_BOUNCE_REPORT,
            {
                "received_at": at,
                "queue_id": decision.queue_id,
                "recipient": decision.recipient,
                "kind": decision.kind,
                "result": decision.result,
                "mail_from": report.mail_from,
                "client_ip": report.client_ip,
                "size": len(report.raw),
                "data": report.raw,
            },
        )
    )
    if decision.bounce:
        conn.execute(
            q.ASYNC_BOUNCE, [{"rid": rid, "response": response, "at": at} for rid, response in decision.bounce]
        )
    append_events(
        conn,
        [NewEvent(e.queue_id, e.recipient, at, e.type, {**e.details, "report_id": report_id}) for e in decision.events],
    )
    if decision.suppress:
        suppressions.add(conn, decision.suppress, actor="bounces", now=at)
    if decision.notify:
        Enqueue.run_many(conn, [Enqueue(m) for m in decision.notify])
    return report_id, decision


def raw(conn: Connection, report_id: int) -> bytes | None:
    """A stored report, as it came."""
    row = conn.execute(q.BOUNCE_REPORT, {"id": report_id}).first()
    return None if row is None else bytes(row.data)
