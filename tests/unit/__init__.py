"""Fast tier: no sockets, no subprocesses, no Redis; time from fake clocks."""
