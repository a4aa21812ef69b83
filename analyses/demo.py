"""The demo: influence by distance of entropy-top, attention-top and random sets on the embedded model.

On a few evaluation essays, the top fraction of each prefix by next-token entropy, by SnapKV window
attention, by H2O cumulative attention and at random is evicted at time t; the table of KL by
distance bucket (95% CI across essays) and its figure are written to the output folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from forward_influence import corpus
from forward_influence.measure import InfluenceSettings
from forward_influence.models import load_model
from forward_influence.traces import read_traces

from .influence_by_distance import run

SELECTIONS = ("entropy_next", "attention_snapkv", "attention_h2o", "random")


def run_demo(model: str, out: Path, docs: int = 4, max_tokens: int = 768, fraction: float = 0.1, evict_at: int = 384) -> Path:
    """Run the demo; returns the path of the influence table (the figure lies beside it)."""
    print(f"loading {model} ...", file=sys.stderr)
    tokenizer = load_model(model).tokenizer
    names = corpus.essay_names("evaluation")[:docs]
    traces = [read_traces(f"essay:{name}", tokenizer, max_tokens)[0] for name in names]
    settings = InfluenceSettings(fraction=fraction, evict_at=evict_at)
    label = f"{len(traces)} evaluation essays x {max_tokens} tokens"
    table = run(model, traces, SELECTIONS, settings, out, label)
    print(table.to_string(index=False, float_format="{:.4g}".format), file=sys.stderr)
    print(f"figure: {out / 'influence.png'}", file=sys.stderr)
    return out / "influence.csv"
