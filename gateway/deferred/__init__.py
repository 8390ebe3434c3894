"""Deferred requests (Prefer: respond-async): service, runner, hold, store and its backends."""
