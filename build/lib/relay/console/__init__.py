"""The support console: server-rendered pages under /ui on the private HTTP listener (never on
``[tracking] listen``). ``relay.console.app.install`` mounts it; ``relay.console.web`` holds what
every page shares (templates, sessions, roles, CSRF); ``pages`` the sign-in, search, message,
held and dashboard pages; ``cases_pages`` the cases, audit and users pages.

Import rule: only this package imports jinja2; it is FastAPI routes like relay.http (which
mounts it), and it reaches data only through LogStore, never SQL."""
