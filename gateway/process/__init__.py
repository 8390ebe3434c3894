"""Serving it: runner and connection guard, lifecycle and drain, reload, worker processes, heap."""
