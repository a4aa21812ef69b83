"""Fidelity under long prefill: compress an essay prefix, then score the continuation teacher-forced.

For each document, the first `prefix` tokens are observed and compressed by a policy at a budget
(the kept sets of every layer and KV head, evicted at the prefix's last position); the next
`continuation` tokens are then read teacher-forced, and compared with the full cache:

- ``nll_increase``: increase in the mean negative log-likelihood of the continuation (nats/token),
- ``kl``: mean KL(full || compressed) of the next-token distributions, and ``kl_far``, the same over
  distances from `far_from` on,
- ``top1_agreement``: share of positions where both predict the same token,
- ``nll_full``: the full cache's own mean NLL (the reference every row is compared with).

The observation and the clean run are computed once per document and shared by every policy and
budget. Exact: the compressed run is the tracer's masked replay of the evictions, which equals
physical eviction (`kv_compression.runtime`).

    python -m analyses.fidelity --docs 5 --policies infokv,snapkv,h2o,random --budgets 0.25,0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from forward_influence import corpus
from forward_influence.eviction import EvictionSpec
from forward_influence.influence import clean_run, evict
from forward_influence.models import DEFAULT_MODEL, load_model
from forward_influence.observation import observe
from forward_influence.outputs import write_table
from forward_influence.stats import mean_ci
from forward_influence.tracer import Tracer
from forward_influence.traces import read_traces
from kv_compression.budget import Budget, eviction_specs, kept_indices
from kv_compression.policies import POLICIES, Policy

METRICS = ("nll_increase", "kl", "kl_far", "top1_agreement")


def fidelity_rows(
    tracer: Tracer,
    document: str,
    token_ids: Sequence[int],
    policies: dict[str, Policy],
    budgets: Sequence[str],
    prefix: int = 1024,
    continuation: int = 256,
    far_from: int = 33,
) -> list[dict]:
    """One row per (policy, budget) for one document (see the module docstring for the columns)."""
    ids = list(token_ids[: prefix + continuation])
    if len(ids) <= prefix:
        raise ValueError(f"{document} has {len(ids)} tokens, not more than the {prefix}-token prefix")
    t = prefix - 1
    window = max([getattr(p, "window", 1) for p in policies.values()] + [64])
    obs = observe(tracer, ids[:prefix], window=window, logit_lens=any("logit_lens" in p.requires() for p in policies.values()))
    clean = clean_run(tracer, ids, hidden=False)
    n_full = -clean.references.next_logp[prefix - 1 : len(ids) - 1].mean().item()
    rows = []
    for name, policy in policies.items():
        for budget in budgets:
            # The empty spec carries the eviction time when a budget keeps everything.
            specs = [EvictionSpec((), t)] + eviction_specs(kept_indices(policy, obs, Budget.parse(budget)), obs, t)
            result = evict(tracer, clean, [specs], len(ids) - prefix, hidden=False)
            d = result.distance
            rows.append(
                dict(
                    document=document, policy=name, budget=budget, prefix=prefix, continuation=len(ids) - prefix,
                    nll_full=n_full,
                    nll_increase=float(np.nanmean(result.nll_increase[0])),
                    kl=float(np.nanmean(result.kl[0])),
                    kl_far=float(np.nanmean(result.kl[0, d >= far_from])),
                    top1_agreement=float(np.nanmean(result.top1_agreement[0])),
                )
            )
    return rows


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% t-interval across documents per (policy, budget) for every metric."""
    rows = []
    for (policy, budget), group in results.groupby(["policy", "budget"], sort=False):
        row = dict(policy=policy, budget=budget, n_documents=len(group), nll_full=group.nll_full.mean())
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = mean_ci(group[metric])
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=5, help="evaluation essays (default 5)")
    parser.add_argument("--policies", default="infokv,snapkv,h2o,random")
    parser.add_argument("--budgets", default="0.25,0.5")
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    tracer = Tracer(loaded)
    policies = {name: POLICIES[name]() for name in args.policies.split(",")}
    budgets = args.budgets.split(",")
    rows = []
    names = [n for n in corpus.essay_names("evaluation")]
    used = 0
    for name in tqdm(names, desc="documents"):
        ids = read_traces(f"essay:{name}", loaded.tokenizer)[0].token_ids
        if len(ids) < args.prefix + args.continuation:
            continue  # too short for the prefix and the whole continuation
        rows += fidelity_rows(tracer, name, ids, policies, budgets, args.prefix, args.continuation)
        used += 1
        if used == args.docs:
            break
    results = pd.DataFrame(rows)
    write_table(results, args.out / "results.csv")
    table = summarize(results)
    write_table(table, args.out / "summary.csv")
    print(table.to_string(index=False, float_format="{:.4g}".format))
    print(args.out / "summary.csv")


if __name__ == "__main__":
    main()
