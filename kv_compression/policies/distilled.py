from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import RECENT, SINKS, WINDOW
from forward_influence.errors import InputError
from forward_influence.observation import Observation, Reads

from .base import Count, Policy, protect
from .learned import FEATURES, band, feature_reads, features, ranked


@dataclass
class Distilled(Policy):
    """Keep what the set optimum keeps: a compressor distilled from `optimal` (``forward-influence distill``).

    Each cached entry of a full-attention layer and KV head is described by its online signals
    (`learned.FEATURES`: window, cumulative and per-query attention, top-k entropies at k = 10 and 256
    in both alignments, both representation changes, key and value norms, relative position, key
    redundancy), each ranked among the head's cached entries and scaled to [0, 1]. The full-attention
    layers are cut into `bands` equal slices, each with its own logistic regression of whether the set
    optimum keeps the entry, fitted on `optimal`'s kept sets of the calibration essays at budgets 0.1,
    0.25 and 0.5 (`analyses.distill`); `weights` holds the bands' vectors one after the other and
    `intercepts` one value per band. The score is the regression's log-odds, per KV head, so heads keep
    different tokens as the optimum's do. The first `sinks` tokens (as many as the calibration sets say
    the optimum always keeps) and the newest `recent` are always kept. Scores: [batch, kv_heads,
    tokens]; higher means keep.
    """

    name = "distilled"
    bands: Count = 1
    weights: tuple[float, ...] = ()
    intercepts: tuple[float, ...] = ()
    window: Count = WINDOW
    sinks: int = SINKS
    recent: int = RECENT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights and (len(self.weights) != self.bands * len(FEATURES) or len(self.intercepts) != self.bands):
            raise InputError(
                f"distilled: {len(self.weights)} weights and {len(self.intercepts)} intercepts for "
                f"{self.bands} band(s) of {len(FEATURES)} signals"
            )

    def reads(self) -> Reads:
        return feature_reads(self.window)

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        if not self.weights:
            raise InputError("distilled: no weights; build it with kv_compression.tuned.distilled(model)")
        full = obs.full_layers
        which = band(full.index(layer), len(full), self.bands)
        weights = torch.tensor(self.weights, dtype=torch.float32).reshape(self.bands, len(FEATURES))[which]
        values = ranked(features(obs, layer, self.window))  # [batch, kv_heads, tokens, features]
        scores = values @ weights.to(values.device) + self.intercepts[which]
        return protect(scores, self.sinks, self.recent)
