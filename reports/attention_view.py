"""Attention patterns as inline SVG heatmaps with token labels (a CircuitsVis-like view).

CircuitsVis is not installed and fetches React from a CDN, so the report draws its own:
one ``<svg>`` per (head, prompt), query tokens down the side and key tokens along the
top, every label escaped. Only the last ``max_tokens`` positions are drawn (the chat
template's tail, where the refusal is decided) and cells below ``floor`` are skipped, which
keeps a 30-layer model's page small; each cell carries a tooltip with its weight.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from markupsafe import Markup

CELL = 13
LABEL_CHARS = 12


def _short(token: str) -> str:
    token = token.replace("\n", "⏎").replace(" ", "·")
    return token if len(token) <= LABEL_CHARS else token[: LABEL_CHARS - 1] + "…"


def pattern_svg(pattern: np.ndarray, tokens: Sequence[str], *, title: str, max_tokens: int = 32,
                floor: float = 0.01, color: str = "#c0392b") -> Markup:
    """``pattern`` is [query, key] attention weights of one head on one prompt."""
    pattern = np.asarray(pattern, dtype=np.float64)
    if pattern.ndim != 2 or pattern.shape[0] != pattern.shape[1] or pattern.shape[0] == 0:
        return Markup('<p class="missing">missing: attention pattern has shape {}</p>').format(str(pattern.shape))
    n = pattern.shape[0]
    toks = list(tokens)[-n:] if len(tokens) >= n else [""] * (n - len(tokens)) + list(tokens)
    start = max(0, n - max_tokens)
    sub, toks = pattern[start:, start:], toks[start:]
    m = sub.shape[0]
    label_w = 8 * LABEL_CHARS
    width, height = label_w + m * CELL + 10, label_w + m * CELL + 28
    vmax = float(np.nanmax(sub)) if np.isfinite(sub).any() and np.nanmax(sub) > 0 else 1.0
    parts = [Markup('<svg xmlns="http://www.w3.org/2000/svg" class="attn" role="img" width="{w}" height="{h}" '
                    'viewBox="0 0 {w} {h}"><text x="2" y="14" class="attn-title">{t}</text>').format(
        w=width, h=height, t=title)]
    top = label_w + 20
    for i, tok in enumerate(toks):
        # key labels rotated along the top, query labels down the left side
        x = label_w + i * CELL + CELL / 2
        parts.append(Markup('<text class="attn-key" transform="translate({x:.1f},{y}) rotate(-60)">{t}</text>').format(
            x=x, y=top - 3, t=_short(tok)))
        parts.append(Markup('<text class="attn-query" x="{x}" y="{y:.1f}" text-anchor="end">{t}</text>').format(
            x=label_w - 3, y=top + i * CELL + CELL - 3, t=_short(tok)))
    parts.append(Markup('<rect x="{x}" y="{y}" width="{s}" height="{s}" class="attn-frame"/>').format(
        x=label_w, y=top, s=m * CELL))
    for q in range(m):
        for k in range(q + 1):  # causal: a query never attends to later keys
            w = sub[q, k]
            if not np.isfinite(w) or w < floor:
                continue
            parts.append(Markup('<rect x="{x}" y="{y}" width="{c}" height="{c}" fill="{col}" fill-opacity="{o:.2f}">'
                                '<title>{qt} → {kt}: {w:.3f}</title></rect>').format(
                x=label_w + k * CELL, y=top + q * CELL, c=CELL, col=color, o=min(1.0, w / vmax),
                qt=toks[q], kt=toks[k], w=w))
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)


def pattern_grid(items: Sequence[tuple[str, Markup, Markup]]) -> Markup:
    """Rows of (head label, harmful view, harmless view)."""
    rows = [Markup('<div class="attn-row"><div class="attn-head">{h}</div>{a}{b}</div>').format(h=h, a=a, b=b)
            for h, a, b in items]
    return Markup('<div class="attn-grid">') + Markup("").join(rows) + Markup("</div>")


def token_strip(tokens: Sequence[str], scores: Sequence[float]) -> Markup:
    """Tokens shaded by an attribution score (red positive, blue negative), for IG examples."""
    vals = np.asarray(list(scores), dtype=np.float64)
    scale = float(np.nanmax(np.abs(vals))) if vals.size and np.isfinite(vals).any() else 1.0
    scale = scale or 1.0
    spans = []
    for tok, v in zip(tokens, vals):
        v = 0.0 if not np.isfinite(v) else float(v)
        rgb = "192,57,43" if v > 0 else "36,113,163"
        spans.append(Markup('<span class="tok" style="background:rgba({rgb},{a:.2f})" title="{v:.3g}">{t}</span>')
                     .format(rgb=rgb, a=min(1.0, abs(v) / scale), v=v, t=str(tok).replace("\n", "⏎")))
    return Markup('<div class="token-strip">') + Markup("").join(spans) + Markup("</div>")

