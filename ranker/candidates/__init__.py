"""Candidate generation: the few hundred tracks a ranker scores for each request."""
