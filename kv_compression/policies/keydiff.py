from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.observation import Observation

from .base import Policy


@dataclass
class KeyDiff(Policy):
    """Keep the keys least like the average key (KeyDiff, Park et al., arXiv 2504.15364).

    Per KV head, the anchor is the mean of the layer's unit-normalised cached keys; each token scores
    minus the cosine similarity of its key with the anchor, so the most distinctive keys are kept. It
    reads no attention, so it runs with any attention kernel. Nothing is protected (as in kvpress's
    ``KeyDiffPress``, the one-shot form of the paper's block-wise eviction). Scores: [batch, kv_heads,
    tokens]; higher means keep.
    """

    name = "keydiff"

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        keys = obs.layers[layer].keys.float()
        anchor = torch.nn.functional.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
        return -torch.nn.functional.cosine_similarity(keys, anchor, dim=-1)
