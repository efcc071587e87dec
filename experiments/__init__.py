"""A/B experiments: user assignment, the DuckDB run record, and metrics per arm."""
