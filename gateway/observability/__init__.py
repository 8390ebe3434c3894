"""Prometheus metrics, OpenTelemetry tracing, JSON logs, the workers' merged scrape."""
