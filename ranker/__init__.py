"""Ranking: the contract, the baseline ranker, ASTRO and its baselines, and serving."""
