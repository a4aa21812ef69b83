"""Token heatmap: a trace's text with every token shaded by a signal, as HTML or PNG.

Signals (one value per token, darker = higher):

- ``entropy``: top-k entropy of the next-token distribution (nats);
- ``attention``: SnapKV attention received from the last window of the trace;
- ``evolution``: layer-wise representation change, ``1 - cos`` averaged over layers;
- ``fi``: per-token Forward Influence, the summed KL over distances 1..32 when the token alone is
  evicted at its own position (`forward_influence.scan`; the most expensive);
- ``policy:NAME``: a compression policy's score (mean over layers and KV heads); the tokens it
  evicts at ``budget`` are marked (kept = kept by at least half the layer x head slots), and the
  tokens it always keeps (score +inf) are shaded as the maximum. A policy that reads the future (the
  oracle, `optimal`) compresses the trace up to the last tokens it reads (its distance, at most half
  the trace), which stay unshaded.

HTML has one ``<span class="tok">`` per token with the value on hover, a colour legend and the
kept/evicted key; PNG is drawn with matplotlib (monospace, wrapped at `WIDTH` characters).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import pyplot as plt
from matplotlib.colors import Normalize, to_hex
from matplotlib.patches import Rectangle

from forward_influence.errors import InputError
from forward_influence.outputs import atomic_open, atomic_path
from forward_influence.scan import scan
from forward_influence.signals import token_signals
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.budget import Budget
from kv_compression.kept import token_view
from kv_compression.names import PER_MODEL, parse, policy_names
from kv_compression.offline import observation

from . import plotting  # noqa: F401  (headless backend)

HEATMAP_SIGNALS = ("entropy", "attention", "evolution", "fi")
UNITS = {
    "entropy": "top-k entropy (nats)",
    "attention": "SnapKV attention received (probability)",
    "evolution": "representation change, 1 - cos",
    "fi": "Forward Influence, summed KL over d = 1..32 (nats)",
}
FI_DISTANCE = 32
WIDTH = 100
CMAP = "YlOrRd"


@dataclass
class Heat:
    """What a heatmap shows: ``tokens`` (text pieces), ``values`` ``[tokens]`` (NaN = unknown), ``kept``
    (bool ``[tokens]`` or None when no policy is shown) and the legend's ``label``."""

    tokens: list[str]
    values: np.ndarray
    kept: np.ndarray | None
    label: str


def check_signal(signal: str) -> str:
    """`signal` if known (``policy:NAME`` with a known policy whose fields are valid; a per-model policy's
    file is read once the model is known), else an `InputError`."""
    spec = signal.removeprefix("policy:")
    if signal.startswith("policy:") and spec.split(":")[0] in policy_names():
        if spec.split(":")[0] not in PER_MODEL:
            parse(spec, quiet=True)
        return signal
    if signal in HEATMAP_SIGNALS:
        return signal
    raise InputError(
        f"unknown signal {signal!r}; choose from {', '.join(HEATMAP_SIGNALS)} or policy:NAME "
        f"with NAME one of {', '.join(policy_names())}"
    )


def heat(tracer: Tracer, trace: Trace, signal: str, budget: Budget | str = "0.25", model: str | None = None) -> Heat:
    """Read `signal` on `trace` (see the module docstring); `budget` is a `Budget` or its text."""
    check_signal(signal)
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    ids = trace.token_ids
    tokens = [tracer.tokenizer.decode([i]) for i in ids]
    if signal == "fi":
        if len(ids) < 2:
            raise InputError("the fi signal needs a trace of at least 2 tokens")
        frame = scan(tracer, ids, 0, len(ids), min(FI_DISTANCE, len(ids) - 1))
        values = frame.fi_total.to_numpy(copy=True)
        values[-1] = np.nan  # no later query: unknown, not zero
        return Heat(tokens, values, None, UNITS["fi"])
    if signal.startswith("policy:"):
        policy = parse(signal.removeprefix("policy:"), model, quiet=True)
        reads = policy.reads()
        ahead = max(reads.influence, *(search.distance for search in reads.set_search), 0)
        observed = len(ids) - min(ahead, len(ids) // 2)
        obs = observation(tracer, ids[:observed], [policy], future=ids[observed:])
        score, share = token_view(policy, obs, budget)
        values = score.float().cpu().numpy()
        finite = np.isfinite(values)
        values = np.where(finite, values, values[finite].max() if finite.any() else 1.0)
        kept = share.cpu().numpy() >= 0.5
        unseen = len(ids) - observed  # the future a policy reads is never compressed
        values, kept = np.concatenate([values, np.full(unseen, np.nan)]), np.concatenate([kept, np.ones(unseen, bool)])
        return Heat(tokens, values, kept, f"{policy.name} score (kept at budget {budget})")
    signals = token_signals(tracer, ids)
    name = {"entropy": "entropy_next", "attention": "attention_snapkv", "evolution": "evolution"}[signal]
    return Heat(tokens, np.asarray(signals.get(name), dtype=float), None, UNITS[signal])


def _colors(values: np.ndarray) -> tuple[list[str], Normalize]:
    finite = values[np.isfinite(values)]
    norm = Normalize(float(finite.min()) if finite.size else 0.0, float(finite.max()) if finite.size else 1.0)
    cmap = matplotlib.colormaps[CMAP]
    return [to_hex(cmap(norm(v))) if np.isfinite(v) else "#ffffff" for v in values], norm


def render_html(h: Heat, title: str) -> str:
    """A standalone HTML page (see the module docstring)."""
    colors, norm = _colors(h.values)
    cmap = matplotlib.colormaps[CMAP]
    gradient = ", ".join(to_hex(cmap(x)) for x in np.linspace(0, 1, 11))
    spans = []
    for i, (token, value, color) in enumerate(zip(h.tokens, h.values, colors)):
        state = "" if h.kept is None else (" kept" if h.kept[i] else " evicted")
        hover = f"position {i} · {token!r} · {'unknown' if not np.isfinite(value) else f'{value:.4g}'}{state and ' ·' + state}"
        dark = np.isfinite(value) and norm(value) > 0.6
        spans.append(
            f'<span class="tok{state}" data-position="{i}" title="{html.escape(hover)}" '
            f'style="background:{color}{";color:#fff" if dark else ""}">{html.escape(token)}</span>'
        )
    key = ""
    if h.kept is not None:
        key = (
            f'<span class="key">kept ({int(h.kept.sum())})</span> '
            f'<span class="key evicted">evicted ({int((~h.kept).sum())})</span>'
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 60em; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.7; }}
.tok {{ border-radius: 2px; }}
.evicted {{ text-decoration: line-through; text-decoration-color: #b00; opacity: .6; }}
.legend {{ display: flex; align-items: center; gap: .6em; margin: .8em 0; font-size: .9em; }}
.bar {{ width: 16em; height: 1em; background: linear-gradient(to right, {gradient}); border: 1px solid #999; }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<div class="legend"><span>{norm.vmin:.3g}</span><span class="bar"></span><span>{norm.vmax:.3g}</span>
<span>{html.escape(h.label)}; hover a token for its value</span> {key}</div>
<div class="text">{"".join(spans)}</div>
</body></html>
"""


def render_png(h: Heat, title: str, path: Path) -> Path:
    """The same view drawn with matplotlib: monospace text wrapped at `WIDTH` characters."""
    colors, norm = _colors(h.values)
    pieces, row, col = [], 0, 0  # (row, column, text, token index); a newline inside a token breaks the line
    for index, token in enumerate(h.tokens):
        for k, part in enumerate(token.split("\n")):
            if k:
                row, col = row + 1, 0
            if col + len(part) > WIDTH and col:
                row, col = row + 1, 0
            if part:
                pieces.append((row, col, part, index))
                col += len(part)
    rows = row + 1
    width, line = WIDTH * 0.08 + 0.4, 0.22  # inches: figure width, one text line
    fig = plt.figure(figsize=(width, rows * line + 1.4))
    ax = fig.add_axes((0.02, 1.0 / (rows * line + 1.4), 0.96, rows * line / (rows * line + 1.4)))
    fontsize = 0.96 * width * 72 / WIDTH / 0.6  # a monospace character is ~0.6 em wide: fill each cell
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    for r, c, text, index in pieces:
        ax.add_patch(Rectangle((c, r + 0.05), len(text), 0.9, facecolor=colors[index], edgecolor="none"))
        ax.text(c, r + 0.5, text, fontsize=fontsize, family="monospace", va="center", ha="left")
        if h.kept is not None and not h.kept[index]:
            ax.plot([c, c + len(text)], [r + 0.5, r + 0.5], color="#b00", linewidth=0.8)
    fig.suptitle(title + ("" if h.kept is None else "  (struck through: evicted)"), fontsize=9)
    bar = fig.add_axes((0.3, 0.25 / (rows * line + 1.4), 0.4, 0.12 / (rows * line + 1.4)))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=CMAP), cax=bar, orientation="horizontal", label=h.label)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def write(h: Heat, title: str, out: Path) -> Path:
    """Write `out` as .html or .png (atomically); returns its path."""
    out = Path(out)
    if out.suffix == ".html":
        with atomic_open(out) as f:
            f.write(render_html(h, title))
        return out
    if out.suffix == ".png":
        return render_png(h, title, out)
    raise InputError(f"--out must end in .html or .png, got {out.name!r}")
