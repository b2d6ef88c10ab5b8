"""HTTP layer: capability specs (spec, capabilities, with their special parts in attention and sample),
the v1 routes built from them (v1), system routes, dependencies (deps), bodies (io), content negotiation
and the error handlers."""
