"""A SimPy music platform: catalog, users whose tastes drift, sessions that react to rankings."""
