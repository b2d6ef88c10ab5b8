"""HTTP routes, one module per group, plus their dependencies (deps) and body helpers (io)."""
