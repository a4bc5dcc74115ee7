"""STUB (replaced by the reports branch)."""

from __future__ import annotations

from email.utils import formatdate, make_msgid


def build_dsn(
    *, hostname: str, queue_id: str, sender: str, recipient: str, status: str, diagnostic: str,
    remote_mta: str | None, arrival: float, at: float, original_headers: bytes, action: str = "failed",
) -> bytes:  # fmt: skip
    b = "b" + queue_id
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>", f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender", f"Date: {formatdate(at)}",
        f"Message-ID: {make_msgid(domain=hostname)}", "Auto-Submitted: auto-replied", "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{b}"', "",
        f"--{b}", "Content-Type: text/plain", "", f"Could not deliver to {recipient}: {diagnostic}", "",
        f"--{b}", "Content-Type: message/delivery-status", "", f"Reporting-MTA: dns; {hostname}",
        f"X-Relay-Queue-ID: {queue_id}", "", f"Final-Recipient: rfc822; {recipient}", f"Action: {action}",
        f"Status: {status}", f"Diagnostic-Code: smtp; {diagnostic}", "",
        f"--{b}", "Content-Type: text/rfc822-headers", "",
    ]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n").encode() + original_headers + f"\r\n--{b}--\r\n".encode()
