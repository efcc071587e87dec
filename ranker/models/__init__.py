"""The model families and their registry: a family name and a size build a model.

    model = build_model("astro", "s", n_tracks)          # ladder rung "s", untrained
    model = model_from_config("astro", checkpoint["config"])

Each family is a `SequenceRanker` (ranker.models.base) with its config class and size
ladder; `FAMILIES` is the list every command offers (the CLI's choices come from it).
"""

from __future__ import annotations

from typing import Any

from ranker.models.astro import AstroModel
from ranker.models.base import SequenceRanker
from ranker.models.config import ModelConfig, refuse_unknown_fields
from ranker.models.hstu import HSTUModel
from ranker.models.sasrec import SASRecModel

MODEL_FAMILIES: dict[str, type[SequenceRanker]] = {"astro": AstroModel, "sasrec": SASRecModel, "hstu": HSTUModel}
FAMILIES: tuple[str, ...] = tuple(MODEL_FAMILIES)


def model_class(family: str) -> type[SequenceRanker]:
    families = MODEL_FAMILIES
    if family not in families:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(families)}")
    return families[family]


def resolve_config(family: str, size: str, n_tracks: int, **overrides: Any) -> ModelConfig:
    """The config of `family` at ladder rung `size`, any field overridable: what a frozen
    config records, and what `build_model` builds."""
    cls = model_class(family)
    if size not in cls.SIZES:
        raise ValueError(f"unknown size {size!r} for {family}; known: {list(cls.SIZES)}")
    refuse_unknown_fields(cls.config_class, overrides, f"{cls.config_class.__name__} overrides")
    return cls.config_class(n_tracks=n_tracks, **{**cls.SIZES[size], **overrides})


def build_model(family: str, size: str, n_tracks: int, **overrides: Any) -> SequenceRanker:
    """A model of `family` at ladder rung `size`, any config field overridable."""
    return model_class(family)(resolve_config(family, size, n_tracks, **overrides))


def model_from_config(family: str, config: dict[str, Any]) -> SequenceRanker:
    """Rebuild a model (untrained) from a saved `config.to_dict()`; load weights after."""
    cls = model_class(family)
    return cls(cls.config_class.from_dict(config))
