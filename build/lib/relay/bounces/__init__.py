"""Bounces: what comes back after delivery, and what a failure means.

``classify`` (a pure function over one rules table: every bounce and deferral gets a sisimai
reason, hard or soft, and the rule that matched), ``reports`` (reading DSNs, ARF complaints
and auto-replies), ``dsn`` (writing an RFC 3464 DSN for the sender), ``verp`` (the signed
return path), and ``inbound`` (the bounce listener's work: a report to events, states and
suppression entries).

Import rule: ``classify``, ``reports``, ``dsn`` and ``verp`` are pure (the standard library,
and flufl.bounce for reading reports), no I/O; ``inbound`` reaches the store only through
``relay.logstore.LogStore``, and SMTP only through ``relay.smtp_in``, which calls it.
"""
