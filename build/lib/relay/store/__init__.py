"""How the store is done: schema, engines and the writer, statements, and the queue, log and
user operations as functions of a connection; ``relay.logstore`` is its face.

Import rule: only relay.store and relay.logstore import sqlalchemy/alembic; everything else
goes through ``relay.logstore.LogStore``.
"""
