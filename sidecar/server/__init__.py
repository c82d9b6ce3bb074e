"""The HTTP face of the sidecar: routes, middleware, listeners and the daemon's wiring."""
