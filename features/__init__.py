"""User sequences and track statistics, and the code that reads and writes them in Feast.

The Feast feature repository itself (feature_store.yaml and definitions) is `features/repo/`.
"""
