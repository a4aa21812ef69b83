"""The eviction set that minimises the future's divergence under a budget, found by optimising soft gates.

Forward Influence is a property of sets: evicting a set can cost many times the sum of its tokens'
single-token influences, so ranking tokens one at a time cannot find the best set. This module
searches the sets themselves. At eviction time t, every compressed layer and KV head keeps `keep` of
its t + 1 cached tokens; the search minimises the mean KL(full || gated) over the next `distance`
positions (`forward_influence.gates.gated_kl`) over those choices, relaxed:

- a score theta per (layer, KV head, token) and gates ``g = sigmoid((theta - tau) / T)``, where tau
  is each head's threshold halfway between its keep-th and (keep + 1)-th largest theta (held fixed
  within a step), so about `keep` gates per head are open: a soft top-k that keeps every head's
  budget;
- the temperature T falls geometrically from ``temperatures[0]`` to ``temperatures[1]`` over the
  steps, so the gates harden towards a 0/1 choice. Theta starts in [-1, 1], where neighbouring ranks
  of a 1024-token head lie 0.002 apart: at the last temperature (0.001) only a few tokens around each
  threshold are still partly open, so the relaxed loss ends close to the exact one (with a final
  temperature of 0.05 a hundred tokens per head stayed half open, and the relaxed loss fell far below
  the exact one while the exact one rose);
- Adam on theta, one forward and one backward pass per step for every start at once (a start is a
  batch row).

A start is an initial theta: each head's ranks of some scores (a baseline policy's, or all equal for
the uniform start), scaled to [-1, 1]. After the search each head keeps its `keep` largest theta: that
hard set is what the search returns (or the start's own hard set, when the search ended worse than it
began), measured exactly (hard 0/1 gates, which equal the tracer's eviction masks), never by its
relaxed loss; the relaxed loss of the last step is kept beside it to show the gap. Layers the caller
leaves out keep every token (their gates stay 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InputError
from .gates import full_gates, gated_kl
from .influence import CleanRun
from .tracer import Tracer


@dataclass(frozen=True)
class SetSearch:
    """How the search runs (module docstring): `budget`, the kept share of each head (in (0, 1]);
    `distance`, the positions after t whose mean KL it minimises; Adam `steps` and learning rate `lr`;
    the temperature schedule; the `starts`, names the caller turns into initial scores."""

    budget: float = 0.25
    distance: int = 256
    steps: int = 20
    lr: float = 0.05
    temperatures: tuple[float, float] = (0.1, 0.001)
    starts: tuple[str, ...] = ("uniform",)


@dataclass
class SetOptimum:
    """What a search found, per start (in `starts` order): the final `thetas` ``[starts, searched layers,
    kv_heads, tokens]``, the exact mean KL of its hard set (`exact_kl`), the relaxed loss of its last
    step (`relaxed_kl`) and the exact mean KL of the start's own hard set (`start_kl`, what the starting
    policy keeps). `best` indexes the start whose hard set has the lowest exact KL, `theta` is its."""

    layers: tuple[int, ...]
    thetas: torch.Tensor
    starts: tuple[str, ...]
    exact_kl: list[float]
    relaxed_kl: list[float]
    start_kl: list[float]

    @property
    def best(self) -> int:
        return min(range(len(self.exact_kl)), key=self.exact_kl.__getitem__)

    @property
    def theta(self) -> torch.Tensor:
        return self.thetas[self.best]


def initial_theta(scores: torch.Tensor) -> torch.Tensor:
    """Each head's ranks of `scores` ``[..., tokens]`` scaled to [-1, 1] (ties and +inf by order): a
    start that keeps the scores' order whatever their scale."""
    finite = torch.nan_to_num(scores.float(), posinf=torch.finfo(torch.float32).max)
    ranks = finite.argsort(dim=-1, stable=True).argsort(dim=-1).float()
    return 2 * ranks / max(scores.shape[-1] - 1, 1) - 1


def _gates(tracer: Tracer, theta: torch.Tensor, layers: Sequence[int], open_: torch.Tensor) -> torch.Tensor:
    """Full gates ``[starts, layers, kv_heads, tokens]`` with `open_` ``[starts, searched layers, kv_heads,
    tokens]`` in the searched layers."""
    batch, _, _, tokens = theta.shape
    gates = full_gates(tracer, tokens - 1, batch)
    rows = list(gates.unbind(dim=1))
    for index, layer in enumerate(layers):
        rows[layer] = open_[:, index]
    return torch.stack(rows, dim=1)


def hard_keep(theta: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 gates of the same shape as `theta`: 1 for each head's `keep` largest entries, ties going to the
    most recent tokens (as `kv_compression.budget.top_indices` breaks them)."""
    newest_first = theta.flip(-1).sort(dim=-1, descending=True, stable=True).indices
    top = theta.shape[-1] - 1 - newest_first[..., :keep]
    return torch.zeros_like(theta).scatter_(-1, top, 1.0)


def optimise_gates(
    tracer: Tracer,
    clean: CleanRun,
    search: SetSearch,
    starts: torch.Tensor,
    layers: Sequence[int],
    keep: int,
) -> SetOptimum:
    """Run `search` from `starts` ``[len(search.starts), len(layers), kv_heads, t + 1]`` (initial theta,
    see `initial_theta`) over the searched `layers`, keeping `keep` tokens per head; t is the last
    cached position. `clean` covers ``t + search.distance + 1`` tokens."""
    n_starts, _, _, tokens = starts.shape
    if not 1 <= keep < tokens:
        raise InputError(f"keep must lie in [1, {tokens - 1}] to evict anything, got {keep}")
    if n_starts != len(search.starts):
        raise InputError(f"{n_starts} initial scores for {len(search.starts)} starts")
    theta = starts.detach().clone().to(tracer.device).requires_grad_(True)
    initial = _exact_kl(tracer, clean, search, theta.detach().clone(), layers, keep)
    optimiser = torch.optim.Adam([theta], lr=search.lr)
    first, last = search.temperatures
    relaxed = torch.full((n_starts,), float("nan"))
    for step in range(search.steps):
        temperature = first * (last / first) ** (step / max(search.steps - 1, 1))
        top = theta.detach().topk(keep + 1, dim=-1).values
        threshold = (top[..., keep - 1 : keep] + top[..., keep:]) / 2
        gates = _gates(tracer, theta, layers, torch.sigmoid((theta - threshold) / temperature))
        loss = gated_kl(tracer, clean, gates, search.distance).mean(dim=1)
        (gradient,) = torch.autograd.grad(loss.sum(), theta)
        theta.grad = gradient
        optimiser.step()
        relaxed = loss.detach().cpu()
    final = theta.detach()
    searched = _exact_kl(tracer, clean, search, final, layers, keep)
    # A start's own hard set stands when its search ended worse.
    worse = searched > initial
    final[worse] = starts.to(final.device)[worse]
    exact_kl = torch.minimum(searched, initial).tolist()
    return SetOptimum(tuple(layers), final, search.starts, exact_kl, relaxed.tolist(), initial.tolist())


def _exact_kl(
    tracer: Tracer, clean: CleanRun, search: SetSearch, theta: torch.Tensor, layers: Sequence[int], keep: int
) -> torch.Tensor:
    """The mean KL ``[starts]`` of each row's hard set (hard 0/1 gates equal the tracer's eviction masks)."""
    with torch.no_grad():
        gates = _gates(tracer, theta, layers, hard_keep(theta, keep))
        return gated_kl(tracer, clean, gates, search.distance).mean(dim=1).cpu()
