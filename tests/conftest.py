"""The fixtures several test modules share. Plain helpers (tiny configs, synthetic logs,
property checks) are in tests/support.py; test modules import nothing from each other."""

from __future__ import annotations

import pytest


@pytest.fixture
def client(tmp_path):
    """A fresh Feast store on SQLite, its feature views applied."""
    from features.store import FeatureStoreClient

    store = FeatureStoreClient(tmp_path / "feast")
    store.apply()
    return store
