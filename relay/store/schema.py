"""The tables. The migrations in relay/store/migrations create exactly these (a test compares).

``queue_id`` is Relay's id in every table; ``message_id`` is only the Message-ID header.
Times are seconds since the epoch (UTC) in float columns named ``*_at``.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite wants INTEGER for rowid aliases
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("queue_id", sa.String(32), primary_key=True),  # the queue id (ULID)
    sa.Column("message_id", sa.Text, nullable=False),  # the Message-ID header, without <>
    sa.Column("mail_from", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("tags", _Json, nullable=False),
    sa.Column("username", sa.Text),
    sa.Column("client_ip", sa.Text, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("track", sa.String(16), nullable=False, server_default=""),
    sa.Index("ix_messages_message_id", "message_id"),
    sa.Index("ix_messages_received_at", "received_at"),
    sa.Index("ix_messages_mail_from_lower", sa.func.lower(sa.text("mail_from"))),  # search: from:
    sa.Index("ix_messages_username", "username"),  # search: user:
)

bodies = sa.Table(
    "bodies",
    metadata,
    sa.Column("queue_id", sa.String(32), sa.ForeignKey("messages.queue_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

message_tags = sa.Table(
    "message_tags",
    metadata,
    sa.Column("queue_id", sa.String(32), sa.ForeignKey("messages.queue_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Index("ix_message_tags_tag", "tag"),
)

recipients = sa.Table(
    "recipients",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("queue_id", sa.String(32), sa.ForeignKey("messages.queue_id", ondelete="CASCADE"), nullable=False),
    sa.Column("address", sa.Text, nullable=False),
    sa.Column("domain", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float),  # due time; the lease expiry while sending; NULL when final
    sa.Column("lease_owner", sa.Text),
    sa.Column("last_response", sa.Text),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_recipients_queue_id", "queue_id"),
    sa.Index("ix_recipients_next_attempt_at", "next_attempt_at"),
    sa.Index("ix_recipients_status", "status"),
    sa.Index("ix_recipients_address_lower", sa.func.lower(sa.text("address"))),
    sa.Index("ix_recipients_domain", "domain"),  # search: domain:
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("queue_id", sa.String(32), sa.ForeignKey("messages.queue_id", ondelete="CASCADE"), nullable=False),
    sa.Column("recipient", sa.Text),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("details", _Json, nullable=False),
    sa.Index("ix_events_queue_id", "queue_id"),
    sa.Index("ix_events_type_at", "type", "at"),
)

LINK_CHUNK = 256  # links per link_chunks row: link ordinal n is urls[n % 256] of chunk n // 256

link_chunks = sa.Table(
    "link_chunks",
    metadata,
    sa.Column("queue_id", sa.String(32), sa.ForeignKey("messages.queue_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("urls", sa.JSON, nullable=False),  # a JSON array of up to LINK_CHUNK URLs, in ordinal order
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # smtp: sends mail (SMTP AUTH), cannot sign in; viewer | support | admin: the console, cannot send
    sa.Column("role", sa.String(16), nullable=False, server_default="smtp"),
)

# -- bounces and suppression

# Addresses Relay will not send to. ``address`` is lower case: a mailbox, or "*@domain" for a
# whole domain. An entry past ``expires_at`` counts as absent (and is replaced by a new one).
suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("address", sa.Text, primary_key=True),
    sa.Column("reason", sa.String(16), nullable=False),  # hard_bounce | complaint | manual
    sa.Column("origin", sa.String(16), nullable=False),  # bounce | complaint | api | cli
    sa.Column("source_queue_id", sa.String(32)),  # the message that caused it; no key: it may be purged
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Index("ix_suppressions_reason", "reason"),
    sa.Index("ix_suppressions_created_at", "created_at"),  # the list is read newest first
)

# Every addition and removal of a suppression entry: who, when, why. Append-only.
suppression_audit = sa.Table(
    "suppression_audit",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("address", sa.Text, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # added | removed
    sa.Column("reason", sa.Text, nullable=False),  # the entry's reason when added; why, when removed
    sa.Column("origin", sa.String(16), nullable=False),  # bounce | complaint | api | cli
    sa.Column("actor", sa.Text, nullable=False),  # who: "delivery", "bounces", an API token's label, a CLI user
    sa.Column("source_queue_id", sa.String(32)),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Index("ix_suppression_audit_address", "address"),
)

# Reports that came to the bounce listener (DSNs, ARF complaints, auto-replies), raw, capped
# at [bounces] max_message_size; an event's details name one by ``report_id``.
bounce_reports = sa.Table(
    "bounce_reports",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("queue_id", sa.String(32), sa.ForeignKey("messages.queue_id", ondelete="CASCADE")),
    sa.Column("recipient", sa.Text),
    sa.Column("kind", sa.String(16), nullable=False),  # dsn | arf | auto_reply | bounce | unknown
    sa.Column("result", sa.String(16), nullable=False),  # matched | unmatched | not_a_bounce
    sa.Column("mail_from", sa.Text, nullable=False),
    sa.Column("client_ip", sa.Text, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Index("ix_bounce_reports_queue_id", "queue_id"),
    sa.Index("ix_bounce_reports_received_at", "received_at"),
)

# -- sending over HTTP

# Idempotency-Key of POST /api/v1/messages: a retried request gets the first answer instead of
# sending twice. Written in the transaction that stores the message; scoped to the caller.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("caller", sa.Text, primary_key=True),  # the API token's fingerprint ("api:...")
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),  # SHA-256 of the request body
    sa.Column("queue_id", sa.String(32), nullable=False),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_idempotency_keys_created_at", "created_at"),
)

# -- webhooks

# The transactional outbox: one row per (event, endpoint), written in the transaction of the
# event it reports; the dispatcher leases due rows (like recipients) and sends ``body`` as
# stored, byte for byte (the signature is over those bytes).
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("webhook_id", sa.String(40), nullable=False),  # the webhook-id header: "msg_" + ULID, per event
    sa.Column("url", sa.Text, nullable=False),  # the endpoint
    sa.Column("type", sa.String(32), nullable=False),  # message.delivered, suppression.created, ...
    sa.Column("event_at", sa.Float, nullable=False),  # when the event happened
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | delivered | failed
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float),  # due time; the lease expiry while sending; NULL when final
    sa.Column("lease_owner", sa.Text),
    sa.Column("last_status", sa.Integer),  # the receiver's HTTP status, if it answered
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("queue_id", sa.String(32)),  # the message a message.* event is about (its page lists them)
    sa.Index("ix_webhook_deliveries_next_attempt_at", "next_attempt_at"),
    sa.Index("ix_webhook_deliveries_queue_id", "queue_id"),
    sa.Index("ix_webhook_deliveries_due", "status", "url", "next_attempt_at"),  # the claim, in due order
    sa.Index("ix_webhook_deliveries_updated_at", "updated_at"),  # retention
)

# Endpoints that answered 410 Gone: nothing is sent to them until `relay webhooks enable URL`.
webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("url", sa.Text, primary_key=True),
    sa.Column("disabled_at", sa.Float),
    sa.Column("disabled_reason", sa.Text, nullable=False, server_default=""),
)

# -- the console

# Signed-in console users. ``id`` is the SHA-256 of the session token (the cookie holds the
# token, HMAC-signed): the table alone cannot be replayed as cookies.
console_sessions = sa.Table(
    "console_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("username", sa.Text, nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),  # the token every form of this session carries
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("seen_at", sa.Float, nullable=False),  # idle expiry: [console] session_idle after this
    sa.Column("ip", sa.Text, nullable=False),
    sa.Index("ix_console_sessions_username", "username"),
)

# Cases: one or more messages, a customer reference, an owner and an append-only trail.
cases = sa.Table(
    "cases",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("customer_ref", sa.Text, nullable=False, server_default=""),  # the ticket id
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    sa.Column("state", sa.String(20), nullable=False),  # model.CASE_STATES
    sa.Column("opened_by", sa.Text, nullable=False),
    sa.Column("opened_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("closed_reason", sa.Text, nullable=False, server_default=""),
    sa.Index("ix_cases_state", "state"),
    sa.Index("ix_cases_opened_at", "opened_at"),
)

# The messages a case covers. No key to messages: a case outlives nothing it links (retention
# keeps messages of open cases), and the link must not vanish with a purge of closed ones.
case_messages = sa.Table(
    "case_messages",
    metadata,
    sa.Column("case_id", _BigId, sa.ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("queue_id", sa.String(32), primary_key=True),
    sa.Index("ix_case_messages_queue_id", "queue_id"),
)

# Recipients a case's actions retried or resent: when every one is delivered, the case is
# confirmed on its own.
case_targets = sa.Table(
    "case_targets",
    metadata,
    sa.Column("case_id", _BigId, sa.ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("recipient_id", _BigId, primary_key=True),
    sa.Column("queue_id", sa.String(32), nullable=False),
    sa.Index("ix_case_targets_recipient_id", "recipient_id"),
)

case_entries = sa.Table(
    "case_entries",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("case_id", _BigId, sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # model.ENTRY_KINDS
    sa.Column("details", _Json, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),  # chained to the previous entry (chain_heads "cases")
    sa.Index("ix_case_entries_case_id", "case_id"),
)

# The access audit: sign-ins, views of bodies, downloads, actions, case entries. Append-only.
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("ip", sa.Text, nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("target", sa.Text, nullable=False, server_default=""),
    sa.Column("details", _Json, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),  # chained to the previous entry (chain_heads "audit")
    sa.Index("ix_audit_log_at", "at"),
)

# The newest link of each hash chain ("audit", "cases"): appending updates this row first, so
# appends serialize (its row lock on PostgreSQL), and a truncated chain shows.
chain_heads = sa.Table(
    "chain_heads",
    metadata,
    sa.Column("name", sa.String(16), primary_key=True),
    sa.Column("last_id", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

# -- several nodes on one store

# Every running Relay process (a node; each worker of `serve --processes` is one): its name is
# the lease owner its deliveries write. A node whose heartbeat is older than 3 [cluster]
# heartbeat intervals is dead: any other node frees its leases at once.
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),  # the lease owner: "host:pid:random"
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),  # its [cluster] heartbeat interval, seconds
    sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),  # SMTP transactions out, now
    sa.Column("stopped_at", sa.Float),  # a clean shutdown; NULL while running (or killed)
    sa.Column("released_at", sa.Float),  # dead: when a live node freed its leases; NULL again once it beats
)
