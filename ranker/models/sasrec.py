"""SASRec-style baseline: one causal softmax transformer over the whole history.

The same tokens, heads and target-aware candidate scoring as ASTRO, without the partition,
the temperature or the fusion gate, so a comparison isolates those three ideas.
"""

from __future__ import annotations

from dataclasses import dataclass

from ranker.models.config import DEFAULT_SIZES, SoftmaxConfig
from ranker.models.base import SingleStackRanker
from ranker.models.layers import SoftmaxStack

SIZES = DEFAULT_SIZES


@dataclass(frozen=True)
class SASRecConfig(SoftmaxConfig):
    pass


class SASRecModel(SingleStackRanker):
    family = "sasrec"
    config: SASRecConfig
    config_class = SASRecConfig
    SIZES = SIZES

    def __init__(self, cfg: SASRecConfig):
        super().__init__(cfg, SoftmaxStack(cfg))
