"""Bounces: what comes back after delivery, and what a failure means.

``classify`` (a pure function over one rules table: every bounce and deferral gets a sisimai
reason, hard or soft, and the rule that matched), ``reports`` (reading DSNs, ARF complaints
and auto-replies), ``dsn`` (writing an RFC 3464 DSN for the sender), ``verp`` (the signed
return path), and ``inbound`` (the bounce listener's work: a report to events, states and
suppression entries).
"""
