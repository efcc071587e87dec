"""What several test modules share: the tiny model configs and the fixtures.

Tests build models from these instead of restating them, so "tiny" means one thing; a test
that needs another size says so with an override. Helpers that are plain functions stay
with the tests they belong to until a second module needs them.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from streaming.events import BEHAVIOUR_CODE, SCENARIO_CODE, EventBatch

# Small enough to run every path in milliseconds, large enough for two heads and two layers.
TINY_MODEL = dict(d_model=16, n_heads=2, n_layers=2, dropout=0.0, max_len=32)
# Size xs is one block by default; ASTRO's tests want its blocks (and a temperature network),
# so they ask for the default partition of sizes s and up.
ASTRO_BLOCKS = dict(tau_hidden=8, partition="behaviour")
TINY_ASTRO = {**TINY_MODEL, **ASTRO_BLOCKS}
TRAINING_LOG_TRACKS = 120  # the catalogue of `synthetic_log`


def synthetic_log(n_users: int = 12, n_requests: int = 240, slate: int = 6, days: int = 3, seed: int = 0) -> EventBatch:
    """Requests over `days`, each followed by reactions; users like tracks of their own
    "taste" (track % 4 == user % 4) so that a model has something to learn."""
    from ranker.training.data import DAY_MS  # imports torch: only the tests that train pay for it

    rng = np.random.default_rng(seed)
    cols: dict[str, list[int]] = {k: [] for k in ("ts", "user_id", "track_id", "scenario", "behaviour", "request_id", "position")}

    def emit(ts, user, track, scenario, behaviour, request=-1, position=-1):
        for key, value in zip(cols, (ts, user, track, scenario, BEHAVIOUR_CODE[behaviour], request, position)):
            cols[key].append(int(value))

    for request, ts in enumerate(np.sort(rng.integers(0, days * DAY_MS, n_requests))):
        user = int(rng.integers(n_users))
        if rng.random() < 0.3:
            emit(ts, user, rng.integers(TRAINING_LOG_TRACKS), SCENARIO_CODE["library"], "play")
        scenario = int(rng.integers(4))
        tracks = rng.choice(TRAINING_LOG_TRACKS, slate, replace=False)
        for position, track in enumerate(tracks):
            emit(ts, user, track, scenario, "impression", request, position)
        for position, track in enumerate(tracks):
            liked = track % 4 == user % 4
            r = rng.random()
            if r < (0.7 if liked else 0.1):
                emit(ts + 1 + position, user, track, scenario, "full_play", request, position)
                if rng.random() < 0.4:
                    emit(ts + 2 + position, user, track, scenario, "like", request, position)
                if rng.random() < 0.1:
                    emit(ts + 3 + position, user, track, scenario, "share", request, position)
            elif r < 0.8:
                emit(ts + 1 + position, user, track, scenario, "skip", request, position)
            elif r < 0.82:
                emit(ts + 1 + position, user, track, scenario, "dislike", request, position)
    n = len(cols["ts"])
    return EventBatch.from_columns(event_id=np.arange(n), **cols)


def write_log(path, events: EventBatch) -> None:
    frame = events.to_pandas()
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE events AS SELECT * FROM frame")
    con.execute("CREATE TABLE tracks AS SELECT range AS track_id, range % 7 AS artist_id, range % 3 AS genre_id, "
                f"180000 AS duration_ms, 0 AS release_ts FROM range({TRAINING_LOG_TRACKS})")
    con.close()


@pytest.fixture
def client(tmp_path):
    """A fresh Feast store on SQLite, its feature views applied."""
    from features.store import FeatureStoreClient

    store = FeatureStoreClient(tmp_path / "feast")
    store.apply()
    return store
