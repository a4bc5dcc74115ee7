"""The service: one Relay process, or several sharing the listeners.

relay.service wires the parts together; nothing below it imports relay.service (only the
command line, relay.cli, is above it).

    listeners   the sockets and checks of a start, made before the event loop (light)
    lifecycle   startup -> serve -> shutdown of one process: ``Relay``, ``serve``, ``run``
    workers     ``relay serve --processes N``: the parent that forks and supervises N workers
    signals     SIGTERM/SIGINT as a stop, the same for a single process and the parent

This file imports nothing: the ``--processes`` parent imports workers, listeners and signals
and must stay free of the heavy modules that lifecycle brings in.
"""
