from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import WINDOW
from forward_influence.observation import Observation, Reads

from .base import Count, Policy, broadcast_heads, pool


@dataclass
class RPC(Policy):
    """Reasoning Path Compression (RPC, Song et al., arXiv 2505.13866).

    RPC compresses the generated reasoning path periodically while decoding: every P generated
    tokens (P = 1024) it keeps the prompt, the R most recent tokens (the selector window, R =
    `window` = 32) and the best 1/c of the path between them (c = 4). A path token's importance is
    the attention it receives from the R selector queries, with the softmax taken over the path's
    keys only (prompt and selector window left out), summed over the queries, averaged over all query
    heads (one selection shared by the layer's KV heads) and average-pooled with width `kernel` = 7
    (padding counted, as in the authors' code). Here the prompt is kept (`keep_prompt`) whenever the
    observation is taken while decoding; when the prompt itself is compressed (a prefill, or a
    measurement on a whole trace) it is the path. RPC's schedule is a budget: ``prompt+0.25`` with a
    buffer of 1024 compresses every 1024 generated tokens to the prompt plus a quarter of what was
    generated (the R recent tokens counted inside that quarter, where RPC adds them on top).
    A count budget below the prompt leaves room for the prompt alone: ties go to the most recent.
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "rpc"
    window: Count = WINDOW
    kernel: Count = 7
    keep_prompt: bool = True

    def reads(self) -> Reads:
        return Reads(window=self.window)

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        view = obs.layers[layer]
        positions = view.positions[:, 0]  # one selection for the layer: every head holds the same tokens
        n = positions.shape[-1]
        decoding = obs.prompt_length is not None and int(positions.max()) >= obs.prompt_length
        prompt = int((positions < obs.prompt_length).sum()) if self.keep_prompt and decoding else 0
        path = slice(prompt, max(prompt, n - self.window))
        attention = obs.window_attention(layer, self.window)[..., path]  # [batch, heads, R, path]
        attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        importance = pool(attention.sum(dim=2).mean(dim=1, keepdim=True), self.kernel, count_padding=True)[:, 0]
        scores = torch.full((positions.shape[0], n), float("inf"), device=importance.device)
        scores[:, path] = importance
        return broadcast_heads(scores, self.kv_heads(obs, layer))
