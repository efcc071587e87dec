"""ASTRO against its slow, obviously-correct reference (ranker/models/reference.py, in the
style of Meta's HSTU tests): one candidate at a time, plain causal attention written out.
The batched model must match it; so must the incremental serving path (extend_history).
"""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ranker.models.astro import AstroModel
from ranker.batch import TASKS, RankBatch
from ranker.models.embedding import TARGET_BEHAVIOUR, log_bucket, seconds_bucket
from ranker.serving.cache import HistoryBuffer
from ranker.serving.incremental import extend_history
from ranker.models import build_model, model_from_config
from ranker.batch import random_batch
from ranker.models.reference import (
    astro_reference, in_block, pointwise_reference, reference_candidate_token, reference_history_tokens,
)
from streaming.events import BEHAVIOURS, SCENARIOS
from tests.support import (TINY_ASTRO, TINY_TRACKS as N_TRACKS, assert_real_candidates_close, batch_with_edge_cases,
                           check_gradients_reach_every_parameter, check_one_cached_history_scores_many_requests,
                           check_padding_changes_no_real_score, check_prefix_keys_and_values_never_change,
                           check_shuffling_candidates_only_shuffles_scores, randomise_layer_norms, randomise_relative_bias,
                           torch_transformer_logits)

torch.set_num_threads(1)
TINY = TINY_ASTRO  # ASTRO's blocks, not xs's one block


BLOCK_ATTENTIONS = ("softmax", "pointwise")


def tiny_astro(**overrides) -> AstroModel:
    torch.manual_seed(0)
    model = build_model("astro", "xs", N_TRACKS, **{**TINY, **overrides}).eval()
    if model.temperature is not None:  # tau starts near 1; spread it so a path that drops tau fails
        with torch.no_grad():
            model.temperature.mlp[2].weight.normal_(std=0.5)
    return randomise_relative_bias(model)


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize(
    "overrides",
    [
        dict(partition="behaviour"),
        dict(partition="scenario", fusion="sigmoid"),
        dict(partition="recency", recency_scales=(3, 8, 32)),
        dict(partition="behaviour", temperature="fixed", block_positions=False, share_block_layers=True),
    ],
    ids=["behaviour", "scenario-sigmoid", "recency", "fixed-shared"],
)
@pytest.mark.parametrize("block_attention", BLOCK_ATTENTIONS)
def test_batched_sumi_matches_one_candidate_at_a_time(overrides, block_attention):
    model = tiny_astro(**overrides, block_attention=block_attention)
    batch = batch_with_edge_cases()
    with torch.no_grad():
        assert_real_candidates_close(model(batch), astro_reference(model, batch), batch)


@pytest.mark.parametrize("block_attention", BLOCK_ATTENTIONS)
def test_post_norm_blocks_match_one_candidate_at_a_time(block_attention):
    model = randomise_layer_norms(tiny_astro(partition="behaviour", block_attention=block_attention, norm="post"))
    batch = batch_with_edge_cases()
    with torch.no_grad():
        assert_real_candidates_close(model(batch), astro_reference(model, batch), batch)


def test_one_block_with_fixed_temperature_is_a_standard_target_aware_transformer():
    """Nb = 1, tau = 1 against torch's own nn.TransformerEncoderLayer with the SUMI mask."""
    model = tiny_astro(partition="none", temperature="fixed", block_positions=False, block_attention="softmax")
    batch = batch_with_edge_cases(seed=2)
    assert_real_candidates_close(*torch_transformer_logits(model, model.stacks[0].layers, batch), batch)


def test_one_pointwise_block_with_fixed_temperature_is_the_hstu_baseline():
    """Nb = 1, tau = 1, pointwise: ASTRO holding the HSTU baseline's weights scores as it does
    (a softmax gate over one block is 1), and its FLOPs count the same stack."""
    astro = tiny_astro(partition="none", temperature="fixed", block_positions=False, block_attention="pointwise")
    hstu_config = {k: v for k, v in TINY.items() if k not in ("tau_hidden", "partition")}
    hstu = randomise_relative_bias(build_model("hstu", "xs", N_TRACKS, **hstu_config))
    astro.embed.load_state_dict(hstu.embed.state_dict())
    astro.heads.load_state_dict(hstu.heads.state_dict())
    astro.stacks[0].load_state_dict(hstu.stack.state_dict())
    batch = batch_with_edge_cases(seed=12)
    with torch.no_grad():
        assert_real_candidates_close(astro(batch), hstu.eval()(batch), batch)
    astro_flops, hstu_flops = astro.flops_breakdown(100, 16), hstu.flops_breakdown(100, 16)
    for part in ("linear", "history_attention", "candidate_attention", "heads"):
        assert astro_flops[part] == hstu_flops[part]
    assert astro_flops["temperature"] == astro_flops["fusion"] == 0


# ----------------------------------------------------------------------------- invariances
# The check_* functions (tests/support.py) hold every family to the same properties.

@pytest.mark.parametrize("block_attention", BLOCK_ATTENTIONS)
def test_shuffling_candidates_only_shuffles_scores(block_attention):
    check_shuffling_candidates_only_shuffles_scores(tiny_astro(block_attention=block_attention))


@pytest.mark.parametrize("block_attention", BLOCK_ATTENTIONS)
def test_padding_candidates_and_history_changes_no_real_score(block_attention):
    check_padding_changes_no_real_score(tiny_astro(block_attention=block_attention))


@pytest.mark.parametrize("block_attention", BLOCK_ATTENTIONS)
@pytest.mark.parametrize("partition", ["behaviour", "scenario"])
def test_history_prefix_keys_and_values_never_change_when_events_are_appended(partition, block_attention):
    check_prefix_keys_and_values_never_change(tiny_astro(partition=partition, block_attention=block_attention))


@pytest.mark.parametrize("block_attention", BLOCK_ATTENTIONS)
def test_one_cached_history_scores_many_requests(block_attention):
    check_one_cached_history_scores_many_requests(tiny_astro(block_attention=block_attention))


@pytest.mark.parametrize("block_attention", BLOCK_ATTENTIONS)
@pytest.mark.parametrize("partition", ["behaviour", "scenario", "none"])
def test_extending_a_history_buffer_equals_a_full_recompute(partition, block_attention):
    """TURBO's incremental path (`extend_history`, `stack_extend` with tau): one event,
    then several at once across blocks, must score as encoding the whole history does."""
    model = tiny_astro(partition=partition, block_attention=block_attention)
    batch = random_batch(1, 20, 6, N_TRACKS, seed=11, min_length=20)
    lengths = (4, 5, 12, 20)
    prefix = lambda n: replace(batch, history_lengths=torch.tensor([n]))  # noqa: E731
    with torch.no_grad():
        buffer = HistoryBuffer(model.encode_history(prefix(lengths[0])), 0, headroom=0.0)
        for n in lengths[1:]:
            extend_history(model, buffer, prefix(n))
            torch.testing.assert_close(model.score_candidates(buffer.view(), prefix(n)), model(prefix(n)),
                                       rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- cost, temperature, gradients

def test_four_blocks_cost_a_quarter_of_the_attention_of_one():
    groups = (("full_play", "like"), ("play",), ("skip", "dislike"), ("share", "add_to_playlist"))
    four = tiny_astro(partition="behaviour", behaviour_groups=groups)
    one = tiny_astro(partition="none")
    four_flops, one_flops = four.flops_breakdown(256, 32), one.flops_breakdown(256, 32)
    assert four_flops["history_attention"] / one_flops["history_attention"] == pytest.approx(0.25)
    # Candidates still see all n history keys in total, so their attention stays ~ linear in n.
    assert four_flops["candidate_attention"] < 1.5 * one_flops["candidate_attention"]
    # And the blocks really are gathered narrow: behaviours cycling over the 4 groups.
    batch = random_batch(2, 24, 3, N_TRACKS, seed=8, min_length=24)
    batch.history_behaviours = torch.tensor([BEHAVIOURS.index(g[0]) for g in groups] * 6).expand(2, 24).clone()
    with torch.no_grad():
        widths = [block.keys[0].shape[2] for block in four.encode_history(batch).blocks]
    assert widths == [6, 6, 6, 6]


def test_tau_table_rows_are_the_mlp_of_each_token_and_follow_the_weights():
    """Fast path (a gather from tau_table, cached without gradients) against the slow one
    (the MLP on each token's own embeddings), before and after an in-place weight change."""
    model = tiny_astro()
    generator = torch.Generator().manual_seed(5)
    scenarios = torch.randint(0, len(SCENARIOS), (3, 7), generator=generator)
    behaviours = torch.randint(0, len(BEHAVIOURS) + 1, (3, 7), generator=generator)

    def per_token():
        return model.temperature(model.embed.scenario(scenarios), model.embed.behaviour(behaviours))

    with torch.no_grad():
        torch.testing.assert_close(model.temperatures(scenarios, behaviours), per_token())
        model.temperature.mlp[0].weight.add_(0.3)  # an optimiser step moves weights in place
        model.embed.scenario.weight.mul_(1.5)
        torch.testing.assert_close(model.temperatures(scenarios, behaviours), per_token())
    model.train()
    model.temperatures(scenarios, behaviours).sum().backward()
    assert model.temperature.mlp[0].weight.grad.abs().sum() > 0
    assert model.embed.scenario.weight.grad.abs().sum() > 0


def test_size_xs_is_one_block_at_exactly_hstu_xs_flops():
    """At xs ASTRO is one block: no fusion gate (a softmax over one block is 1), tau a table
    lookup, so it costs what HSTU xs costs; from s up it has the two behaviour blocks."""
    astro, hstu = build_model("astro", "xs", N_TRACKS, max_len=64), build_model("hstu", "xs", N_TRACKS, max_len=64)
    assert astro.config.n_blocks == 1 and astro.fusion.gate is None
    for n, M in ((56, 11), (64, 32), (10, 1)):
        assert astro.flops_per_request(n, M) == hstu.flops_per_request(n, M)
    assert build_model("astro", "s", N_TRACKS).config.n_blocks == 2


def test_dynamic_temperatures_stay_above_tau_min_and_depend_on_scenario():
    model = tiny_astro(tau_min=0.3)
    scenarios = torch.arange(len(SCENARIOS))
    with torch.no_grad():
        tau = model.temperatures(scenarios, torch.full_like(scenarios, TARGET_BEHAVIOUR))  # [S, Nb, h]
    assert tau.shape == (len(SCENARIOS), model.config.n_blocks, model.config.n_heads)
    assert (tau > 0.3).all()
    assert (tau - tau[0]).abs().amax(dim=(1, 2))[1:].min() > 1e-5  # every scenario differs from the first
    assert tiny_astro(temperature="fixed").temperatures(scenarios, scenarios) is None


@pytest.mark.parametrize(
    "overrides",
    [dict(partition="recency", recency_scales=(4, 32)), dict(fusion="sigmoid"), dict(block_attention="pointwise")],
)
def test_gradients_reach_every_parameter(overrides):
    check_gradients_reach_every_parameter(tiny_astro(**overrides))


# ----------------------------------------------------------------------------- config, score, errors

def test_config_round_trips_through_json_and_rebuilds_the_model():
    model = tiny_astro(partition="recency", recency_scales=(4, 16))
    config = json.loads(json.dumps(model.config.to_dict()))
    rebuilt = model_from_config("astro", config)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    batch = random_batch(2, 10, 3, N_TRACKS, seed=10)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(batch), model(batch))


def test_score_combines_tasks_with_the_configured_weights_and_masks_padding():
    model, batch = tiny_astro(task_weights=(1.0, 0.5, -1.0, 2.0)), batch_with_edge_cases()
    with torch.no_grad():
        logits = model(batch)
        score = model.score(logits, batch.candidate_mask)
    p = torch.sigmoid(logits)
    expected = p[..., 0] + 0.5 * p[..., 1] - p[..., 2] + 2.0 * p[..., 3]
    torch.testing.assert_close(score[batch.candidate_mask], expected[batch.candidate_mask])
    assert torch.isneginf(score[~batch.candidate_mask]).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(partition="genre"), "partition must be one of"),
        (dict(behaviour_groups=(("like",), ("like", "skip"))), "more than one group"),
        (dict(scenario_groups=(("podcast",),)), "unknown name 'podcast'"),
        (dict(temperature="hot"), "temperature must be"),
        (dict(n_heads=3), "not divisible"),
        (dict(tau_min=0.0), "tau_min"),
        (dict(block_attention="linear"), "block_attention must be one of"),
        (dict(block_attention="pointwise", n_rab_buckets=0), "n_rab_buckets"),
        (dict(candidate_path="joint"), "candidate_path must be one of"),
        (dict(block_attention="softmax", candidate_path="shared"), "needs block_attention"),
        (dict(colour="red"), "unknown AstroConfig overrides"),
    ],
)
def test_bad_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_astro(**overrides)


def test_bad_inputs_are_named():
    model = tiny_astro()
    batch = random_batch(2, 8, 3, N_TRACKS)
    batch.candidate_tracks[0, 0] = N_TRACKS + 1
    with pytest.raises(ValueError, match="candidate_tracks must be in"):
        model(batch)
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        model(random_batch(1, 40, 2, N_TRACKS))
    with pytest.raises(ValueError, match="unknown model family"):
        build_model("bert", "xs", N_TRACKS)
    with pytest.raises(ValueError, match="unknown size"):
        build_model("astro", "xxl", N_TRACKS)


# ----------------------------------------------------------------------------- the shared candidate path

def shared_candidate_reference(model: AstroModel, batch: RankBatch) -> torch.Tensor:
    """candidate_path="shared", one candidate at a time, written out: each block's history
    through its own layers (pointwise_reference, layer by layer for every layer's K/V), then
    the candidate's own layers, its query attending each block (that block layer's rab, its
    tau) and itself, mixed by the per-block, per-head softmax gate."""
    cfg = model.config
    h, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    norm = float(cfg.attention_norm or cfg.max_len)
    logits = torch.zeros(*batch.candidate_tracks.shape, len(TASKS))
    target = torch.tensor(TARGET_BEHAVIOUR)
    for row in range(len(batch.history_lengths)):
        history, length = reference_history_tokens(model, batch, row), int(batch.history_lengths[row])
        blocks = []  # per block: (index, per-layer inputs [L_b, d])
        for b in range(cfg.n_blocks):
            idx = [i for i in range(length) if in_block(cfg, batch, row, i, b)]
            seq = history[idx] + (model.block_position[b].weight[: len(idx)] if cfg.block_positions else 0)
            ts = batch.history_ts[row, idx]
            tau = None
            if cfg.temperature == "dynamic" and idx:
                tau = model.temperatures(batch.history_scenarios[row, idx], batch.history_behaviours[row, idx])[:, b]
            inputs = [pointwise_reference(model.stacks[b].layers[:i], seq, torch.tensor(idx), ts, tau, norm)
                      for i in range(cfg.n_layers)]
            blocks.append((idx, inputs))
        tau_c = model.temperatures(batch.scenario[row], target) if cfg.temperature == "dynamic" else None  # [Nb, h]
        for m in range(batch.candidate_tracks.shape[1]):
            if not batch.candidate_mask[row, m]:
                continue
            c = reference_candidate_token(model, batch, row, m)
            gates = model.block_gate(c).view(cfg.n_blocks, h).softmax(0)
            for i, layer in enumerate(model.candidate_layers):
                u, q, k, v = F.silu(layer.f1(layer.norm_in(c))).chunk(4, -1)
                q, k, v = (t.view(h, dh) for t in (q, k, v))
                own = layer.rab_position.weight[0] + layer.rab_time.weight[0]  # distance 0, 0 s
                attended = F.silu((q * k).sum(-1) / math.sqrt(dh) + own)[:, None] / norm * v
                for b, (idx, inputs) in enumerate(blocks):
                    if not idx:
                        continue
                    block_layer = model.stacks[b].layers[i]
                    _, _, kh, vh = F.silu(block_layer.f1(block_layer.norm_in(inputs[i]))).chunk(4, -1)
                    kh, vh = (t.view(len(idx), h, dh).transpose(0, 1) for t in (kh, vh))  # [h, L_b, dh]
                    scores = (kh @ q[:, :, None])[..., 0] / math.sqrt(dh)  # [h, L_b]
                    if tau_c is not None:
                        scores = scores / tau_c[b][:, None]
                    distance = length - torch.tensor(idx)
                    seconds_ago = batch.request_ts[row] - batch.history_ts[row, idx]
                    bias = (block_layer.rab_position(log_bucket(distance, cfg.n_rab_buckets))
                            + block_layer.rab_time(seconds_bucket(seconds_ago, cfg.n_rab_buckets))).T  # [h, L_b]
                    weights = F.silu(scores + bias) / norm
                    attended = attended + gates[b][:, None] * (weights[:, None, :] @ vh)[:, 0]
                c = c + layer.f2(layer.norm_attn(attended.reshape(-1)) * u)
            logits[row, m] = model.heads(c)
    return logits


SHARED = dict(block_attention="pointwise", candidate_path="shared")


@pytest.mark.parametrize("overrides", [dict(partition="behaviour"), dict(partition="scenario", n_layers=1),
                                       dict(partition="recency", recency_scales=(3, 8, 32)),
                                       dict(partition="behaviour", temperature="fixed", block_positions=False)],
                         ids=["behaviour", "scenario-1-layer", "recency", "fixed"])
def test_shared_candidate_path_matches_its_written_out_reference(overrides):
    model = tiny_astro(**SHARED, **overrides)
    batch = batch_with_edge_cases()
    with torch.no_grad():
        assert_real_candidates_close(model(batch), shared_candidate_reference(model, batch), batch)


def test_shared_candidate_path_keeps_the_serving_properties():
    """Shuffle invariance, padding, prefix K/V, one cache for many requests, gradients, and
    incremental extension equal to a full recompute: the per-block path's checks."""
    check_shuffling_candidates_only_shuffles_scores(tiny_astro(**SHARED))
    check_padding_changes_no_real_score(tiny_astro(**SHARED))
    check_one_cached_history_scores_many_requests(tiny_astro(**SHARED))
    check_gradients_reach_every_parameter(tiny_astro(**SHARED, partition="behaviour"))
    model = tiny_astro(**SHARED, partition="scenario")
    batch = random_batch(1, 20, 6, N_TRACKS, seed=11, min_length=20)
    with torch.no_grad():
        buffer = HistoryBuffer(model.encode_history(replace(batch, history_lengths=torch.tensor([5]))), 0, headroom=0.0)
        extend_history(model, buffer, batch)
        torch.testing.assert_close(model.score_candidates(buffer.view(), batch), model(batch), rtol=1e-4, atol=1e-5)


def test_shared_candidate_path_costs_one_token_per_candidate_whatever_the_blocks():
    """Its candidate linear work does not grow with Nb (the per-block path's does)."""
    one = tiny_astro(**SHARED, partition="none").flops_breakdown(60, 50)
    five = tiny_astro(**SHARED, partition="scenario").flops_breakdown(60, 50)
    per_block = tiny_astro(block_attention="pointwise", partition="scenario").flops_breakdown(60, 50)
    assert five["linear"] == one["linear"] < per_block["linear"]
