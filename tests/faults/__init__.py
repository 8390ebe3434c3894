"""Fault-injection tests: what users see and what is recorded when Redis, the upstream, the
client or a replica misbehaves. docs/reliability.md maps each guarantee to its test here."""
