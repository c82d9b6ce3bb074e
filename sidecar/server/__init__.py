"""The HTTP face of the sidecar: the route table (``app``), the request pipeline (``pipeline``),
bounded connections (``connections``), and the daemon's wiring (``run``); the sockets and what a
connection proves are :mod:`sidecar.transport`'s. See ``docs/architecture.md``."""
