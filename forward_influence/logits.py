"""Next-token distributions from final hidden states, a chunk of positions at a time.

The tracer reads the final (normed) hidden states, never a ``[tokens, vocab]`` logits tensor: a
49k-262k vocabulary makes that the largest tensor of a long trace. Everything here applies the
language-model head to `chunk` positions at a time, so extra memory is ``chunk x vocab`` floats
whatever the trace length. Entropies and divergences are in nats.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

DEFAULT_CHUNK = 256


def logits_of(model: PreTrainedModel, final: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., vocab]`` (float32) from final hidden states, with the model's logit soft-capping."""
    logits = model.get_output_embeddings()(final).float()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def entropies(
    model: PreTrainedModel, final: torch.Tensor, top_k: int = 10, chunk: int = DEFAULT_CHUNK
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
        top_logp = torch.log_softmax(logits.topk(top_k, dim=-1).values, dim=-1)
        top.append(-(top_logp.exp() * top_logp).sum(-1))
    return torch.cat(top), torch.cat(full)


def kl_and_agreement(
    model: PreTrainedModel, reference: torch.Tensor, other: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(reference || other) and top-1 agreement per position.

    `reference` and `other` are final hidden states ``[positions, hidden]``. Returns the KL in nats
    and a boolean tensor that is True where both distributions have the same most probable token.
    """
    kls, agree = [], []
    for start in range(0, reference.shape[0], chunk):
        ref = torch.log_softmax(logits_of(model, reference[start : start + chunk]), dim=-1)
        oth = torch.log_softmax(logits_of(model, other[start : start + chunk]), dim=-1)
        kls.append((ref.exp() * (ref - oth)).sum(-1).clamp_min(0.0))
        agree.append(ref.argmax(-1) == oth.argmax(-1))
    return torch.cat(kls), torch.cat(agree)


def hidden_divergence(reference: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distance and relative L2 distance between hidden states, over the last dimension.

    ``hidden_cos = 1 - cos(ref, other)``, ``hidden_rel_l2 = ||other - ref|| / ||ref||``.
    """
    ref, oth = reference.float(), other.float()
    cos = torch.nn.functional.cosine_similarity(ref, oth, dim=-1)
    rel = (oth - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    return 1.0 - cos, rel
