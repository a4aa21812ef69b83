from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import QUERY_WINDOW, SINKS
from forward_influence.observation import Observation, Reads

from .base import Count, NonNegative, Policy, protect


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * angles.shape[-1]`` dimensions of `x` as RoPE does (the two halves of the
    rotary dimensions are the pairs), by `angles` (radians, broadcast against ``x[..., :r/2]``)."""
    half = angles.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def mean_rotation(angles: torch.Tensor, dim: int) -> torch.Tensor:
    """The average ``[dim, dim]`` of the RoPE rotations by each row of `angles` ``[positions, r/2]``
    (identity on the dimensions RoPE leaves alone)."""
    half = angles.shape[-1]
    cos, sin = angles.cos().mean(dim=0), angles.sin().mean(dim=0)
    matrix = torch.eye(dim, dtype=angles.dtype, device=angles.device)
    top, bottom = slice(0, half), slice(half, 2 * half)
    matrix[top, top] = torch.diag(cos)
    matrix[bottom, bottom] = torch.diag(cos)
    matrix[top, bottom] = -torch.diag(sin)
    matrix[bottom, top] = torch.diag(sin)
    return matrix


@dataclass
class ExpectedAttention(Policy):
    """The attention future queries are expected to pay each key (Expected Attention, Devoto et al.,
    arXiv 2510.00636; kvpress's ``ExpectedAttentionPress``).

    Queries are modelled as a Gaussian. Its statistics come from the last `window` queries the layer
    received (after norms and RoPE), each rotated back to position 0 (RoPE's inverse at its own
    position): their mean m and covariance C per query head. The next `future` positions
    ``n .. n + future - 1`` (n = the position after the newest query) are averaged into one matrix R̄,
    the mean of their RoPE rotations, so the expected future query has mean ``mu = R̄ m`` and covariance
    ``Sigma = R̄ C R̄^T``. A Gaussian query q gives ``E[exp(s q.k)] = exp(s mu.k + s^2 k^T Sigma k / 2)``
    (s the layer's attention scaling), so each key k's expected attention is the softmax over the
    cached keys of ``s mu.k + s^2 k^T Sigma k / 2`` (`covariance` = False drops the second term),
    averaged over the query heads of its KV group and multiplied by ``(score + epsilon) * ||v||``, the
    norm of its value (`value_norm`). The first `sinks` tokens are left out of the softmax and always
    kept. kvpress takes the statistics of every prompt token's hidden state through the query
    projection before RoPE and refuses models with query/key norms; rotating the recorded queries back
    gives the same pre-RoPE queries after the norms, so Gemma3 works too. Models without RoPE use the
    queries as they are. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "expected-attention"
    future: Count = 512
    window: Count = QUERY_WINDOW
    sinks: int = SINKS
    covariance: bool = True
    value_norm: bool = True
    epsilon: NonNegative = 0.0

    def reads(self) -> Reads:
        return Reads(window=self.window)

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        view = obs.layers[layer]
        queries = view.queries[:, :, -self.window :].float()  # [batch, heads, w, dim]
        positions = view.query_positions[-self.window :].float()
        dim = queries.shape[-1]
        if view.inv_freq is None:
            unrotated, rotation = queries, torch.eye(dim, device=queries.device)
        else:
            frequencies = view.inv_freq.float().to(queries.device)
            unrotated = rotate(queries, -positions[:, None] * frequencies)
            ahead = torch.arange(self.future, device=queries.device) + positions[-1] + 1
            rotation = mean_rotation(ahead[:, None] * frequencies, dim)
        mean = unrotated.mean(dim=2)  # [batch, heads, dim]
        group = queries.shape[1] // view.keys.shape[1]
        keys = view.keys[:, :, self.sinks :].float().repeat_interleave(group, dim=1)  # [batch, heads, n, dim]
        logits = view.scaling * torch.einsum("bhnd,bhd->bhn", keys, mean @ rotation.T)
        if self.covariance and unrotated.shape[2] > 1:
            centred = unrotated - mean[:, :, None]
            spread = rotation @ (centred.transpose(-1, -2) @ centred / unrotated.shape[2]) @ rotation.T
            logits = logits + 0.5 * view.scaling**2 * torch.einsum("bhnd,bhde,bhne->bhn", keys, spread, keys)
        expected = torch.softmax(logits, dim=-1)
        expected = expected.reshape(expected.shape[0], -1, group, expected.shape[-1]).mean(dim=2)
        if self.value_norm:
            expected = (expected + self.epsilon) * view.values[:, :, self.sinks :].float().norm(dim=-1)
        sinks = torch.zeros(*expected.shape[:2], min(self.sinks, view.keys.shape[2]), device=expected.device)
        return protect(torch.cat([sinks, expected], dim=-1), sinks=self.sinks)
