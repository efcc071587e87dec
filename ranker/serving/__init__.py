"""Serving: the per-user KV cache, a trained model as a ranker arm, the micro-batching
scoring service and its HTTP app."""
