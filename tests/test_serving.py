"""The neural ranker and the micro-batching service over a real Feast store (SQLite, tmp dir)."""

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from features.sequence import UserSequence
from features.store import FeatureStoreClient
from ranker.interface import RANKING_SCORE, RankRequest, order_by_score
from ranker.serving.cache import history_batch
from ranker.serving.incremental import PATHS
from ranker.models import build_model
from ranker.serving.ranker import NeuralRanker
from ranker.serving.stage_two import SCORING_PATHS, has_fast_path
from ranker.serving.service import ScoringService, ServingSettings
from streaming.events import SCENARIO_CODE
from tests.support import TINY_ASTRO

torch.set_num_threads(1)
N_TRACKS = 60
TINY = TINY_ASTRO  # ASTRO's blocks, not xs's one block


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("astro", "xs", N_TRACKS, **TINY)


def sequence(length: int, seed: int) -> UserSequence:
    rng = np.random.default_rng(seed)
    return UserSequence(rng.integers(0, N_TRACKS, length), rng.integers(1, 8, length).astype(np.int8),
                        rng.integers(0, 5, length).astype(np.int8),
                        1_700_000_000_000 + np.cumsum(rng.integers(1, 600_000, length)), length - 1)


def grown(seq: UserSequence, k: int, seed: int) -> UserSequence:
    more = sequence(k, seed)
    return UserSequence(
        *(np.concatenate([getattr(seq, f), getattr(more, f) + (seq.timestamps[-1] if f == "timestamps" else 0)])
          for f in ("track_ids", "behaviours", "scenarios", "timestamps")),
        last_event_id=seq.last_event_id + k)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStoreClient:
    client = FeatureStoreClient(tmp_path_factory.mktemp("feast"))
    client.apply()
    client.write_sequences({user: sequence(5 + 4 * user, seed=user) for user in range(1, 6)})
    return client


def request(request_id: int, user: int, candidates, scenario: str = "home_feed", ts: int = 1_800_000_000_000):
    return RankRequest(request_id=request_id, user_id=user, scenario=scenario,
                       candidates=np.asarray(candidates, np.int64), ts=ts)


def reference_scores(model, seq: UserSequence, req: RankRequest) -> np.ndarray:
    """The model's full forward over the same history and candidates (no cache)."""
    batch = history_batch([seq], N_TRACKS)
    batch = replace(batch, candidate_tracks=torch.as_tensor(req.candidates + 1)[None],
                    candidate_mask=torch.ones(1, len(req.candidates), dtype=torch.bool),
                    scenario=torch.tensor([SCENARIO_CODE[req.scenario]]), request_ts=torch.tensor([req.ts]))
    with torch.no_grad():
        return model.score(model(batch))[0].numpy()


@pytest.mark.parametrize("scoring", SCORING_PATHS)
def test_neural_ranker_scores_a_batch_of_users_like_the_model_and_follows_new_events(store, scoring):
    model = tiny_model()
    ranker = NeuralRanker(model, "v1", store, device="cpu", stage_two=scoring)
    assert has_fast_path(ranker.model)  # so "fast" is the fast path here, not the reference
    requests = [request(1, 2, [3, 1, 4, 1, 5]), request(2, 4, [9, 2, 6]), request(3, 2, [5, 3], "radio"),
                request(4, 999, [7, 8, 0])]  # user 999 has no sequence: a cold start, still ranked
    responses = ranker.rank(requests)
    stored = store.get_sequences([2, 4, 999])
    for req, resp in zip(requests, responses):
        assert resp.request_id == req.request_id and resp.model_version == "v1"
        np.testing.assert_allclose(resp.scores[RANKING_SCORE], reference_scores(model, stored[req.user_id], req), atol=1e-5)
        np.testing.assert_array_equal(resp.order, order_by_score(resp.scores[RANKING_SCORE]))
        assert set(resp.scores) == {RANKING_SCORE, "full_play", "like", "skip", "share"}
    assert ranker.cache.stats.rebuilds == 2 and ranker.cache.stats.cold == 1
    # User 2 plays two more tracks; the Feast row changes, the cache extends.
    store.write_sequences({2: grown(stored[2], 2, seed=77)})
    again = ranker.rank([requests[0]])[0]
    np.testing.assert_allclose(again.scores[RANKING_SCORE],
                               reference_scores(model, store.get_sequences([2])[2], requests[0]), atol=1e-5)
    assert ranker.cache.stats.incremental == 1


@pytest.mark.parametrize("scoring", ["loop", "thread"])
def test_concurrent_requests_are_micro_batched_and_each_gets_its_own_answer(store, scoring):
    model = tiny_model()
    service = ScoringService(NeuralRanker(model, "v1", store, device="cpu"),
                             ServingSettings(max_batch=8, max_wait_ms=20.0, scoring=scoring))
    requests = [request(100 + i, 1 + i % 5, [i % N_TRACKS, (i * 7) % N_TRACKS, 11]) for i in range(12)]

    async def clients():
        async with service:
            return await asyncio.gather(*(service.rank_one(r) for r in requests))

    results = asyncio.run(clients())
    stored = store.get_sequences(range(1, 6))
    for req, scored in zip(requests, results):
        assert scored.response.request_id == req.request_id
        np.testing.assert_allclose(scored.response.scores[RANKING_SCORE],
                                   reference_scores(model, stored[req.user_id], req), atol=1e-5)
        assert scored.timing_ms["total_ms"] >= scored.timing_ms["queue_ms"] >= 0
    assert sorted(scored.timing_ms["batch_size"] for scored in results) == [4] * 4 + [8] * 8  # max_batch=8
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(service.metrics_text().decode()) for s in family.samples}
    assert samples[("climber_rank_batch_size_sum", ())] == 12
    assert samples[("climber_rank_batch_size_count", ())] == 2
    assert samples[("climber_rank_latency_seconds_count", ())] == 12
    assert samples[("climber_rank_requests_total", (("outcome", "ok"),))] == 12
    lookups = {outcome: samples[("climber_kv_cache_lookups_total", (("outcome", outcome),))]
               for outcome in ("hits", "incremental", "rebuilds", "cold")}
    # Batch 1 meets all 5 users (rebuilds); batch 2 (requests 8-11) users 4, 5, 1, 2 again (hits).
    assert lookups == {"hits": 4, "incremental": 0, "rebuilds": 5, "cold": 0}
    assert samples[("climber_kv_cache_hit_rate", ())] == pytest.approx(4 / 9)
    assert samples[("climber_kv_cache_bytes", ())] == service.ranker.cache.nbytes > 0


def test_without_a_batching_wait_requests_that_arrive_together_still_share_a_batch(store):
    """max_wait_ms 0 waits for no timer, only one pass of the event loop: what was submitted
    together is ranked together, and a lone request is ranked at once."""
    service = ScoringService(NeuralRanker(tiny_model(), "v1", store, device="cpu"),
                             ServingSettings(max_batch=8, max_wait_ms=0))
    together = [request(200 + i, 1 + i % 5, [i % N_TRACKS, 11]) for i in range(6)]

    async def clients():
        async with service:
            first = await asyncio.gather(*(service.rank_one(r) for r in together))
            alone = await service.rank_one(request(300, 1, [3]))
            return first, alone

    first, alone = asyncio.run(clients())
    assert [s.timing_ms["batch_size"] for s in first] == [6] * 6
    assert alone.timing_ms["batch_size"] == 1


def test_scoring_in_a_thread_leaves_the_loop_free_and_still_fails_a_bad_request_alone(store):
    """scoring "thread": while a (slow) batch ranks, the event loop keeps running, and a
    request that fails its batch fails alone after the one-by-one retry, as on the loop."""
    ranker = NeuralRanker(tiny_model(), "v1", store, device="cpu")
    rank_timed = ranker.rank_timed

    def slow(requests):
        time.sleep(0.15)
        if any(r.request_id == 666 for r in requests):
            raise RuntimeError("cannot rank request 666")
        return rank_timed(requests)

    ranker.rank_timed = slow

    async def run(scoring: str):
        async with ScoringService(ranker, ServingSettings(scoring=scoring)) as service:
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.ensure_future(tick())
            await asyncio.sleep(0)
            results = await asyncio.gather(service.rank_one(request(1, 1, [3])), service.rank_one(request(666, 2, [4])),
                                           return_exceptions=True)
            ticker.cancel()
            return ticks, results, service.busy_seconds

    for scoring in ("thread", "loop"):  # the batch of two fails (0.15 s), then each alone (0.3 s)
        ticks, (good, bad), busy = asyncio.run(run(scoring))
        assert good.response.request_id == 1 and good.timing_ms["batch_size"] == 1
        assert isinstance(bad, RuntimeError) and "666" in str(bad)
        if scoring == "thread":
            assert ticks >= 10 and busy == 0  # the loop ran all along
        else:
            assert ticks <= 3 and busy >= 0.4  # blocked for the whole batch and its retries


def test_bad_requests_are_refused_before_they_reach_a_batch(store):
    service = ScoringService(NeuralRanker(tiny_model(), "v1", store, device="cpu"), ServingSettings(max_candidates=4))
    bad_requests = [
        (request(1, 1, []), "1 to 4 candidates"),
        (request(2, 1, [1, 2, 3, 4, 5]), "1 to 4 candidates"),
        (request(3, 1, [1, 2], scenario="podcast"), "unknown scenario 'podcast'"),
        (request(4, 1, [1, N_TRACKS]), f"candidate track id {N_TRACKS} is outside"),
        (RankRequest(5, 1, "radio", np.array([1.5, 2.0])), "integer track ids"),
    ]

    async def clients():
        async with service:
            for bad, message in bad_requests:
                with pytest.raises(ValueError, match=message):
                    await service.rank_one(bad)
            return await service.rank_one(request(6, 1, [1, 2]))

    assert asyncio.run(clients()).response.request_id == 6


def test_in_process_rank_and_model_reload(store):
    ranker = NeuralRanker(tiny_model(seed=0), "v1", store, device="cpu")
    service = ScoringService(ranker)
    req = request(1, 3, [4, 5, 6])
    assert service.rank([req])[0].model_version == "v1"
    new_model = tiny_model(seed=1)
    ranker.reload(new_model, "v2")
    response = service.rank([req])[0]
    assert response.model_version == "v2" and ranker.cache.stats.rebuilds == 2
    np.testing.assert_allclose(response.scores[RANKING_SCORE],
                               reference_scores(new_model, store.get_sequences([3])[3], req), atol=1e-5)
    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(service.rank_one(req))


def test_settings_read_batching_and_threads_from_the_environment(monkeypatch):
    defaults = ServingSettings()
    assert defaults.max_batch == 16 and defaults.torch_threads == 1  # see ServingSettings for the measurements
    monkeypatch.setenv("CLIMBER_SERVE_MAX_BATCH", "8")
    monkeypatch.setenv("CLIMBER_SERVE_TORCH_THREADS", "0")
    settings = ServingSettings()
    assert settings.max_batch == 8 and settings.torch_threads == 0
    monkeypatch.setenv("CLIMBER_SERVE_TORCH_THREADS", "-1")
    with pytest.raises(ValueError, match="torch_threads"):
        ServingSettings()


def test_bench_serve_pins_model_defaults_with_set():
    """`climber bench serve --set` reaches the models it builds, so its frozen config can pin
    the defaults its figures were measured on."""
    from bench.serve import serving_model
    from sandbox.frozen import parse_step

    _, args = parse_step(["bench", "serve", "--set", "partition=scenario", "--set", "n_layers=1", "--set", "max_len=8"])
    model = serving_model("xs", 32, **dict(args.overrides))
    assert (model.config.partition, model.config.n_layers, model.config.max_len) == ("scenario", 1, 32)


@pytest.mark.parametrize("path", PATHS)
def test_whole_catalogue_in_chunks_scores_as_one_pass(store, path):
    """M past the chunk size: chunks over one cached history give the one-pass scores, on a
    rebuilt and on an incrementally extended cache, for ragged batches (one row runs out)."""
    model = tiny_model(seed=3)
    chunked = NeuralRanker(model, "v1", store, device="cpu", candidate_chunk=7, incremental=path)
    one_pass = NeuralRanker(model, "v1", store, device="cpu", candidate_chunk=10**6, incremental=path)
    catalogue = np.arange(N_TRACKS)[::-1]
    requests = [request(1, 3, catalogue), request(2, 5, [4, 9, 2]), request(3, 999, catalogue[:20])]
    for round_ in range(2):
        got, expected = chunked.rank(requests), one_pass.rank(requests)
        stored = store.get_sequences([3, 5, 999])
        for req, a, b in zip(requests, got, expected):
            np.testing.assert_allclose(a.scores[RANKING_SCORE], b.scores[RANKING_SCORE], rtol=0, atol=1e-6)
            np.testing.assert_allclose(a.scores[RANKING_SCORE], reference_scores(model, stored[req.user_id], req),
                                       atol=1e-5)
            for task in ("full_play", "like", "skip", "share"):
                np.testing.assert_allclose(a.scores[task], b.scores[task], rtol=0, atol=1e-6)
        if round_ == 0:  # user 3 plays two more tracks: the second round extends the cache
            store.write_sequences({3: grown(stored[3], 2, seed=91)})
    assert chunked.cache.stats.incremental == one_pass.cache.stats.incremental == 1


def test_the_adaptive_wait_spares_a_lone_request_and_waits_for_one_on_its_way(store):
    """batching "adaptive": with a 10 s wait allowed, a lone request is ranked at once; one
    whose body is still being read (`arriving`) holds the batch until it is queued; "fixed"
    waits the whole wait even alone."""
    def service(batching: str, wait_ms: float) -> ScoringService:
        return ScoringService(NeuralRanker(tiny_model(), "v1", store, device="cpu"),
                              ServingSettings(max_batch=8, max_wait_ms=wait_ms, batching=batching))

    async def adaptive():
        async with service("adaptive", 10_000) as svc:
            alone = await svc.rank_one(request(400, 1, [3]))

            async def late():
                with svc.arriving():
                    await asyncio.sleep(0.05)  # its body still coming in
                return await svc.rank_one(request(402, 2, [4]))

            arriving = asyncio.ensure_future(late())
            await asyncio.sleep(0)  # late() has begun arriving
            pair = await asyncio.gather(svc.rank_one(request(401, 1, [5])), arriving)
            return alone, pair

    alone, pair = asyncio.run(adaptive())
    assert alone.timing_ms["batch_size"] == 1 and alone.timing_ms["queue_ms"] < 5_000
    assert [s.timing_ms["batch_size"] for s in pair] == [2, 2]
    assert pair[0].timing_ms["queue_ms"] >= 40  # it waited for the one arriving

    async def fixed():
        async with service("fixed", 50) as svc:
            return await svc.rank_one(request(403, 1, [3]))

    assert asyncio.run(fixed()).timing_ms["queue_ms"] >= 45


# A batch's buffers freed and allocated again, counted in minor page faults: first with glibc
# held at its starting mmap threshold (where every such buffer is a fresh mapping, as in a
# server whose dynamic thresholds settled low), then after the serving process's settings.
_MALLOC_CHURN = """
import resource, sys
import numpy as np
from ranker.serving.http import process_settings
from ranker.serving.service import ServingSettings

def churn():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        buffers = [np.ones(64 * 1024 * k) for k in (1, 2, 4)]  # 0.5, 1 and 2 MiB
        del buffers
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

churn()
default = churn()
setting = process_settings(ServingSettings(malloc="keep", torch_threads=0))["malloc"]  # as `climber serve` starts
churn()
kept = churn()
print(setting.applied, default, kept)
"""


def test_keep_freed_pages_reuses_a_batchs_pages():
    """ServingSettings.malloc "keep": buffers freed by one batch are reused by the next, not
    unmapped and faulted in again (ranker.serving.malloc)."""
    import os
    import subprocess
    import sys

    from ranker.serving.malloc import _glibc, keep_freed_pages

    if _glibc() is None:
        pytest.skip("not glibc")
    from ranker.serving.http import process_settings

    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_pages(mmap_threshold=1 << 30)
    assert process_settings(ServingSettings(malloc="glibc", torch_threads=0)) == {}  # the reference: left alone
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _MALLOC_CHURN], env=env, cwd=root, capture_output=True, text=True,
                         check=True)
    applied, default, kept = out.stdout.split()[-3:]
    assert applied == "True"
    # 20 rounds of 3.5 MiB: ~17,900 faults when each buffer is a fresh mapping; near none when kept.
    assert int(default) > 10_000, out.stdout
    assert int(kept) < int(default) / 20, out.stdout
