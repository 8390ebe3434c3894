"""Tenant rate limits, budgets and run budgets, provider quotas, degraded mode and its journal."""
