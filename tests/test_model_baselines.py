"""SASRec- and HSTU-style baselines against one-candidate-at-a-time references; the ladder."""

import json

import pytest
import torch

from ranker.batch import TASKS
from ranker.models.config import SIZE_NAMES
from ranker.models import build_model, model_from_config
from ranker.batch import random_batch
from ranker.models.reference import pointwise_reference, reference_history_tokens, reference_logits
from tests.support import (
    TINY_MODEL,
    TINY_TRACKS as N_TRACKS,
    assert_real_candidates_close,
    batch_with_edge_cases,
    check_gradients_reach_every_parameter,
    check_one_cached_history_scores_many_requests,
    check_padding_changes_no_real_score,
    check_prefix_keys_and_values_never_change,
    check_shuffling_candidates_only_shuffles_scores,
    randomise_layer_norms,
    randomise_relative_bias,
    torch_transformer_logits,
)

torch.set_num_threads(1)
TINY = TINY_MODEL
BASELINES = ("sasrec", "hstu")


def tiny(family: str, **overrides):
    torch.manual_seed(0)
    return build_model(family, "xs", N_TRACKS, **{**TINY, **overrides}).eval()


@pytest.mark.parametrize("family, overrides", [("sasrec", {}), ("sasrec", dict(norm="post")),
                                               ("sasrec", dict(norm="post", init="normal")), ("hstu", {}),
                                               ("hstu", dict(norm="post")), ("hstu", dict(norm="post", n_layers=1))])
def test_batched_sumi_matches_one_candidate_at_a_time(family, overrides):
    model = randomise_layer_norms(tiny(family, **overrides))
    if family == "hstu":
        randomise_relative_bias(model)
    batch = batch_with_edge_cases()
    with torch.no_grad():
        assert_real_candidates_close(model(batch), reference_logits(model, batch), batch)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_sasrec_is_a_standard_target_aware_transformer(norm):
    """Pre-norm: nn.TransformerEncoderLayer(norm_first=True); post-norm (RecBole's layout):
    norm_first=False, on layer-normed input tokens."""
    model = tiny("sasrec", norm=norm)
    batch = batch_with_edge_cases(seed=2)
    assert_real_candidates_close(*torch_transformer_logits(model, model.stack.layers, batch), batch)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_hstu_next_item_outputs_match_the_reference_layer(norm):
    """The training path (`sequence_output`, every history position) against Meta's layer
    written out (`pointwise_reference`) on each row's unpadded history."""
    model = randomise_relative_bias(randomise_layer_norms(tiny("hstu", norm=norm)))
    batch = batch_with_edge_cases(seed=3)
    with torch.no_grad():
        out = model.sequence_output(batch)
        for row, length in enumerate(batch.history_lengths.tolist()):
            tokens = reference_history_tokens(model, batch, row)
            want = pointwise_reference(model.stack.layers, tokens, torch.arange(length),
                                       batch.history_ts[row, :length], None, float(model.config.max_len))
            torch.testing.assert_close(out[row, :length], want, atol=1e-5, rtol=1e-5)


def test_post_norm_hstu_has_the_same_parameters_and_other_outputs():
    """Post-norm moves norm_in from the layer's input to its output and normalises the input
    tokens (TokenEmbedding): the same state-dict keys and shapes load into either layout, and
    the layouts then score differently (the flag is not a no-op)."""
    pre, post = tiny("hstu"), tiny("hstu", norm="post")
    post_state = {k: v for k, v in post.state_dict().items() if not k.startswith("embed.norm.")}
    assert {k: v.shape for k, v in pre.state_dict().items()} == {k: v.shape for k, v in post_state.items()}
    assert set(post.state_dict()) - set(post_state) == {"embed.norm.weight", "embed.norm.bias"}
    pre.load_state_dict(post_state)
    batch = batch_with_edge_cases()
    with torch.no_grad():
        assert (pre(batch) - post(batch)).abs().max() > 1e-2


@pytest.mark.parametrize("family", BASELINES)
def test_shuffling_candidates_only_shuffles_scores(family):
    check_shuffling_candidates_only_shuffles_scores(tiny(family))


@pytest.mark.parametrize("family", BASELINES)
def test_padding_candidates_and_history_changes_no_real_score(family):
    model = tiny(family)
    if family == "hstu":
        randomise_relative_bias(model)
    check_padding_changes_no_real_score(model)


@pytest.mark.parametrize("family", BASELINES)
def test_history_prefix_keys_and_values_never_change_when_events_are_appended(family):
    check_prefix_keys_and_values_never_change(tiny(family))


@pytest.mark.parametrize("family", BASELINES)
def test_one_cached_history_scores_many_requests(family):
    check_one_cached_history_scores_many_requests(tiny(family))


@pytest.mark.parametrize("family, overrides", [(family, {}) for family in BASELINES] + [("hstu", dict(norm="post"))])
def test_gradients_reach_every_parameter(family, overrides):
    """Post-norm HSTU too: each layer's norm_in, the last layer's included, is now its output norm."""
    check_gradients_reach_every_parameter(tiny(family, **overrides))


@pytest.mark.parametrize("family, overrides", [("sasrec", {}), ("sasrec", dict(norm="post")), ("hstu", {}),
                                               ("hstu", dict(norm="post"))])
def test_config_round_trips_through_json(family, overrides):
    model = tiny(family, **overrides)
    rebuilt = model_from_config(family, json.loads(json.dumps(model.config.to_dict())))
    assert rebuilt.config == model.config and type(rebuilt) is type(model)


@pytest.mark.parametrize("family", ["sasrec", "hstu", "astro"])
def test_the_norm_layout_is_recorded_only_when_it_is_not_the_default(family):
    """Configs frozen before `norm` existed record no such key: the pre-norm default must
    still read as the same model, and a post-norm one must say so. ASTRO's pointwise blocks
    (its default) take either layout; its shared candidate path is pre-norm only."""
    assert "norm" not in tiny(family).config.to_dict()
    assert tiny(family, norm="post").config.to_dict()["norm"] == "post"
    with pytest.raises(ValueError, match="norm must be one of"):
        tiny(family, norm="sandwich")
    if family == "astro":
        assert tiny(family, norm="post", block_attention="softmax").config.to_dict()["norm"] == "post"
        with pytest.raises(ValueError, match="norm='post' needs candidate_path='per_block'"):
            tiny(family, norm="post", candidate_path="shared")


@pytest.mark.parametrize("family", ("astro", *BASELINES))
def test_init_and_logit_norm_are_recorded_only_off_their_default(family):
    """Configs frozen before `init` and `logit_norm` existed must still read as the same model."""
    recorded = tiny(family).config.to_dict()
    assert "init" not in recorded and "logit_norm" not in recorded
    changed = tiny(family, init="normal", logit_norm=False).config.to_dict()
    assert changed["init"] == "normal" and changed["logit_norm"] is False
    with pytest.raises(ValueError, match="init must be one of"):
        tiny(family, init="xavier")
    with pytest.raises(ValueError, match="logit_norm must be true or false"):
        tiny(family, logit_norm="no")


@pytest.mark.parametrize("family", ("astro", *BASELINES))
def test_normal_init_is_recboles_rule_and_keeps_deliberate_starts(family):
    """init=normal: every Linear weight N(0, 0.02) and bias 0, LayerNorms 1 and 0 (RecBole's
    SASRec); ASTRO's temperature still starts at tau = 1, HSTU's relative bias at 0."""
    default, normal = tiny(family), tiny(family, init="normal")
    linears = [m for m in normal.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears if m.weight.numel() >= 256])
    assert weights.std().item() == pytest.approx(0.02, rel=0.1) and abs(weights.mean().item()) < 0.002
    temperature = getattr(normal, "temperature", None)
    for m in linears:
        if temperature is None or m is not temperature.mlp[2]:
            assert m.bias is None or not m.bias.any()
    if temperature is not None:
        assert torch.equal(temperature.mlp[2].bias, default.temperature.mlp[2].bias)  # tau = 1 at the start
    for m in normal.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    for name, p in normal.named_parameters():
        if "rab_" in name:
            assert not p.any()
    assert not normal.embed.track.weight[0].any()  # padding row
    # the default init draws exactly what it drew before the option existed
    again = tiny(family)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("family", ("astro", *BASELINES))
def test_the_size_ladder_grows_in_parameters_and_flops(family):
    models = [build_model(family, size, 100) for size in SIZE_NAMES]
    params = [m.n_params(include_embeddings=False) for m in models]
    flops = [m.flops_per_request(256, 32) for m in models]
    assert params == sorted(params) and len(set(params)) == len(params)
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    # Every rung still scores a (small) batch.
    with torch.no_grad():
        assert models[0].eval()(random_batch(2, 8, 3, 100)).shape == (2, 3, len(TASKS))


def test_flops_grow_quadratically_in_history_only_through_attention():
    model = tiny("sasrec")
    short, long = model.flops_breakdown(64, 8), model.flops_breakdown(128, 8)
    assert long["history_attention"] == 4 * short["history_attention"]
    assert long["linear"] < 2 * short["linear"]


def test_the_ladder_takes_per_family_overrides_and_keys_rungs_by_them(tmp_path):
    """`climber scaling --set astro:KEY=VALUE`: parsed like `train --set`, kept in the rung key."""
    from studies.scaling import Budget, _rung_key, family_overrides, parse_family_override, run_ladder

    items = [parse_family_override("astro:block_attention=pointwise"), parse_family_override("astro:n_layers=1")]
    assert items == [("astro", "block_attention", "pointwise"), ("astro", "n_layers", 1)]
    overrides = family_overrides(items)
    assert overrides == {"astro": {"block_attention": "pointwise", "n_layers": 1}}
    budget = Budget()
    assert _rung_key("astro", "s", budget, overrides["astro"]) != _rung_key("astro", "s", budget)
    assert _rung_key("hstu", "s", budget, None) == _rung_key("hstu", "s", budget, {})  # old keys still match
    with pytest.raises(ValueError, match="FAMILY:KEY=VALUE"):
        parse_family_override("n_layers=1")
    with pytest.raises(ValueError, match="not on the ladder"):
        run_ladder(tmp_path / "none.duckdb", tmp_path, families=["hstu"], overrides={"astro": {"n_layers": 1}})
