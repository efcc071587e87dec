"""What several test modules share: the tiny model configs and the fixtures.

Tests build models from these instead of restating them, so "tiny" means one thing; a test
that needs another size says so with an override. Helpers that are plain functions stay
with the tests they belong to until a second module needs them.
"""

from __future__ import annotations

import pytest

# Small enough to run every path in milliseconds, large enough for two heads and two layers.
TINY_MODEL = dict(d_model=16, n_heads=2, n_layers=2, dropout=0.0, max_len=32)
# Size xs is one block by default; ASTRO's tests want its blocks (and a temperature network),
# so they ask for the default partition of sizes s and up.
ASTRO_BLOCKS = dict(tau_hidden=8, partition="behaviour")
TINY_ASTRO = {**TINY_MODEL, **ASTRO_BLOCKS}


@pytest.fixture
def client(tmp_path):
    """A fresh Feast store on SQLite, its feature views applied."""
    from features.store import FeatureStoreClient

    store = FeatureStoreClient(tmp_path / "feast")
    store.apply()
    return store
