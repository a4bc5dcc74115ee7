# mypy: ignore-errors
"""STUB (replaced by the reports branch)."""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from typing import Literal

ReportKind = Literal["dsn", "arf", "auto_reply", "bounce", "unknown"]


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    action: str | None
    status: str | None
    code: int | None
    diagnostic: str
    final_recipient: str | None
    original_recipient: str | None
    remote_mta: str | None


@dataclass(frozen=True, slots=True)
class Report:
    kind: ReportKind
    recipients: tuple[RecipientStatus, ...]
    reporting_mta: str | None
    subject: str
    feedback_type: str | None
    user_agent: str | None
    source_ip: str | None
    arf_recipient: str | None
    relay_refs: tuple[str, ...]
    original_message_id: str | None
    auto_reply_reason: str | None


def parse(raw: bytes) -> Report:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    kind: ReportKind = "unknown"
    rcpts: list[RecipientStatus] = []
    fb = ua = ip = None

    for part in msg.walk():
        pt = part.get_content_type()
        if pt == "message/delivery-status":
            kind = "dsn"
            payload = part.get_payload()
            blocks = payload[1:] if isinstance(payload, list) else []
            for b in blocks:
                diag = str(b.get("Diagnostic-Code", "")).partition(";")[2].strip()
                code = int(diag[:3]) if diag[:3].isdigit() else None
                rcpts.append(RecipientStatus(
                    str(b.get("Action", "")).lower() or None, b.get("Status"), code, diag,
                    str(b.get("Final-Recipient", "")).partition(";")[2].strip() or None, None,
                    str(b.get("Remote-MTA", "")).partition(";")[2].strip() or None,
                ))  # fmt: skip
        elif pt == "message/feedback-report":
            kind = "arf"
            payload = part.get_payload()
            fields = payload[0] if isinstance(payload, list) and payload else part
            fb = str(fields.get("Feedback-Type", "")).lower() or None
            ua = fields.get("User-Agent")
            ip = fields.get("Source-IP")
    if kind == "unknown" and str(msg.get("Auto-Submitted", "")).lower().startswith("auto-replied"):
        kind = "auto_reply"
    refs = tuple(dict.fromkeys(m.group(1) for m in __import__("re").finditer(rb"X-Relay-Ref:\s*(\S+)", raw)))
    return Report(kind, tuple(rcpts), None, str(msg.get("Subject", "")), fb, ua, ip, None,
                  tuple(r.decode("ascii", "replace") for r in refs), None,
                  "vacation" if kind == "auto_reply" else None)  # fmt: skip
