"""Candidate generation, the non-neural rankers and arm routing, on a small hand-made catalog."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.sequence import UserSequence, sequences_from_log
from ranker.baselines import CooccurrenceRanker, PopularityRanker
from ranker.candidates.reference import generate_with_sources_reference, history_profiles_reference, take_reference
from ranker.candidates.generator import (
    DAY_MS,
    SOURCE_CODE,
    SOURCE_LABELS,
    CandidateGenerator,
    TrackPopularity,
    history_profiles,
    popularity_order,
    _Picks,
)
from ranker.interface import (
    RANKING_SCORE, RankRequest, SlateRequest, TrackMetadata, order_by_score, order_rows_by_score,
)
from ranker.recommender import ArmRecommender
from streaming.events import BEHAVIOUR_CODE, SCENARIO_CODE, EventBatch
from tests.support import DictSequenceSource

N_TRACKS, N_ARTISTS, N_GENRES = 400, 40, 4
NOW = 10 * DAY_MS


def catalog() -> TrackMetadata:
    """Artist a owns tracks a*10 .. a*10+9; genre = artist % 4; every 7th track is unreleased."""
    track = np.arange(N_TRACKS)
    release = np.where(track % 7 == 3, NOW + DAY_MS, 0)
    return TrackMetadata(artist_id=track // 10, genre_id=(track // 10) % N_GENRES,
                         duration_ms=np.full(N_TRACKS, 180_000), release_ts=release.astype(np.int64))


def events(users, tracks, behaviour="full_play", start_id=0, ts=NOW - 1000) -> EventBatch:
    n = len(users)
    return EventBatch.from_columns(
        event_id=np.arange(start_id, start_id + n), ts=np.full(n, ts), user_id=users, track_id=tracks,
        scenario=np.full(n, SCENARIO_CODE["home_feed"]), behaviour=np.full(n, BEHAVIOUR_CODE[behaviour]))


def slate(request_id, user_id=0, scenario="home_feed", context=None, ts=NOW, size=10) -> SlateRequest:
    return SlateRequest(request_id, user_id, scenario, ts, size, context or {})


MIXED = [slate(0), slate(1, 1, "daily_mix"), slate(2, 2, "radio", {"seed_track": 55}),
         slate(3, 3, "search", {"query_genre": 2}), slate(4, 4, "search", {"query_genre": 1, "query_artist": 9}),
         slate(5, 5, "library")]


@pytest.fixture
def history() -> DictSequenceSource:
    # user 0 loves artists 5 and 12 (genres 1 and 0); user 1 listened to artist 33
    log = EventBatch.concat([events([0] * 6, [50, 51, 52, 120, 121, 54]), events([1, 1], [330, 331], start_id=100)])
    return DictSequenceSource(sequences_from_log(log))


def test_candidates_are_released_unique_and_full(history):
    meta = catalog()
    generator = CandidateGenerator(meta, seed=1, n_candidates=60, sequences=history)
    generator.observe(events(np.arange(50) % 7, np.arange(50) * 8 % N_TRACKS))
    for request, tracks in zip(MIXED, generator.generate(MIXED)):
        assert tracks.dtype == np.int64
        assert len(np.unique(tracks)) == len(tracks), request
        assert (meta.release_ts[tracks] <= request.ts).all(), request
        if request.scenario not in ("search", "radio"):
            assert len(tracks) == 60  # quotas plus backfill fill every slot


def test_unreleased_tracks_appear_once_released():
    meta = catalog()
    generator = CandidateGenerator(meta, seed=0, n_candidates=350, refresh_ms=0)
    before = np.concatenate(generator.generate([slate(0, ts=NOW)]))
    after = np.concatenate(generator.generate([slate(1, ts=NOW + DAY_MS)]))
    unreleased = np.flatnonzero(meta.release_ts > NOW)
    assert not np.isin(before, unreleased).any()
    assert np.isin(after, unreleased).any()


def test_source_quotas_are_respected(history):
    generator = CandidateGenerator(catalog(), seed=2, n_candidates=100, sequences=history)
    for request, (tracks, sources) in zip(MIXED, generator.generate_with_sources(MIXED)):
        row = generator.quota[SCENARIO_CODE[request.scenario]]
        counts = np.bincount(sources, minlength=len(SOURCE_LABELS))
        assert (counts[: len(row)] <= row).all(), (request, counts, row)
        if request.scenario == "home_feed":
            assert len(tracks) == 100  # what the quotas left empty was backfilled
            assert counts[SOURCE_CODE["random"]] == row[SOURCE_CODE["random"]]  # plenty of random tracks
            assert counts[SOURCE_CODE["recent_artist"]] > 0 and counts[SOURCE_CODE["user_genre"]] > 0


def test_history_sources_follow_the_users_taste(history):
    meta = catalog()
    generator = CandidateGenerator(meta, seed=3, n_candidates=100, sequences=history)
    (tracks, sources), = generator.generate_with_sources([slate(0)])
    recent = tracks[sources == SOURCE_CODE["recent_artist"]]
    assert set(meta.artist_id[recent]) <= {5, 12} and len(recent) > 0
    by_genre = tracks[sources == SOURCE_CODE["user_genre"]]
    assert set(meta.genre_id[by_genre]) <= {1, 0} and len(by_genre) > 0
    profile = history_profiles(history.get_sequences([0, 7]), [0, 7], meta)
    assert profile.distinct_recent_artists(3).tolist() == [[5, 12, -1], [-1, -1, -1]]
    np.testing.assert_allclose(profile.genre_share[0], [2 / 6, 4 / 6, 0, 0])


def test_search_candidates_match_the_query_genre():
    meta = catalog()
    generator = CandidateGenerator(meta, seed=4, n_candidates=50)
    requests = [slate(i, i, "search", {"query_genre": i % N_GENRES}) for i in range(8)]
    for request, tracks in zip(requests, generator.generate(requests)):
        assert len(tracks) > 0
        assert (meta.genre_id[tracks] == request.context["query_genre"]).all()


def test_radio_stays_near_its_seed_and_never_replays_it():
    meta = catalog()
    generator = CandidateGenerator(meta, seed=5, n_candidates=50)
    (tracks, sources), = generator.generate_with_sources([slate(0, scenario="radio", context={"seed_track": 55})])
    assert 55 not in tracks
    assert (meta.artist_id[tracks[sources == SOURCE_CODE["seed_artist"]]] == 5).all()
    assert (meta.genre_id[tracks[sources == SOURCE_CODE["seed_genre"]]] == 1).all()


def test_popularity_is_learned_online_and_decays():
    meta = catalog()
    generator = CandidateGenerator(meta, seed=6, n_candidates=20, refresh_ms=0)
    hits = np.array([40, 40, 40, 41, 41, 42])
    generator.observe(events(np.arange(len(hits)), hits))
    (tracks, sources), = generator.generate_with_sources([slate(0)])
    assert tracks[sources == SOURCE_CODE["popular"]][:3].tolist() == [40, 41, 42]

    popularity = TrackPopularity(N_TRACKS, half_life_ms=DAY_MS)
    popularity.observe(events([0, 1], [7, 7], ts=0))
    assert popularity.at(0)[7] == pytest.approx(2.0)
    assert popularity.at(DAY_MS)[7] == pytest.approx(1.0)
    popularity.observe(events([0], [7], ts=60 * DAY_MS, start_id=5))  # forces a rebase
    assert popularity.at(60 * DAY_MS)[7] == pytest.approx(1.0 + 2.0 * 2.0**-60)


def test_bad_requests_are_named():
    generator = CandidateGenerator(catalog(), seed=0)
    with pytest.raises(ValueError, match="unknown scenario 'moon'"):
        generator.generate([slate(0, scenario="moon")])
    with pytest.raises(ValueError, match=r"search request 7 has no context\['query_genre'\]"):
        generator.generate([slate(7, scenario="search")])
    with pytest.raises(ValueError, match=r"seed_track'\]=9999 is not an id"):
        generator.generate([slate(8, scenario="radio", context={"seed_track": 9999})])
    with pytest.raises(ValueError, match="track_id 400 is not in the catalog"):
        generator.observe(events([0], [400]))
    with pytest.raises(ValueError, match="unknown source"):
        CandidateGenerator(catalog(), quotas={"home_feed": {"magic": 0.5}})
    with pytest.raises(ValueError, match="request 3 candidates: track_id -2"):
        PopularityRanker(catalog()).rank([RankRequest(3, 0, "home_feed", np.array([1, -2]), ts=NOW)])


def rank_request(candidates, user_id=0, request_id=0) -> RankRequest:
    return RankRequest(request_id, user_id, "home_feed", np.asarray(candidates, np.int64), ts=NOW)


def test_cooccurrence_ranks_a_co_listened_artist_above_an_unrelated_one():
    meta = catalog()
    source = DictSequenceSource()
    ranker = CooccurrenceRanker(meta, source)
    # Many users play artist 1 then artist 2 (both genre 1 / 2); artist 3 is played alone.
    users = np.repeat(np.arange(10, 30), 2)
    tracks = np.tile([10, 20], 20)
    log = EventBatch.concat([events(users, tracks), events(np.arange(40, 60), np.full(20, 30), start_id=100)])
    ranker.observe(log)
    # The user just played artist 1. Candidates: artist 2's track and artist 3's (both equally popular).
    source.sequences = sequences_from_log(events([0], [11], start_id=500))
    response, = ranker.rank([rank_request([30, 20])])
    score = response.scores[RANKING_SCORE]
    assert score[1] > score[0]
    assert response.ranked_tracks.tolist() == [20, 30]
    # The popularity ranker alone cannot tell them apart: tie, broken by candidate position.
    baseline, = PopularityRanker(meta).rank([rank_request([30, 20])])
    assert baseline.scores[RANKING_SCORE][0] == baseline.scores[RANKING_SCORE][1]


def test_cooccurrence_pairs_link_across_batches_and_skip_artist_runs():
    ranker = CooccurrenceRanker(catalog(), DictSequenceSource())
    ranker.observe(events([0], [10]))
    ranker.observe(events([0, 0, 0], [20, 21, 22], start_id=1))  # 10 -> 20 pairs; 20 -> 21 -> 22 is one artist
    assert ranker.cooccurrence[1, 2] > 0 and ranker.cooccurrence[2, 1] == ranker.cooccurrence[1, 2]
    assert ranker.cooccurrence[2, 2] == 0
    assert ranker.cooccurrence.sum() == pytest.approx(ranker.degree.sum())


def test_repeating_an_artist_costs_the_later_tracks():
    meta = catalog()
    plays = events(np.arange(9), [60, 60, 60, 60, 61, 61, 61, 70, 70])  # artist 6: 60, 61; artist 7: 70
    plain, diverse = PopularityRanker(meta), CooccurrenceRanker(meta, DictSequenceSource(), w_artist_repeat=0.5)
    for ranker in (plain, diverse):
        ranker.observe(plays)
    assert plain.rank([rank_request([70, 61, 60])])[0].ranked_tracks.tolist() == [60, 61, 70]
    assert diverse.rank([rank_request([70, 61, 60])])[0].ranked_tracks.tolist() == [60, 70, 61]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, N_TRACKS - 1), min_size=1, max_size=30, unique=True), st.randoms())
def test_shuffling_candidates_only_shuffles_scores(candidates, random):
    meta = catalog()
    source = DictSequenceSource(sequences_from_log(events([0, 0, 0], [10, 20, 31])))
    rankers = [PopularityRanker(meta, source), CooccurrenceRanker(meta, source)]
    log = events(np.arange(60) % 9, (np.arange(60) * 37) % N_TRACKS)
    shuffled = list(candidates)
    random.shuffle(shuffled)
    for ranker in rankers:
        ranker.observe(log)
        first, = ranker.rank([rank_request(candidates)])
        second, = ranker.rank([rank_request(shuffled)])
        by_track = dict(zip(candidates, first.scores[RANKING_SCORE]))
        np.testing.assert_allclose(second.scores[RANKING_SCORE], [by_track[t] for t in shuffled], rtol=1e-6)
        assert sorted(first.order.tolist()) == list(range(len(candidates)))


class CountingRanker:
    """A real ranker (popularity) that records the batches it was given."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.version, self.batches = inner, inner.name, inner.version, []

    def rank(self, requests):
        self.batches.append([r.request_id for r in requests])
        return self.inner.rank(requests)


def test_recommender_routes_each_arm_in_one_batch_and_keeps_request_order(history):
    meta = catalog()
    control = CountingRanker(PopularityRanker(meta, history))
    treatment = CountingRanker(CooccurrenceRanker(meta, history))
    arms = np.array(["control", "treatment"] * 3, dtype=object)  # user u -> arms[u]
    logged = []
    recommender = ArmRecommender(CandidateGenerator(meta, seed=0, n_candidates=30, sequences=history),
                                 {"control": control, "treatment": treatment}, arms,
                                 on_response=lambda req, resp, arm: logged.append((req.request_id, arm)))
    responses = recommender.recommend(MIXED)
    assert [r.request_id for r in responses] == [r.request_id for r in MIXED]
    assert control.batches == [[0, 2, 4]] and treatment.batches == [[1, 3, 5]]
    assert [r.model_name for r in responses] == ["popularity", "cooccurrence"] * 3
    assert logged == [(r.request_id, arms[r.user_id]) for r in MIXED]
    with pytest.raises(ValueError, match="user 6 has no experiment arm"):
        recommender.recommend([slate(9, user_id=6)])
    with pytest.raises(ValueError, match="no ranker for arm"):
        ArmRecommender(recommender.candidates, {"control": control}, arms)


def random_slates(rng: np.random.Generator, n: int, ts: int, first_id: int = 0) -> list[SlateRequest]:
    """A mixed batch: every scenario, search with and without an artist, users repeated."""
    out = []
    for i in range(n):
        scenario = ["home_feed", "daily_mix", "radio", "search", "library"][int(rng.integers(5))]
        context = {}
        if scenario == "radio":
            context = {"seed_track": int(rng.integers(N_TRACKS))}
        elif scenario == "search":
            context = {"query_genre": int(rng.integers(N_GENRES))}
            if rng.random() < 0.5:
                context["query_artist"] = int(rng.integers(N_ARTISTS))
        out.append(slate(first_id + i, int(rng.integers(8)), scenario, context,
                         ts=ts + int(rng.integers(0, 60_000))))
    return out


@pytest.mark.parametrize("quotas", [None, {"home_feed": {"random": 0.1, "popular": 0.3, "seed_genre": 0.2},
                                           "search": {"query_genre_random": 0.6}}])
def test_batched_candidate_generation_matches_the_one_source_at_a_time_reference(quotas):
    """The stage-merged generator is an optimisation: same tracks, sources and random draws."""
    plain = catalog()  # releases spread over the requests' times, so some batches need the release check
    release = np.where(np.arange(N_TRACKS) % 7 == 3, NOW + (np.arange(N_TRACKS) % 11) * 20_000, 0)
    meta = TrackMetadata(plain.artist_id, plain.genre_id, plain.duration_ms, release.astype(np.int64))
    rng = np.random.default_rng(11)
    log = events(rng.integers(0, 8, 300), rng.integers(0, N_TRACKS, 300),
                 behaviour="full_play", start_id=0, ts=NOW - DAY_MS)
    source = DictSequenceSource(sequences_from_log(log))
    fast, reference = (CandidateGenerator(meta, seed=3, n_candidates=80, sequences=source, quotas=quotas,
                                          refresh_ms=50_000) for _ in range(2))
    for generator in (fast, reference):
        generator.observe(log)
    for step in range(12):  # crosses index rebuilds and the releases of every 7th track
        requests = random_slates(rng, int(rng.integers(1, 12)), NOW - 40_000 + step * 25_000, first_id=step * 100)
        for (tracks, sources), (expected_tracks, expected_sources) in zip(
                fast.generate_with_sources(requests), generate_with_sources_reference(reference, requests)):
            np.testing.assert_array_equal(tracks, expected_tracks)
            np.testing.assert_array_equal(sources, expected_sources)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), check_release=st.booleans())
def test_compiled_stage_merge_keeps_what_the_reference_take_keeps(seed, check_release):
    """Duplicates, -1 pads, tracks taken before the stage, unreleased tracks and quotas:
    random-draw rows keep a track's first copy only, other rows keep what the reference keeps."""
    rng = np.random.default_rng(seed)
    meta = catalog()
    n_rows, k, n_tracks = 6, 12, 30  # few tracks, so proposals repeat
    generator = CandidateGenerator(meta, n_candidates=40)
    picks = _Picks(n_rows, 40, meta.n_tracks, np.full(n_rows, -1), meta.release_ts if check_release else None)
    picks.taken[:, :n_tracks] = rng.random((n_rows, n_tracks)) < 0.2
    taken_before = picks.taken.copy()
    rows = np.sort(rng.choice(n_rows, 4, replace=False))
    proposed = np.where(rng.random((4, k)) < 0.15, -1, rng.integers(0, n_tracks, (4, k)))
    quota, ts = rng.integers(0, 8, 4), np.full(4, NOW if check_release else NOW + 2 * DAY_MS)
    may_repeat = rng.random(4) < 0.5
    kept = picks.add(rows, proposed, quota, ts, np.full(4, 3, np.int8), may_repeat)
    for repeat in (False, True):  # the reference takes one kind of row per call
        mine = np.flatnonzero(may_repeat == repeat)
        keep = take_reference(generator, rows[mine], proposed[mine], quota[mine], ts[mine], taken_before, repeat)
        for i, mask in zip(mine.tolist(), keep):
            assert kept[i] == mask.sum()
            np.testing.assert_array_equal(picks.tracks[rows[i], :kept[i]], proposed[i][mask])
    np.testing.assert_array_equal(picks.taken, taken_before)  # the reference marked the same tracks
    assert (picks.codes[rows][picks.tracks[rows] >= 0] == 3).all()


def test_batched_history_profiles_match_the_per_user_reference():
    meta = catalog()
    rng = np.random.default_rng(5)
    behaviours = list(BEHAVIOUR_CODE)
    log = EventBatch.concat([events(rng.integers(0, 6, 40), rng.integers(0, N_TRACKS, 40),
                                    behaviour=behaviours[i % len(behaviours)], start_id=40 * i) for i in range(8)])
    sequences = sequences_from_log(log)
    sequences[6] = UserSequence.empty()
    users = [3, 0, 6, 9, 3, 1, 2, 4, 5]  # 9 has no sequence; 3 appears twice
    for recent in (1, 4, 32):
        fast = history_profiles(sequences, users, meta, recent)
        reference = history_profiles_reference(sequences, users, meta, recent)
        for name in ("recent_tracks", "recent_artists", "genre_share"):
            np.testing.assert_array_equal(getattr(fast, name), getattr(reference, name))
    empty = history_profiles({}, [1, 2], meta)
    assert (empty.recent_tracks == -1).all() and (empty.genre_share == 0).all()


def test_batched_orders_match_order_by_score_with_ties_and_padding():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 4, (7, 12)).astype(np.float32)  # many ties
    scores[3, 2] = -np.inf
    lengths = [12, 0, 5, 9, 1, 12, 3]
    orders = order_rows_by_score(scores, lengths)
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(orders[row, :n], order_by_score(scores[row, :n]))


def test_popularity_scores_are_log_counts_over_the_catalog_maximum():
    meta = catalog()
    ranker = PopularityRanker(meta)
    ranker.observe(events(np.arange(9), [60, 60, 60, 61, 61, 70, 5, 5, 5], ts=NOW - DAY_MS))
    response, = ranker.rank([rank_request([70, 61, 60, 3])])
    logged = np.log1p(ranker.popularity.at(NOW))
    np.testing.assert_array_equal(response.scores[RANKING_SCORE],
                                  (logged[[70, 61, 60, 3]] / logged.max()).astype(np.float32))


def test_popularity_order_is_a_stable_sort_by_decreasing_popularity():
    rng = np.random.default_rng(4)
    for zeros in (0.0, 0.5, 0.95, 1.0):
        popularity = rng.integers(0, 5, 300).astype(np.float64) * (rng.random(300) >= zeros)
        tracks = np.sort(rng.choice(300, 200, replace=False))
        expected = tracks[np.argsort(-popularity[tracks], kind="stable")]
        np.testing.assert_array_equal(popularity_order(tracks, popularity), expected)
    popularity[7] = -1.0  # outside what counts can be: still a correct (slow) sort
    np.testing.assert_array_equal(popularity_order(np.arange(300), popularity),
                                  np.argsort(-popularity, kind="stable"))
