"""Every token's Forward Influence from gradients: one forward pass per distance bucket for all tokens.

The exact influence of token j at a common eviction time t (`forward_influence.scan.scan_at`, what the
`oracle` reads) costs one replay per token. The estimate here costs, per distance bucket, one forward
pass and a few backward passes for all tokens, layers and KV heads at once, through the soft eviction
gates of `forward_influence.gates`.

The estimator. KL(full || gated) is zero, with zero gradient, at the full cache (g = 1), so a first
derivative there says nothing; the first term that does is the second-order one. With delta = 1 - g,

    KL(g) ~ 1/2 delta^T F delta,    F = E_{y ~ p_full} [ grad_g log p(y) grad_g log p(y)^T ]  at g = 1,

where F is the Fisher information of the next-token distributions with respect to the gates (the
Hessian of the KL at the full cache). Evicting token j alone closes all of its gates (delta = e_j), so
its influence is about ``F_jj / 2``, and its influence through one layer and KV head alone about the
diagonal entry of that gate. Per position q the score ``grad log p_q(y_q)`` has zero mean under
p_q, so for labels y_q drawn independently at every position of a bucket,
``E[(d/dg_j sum_q log p_q(y_q))^2] = sum_q F^(q)_jj``: one backward pass per sampled continuation
(`samples` of them, over one shared forward pass) estimates every token's diagonal at once, per layer
and head or summed over them (one gate shared by all of a token's layers and heads has the summed
derivative). It is an estimate: second order in delta (tokens that take much of a query's attention
are evicted far from that regime) and a Monte Carlo average (its noise falls as 1 / samples).
`analyses.gradient_influence` measures how well it ranks tokens against the exact scan.

Buckets: ``near`` is the mean KL over distances `NEAR` (1-8), ``far`` over distances `FAR_FROM` (33)
to D, as in `forward_influence.scan`; each bucket runs only the positions it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .defaults import FAR_FROM, GRADIENT_SAMPLES, NEAR
from .errors import InputError
from .gates import full_gates, gated_log_probs
from .influence import CleanRun
from .tracer import Tracer


@dataclass
class GradientInfluence:
    """Estimated influence ``[layers, kv_heads, time + 1]`` per bucket (nats of the bucket's mean KL)
    of evicting each token in one layer and KV head alone, and ``[time + 1]`` of evicting it everywhere
    (`near_token`, `far_token`), at eviction time `time`. The far fields are None when the distance
    does not reach `FAR_FROM`."""

    time: int
    near: torch.Tensor
    near_token: torch.Tensor
    far: torch.Tensor | None = None
    far_token: torch.Tensor | None = None

    def per_token(self) -> pd.DataFrame:
        """``position, fi_near, fi_far``: each token's estimated influence, evicted from every layer and head."""
        far = self.far_token.cpu().numpy() if self.far_token is not None else np.nan
        return pd.DataFrame(
            {"position": np.arange(self.time + 1), "fi_near": self.near_token.cpu().numpy(), "fi_far": far}
        )


def fisher_influence(
    tracer: Tracer,
    clean: CleanRun,
    time: int,
    first: int,
    last: int,
    samples: int = GRADIENT_SAMPLES,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimated influence on the mean KL over distances `first`..`last` after `time` (the Fisher
    diagonals / 2, module docstring): per gate ``[layers, kv_heads, time + 1]`` (evicting one token from
    one layer and KV head) and per token ``[time + 1]`` (from all of them)."""
    gates = full_gates(tracer, time).requires_grad_(True)
    log_p = gated_log_probs(tracer, clean, gates, last)[0, first - 1 :]  # [n, vocab]
    labels = torch.multinomial(log_p.detach().exp(), samples, replacement=True, generator=generator)
    likelihoods = log_p.gather(-1, labels).sum(dim=0)  # [samples]
    per_gate = torch.zeros_like(gates[0])
    per_token = torch.zeros(time + 1, device=tracer.device)
    for sample in range(samples):
        (gradient,) = torch.autograd.grad(likelihoods[sample], gates, retain_graph=sample < samples - 1)
        per_gate += gradient[0].square()
        per_token += gradient[0].sum(dim=(0, 1)).square()
    scale = 2 * samples * (last - first + 1)
    return per_gate / scale, per_token / scale


def gradient_influence(
    tracer: Tracer, clean: CleanRun, time: int, max_distance: int, samples: int = GRADIENT_SAMPLES, seed: int = 0
) -> GradientInfluence:
    """The Fisher estimate (module docstring) of every cached token's near and far influence at eviction
    time `time`, per layer and KV head and per token. `clean` must cover ``time + max_distance + 1``
    tokens; `seed` fixes the sampled continuations."""
    if samples < 1:
        raise InputError(f"samples must be at least 1, got {samples}", "samples")
    if max_distance < NEAR[1]:
        raise InputError(
            f"max_distance must be at least {NEAR[1]} (the near bucket), got {max_distance}", "max_distance"
        )
    generator = torch.Generator(device=tracer.device).manual_seed(seed)
    near = fisher_influence(tracer, clean, time, NEAR[0], NEAR[1], samples, generator)
    far = (None, None)
    if max_distance >= FAR_FROM:
        far = fisher_influence(tracer, clean, time, FAR_FROM, max_distance, samples, generator)
    return GradientInfluence(time, *near, *far)
