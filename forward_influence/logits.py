"""Next-token distributions from final hidden states, a chunk of positions at a time.

The tracer reads the final (normed) hidden states, never a ``[tokens, vocab]`` logits tensor: a
49k-262k vocabulary makes that the largest tensor of a long trace. Everything here applies the
language-model head to `chunk` positions at a time, so extra memory is ``chunk x vocab`` floats
whatever the trace length. Entropies and divergences are in nats.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .defaults import TOP_K

DEFAULT_CHUNK = 256


def logits_of(model: PreTrainedModel, final: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., vocab]`` (float32) from final hidden states, with the model's logit soft-capping. The
    head runs in its own dtype (a bfloat16 model gets bfloat16 states), the logits come back in float32."""
    head = model.get_output_embeddings()
    logits = head(final.to(head.weight.dtype)).float()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _restricted_entropy(top_logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax over the last dimension: the renormalised top-k distribution."""
    logp = torch.log_softmax(top_logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropies(
    model: PreTrainedModel, final: torch.Tensor, top_k: int = TOP_K, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k and full-vocabulary entropy of each position's next-token distribution.

    `final` is ``[tokens, hidden]``. The top-k entropy renormalises the k most probable tokens'
    probabilities (softmax over their logits). Returns two ``[tokens]`` float32 tensors.
    """
    top, full = [], []
    for start in range(0, final.shape[0], chunk):
        logits = logits_of(model, final[start : start + chunk])
        logp = torch.log_softmax(logits, dim=-1)
        full.append(-(logp.exp() * logp).sum(-1))
        top.append(_restricted_entropy(logits.topk(min(top_k, logits.shape[-1]), dim=-1).values))
    return torch.cat(top), torch.cat(full)


def _linear_head(model: PreTrainedModel) -> torch.nn.Linear | None:
    """The output head when logits are affine in the final state (no soft-capping), else None."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    return head if isinstance(head, torch.nn.Linear) and not cap else None


@dataclass
class References:
    """The clean run's next-token distributions, summarised once for fast KL against many evicted runs.

    With an affine head (logits = W h + b) and reference probabilities p,
    ``KL(p || q) = sum p log p - (p W) . h_q - p . b + logsumexp(W h_q + b)``,
    so each evicted position costs one row of logits and a logsumexp, and the reference needs only
    ``sum p log p`` (`neg_entropy`), the expected output embedding ``p W`` (`mean_embedding`), ``p . b``
    and its top-1 token, per position. Other heads (soft-capped logits) keep the states and recompute.
    `next_ids` are the tokens that actually follow each position (the last one's is a placeholder)
    and `next_logp` their log-probabilities under the reference.
    """

    final: torch.Tensor
    next_ids: torch.Tensor
    next_logp: torch.Tensor
    neg_entropy: torch.Tensor | None = None
    mean_embedding: torch.Tensor | None = None
    bias_term: torch.Tensor | None = None
    top1: torch.Tensor | None = None


def references(
    model: PreTrainedModel, final: torch.Tensor, token_ids: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> References:
    """Summaries of the distributions at every position of `final` ``[positions, hidden]``, whose
    input tokens are `token_ids` ``[positions]``."""
    head = _linear_head(model)
    next_ids = torch.cat([token_ids[1:], token_ids[-1:]]).to(final.device)
    neg_entropy, mean_embedding, bias_term, top1, next_logp = [], [], [], [], []
    for start in range(0, final.shape[0], chunk):
        logp = torch.log_softmax(logits_of(model, final[start : start + chunk]), dim=-1)
        next_logp.append(logp.gather(-1, next_ids[start : start + chunk, None])[:, 0])
        if head is None:
            continue
        p = logp.exp()
        neg_entropy.append((p * logp).sum(-1))
        mean_embedding.append(p @ head.weight.float())
        bias_term.append(p @ head.bias.float() if head.bias is not None else torch.zeros(p.shape[0], device=p.device))
        top1.append(logp.argmax(-1))
    if head is None:
        return References(final, next_ids, torch.cat(next_logp))
    cat = torch.cat
    return References(final, next_ids, cat(next_logp), cat(neg_entropy), cat(mean_embedding), cat(bias_term), cat(top1))


CANDIDATE_MARGIN = 64
_ROUGH_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rough_weight(head: torch.nn.Linear) -> torch.Tensor:
    """A bfloat16 copy of the head's weight, made once per head (and again if the weight changes)."""
    stored = _ROUGH_WEIGHTS.get(head)
    if stored is None or stored[0] != (head.weight.data_ptr(), head.weight._version):
        stored = ((head.weight.data_ptr(), head.weight._version), head.weight.detach().to(torch.bfloat16))
        _ROUGH_WEIGHTS[head] = stored
    return stored[1]


def _top_logits(model: PreTrainedModel, final: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` largest logits of each row of `final` ``[rows, hidden]``, sorted descending, float32.

    With an affine head the search runs in bfloat16 (several times faster than float32 on CPUs with
    bf16 units and on GPUs): it finds the ``k + CANDIDATE_MARGIN`` most likely tokens of each row,
    whose logits are then computed again exactly in float32, and the top k are taken from those. The
    result equals the float32 computation unless a true top-k token lies outside the candidates,
    which needs a bfloat16 error larger than the logit gap across the margin; then a near-tie at rank
    k is swapped, which moves the restricted entropy by far less than its float32 rounding (tested
    against the exact path). Other heads (soft-capping) take the float32 path.
    """
    head = _linear_head(model)
    vocabulary = head.weight.shape[0] if head is not None else None
    if head is None or k + CANDIDATE_MARGIN >= vocabulary:
        logits = logits_of(model, final)
        return logits.topk(min(k, logits.shape[-1]), dim=-1, sorted=True).values
    rough = final.to(torch.bfloat16) @ _rough_weight(head).T
    candidates = rough.topk(k + CANDIDATE_MARGIN, dim=-1).indices  # [rows, k + margin]
    columns, where = candidates.unique(return_inverse=True)
    exact = final.float() @ head.weight[columns].float().T  # [rows, distinct candidates]
    if head.bias is not None:
        exact = exact + head.bias[columns].float()
    return exact.gather(-1, where).topk(k, dim=-1, sorted=True).values


def topk_entropies(
    model: PreTrainedModel, final: torch.Tensor, ks: Iterable[int], chunk: int = DEFAULT_CHUNK
) -> dict[int, torch.Tensor]:
    """Top-k entropy ``[tokens]`` for each k of `ks`: only the largest k logits are normalised (no
    full-vocabulary softmax), found a chunk of positions at a time (`_top_logits`), and every smaller
    k reads the sorted top of the largest. A k beyond the vocabulary takes the whole vocabulary. The
    prefill of a compressed generation pays for this one, so it is the fast path."""
    ks = sorted(set(ks))
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, final.shape[0], chunk):
        top = _top_logits(model, final[start : start + chunk], ks[-1])
        for k in ks:
            out[k].append(_restricted_entropy(top[..., :k]))
    return {k: torch.cat(parts) for k, parts in out.items()}


def topk_entropy(
    model: PreTrainedModel, final: torch.Tensor, top_k: int = TOP_K, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Top-k entropy ``[tokens]`` for one k (see `topk_entropies`)."""
    return topk_entropies(model, final, (top_k,), chunk)[top_k]


def kl_and_agreement(
    model: PreTrainedModel,
    reference: References,
    positions: torch.Tensor,
    other: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(reference || other), top-1 agreement and NLL change at reference `positions` ``[n]``.

    `other` holds the final hidden states ``[n, hidden]`` of the compared run at those positions.
    Returns the KL in nats (clamped at 0 against rounding), a boolean tensor that is True where both
    distributions have the same most probable token, and the increase in negative log-likelihood of
    the token that actually follows (nats; other minus reference).
    """
    kls, agree, nll = [], [], []
    for start in range(0, other.shape[0], chunk):
        index = positions[start : start + chunk]
        logits = logits_of(model, other[start : start + chunk])
        lse = logits.logsumexp(-1)
        if reference.neg_entropy is None:
            ref = torch.log_softmax(logits_of(model, reference.final[index]), dim=-1)
            kl = (ref.exp() * (ref - (logits - lse[:, None]))).sum(-1)
            top1 = ref.argmax(-1)
        else:
            expected = (reference.mean_embedding[index] * other[start : start + chunk].float()).sum(-1)
            kl = reference.neg_entropy[index] - expected - reference.bias_term[index] + lse
            top1 = reference.top1[index]
        kls.append(kl.clamp_min(0.0))
        agree.append(top1 == logits.argmax(-1))
        other_logp = logits.gather(-1, reference.next_ids[index, None])[:, 0] - lse
        nll.append(reference.next_logp[index] - other_logp)
    return torch.cat(kls), torch.cat(agree), torch.cat(nll)


def hidden_divergence(reference: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distance and relative L2 distance between hidden states, over the last dimension.

    ``hidden_cos = 1 - cos(ref, other)``, ``hidden_rel_l2 = ||other - ref|| / ||ref||``.
    """
    ref, oth = reference.float(), other.float()
    cos = torch.nn.functional.cosine_similarity(ref, oth, dim=-1)
    rel = (oth - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    return 1.0 - cos, rel
