"""Every backend and library the gateway relies on, held to one contract."""
