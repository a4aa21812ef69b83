"""A single self-contained HTML report: sections of text, tables and figures (PNG embedded as base64).

`Report` collects sections in order; `write` renders them to one file that opens anywhere (no
network, no side files), atomically.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from forward_influence.outputs import atomic_open

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: .85em; margin: .8em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .note { color: #555; font-size: .9em; }
iframe { width: 100%; height: 32em; border: 1px solid #ccc; }
"""


@dataclass
class Report:
    """An HTML report under construction: ``title`` and the rendered parts in order."""

    title: str
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, note: bool = False) -> None:
        self.parts.append(f"<p{' class=note' if note else ''}>{html.escape(text)}</p>")

    def table(self, frame: pd.DataFrame, digits: int = 3) -> None:
        self.parts.append(frame.to_html(index=False, float_format=lambda x: f"{x:.{digits}g}", border=0))

    def figure(self, png: Path, caption: str) -> None:
        data = base64.b64encode(Path(png).read_bytes()).decode()
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption class=note>{html.escape(caption)}</figcaption></figure>"
        )

    def page(self, document: str, caption: str) -> None:
        """Embed a whole HTML page (a token heatmap) in a frame."""
        self.parts.append(
            f'<iframe srcdoc="{html.escape(document)}" title="{html.escape(caption)}"></iframe>'
            f"<p class=note>{html.escape(caption)}</p>"
        )

    def write(self, path: Path) -> Path:
        with atomic_open(path) as f:
            f.write(
                f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n"
            )
            f.write("\n".join(self.parts))
            f.write("\n</body></html>\n")
        return Path(path)
