from __future__ import annotations

from dataclasses import dataclass

from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores with a pyramid of layer budgets (PyramidKV, Cai et al., arXiv 2406.02069).

    Tokens are scored as in SnapKV. The layer budgets fall linearly from the bottom layer to the top
    one with the same total as a uniform budget: with b the uniform per-layer budget beyond the
    window, the top layer keeps ``b / beta`` and the bottom one ``2b - b / beta`` (plus the window).
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "pyramidkv"
    beta: int = 20

    def layer_budgets(self, tokens, num_layers):
        if num_layers == 1:
            return [tokens]
        extra = max(tokens - self.window, 0)
        top = extra / self.beta
        bottom = 2 * extra - top
        budgets = [round(bottom - (bottom - top) * l / (num_layers - 1)) + min(tokens, self.window) for l in range(num_layers)]
        return budgets
