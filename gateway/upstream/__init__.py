"""The deployments: pool, one attempt with its timeouts, relay, SSE parsing, retry decisions."""
