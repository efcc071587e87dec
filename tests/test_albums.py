"""User model 3: albums in the catalogue, album listens in order, continuation within a session."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.config import SimConfig
from simulator.facts import album_in_order_share, stylised_facts
from simulator.platform import MusicPlatform
from simulator.policies import RandomRecommender
from streaming.events import BEHAVIOUR_CODE, EventBatch
from tests.support import log_hash

SMALL = dict(n_users=200, n_tracks=2000, days=2.0, seed=5)


def run(**config) -> tuple[MusicPlatform, EventBatch]:
    batches: list[EventBatch] = []
    platform = MusicPlatform(SimConfig(**config), None, batches.append)
    platform.recommender = RandomRecommender(platform.catalog.metadata(), 1)
    platform.run()
    return platform, EventBatch.concat(batches)


@pytest.fixture(scope="module")
def model_3():
    return run(**SMALL, user_model=3)


@pytest.fixture(scope="module")
def model_2():
    return run(**SMALL, user_model=2)


def test_albums_group_each_artists_back_catalogue_in_release_order():
    config = SimConfig(n_tracks=20_000, user_model=3)
    catalog = MusicPlatform(config, None, lambda batch: None).catalog
    albums, T = catalog.albums, catalog.n_tracks
    # Every track is on exactly one album, numbered 0..size-1, all by one artist.
    sizes = np.bincount(albums.album_id)
    assert (sizes[albums.album_id] == albums.size).all()
    assert np.array_equal(np.sort(albums.order), np.arange(T)) and (albums.order[albums.rank] == np.arange(T)).all()
    by_album = albums.order
    same_album = albums.album_id[by_album[1:]] == albums.album_id[by_album[:-1]]
    assert (albums.track_number[by_album[1:]][same_album] == albums.track_number[by_album[:-1]][same_album] + 1).all()
    assert (catalog.artist_id[by_album[1:]][same_album] == catalog.artist_id[by_album[:-1]][same_album]).all()
    assert (catalog.release_ts[by_album[1:]][same_album] >= catalog.release_ts[by_album[:-1]][same_album]).all()
    # Full albums are 7-18 tracks around 12; only an artist's last release is shorter; new releases are singles.
    new = catalog.release_ts > config.start_ts
    assert (albums.size[new] == 1).all()
    # Back-catalogue album ids run in (artist, release) order: an artist's last album takes what is left.
    back = np.unique(albums.album_id[~new])
    artist_of = np.zeros(len(sizes), np.int64)
    artist_of[albums.album_id] = catalog.artist_id
    last = np.r_[artist_of[back][1:] != artist_of[back][:-1], True]
    drawn = sizes[back][~last]
    assert drawn.min() >= config.album_size_min and drawn.max() <= config.album_size_max
    assert 11 <= np.median(drawn) <= 13
    assert (sizes[back][last] <= config.album_size_max).all() and (sizes[back][last] < config.album_size_min).any()
    # The successor chain walks each album in order and ends at its last track.
    has_next = albums.next_track >= 0
    assert (albums.album_id[albums.next_track[has_next]] == albums.album_id[has_next]).all()
    assert (albums.track_number[~has_next] == albums.size[~has_next] - 1).all()
    metadata = catalog.metadata()
    assert np.array_equal(metadata.album_id, albums.album_id) and np.array_equal(metadata.album_track,
                                                                                 albums.track_number)


def test_model_3_keeps_model_2s_catalogue_and_adds_albums():
    two = MusicPlatform(SimConfig(**SMALL, user_model=2), None, lambda batch: None)
    three = MusicPlatform(SimConfig(**SMALL, user_model=3), None, lambda batch: None)
    assert two.catalog.albums is None and two.catalog.metadata().album_id is None
    assert np.array_equal(two.catalog.latent, three.catalog.latent)
    assert np.array_equal(two.users.taste, three.users.taste)  # albums draw from their own generator


def test_model_3_same_seed_same_log_and_not_model_2s(model_3, model_2):
    _, events = model_3
    assert log_hash(events) == log_hash(run(**SMALL, user_model=3)[1])
    assert log_hash(events) != log_hash(model_2[1])


def test_library_sessions_play_albums_on_in_order(model_3, model_2):
    """Model 3's log has album runs in order; model 2's, read with the same albums, has none to speak of."""
    platform, events = model_3
    metadata = platform.catalog.metadata()
    _, old = model_2
    in_order, by_chance = album_in_order_share(events, metadata), album_in_order_share(old, metadata)
    assert in_order > 0.04 and by_chance < 0.01
    organic = events.select((events.request_id < 0) & (events.behaviour == BEHAVIOUR_CODE["play"]))
    assert album_in_order_share(organic, metadata) > in_order  # album listens happen in library slates
    facts = {fact.name: fact for fact in stylised_facts(events, metadata)}
    assert "album_in_order_share" in facts
    assert "album_in_order_share" not in {fact.name for fact in stylised_facts(old, two_metadata(platform))}


def two_metadata(platform: MusicPlatform):
    from dataclasses import replace

    return replace(platform.catalog.metadata(), album_id=None, album_track=None)


def test_the_oracle_knows_the_next_track_of_the_album_in_progress(model_3):
    platform, _ = model_3
    albums, oracle = platform.catalog.albums, platform.oracle
    track = int(np.flatnonzero(albums.next_track >= 0)[0])
    nxt = int(albums.next_track[track])
    platform.users.album_next[0] = -1
    before = oracle.expected_engagement(0, nxt, 0)
    platform.users.album_next[0] = nxt
    after = oracle.expected_engagement(0, nxt, 0)
    assert after > before
    assert oracle.expected_engagement(0, track, 0) == pytest.approx(oracle.expected_engagement(0, track, 0))


def test_album_sizes_are_checked():
    with pytest.raises(ValueError, match="album_size_min"):
        SimConfig(album_size_min=20, album_size_max=18)


def test_model_3s_recorded_oracle_expects_the_fatigue_met_within_the_slate():
    """Later tracks by an artist already on the slate are worth less to the user; model 3's recorded
    oracle engagement says so (expected over earlier plays), model 2's per-item oracle does not."""
    from simulator.reactions import Slates

    def engagement(user_model: int, same_artist: bool) -> np.ndarray:
        platform = MusicPlatform(SimConfig(**SMALL, user_model=user_model), None, lambda batch: None)
        catalog, reactions = platform.catalog, platform.reactions
        artists, counts = np.unique(catalog.artist_id, return_counts=True)
        artist = artists[np.argmax(counts)]
        by_artist = np.flatnonzero(catalog.artist_id == artist)[::-1][:6]  # newest first: not in album order
        others = np.flatnonzero(catalog.artist_id != artist)[:5]
        tracks = np.r_[by_artist[:1], by_artist[1:] if same_artist else others][None, :]
        reactions.record_engagement = True
        slates = Slates(users=np.array([0]), scenario=np.array([1]), query_genre=np.array([-1]),
                        seed_track=np.array([-1]), request_id=np.array([0]), shown_at=np.array([catalog.release_ts.max()]),
                        slate_index=np.array([0]), tracks=tracks, mask=np.ones(tracks.shape, bool))
        return reactions.react(slates, np.random.default_rng(0)).engagement[0]

    per_item, slate_aware = engagement(2, True), engagement(3, True)  # same world and state, no album order
    assert slate_aware[0] == pytest.approx(per_item[0])  # nothing earlier on the slate
    ratio = slate_aware[1:] / per_item[1:]
    assert (ratio < 1).all() and ratio[-1] < 0.6 and np.all(np.diff(ratio) < 0)  # more repeats, more fatigue
    assert engagement(3, False)[1:] == pytest.approx(engagement(2, False)[1:], rel=0.05)


def test_model_3s_oracle_orders_the_slate_for_the_fatigue_it_causes(model_3):
    """The slate-aware order is worth more to the simulated user, in expectation over the
    examination and plays of the positions above, than the per-item order of the same candidates."""
    from ranker.interface import order_by_score
    from simulator.oracle import sigmoid
    from simulator.reactions import Slates

    platform, _ = model_3
    oracle, reactions, catalog = platform.oracle, platform.reactions, platform.catalog
    rng = np.random.default_rng(3)
    ts = int(catalog.release_ts.max())

    def slate_value(user: int, tracks: np.ndarray, scenario: int) -> float:
        S = len(tracks)
        slates = Slates(users=np.array([user]), scenario=np.array([scenario]), query_genre=np.array([-1]),
                        seed_track=np.array([-1]), request_id=np.array([0]), shown_at=np.array([ts]),
                        slate_index=np.array([0]), tracks=tracks[None, :], mask=np.ones((1, S), bool))
        u, t, continues = np.array([[user]]), tracks[None, :], reactions._album_continues(slates)
        play, full = oracle.logits(u, t, np.array([[scenario]]), np.array([[-1]]), np.array([[-1]]),
                                   oracle.session_fatigue(u, t, continues))
        examine = reactions.examine[scenario, :S]
        reached = examine * sigmoid(play)
        full = full - reactions._slate_fatigue(u, catalog.genre_id[t], catalog.artist_id[t], reached, continues)
        return float((reached * sigmoid(full)).sum())

    gains = []
    for request in range(40):
        user, scenario = int(rng.integers(platform.config.n_users)), int(rng.integers(3))
        # Few artists among the candidates, so a per-item order stacks them on the slate.
        artists = rng.choice(np.unique(catalog.artist_id), 6, replace=False)
        candidates = np.flatnonzero(np.isin(catalog.artist_id, artists))[:60]
        k = platform.config.scenario(["home_feed", "daily_mix", "radio"][scenario]).slate_size
        score, order = oracle.rank(user, candidates, scenario, ts)
        assert sorted(order.tolist()) == list(range(len(candidates))) and order[0] == order_by_score(score)[0]
        gains.append(slate_value(user, candidates[order[:k]], scenario)
                     - slate_value(user, candidates[order_by_score(score)[:k]], scenario))
        oracle.slate_aware = False
        assert np.array_equal(oracle.rank(user, candidates, scenario, ts)[1], order_by_score(score))
        oracle.slate_aware = True
    assert np.mean(gains) > 0 and np.mean(np.array(gains) >= -1e-9) > 0.9
