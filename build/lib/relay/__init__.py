"""Relay: a transactional SMTP relay with a searchable delivery log."""

__version__ = "0.1.0"
