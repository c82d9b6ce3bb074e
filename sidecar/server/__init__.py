"""The HTTP face of the sidecar: the route table (``app``), the request pipeline (``pipeline``),
listeners, and the daemon's wiring (``run``). See ``docs/architecture.md``."""
