from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import WINDOW
from forward_influence.errors import InputError
from forward_influence.observation import Observation, Reads

from .base import Count, Policy, group_reduce, normalise, protect

TOP_KS = (10, 256)
SIGNALS = (
    "attention_window",
    "attention_cumulative",
    "attention_per_query",
    "entropy_next_10",
    "entropy_generated_10",
    "entropy_next_256",
    "entropy_generated_256",
    "layer_change",
    "final_distance",
    "key_norm",
    "value_norm",
    "relative_position",
    "redundancy",
    "duplicate",
)


def signals(obs: Observation, layer: int, window: int = WINDOW) -> torch.Tensor:
    """The online signals of every cached token of `layer`: ``[batch, kv_heads, tokens, len(SIGNALS)]``.

    attention_window: attention from the last `window` queries, mean over them and over each KV group;
    attention_cumulative: attention received from every query so far (H2O), mean over each group;
    attention_per_query: the same divided by the number of queries that saw the token (``seen - p``);
    entropy_<alignment>_<k>: top-k entropy (k = 10, 256) at the token (next) or of the distribution
    that produced it (generated); layer_change: ``1 - cos`` across this layer; final_distance: cosine
    distance of the token's stream after this layer to the last layer's; key_norm, value_norm: L2
    norms of the cached entries; relative_position: ``p / (seen - 1)`` (its rank is the reverse rank of the
    token's age); redundancy: mean cosine similarity of the key with the layer's other keys (R-KV);
    duplicate: the largest cosine similarity with a later key.
    """
    view = obs.layers[layer]
    heads = view.keys.shape[1]
    seen = max(t.shape[-1] for t in obs.entropy_next.values())
    cumulative = group_reduce(view.cumulative_attention, heads)
    keys = torch.nn.functional.normalize(view.keys.float(), dim=-1)
    similarity = keys @ keys.transpose(-1, -2)
    similarity.diagonal(dim1=-2, dim2=-1).zero_()
    later = similarity.masked_fill(~torch.ones_like(similarity, dtype=torch.bool).triu(diagonal=1), -1.0)
    tables = [
        group_reduce(obs.window_attention(layer, window).mean(dim=2), heads),
        cumulative,
        cumulative / (seen - view.positions).float(),
        *[obs.per_token(layer, obs.entropy(k, alignment)) for k in TOP_KS for alignment in ("next", "generated")],
        obs.per_token(layer, obs.layer_change[:, layer]),
        obs.per_token(layer, obs.final_distance[:, layer]),
        view.keys.float().norm(dim=-1),
        view.values.float().norm(dim=-1),
        view.positions.float() / max(seen - 1, 1),
        similarity.sum(dim=-1) / max(similarity.shape[-1] - 1, 1),
        later.amax(dim=-1).clamp_min(0.0),
    ]
    return torch.stack([t.float() for t in tables], dim=-1)


def ranked(values: torch.Tensor) -> torch.Tensor:
    """Each signal ranked among the layer's cached tokens, scaled to [0, 1] (unknown values: 0.5)."""
    ranks = normalise(values.movedim(-1, -2), "rank").movedim(-2, -1)
    return torch.nan_to_num(ranks, nan=0.5)


def band(layer: int, layers: int, bands: int) -> int:
    """The band (early, middle, late third, ...) of a layer: ``bands`` equal slices of the layers."""
    return min(bands - 1, layer * bands // layers)


@dataclass
class Learned(Policy):
    """A linear score fitted to measured Forward Influence (``forward-influence learn``).

    Each cached token of a layer is described by the online signals of `SIGNALS` (`signals`: window,
    cumulative and per-query attention, top-k entropies at k = 10 and 256 in both alignments, both
    representation changes, key and value norms, relative position, key redundancy), each ranked among
    the layer's tokens per KV head and scaled to [0, 1]. The score is ``intercept + w_b . ranks``, with
    one weight vector per band of layers (`bands` equal slices; 1 = one vector for every layer),
    `weights` holding the bands' vectors one after the other. The weights are a ridge regression of
    each token's rank of far Forward Influence (mean KL at distances 33-64, the token evicted alone at
    the compression time) on its signals' ranks, fitted on the calibration essays only
    (`analyses.learned`); the fitted file of a model is read by the CLI name ``learned``. The newest
    `recent` tokens (whose window attention is their own) are always kept.
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "learned"
    bands: Count = 1
    weights: tuple[float, ...] = ()
    intercept: float = 0.0
    window: Count = WINDOW
    recent: int = WINDOW

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights and len(self.weights) != self.bands * len(SIGNALS):
            raise InputError(f"learned: {len(self.weights)} weights for {self.bands} band(s) of {len(SIGNALS)} signals")

    def reads(self) -> Reads:
        return Reads(
            window=self.window,
            top_k=frozenset(TOP_KS),
            cumulative_attention=True,
            layer_change=True,
            final_distance=True,
        )

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        if not self.weights:
            raise InputError(
                "learned: no weights; build it with kv_compression.tuned.learned(model) or `forward-influence learn`"
            )
        vector = torch.tensor(self.weights, dtype=torch.float32).reshape(self.bands, len(SIGNALS))
        weights = vector[band(layer, len(obs.layers), self.bands)].to(obs.layers[layer].keys.device)
        return protect(ranked(signals(obs, layer, self.window)) @ weights + self.intercept, recent=self.recent)
