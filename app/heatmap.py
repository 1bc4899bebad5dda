"""Pictures of the δ state drawn with Unicode blocks and Rich colours (no widgets here).

Each layer holds a state [H, r, r]. `state_heatmap` draws every layer's matrices with the upper
half block "▀" (two matrix rows per text line: top row = foreground, bottom row = background), on
one colour scale shared by all layers so that layers can be compared. `layer_norms` draws one
bar per layer (the Frobenius norm of its state).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text

BARS = " ▁▂▃▄▅▆▇█"
EMPTY = (30, 30, 40)
POSITIVE = (255, 120, 60)
NEGATIVE = (70, 150, 255)


def value_color(value: float, scale: float) -> Color:
    """Diverging colour: blue for negative, orange for positive, dark for ~0 (sqrt-compressed)."""
    if scale <= 0 or not np.isfinite(value):
        return Color.from_rgb(*EMPTY)
    t = min(abs(value) / scale, 1.0) ** 0.5
    end = POSITIVE if value > 0 else NEGATIVE
    return Color.from_rgb(*(round(a + (b - a) * t) for a, b in zip(EMPTY, end)))


def _as_matrices(state: np.ndarray) -> list[np.ndarray]:
    """[H, r, r] (or [r, r], or [B, H, r, r] with B = 1) → list of H matrices [r, r]."""
    state = np.asarray(state, dtype=np.float32)
    while state.ndim > 3:
        state = state[0]
    if state.ndim == 2:
        state = state[None]
    return list(state)


def matrix_lines(matrix: np.ndarray, scale: float) -> list[Text]:
    """One r×r matrix → ceil(r/2) lines of r cells."""
    rows, cols = matrix.shape
    lines = []
    for top in range(0, rows, 2):
        line = Text()
        for j in range(cols):
            fg = value_color(float(matrix[top, j]), scale)
            bg = (value_color(float(matrix[top + 1, j]), scale) if top + 1 < rows
                  else Color.default())
            line.append("▀", Style(color=fg, bgcolor=bg))
        lines.append(line)
    return lines


def _layer_block(matrices: list[np.ndarray], scale: float, width: int) -> list[Text]:
    """One layer's heads side by side, wrapped onto more lines when they do not fit `width`."""
    r = matrices[0].shape[1]
    per_line = max(1, min(len(matrices), (width + 1) // (r + 1)))
    lines: list[Text] = []
    for start in range(0, len(matrices), per_line):
        pictures = [matrix_lines(m, scale) for m in matrices[start:start + per_line]]
        for y in range(len(pictures[0])):  # a layer's heads all have the same shape
            line = Text()
            for h, picture in enumerate(pictures):
                if h:
                    line.append(" ")
                line.append_text(picture[y])
            lines.append(line)
    return lines


def state_heatmap(layer_states: Mapping[int, np.ndarray], width: int = 36) -> Text:
    """All layers' states as a grid of small heatmaps, `L{i}` above each, fitting `width` cells.

    Layers sit side by side while they fit; a layer with many heads wraps its heads onto
    several lines.
    """
    if not layer_states:
        return Text("no δ layers", style="dim")
    layers = sorted(layer_states)
    blocks = {i: _as_matrices(layer_states[i]) for i in layers}
    scale = max((float(np.max(np.abs(m))) for ms in blocks.values() for m in ms), default=0.0)
    drawn = {i: _layer_block(blocks[i], scale, width) for i in layers}
    cell = max(max(len(line) for line in drawn[i]) for i in layers)
    cell = max(cell, len(f"L{layers[-1]}"))
    per_row = max(1, (width + 1) // (cell + 1))
    out = Text()
    for start in range(0, len(layers), per_row):
        group = layers[start:start + per_row]
        out.append(" ".join(f"L{i}".ljust(cell) for i in group).rstrip() + "\n", style="dim")
        for y in range(max(len(drawn[i]) for i in group)):
            for n, i in enumerate(group):
                if n:
                    out.append(" ")
                line = drawn[i][y] if y < len(drawn[i]) else Text()
                out.append_text(line)
                out.append(" " * (cell - len(line)))
            out.append("\n")
    out.append(f"scale ±{scale:.3g}", style="dim")
    return out


def layer_norms(layer_states: Mapping[int, np.ndarray]) -> tuple[Text, float]:
    """One bar per layer (‖S‖_F relative to the largest) → (bars, largest norm)."""
    norms = [float(np.linalg.norm(np.asarray(layer_states[i], dtype=np.float32)))
             for i in sorted(layer_states)]
    top = max(norms, default=0.0)
    bars = Text()
    for norm in norms:
        level = 0 if top <= 0 else max(1, round(norm / top * (len(BARS) - 1))) if norm > 0 else 0
        bars.append(BARS[level], style=Style(color=value_color(norm, top)))
    return bars, top
