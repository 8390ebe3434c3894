"""Per-deployment circuit breakers (pybreaker), escalation and fleet-wide sync."""
