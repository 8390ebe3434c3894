"""Who goes now: self-protection, deadlines, per-deployment AIMD limit, priority queues, shedding."""
