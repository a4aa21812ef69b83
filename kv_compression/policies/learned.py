from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import RECENT, SINKS, WINDOW
from forward_influence.errors import InputError
from forward_influence.observation import Observation, Reads

from .base import Count, Policy, group_reduce, normalise, protect

TOP_KS = (10, 256)
FEATURES = (
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


def feature_reads(window: int = WINDOW) -> Reads:
    """What `features` reads of an observation."""
    return Reads(
        window=window, top_k=frozenset(TOP_KS), cumulative_attention=True, layer_change=True, final_distance=True
    )


def features(obs: Observation, layer: int, window: int = WINDOW) -> torch.Tensor:
    """The online signals of every cached token of `layer`: ``[batch, kv_heads, tokens, len(FEATURES)]``.

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


def band(index: int, count: int, bands: int) -> int:
    """The band of the `index`-th of `count` full-attention layers: ``bands`` equal slices of them."""
    return min(bands - 1, index * bands // count)


def token_features(obs: Observation, window: int = WINDOW) -> torch.Tensor:
    """The ranked signals of every token seen, per full-attention layer, averaged over the layer's KV
    heads: ``[batch, full layers, seen, len(FEATURES)]`` (NaN for a token no head of the layer holds)."""
    seen = max(t.shape[-1] for t in obs.entropy_next.values())
    tables = []
    for layer in obs.full_layers:
        values = ranked(features(obs, layer, window))  # [batch, kv_heads, tokens, features]
        positions = obs.layers[layer].positions
        batch, heads, tokens, count = values.shape
        index = positions.reshape(batch, heads * tokens, 1).expand(-1, -1, count)
        total = torch.zeros(batch, seen, count, device=values.device).scatter_add_(
            1, index, values.reshape(batch, -1, count)
        )
        held = torch.zeros(batch, seen, 1, device=values.device).scatter_add_(
            1, index[..., :1], torch.ones_like(index[..., :1], dtype=values.dtype)
        )
        tables.append(total / held)
    return torch.stack(tables, dim=1)


@dataclass
class Learned(Policy):
    """A linear score fitted to measured Forward Influence (``forward-influence learn``).

    Each token is described by the online signals of `FEATURES` (`features`: window, cumulative and
    per-query attention, top-k entropies at k = 10 and 256 in both alignments, both representation
    changes, key and value norms, relative position, key redundancy), each ranked among a layer's cached
    tokens per KV head, scaled to [0, 1] and averaged over the heads (`token_features`); the full-attention
    layers are cut into `bands` equal slices, whose rank averages are the features. The score is
    ``intercept + sum_b w_b . features_b``, `weights` holding the bands' vectors one after the other: a
    ridge regression of each token's rank of far Forward Influence (mean KL at distances 33-64, the
    token evicted alone at the compression time) on its features, fitted on the calibration essays only
    (`analyses.learned`), read by the CLI name ``learned``. The score is the token's, so every layer and
    KV head keeps the same tokens (whose signals then stay comparable across heads). The first `sinks`
    tokens are always kept, as random and StreamingLLM keep them: a linear score of ranks cannot single
    out one outlier, and Gemma's `<bos>`, the most influential token of every calibration essay, ranks
    only 163rd of 1024 by the fitted score on an evaluation essay. The newest `recent` tokens (whose
    window attention is their own) are always kept too. Scores:
    [batch, kv_heads, tokens]; higher means keep.
    """

    name = "learned"
    bands: Count = 1
    weights: tuple[float, ...] = ()
    intercept: float = 0.0
    window: Count = WINDOW
    sinks: int = SINKS
    recent: int = RECENT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights and len(self.weights) != self.bands * len(FEATURES):
            raise InputError(
                f"learned: {len(self.weights)} weights for {self.bands} band(s) of {len(FEATURES)} signals"
            )

    def reads(self) -> Reads:
        return feature_reads(self.window)

    def token_score(self, obs: Observation) -> torch.Tensor:
        """``[batch, seen]``: the score of every token seen, derived once per observation."""
        key = ("learned", self.bands, self.weights, self.intercept, self.window)
        if key not in obs.derived:
            if not self.weights:
                raise InputError(
                    "learned: no weights; build it with kv_compression.tuned.learned(model) or "
                    "`forward-influence learn`"
                )
            table = token_features(obs, self.window)  # [batch, layers, seen, features]
            count = table.shape[1]
            which = torch.tensor([band(i, count, self.bands) for i in range(count)], device=table.device)
            weights = torch.tensor(self.weights, dtype=torch.float32, device=table.device)
            weights = weights.reshape(self.bands, len(FEATURES))
            banded = torch.stack([table[:, which == b].nanmean(dim=1) for b in range(self.bands)], dim=1)
            obs.derived[key] = torch.einsum("bksf,kf->bs", torch.nan_to_num(banded, nan=0.5), weights) + self.intercept
        return obs.derived[key]

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        return protect(obs.per_token(layer, self.token_score(obs)), self.sinks, self.recent)
