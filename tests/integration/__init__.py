"""A real gateway (in process or a subprocess) in front of the mock upstream."""
