"""The SimPy music platform: determinism, the event contract, realism, and ground truth."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError

from ranker.interface import SlateRequest
from simulator.config import DAY_MS, SimConfig
from simulator.facts import session_lengths, stylised_facts
from simulator.platform import MusicPlatform, SimSummary
from simulator.policies import OracleRecommender, PopularityRecommender, RandomRecommender
from streaming.events import BEHAVIOUR_CODE, SCENARIO_CODE, EventBatch, validate_batch
from tests.support import log_hash

TINY = dict(n_users=80, n_tracks=800, days=1.0)
SMALL = dict(n_users=300, n_tracks=3000, days=2.0)
PLAY, FULL_PLAY, IMPRESSION = (BEHAVIOUR_CODE[b] for b in ("play", "full_play", "impression"))


class BatchSizes:
    """A random policy that remembers how many requests each call carried."""

    def __init__(self, policy) -> None:
        self.policy, self.sizes = policy, []

    def recommend(self, requests):
        self.sizes.append(len(requests))
        return self.policy.recommend(requests)


def simulate(policy: str = "random", seed: int = 3, **sizes) -> tuple[MusicPlatform, EventBatch, SimSummary]:
    batches: list[EventBatch] = []
    platform = MusicPlatform(SimConfig(seed=seed, **(sizes or TINY)), None, batches.append)
    metadata = platform.catalog.metadata()
    if policy == "random":
        platform.recommender = RandomRecommender(metadata, seed)
    elif policy == "oracle":
        platform.recommender = OracleRecommender(platform, n_candidates=100, seed=seed)
    elif policy == "popularity":
        popular = PopularityRecommender(metadata, seed)
        platform.sink = lambda batch: (batches.append(batch), popular.observe(batch))
        platform.recommender = popular
    summary = platform.run()
    return platform, EventBatch.concat(batches), summary


@pytest.fixture(scope="module")
def tiny():
    return simulate()


@pytest.fixture(scope="module")
def small_random():
    return simulate("random", **SMALL)


def test_same_seed_same_log_and_another_seed_differs(tiny):
    _, events, _ = tiny
    assert log_hash(simulate()[1]) == log_hash(events)
    assert log_hash(simulate(seed=4)[1]) != log_hash(events)


def test_events_meet_the_contract_and_come_in_time_order(tiny):
    platform, events, summary = tiny
    good, dead = validate_batch(events)
    assert dead == [] and len(good) == len(events) == summary.events > 1000
    assert np.array_equal(events.event_id, np.arange(len(events)))
    assert (np.diff(events.ts) >= 0).all()
    assert events.ts.min() >= platform.config.start_ts
    assert set(np.unique(events.arm)) == {"control"}
    ended = np.isin(events.behaviour, [BEHAVIOUR_CODE["full_play"], BEHAVIOUR_CODE["skip"]])
    assert (events.play_ms[ended] > 0).all() and (events.play_ms[~ended] == 0).all()
    full = events.behaviour == FULL_PLAY
    assert np.array_equal(events.play_ms[full], platform.catalog.duration_ms[events.track_id[full]])


def test_library_plays_are_organic_and_ranked_slates_are_impressions(tiny):
    _, events, summary = tiny
    library = events.scenario == SCENARIO_CODE["library"]
    assert summary.library_slates > 0 and library.any()
    assert (events.request_id[library] == -1).all() and (events.position[library] == -1).all()
    assert not (library & (events.behaviour == IMPRESSION)).any()
    ranked = ~library
    assert (events.request_id[ranked] >= 0).all() and (events.position[ranked] >= 0).all()
    # every ranked play was shown first: its (request, position) has an impression
    shown = set(zip(events.request_id[ranked & (events.behaviour == IMPRESSION)].tolist(),
                    events.position[ranked & (events.behaviour == IMPRESSION)].tolist()))
    plays = ranked & (events.behaviour == PLAY)
    assert set(zip(events.request_id[plays].tolist(), events.position[plays].tolist())) <= shown


def test_arms_reach_the_events_and_progress_is_reported():
    config = SimConfig(seed=1, **TINY)
    arms = np.where(np.arange(config.n_users) % 2 == 0, "control", "treatment")
    batches, fractions = [], []
    platform = MusicPlatform(config, None, batches.append, arms=arms)
    platform.recommender = RandomRecommender(platform.catalog.metadata(), 1)
    summary = platform.run(progress=fractions.append)
    events = EventBatch.concat(batches)
    assert np.array_equal(events.arm, arms[events.user_id])
    assert len(fractions) >= 20 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert summary.simulated_seconds == 86_400 and len(events) == summary.events
    with pytest.raises(RuntimeError, match="once"):
        platform.run()
    with pytest.raises(ValueError, match="arms"):
        MusicPlatform(config, None, batches.append, arms=arms[:-1])


@pytest.mark.parametrize("policy", ["random", "popularity"])
def test_facts_that_do_not_depend_on_scale_hold_for_a_small_run(policy, small_random):
    """Skips and position bias hold for any policy and size; the whole set at the default size
    under the logging policy is tested in test_returns.py."""
    platform, events, _ = small_random if policy == "random" else simulate(policy, **SMALL)
    facts = {f.name: f for f in stylised_facts(events, platform.catalog.metadata())}
    scale_free = ("skip_within_30s_share", "skip_within_5s_share", "position_bias")
    assert [name for name in scale_free if not facts[name].ok] == [], [(f.name, f.value) for f in facts.values()]


def test_position_bias_favours_the_top_of_the_slate(small_random):
    _, events, _ = small_random
    impressions = events.behaviour == IMPRESSION
    plays = events.behaviour == PLAY
    rate = [(plays & (events.position == k)).sum() / (impressions & (events.position == k)).sum() for k in range(8)]
    assert rate[0] > rate[3] > rate[7]


def test_oracle_ranking_engages_more_than_random():
    rates = {}
    for policy in ("random", "oracle"):
        _, events, _ = simulate(policy, seed=5, n_users=150, n_tracks=2000, days=1.0)
        rates[policy] = (events.behaviour == FULL_PLAY).sum() / (events.behaviour == IMPRESSION).sum()
    assert rates["oracle"] > 1.2 * rates["random"]


def test_requests_are_batched_across_sessions():
    batches = []
    platform = MusicPlatform(SimConfig(seed=2, n_users=400, n_tracks=1000, days=0.5), None, batches.append)
    platform.recommender = recorder = BatchSizes(RandomRecommender(platform.catalog.metadata(), 2))
    summary = platform.run()
    assert summary.recommend_calls == len(recorder.sizes) and sum(recorder.sizes) == summary.requests
    assert np.mean(recorder.sizes) > 1.5


def test_random_policy_never_serves_unreleased_tracks(tiny):
    platform, events, _ = tiny
    metadata = platform.catalog.metadata()
    midway = int(np.median(metadata.release_ts))
    requests = [SlateRequest(i, i, "home_feed", midway, 10) for i in range(50)]
    candidates = RandomRecommender(metadata, seed=0, n_candidates=40).candidates(requests)
    for picked in candidates:
        assert len(picked) == 40 == len(np.unique(picked))
        assert (metadata.release_ts[picked] <= midway).all()
    shown = events.behaviour == IMPRESSION
    assert (metadata.release_ts[events.track_id[shown]] <= events.ts[shown]).all()
    new = metadata.release_ts > platform.config.start_ts
    assert new.any() and np.isin(events.track_id[shown], np.flatnonzero(new)).any()


def test_a_policy_serving_unreleased_tracks_is_refused():
    class IgnoresReleaseDates(RandomRecommender):
        def recommend(self, requests):
            return super().recommend([replace(r, ts=2**62) for r in requests])

    config = SimConfig(seed=1, **TINY, new_release_fraction=0.5)
    platform = MusicPlatform(config, None, lambda batch: None)
    platform.recommender = IgnoresReleaseDates(platform.catalog.metadata(), 1)
    with pytest.raises(ValueError, match="not yet released"):
        platform.run()


@pytest.mark.parametrize("bad_id", [-1, 10**9])
def test_a_policy_serving_ids_outside_the_catalog_is_refused(bad_id):
    class ServesABadId(RandomRecommender):
        def recommend(self, requests):
            responses = super().recommend(requests)
            responses[-1].candidates[responses[-1].order[-1]] = bad_id  # the last shown track of the batch
            return responses

    platform = MusicPlatform(SimConfig(seed=1, **TINY), None, lambda batch: None)
    platform.recommender = ServesABadId(platform.catalog.metadata(), 1)
    with pytest.raises(ValueError, match=rf"got track ids outside \[0, {platform.catalog.n_tracks}\): \[{bad_id}\]"):
        platform.run()


def test_taste_drifts_toward_consumed_tracks():
    config = SimConfig(seed=7, **TINY, taste_walk_per_day=0.0)
    batches = []
    platform = MusicPlatform(config, None, batches.append)
    platform.recommender = RandomRecommender(platform.catalog.metadata(), 7)
    before = platform.users.taste.copy()
    platform.run()
    events = EventBatch.concat(batches)
    full = events.behaviour == FULL_PLAY
    users = np.unique(events.user_id[full])
    consumed = np.zeros_like(before)
    np.add.at(consumed, events.user_id[full], platform.catalog.latent[events.track_id[full]])
    target = consumed[users] / np.linalg.norm(consumed[users], axis=1, keepdims=True)
    closer = np.einsum("ud,ud->u", platform.users.taste[users], target) > np.einsum("ud,ud->u", before[users], target)
    assert closer.mean() > 0.9


def test_oracle_gives_zero_before_release_and_names_bad_ids(tiny):
    platform = tiny[0]
    oracle, release = platform.oracle, platform.catalog.release_ts
    track = int(np.argmax(release))
    users, tracks = np.zeros(2, np.int64), np.array([track, track])
    engagement = oracle.expected_engagement(users, tracks, [0, 0], ts=np.array([release[track] - 1, release[track]]))
    assert engagement[0] == 0.0 and 0 < engagement[1] < 1
    with pytest.raises(ValueError, match="track_ids"):
        oracle.expected_engagement([0], [platform.catalog.n_tracks], [0])
    with pytest.raises(ValueError, match="scenario_codes"):
        oracle.expected_engagement([0], [0], [9])


def test_sessions_split_at_thirty_minutes():
    minute = 60_000
    ts = np.array([0, 10, 20, 60, 61, 0, 200]) * minute
    users = np.array([1, 1, 1, 1, 1, 2, 2])
    events = EventBatch.from_columns(event_id=np.arange(7), ts=ts, user_id=users, track_id=np.zeros(7),
                                     scenario=np.zeros(7), behaviour=np.full(7, PLAY))
    assert sorted(session_lengths(events).tolist()) == [1, 1, 2, 3]


@pytest.mark.parametrize("field, value", [("n_users", 0), ("days", -1), ("new_release_fraction", 2.0),
                                          ("n_artists", 10**9), ("scenario_params", {"moonwalk": {}})])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        SimConfig(**{field: value})


def test_horizon_and_defaults():
    config = SimConfig()
    assert config.artists == config.n_tracks // 10 and config.horizon_ms == 7 * DAY_MS
    assert SimConfig(days=0.5).horizon_ms == DAY_MS // 2


@pytest.mark.parametrize("users_shape, tracks_shape", [((6, 1), (6, 10)), ((), (40,)), ((25,), (25,)),
                                                       ((3, 1, 1), (3, 4, 5)), ((4, 1), (1, 7))])
def test_familiarity_fast_path_equals_the_formula_on_every_broadcast_shape(tiny, users_shape, tracks_shape):
    """Oracle.familiarity computes weights for matches only; the formula weighs every slot."""
    from simulator.oracle import FAMILIAR_SLOTS

    platform = tiny[0]
    oracle, users, config = platform.oracle, platform.users, platform.config
    rng = np.random.default_rng(5)
    user_ids = np.asarray(rng.integers(config.n_users, size=users_shape))
    track_ids = rng.integers(config.n_tracks, size=tracks_shape)
    loved = users.library[user_ids.reshape(-1)[0]]
    flat = track_ids.reshape(-1)  # a view: half the tracks become the first user's loves
    flat[::2] = rng.choice(loved[loved >= 0], len(flat[::2]))
    rows = user_ids[..., None]
    slots = (users.library_next[rows] - (1 + np.arange(FAMILIAR_SLOTS))) % users.library.shape[1]
    weight = np.exp(-np.maximum((users.now_ms - users.library_ms[rows, slots]) / DAY_MS, 0.0)
                    / config.repeat_memory_days)
    expected = np.where(track_ids[..., None] == users.library[rows, slots], weight, 0.0).max(axis=-1)
    got = oracle.familiarity(user_ids, track_ids)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert (expected > 0).any()
