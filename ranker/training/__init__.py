"""Training: the request log from DuckDB (and the importer), the loop, checkpoints,
offline metrics, and alternate growth and pruning."""
