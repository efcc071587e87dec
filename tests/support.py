"""Helpers that several test modules share: tiny configs, synthetic logs and the property
checks every model family must pass. Test modules import helpers from here and fixtures from
conftest.py, never from each other, so one test file can change without breaking another.

Torch, FastAPI and uvicorn are imported inside the helpers that need them: a test that only
wants a log hash or a bad JSON line does not pay for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import duckdb
import numpy as np

from features.sequence import UserSequence
from streaming.events import BEHAVIOUR_CODE, SCENARIO_CODE, EventBatch

if TYPE_CHECKING:
    import torch

    from ranker.batch import RankBatch
    from ranker.serving.service import ServingSettings
    from sandbox.settings import SandboxSettings

# ----------------------------------------------------------------------------- tiny models
# Small enough to run every path in milliseconds, large enough for two heads and two layers.
TINY_MODEL = dict(d_model=16, n_heads=2, n_layers=2, dropout=0.0, max_len=32)
# Size xs is one block by default; ASTRO's tests want its blocks (and a temperature network),
# so they ask for the default partition of sizes s and up.
ASTRO_BLOCKS = dict(tau_hidden=8, partition="behaviour")
TINY_ASTRO = {**TINY_MODEL, **ASTRO_BLOCKS}
# The checkpoint the HTTP tests serve: TINY_ASTRO's width, with size xs's layers and dropout.
TINY_SERVED_ASTRO = {**{key: TINY_MODEL[key] for key in ("d_model", "n_heads", "max_len")}, **ASTRO_BLOCKS}
TINY_TRACKS = 40  # the catalogue of the tiny models and of the stores they are served from


def randomise_relative_bias(model):
    """rab starts at zero; give every HSTU layer's rab values so the pointwise references
    exercise it (a model without HSTU layers is returned unchanged)."""
    import torch

    from ranker.models.hstu import HSTULayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HSTULayer):
                module.rab_position.weight.normal_(std=0.5)
                module.rab_time.weight.normal_(std=0.5)
    return model


def randomise_layer_norms(model):
    """LayerNorms start at weight 1, bias 0, so every one is the same function and a path
    that runs the wrong one (norm_attn for norm_in, an input norm for an output norm) would
    agree with the reference; give each its own gain and bias."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.3)
    return model


def batch_with_edge_cases(seed: int = 0, B: int = 4, n: int = 20, M: int = 5) -> RankBatch:
    """Ragged histories including an empty one, and a padded candidate slot."""
    import torch

    from ranker.batch import random_batch

    batch = random_batch(B, n, M, TINY_TRACKS, seed=seed)
    batch.history_lengths[0] = 0
    batch.history_lengths[1] = n
    real = torch.arange(n)[None] < batch.history_lengths[:, None]
    for name in ("history_tracks", "history_behaviours", "history_scenarios", "history_ts"):
        setattr(batch, name, getattr(batch, name) * real)
    batch.candidate_mask[2, -1] = False
    batch.candidate_tracks[2, -1] = 0
    return batch


def assert_real_candidates_close(actual: torch.Tensor, expected: torch.Tensor, batch: RankBatch) -> None:
    import torch

    mask = batch.candidate_mask
    torch.testing.assert_close(actual[mask], expected[mask], rtol=1e-4, atol=1e-5)


def torch_transformer_logits(model, layers, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(model logits, logits of nn.TransformerEncoderLayers holding the same weights)."""
    import torch

    cfg = model.config
    reference = []
    for layer in layers:
        ref = torch.nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, cfg.ffn_mult * cfg.d_model, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=not layer.post_norm,
        )
        ref.self_attn.in_proj_weight.data.copy_(layer.qkv.weight)
        ref.self_attn.in_proj_bias.data.copy_(layer.qkv.bias)
        ref.self_attn.out_proj.load_state_dict(layer.out.state_dict())
        ref.linear1.load_state_dict(layer.ffn[0].state_dict())
        ref.linear2.load_state_dict(layer.ffn[3].state_dict())
        ref.norm1.load_state_dict(layer.norm1.state_dict())
        ref.norm2.load_state_dict(layer.norm2.state_dict())
        reference.append(ref.eval())
    with torch.no_grad():
        lengths = batch.history_lengths
        last_ts = torch.stack([batch.history_ts[r, max(int(l) - 1, 0)] if l else torch.tensor(0) for r, l in enumerate(lengths)])
        x = torch.cat([model.embed.history(batch), model.embed.candidates(batch, lengths, last_ts)], dim=1)
        n, M = batch.history_tracks.shape[1], batch.candidate_tracks.shape[1]
        allowed = torch.zeros(len(lengths), n + M, n + M, dtype=torch.bool)
        allowed[:, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[:, n:, :n] = batch.history_mask[:, None, :]
        allowed[:, n:, n:] = torch.eye(M, dtype=torch.bool)
        disallowed = (~allowed).repeat_interleave(cfg.n_heads, dim=0)  # [B * heads, L, L]
        for ref in reference:
            x = ref(x, src_mask=disallowed)
        return model(batch), model.heads(x[:, n:])


# ----------------------------------------------------------------------------- invariances
# Every family must pass these (tests/test_astro.py, tests/test_model_baselines.py).

def check_shuffling_candidates_only_shuffles_scores(model) -> None:
    import torch

    batch = batch_with_edge_cases(seed=3)
    perm = torch.randperm(batch.candidate_tracks.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(batch)
        batch.candidate_tracks, batch.candidate_mask = batch.candidate_tracks[:, perm], batch.candidate_mask[:, perm]
        torch.testing.assert_close(model(batch), base[:, perm])


def check_padding_changes_no_real_score(model) -> None:
    """Extra padded candidates and extra history padding columns leave real logits alone."""
    import torch

    batch = batch_with_edge_cases(seed=4)
    real, M = batch.candidate_mask.clone(), batch.candidate_tracks.shape[1]
    with torch.no_grad():
        base = model(batch)
        B = len(batch.history_lengths)
        batch.candidate_tracks = torch.cat([batch.candidate_tracks, torch.randint(0, TINY_TRACKS, (B, 3))], 1)
        batch.candidate_mask = torch.cat([batch.candidate_mask, torch.zeros(B, 3, dtype=torch.bool)], 1)
        for name in ("history_tracks", "history_behaviours", "history_scenarios", "history_ts"):
            setattr(batch, name, torch.nn.functional.pad(getattr(batch, name), (0, 4)))
        padded = model(batch)
    torch.testing.assert_close(padded[:, :M][real], base[real])


def check_prefix_keys_and_values_never_change(model) -> None:
    """What TURBO's incremental KV cache relies on: appending events leaves a prefix's K/V alone."""
    import torch

    from ranker.batch import random_batch

    full = random_batch(2, 16, 3, TINY_TRACKS, seed=5, min_length=16)
    prefix = random_batch(2, 16, 3, TINY_TRACKS, seed=5, min_length=16)
    prefix.history_lengths = torch.tensor([10, 13])
    with torch.no_grad():
        long_cache, short_cache = model.encode_history(full), model.encode_history(prefix)
    for long_block, short_block in zip(long_cache.blocks, short_cache.blocks):
        for row in range(2):
            keep = int(short_block.lengths[row])
            for k_long, k_short, v_long, v_short in zip(long_block.keys, short_block.keys, long_block.values, short_block.values):
                torch.testing.assert_close(k_long[row, :, :keep], k_short[row, :, :keep])
                torch.testing.assert_close(v_long[row, :, :keep], v_short[row, :, :keep])


def check_one_cached_history_scores_many_requests(model) -> None:
    """forward == score_candidates(encode_history(...)), with the cache reused across requests."""
    import torch

    from ranker.batch import random_batch

    batch = random_batch(1, 12, 4, TINY_TRACKS, seed=6, min_length=5)
    more = random_batch(3, 12, 4, TINY_TRACKS, seed=7)
    for name in ("history_tracks", "history_behaviours", "history_scenarios", "history_ts", "history_lengths"):
        setattr(more, name, getattr(batch, name).expand(3, *getattr(batch, name).shape[1:]).clone())
    with torch.no_grad():
        cache = model.encode_history(batch).select(torch.zeros(3, dtype=torch.long))
        torch.testing.assert_close(model.score_candidates(cache, more), model(more))
        torch.testing.assert_close(model(more), model.score_candidates(model.encode_history(more), more))


def check_gradients_reach_every_parameter(model) -> None:
    from ranker.batch import random_batch

    model.train()
    batch = random_batch(3, 12, 4, TINY_TRACKS, seed=9, min_length=6)
    model(batch).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# ----------------------------------------------------------------------------- logs
# ----------------------------------------------------------------------------- KV cache

KV_TRACKS = 50  # the catalogue of the KV cache tests' tiny models
KV_MAX_LEN = 24


def kv_tiny_model(family: str = "astro", seed: int = 0, **overrides):
    """A small model in eval mode (max_len KV_MAX_LEN); HSTU-style relative biases (rab,
    initialised at 0) are spread so that a wrong bias row in a fast path shows up, and so
    are a post-norm model's LayerNorms (a norm run in the wrong place or the wrong one)."""
    import torch

    from ranker.models import build_model

    torch.manual_seed(seed)
    extra = ASTRO_BLOCKS if family == "astro" else {}  # xs alone is one block
    model = build_model(family, "xs", KV_TRACKS, **{**TINY_MODEL, "max_len": KV_MAX_LEN, **extra, **overrides}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rab_" in name:
                param.normal_(0.0, 0.5)
    return randomise_layer_norms(model) if overrides.get("norm") == "post" else model


def kv_sequence(length: int, seed: int, start_ts: int = 1_700_000_000_000, first_id: int = 0) -> UserSequence:
    """A user's sequence over the KV tests' catalogue, events up to 10 minutes apart."""
    rng = np.random.default_rng(seed)
    return UserSequence(
        track_ids=rng.integers(0, KV_TRACKS, length),
        behaviours=rng.integers(1, 8, length).astype(np.int8),  # every behaviour but impression
        scenarios=rng.integers(0, 5, length).astype(np.int8),
        timestamps=start_ts + np.cumsum(rng.integers(0, 600_000, length)),
        last_event_id=first_id + length - 1,
    )


def kv_append(seq: UserSequence, k: int, seed: int, max_len: int = 1000) -> UserSequence:
    """`seq` with k later events appended (keeping the last max_len), as apply_events would."""
    new = kv_sequence(k, seed, start_ts=int(seq.timestamps[-1]) + 1000 if len(seq) else 1_700_000_000_000)
    return UserSequence(
        *(np.concatenate([getattr(seq, f), getattr(new, f)])[-max_len:]
          for f in ("track_ids", "behaviours", "scenarios", "timestamps")),
        last_event_id=seq.last_event_id + k,
    )


def _request_for(window: UserSequence, max_len: int, candidates: torch.Tensor) -> RankBatch:
    from dataclasses import replace

    import torch

    from ranker.serving.cache import history_batch, model_window

    batch = history_batch([model_window(window, max_len)], KV_TRACKS)
    return replace(batch, candidate_tracks=candidates[None], candidate_mask=torch.ones(1, len(candidates), dtype=torch.bool),
                   scenario=torch.tensor([2]), request_ts=batch.history_ts.max(1).values + 60_000)


def full_recompute_scores(model, window: UserSequence, candidates: torch.Tensor) -> torch.Tensor:
    """Logits [M, tasks] of the window encoded from scratch."""
    import torch

    with torch.no_grad():
        return model(_request_for(window, model.config.max_len, candidates))[0]


def cached_scores(model, cache, user: int, window: UserSequence, candidates: torch.Tensor) -> torch.Tensor:
    """Logits [M, tasks] of the window's history served from `cache` (a UserKVCache)."""
    import torch

    history = cache.histories([user], [window])[0]
    with torch.no_grad():
        return model.score_candidates(history, _request_for(window, model.config.max_len, candidates))[0]


TRAINING_LOG_TRACKS = 120  # the catalogue of `synthetic_log`
HOUR_MS = 3600 * 1000


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


def event_log(n: int, n_users: int = 20, n_tracks: int = 30, span_ms: int = 72 * HOUR_MS, seed: int = 0,
              start_ms: int = 0) -> EventBatch:
    """Events in emission order (ids and times ascending) spread over `span_ms` from `start_ms`."""
    rng = np.random.default_rng(seed)
    return EventBatch.from_columns(
        event_id=np.arange(n), ts=start_ms + np.sort(rng.integers(0, span_ms, n)), user_id=rng.integers(0, n_users, n),
        track_id=rng.integers(0, n_tracks, n), scenario=rng.integers(0, 5, n), behaviour=rng.integers(0, 8, n),
    )


def log_hash(events: EventBatch) -> str:
    digest = hashlib.sha256()
    for name, column in events.columns().items():
        digest.update(name.encode())
        digest.update(column.astype(str).tobytes() if column.dtype == object else column.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- feature sequences

def random_sequence(length: int, rng: np.random.Generator, last_event_id: int = 0) -> UserSequence:
    return UserSequence(
        track_ids=rng.integers(0, 2**40, length), behaviours=rng.integers(1, 8, length).astype(np.int8),
        scenarios=rng.integers(0, 5, length).astype(np.int8),
        timestamps=np.sort(rng.integers(0, 2**41, length)), last_event_id=last_event_id,
    )


def assert_same_sequences(got: dict[int, UserSequence], expected: dict[int, UserSequence]) -> None:
    assert set(got) == set(expected)
    for user, seq in expected.items():
        assert got[user].equals(seq), f"user {user}"
        assert got[user].behaviours.dtype == np.int8 and got[user].track_ids.dtype == np.int64


# ----------------------------------------------------------------------------- bad input
# The catalogue of bench.stream.simulated_log: 10 tracks per user.
SIM_LOG_USERS, SIM_LOG_TRACKS = 200, 2_000


def one(log: EventBatch, i: int, **changes) -> EventBatch:
    """Event i of the log with some fields changed."""
    columns = {name: column[i:i + 1].copy() for name, column in log.columns().items()}
    for name, value in changes.items():
        columns[name][:] = value
    return EventBatch.from_columns(**columns)


def a_play(log: EventBatch) -> int:
    return int(np.flatnonzero(log.behaviour == BEHAVIOUR_CODE["full_play"])[0])


def hostile_events(log: EventBatch) -> list[tuple[EventBatch, str]]:
    """(event, what its reason must say), each at the end of a log of SIM_LOG_USERS users
    and SIM_LOG_TRACKS tracks."""
    from streaming.plausibility import DAY_MS

    top_id, top_ts, i = int(log.event_id.max()), int(log.ts.max()), a_play(log)
    return [
        (one(log, i, event_id=10**15), "event_id more than"),
        (one(log, i, event_id=top_id + 1, ts=253_402_300_799_000), "ts more than"),  # 9999-12-31
        (one(log, i, event_id=top_id + 2, user_id=SIM_LOG_USERS), "user space"),
        (one(log, i, event_id=top_id + 3, track_id=SIM_LOG_TRACKS + 7), "catalogue"),
        (one(log, i, event_id=top_id + 4, play_ms=10 * DAY_MS), "play_ms"),
        (one(log, i, ts=top_ts, behaviour=BEHAVIOUR_CODE["like"]), "repeated with different content"),
        (one(log, i), "repeated (same content"),
    ]


# Words each bad line's dead-letter reason must contain, in the order of `bad_json_lines`.
BAD_LINE_REASONS = ("malformed JSON", "user_id", "behaviour", "missing required field", "over the")


def bad_json_lines(good: list[bytes]) -> list[bytes]:
    """One line per way raw input goes wrong, two of them made from good events."""
    return [b"{broken json", good[0].replace(b'"user_id":', b'"user_id":-'),
            good[1].replace(b'"behaviour":"', b'"behaviour":"moonwalk'), b"{}", b"x" * 10_000]


def assigned_partitions(line: str) -> set[int]:
    """The partitions of the `events` topic a worker's 'assigned events[...]' log line names."""
    return {int(part.split("]")[0]) for part in line.split("events[")[1:]}


class DictSequenceSource:
    """User history kept in a dict: the SequenceSource contract without a feature store."""

    def __init__(self, sequences: dict[int, UserSequence] | None = None) -> None:
        self.sequences = dict(sequences or {})
        self.calls = 0

    def get_sequences(self, user_ids: Sequence[int]) -> dict[int, UserSequence]:
        self.calls += 1
        return {u: self.sequences.get(u, UserSequence.empty()) for u in user_ids}


# ----------------------------------------------------------------------------- running things
TINY_SANDBOX = dict(n_users=60, n_tracks=600, days=1.0)


def tiny_settings(out: Path, seed: int = 3, run_id: str = "tiny") -> SandboxSettings:
    from sandbox.settings import SandboxSettings
    from simulator.config import SimConfig

    return SandboxSettings(sim=SimConfig(seed=seed, **TINY_SANDBOX), out=out, run_id=run_id)


def tiny_service_settings(root, users: list[int], length: int, seed: int, max_candidates: int) -> ServingSettings:
    """A real Feast store under `root` holding a random `length`-token history for each of
    `users`, and a tiny astro checkpoint beside it: what the HTTP tests serve."""
    import torch

    from features.store import FeatureStoreClient
    from ranker.models import build_model
    from ranker.serving.service import ServingSettings
    from ranker.training.checkpoint import save_checkpoint

    store = FeatureStoreClient(root / "feast")
    store.apply()
    rng = np.random.default_rng(seed)
    store.write_sequences({user: UserSequence(rng.integers(0, TINY_TRACKS, length),
                                              rng.integers(1, 8, length).astype(np.int8),
                                              rng.integers(0, 5, length).astype(np.int8),
                                              1_700_000_000_000 + np.arange(length) * 60_000, length - 1)
                           for user in users})
    torch.manual_seed(0)
    model = build_model("astro", "xs", TINY_TRACKS, **TINY_SERVED_ASTRO)
    save_checkpoint(root / "model", model, torch.optim.AdamW(model.parameters()), "astro", "xs", step=0, extra={})
    return ServingSettings(checkpoint=root / "model", feast_dir=root / "feast", max_candidates=max_candidates,
                           device="cpu")


@contextlib.contextmanager
def serving_in_thread(settings):
    """The app over `settings` served by uvicorn in a thread on a free port; yields the port."""
    import uvicorn

    from ranker.serving.http import build_service, create_app

    server = uvicorn.Server(uvicorn.Config(create_app(build_service(settings)), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.05)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
