"""Model configs: the fields every family shares, the softmax stack's, and the size ladder.

A config is a frozen dataclass: what a checkpoint and a frozen config (configs/) record,
and what `ranker.models.resolve_config` builds from a family, a size and overrides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ranker.batch import TASKS

SIZE_NAMES: tuple[str, ...] = ("xs", "s", "m", "l", "xl")
# The shared depth/width ladder; families may override it.
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "xs": dict(d_model=32, n_layers=1, n_heads=2),
    "s": dict(d_model=64, n_layers=2, n_heads=2),
    "m": dict(d_model=128, n_layers=2, n_heads=4),
    "l": dict(d_model=192, n_layers=3, n_heads=4),
    "xl": dict(d_model=256, n_layers=4, n_heads=8),
}



def _tuples(value: Any) -> Any:
    """JSON turns tuples into lists; frozen configs want them back (hashable, immutable)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def refuse_unknown_fields(cls: type, keys, what: str) -> None:
    """A config dataclass built from user input (flags, JSON, frozen files) names a wrong key
    by name, with the ones it knows, instead of a TypeError from the constructor."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")

INITS = ("default", "normal")
NORMS = ("pre", "post")


@dataclass(frozen=True)
class ModelConfig:
    n_tracks: int  # catalogue size; embedding rows are n_tracks + 1 (row 0 is padding)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 256  # longest history; positions 0..max_len (a candidate sits at max_len)
    dropout: float = 0.1
    n_time_buckets: int = 48  # half-octave buckets of seconds: 2^23 s ~ 3 months at the top
    head_hidden: int = 0  # hidden width of the task heads; 0 means d_model
    # Ranking score = sum_t w_t * sigmoid(logit_t), in TASKS order (full_play, like, skip, share).
    task_weights: tuple[float, ...] = (1.0, 0.5, -1.0, 1.0)
    # "default": PyTorch's per-layer init (Linear: uniform +-1/sqrt(fan_in)), token tables
    # N(0, 0.02); "normal": RecBole's / BERT's rule, every Linear weight N(0, 0.02), its bias 0
    # (SequenceRanker.apply_init; deliberate starts such as tau = 1 are kept).
    init: str = "default"
    # Next-item logits = LayerNorm(h) . item (parameter-free norm: one scale for the user side)
    # when true; h . item as SASRec/RecBole score when false (a post-norm stack already ends
    # in a LayerNorm with its own gain, which then sets the softmax's temperature).
    logit_norm: bool = True
    # Layer layout, every family: "pre": x + f(LayerNorm(x)) (GPT-2, nanoGPT, Meta's HSTU);
    # "post": LayerNorm(x + f(x)) with a LayerNorm on the input tokens, the original
    # Transformer's layout and RecBole's SASRec (each family's layers say how they apply it).
    norm: str = "pre"
    # Fields added after figures were frozen: `to_dict` leaves them out at their default, so
    # a model recorded before they existed (configs/, checkpoints) still reads as the same model.
    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("init", "logit_norm", "norm")

    def __post_init__(self) -> None:
        for name in ("n_tracks", "d_model", "n_layers", "n_heads", "max_len", "n_time_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.logit_norm, bool):
            raise ValueError(f"logit_norm must be true or false, got {self.logit_norm!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if len(self.task_weights) != len(TASKS):
            raise ValueError(f"task_weights needs {len(TASKS)} weights for {TASKS}, got {self.task_weights}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        defaults = {f.name: f.default for f in fields(self)}
        for name in self.OMITTED_AT_DEFAULT:
            if data[name] == defaults[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        refuse_unknown_fields(cls, data, f"{cls.__name__} fields")
        return cls(**{k: _tuples(v) for k, v in data.items()})


@dataclass(frozen=True)
class SoftmaxConfig(ModelConfig):
    ffn_mult: int = 4  # feed-forward width = ffn_mult * d_model


def config_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: recorded X, now Y' for each field that differs, compared as JSON and YAML hold
    values (tuples, nested too, are lists), so a config read back from a file can match."""
    def norm(value: Any) -> Any:
        return json.loads(json.dumps(value))

    keys = sorted(set(recorded) | set(now))
    return [f"{k}: recorded {recorded.get(k, '(absent)')!r}, now {norm(now.get(k, '(absent)'))!r}"
            for k in keys if norm(recorded.get(k)) != norm(now.get(k))]
