"""SVG charts drawn on the server: no script library, no network, readable at any width.

Every plotted value is an element with a `<title>` (the browser's tooltip) and a class the
tests look for (`pt` for a point, `cell` for a heat-map cell, `bar` for a histogram bar).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
W, H = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _time_label(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M")


def _scale(lo: float, hi: float, a: float, b: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, y_label: str, empty: str,
               lines: dict[str, float] | None = None, marks: Sequence[tuple[float, str]] = (),
               y_min: float | None = None, x_range: tuple[float, float] | None = None,
               bands: Mapping[str, Sequence[tuple[float, float, float]]] | None = None) -> str:
    """Lines with a point per value, x in epoch seconds; `lines`: labelled horizontal references;
    `marks`: labelled vertical events (retrains, promotions); `x_range`: the axis' span (default:
    the data's); `bands`: shaded ranges (x, low, high), drawn in the colour of the series of the
    same name."""
    points = [p for s in series.values() for p in s]
    if not points:
        return f'<p class="empty">{escape(empty)}</p>'
    spans = [b for band in (bands or {}).values() for b in band]
    xs = [p[0] for p in points] + [m[0] for m in marks]
    ys = [p[1] for p in points] + list((lines or {}).values()) + [v for b in spans for v in b[1:]]
    x0, x1 = x_range or (min(xs), max(xs))
    y0 = min(ys) if y_min is None else min(y_min, min(ys))
    y1 = max(ys)
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = (y0 if y_min is not None else y0 - pad), y1 + pad
    sx, sy = _scale(x0, x1, LEFT, W - RIGHT), _scale(y0, y1, H - BOTTOM, TOP)
    out = [_frame(y0, y1, sy, x0, x1, y_label)]
    for name, value in (lines or {}).items():
        y = sy(value)
        out.append(f'<line class="ref" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#6b7280" stroke-dasharray="5 4"><title>{escape(name)}: {_fmt(value)}'
                   '</title></line>')
    names = list(series)
    for name, band in (bands or {}).items():
        spanned = sorted(band)
        if not spanned:
            continue
        color = PALETTE[names.index(name) % len(PALETTE)] if name in names else "#9ca3af"
        edge = [f"{sx(x):.1f},{sy(hi):.1f}" for x, _, hi in spanned] + \
            [f"{sx(x):.1f},{sy(lo):.1f}" for x, lo, _ in reversed(spanned)]
        out.append(f'<polygon class="band" points="{" ".join(edge)}" fill="{color}" fill-opacity="0.15" '
                   f'stroke="none"><title>{escape(name)}: band</title></polygon>')
    for x, label in marks:
        px = sx(x)
        out.append(f'<line class="mark" x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{H - BOTTOM}" '
                   f'stroke="#f59e0b" stroke-width="2"><title>{escape(label)}</title></line>')
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        ordered = sorted(pts)
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}"
                        for j, (x, y) in enumerate(ordered))
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        out.extend(f'<circle class="pt" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{color}">'
                   f'<title>{escape(name)} {_time_label(x)}: {_fmt(y)}</title></circle>' for x, y in ordered)
    legend = "".join(f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>'
                     f'{escape(name)}</span>' for i, name in enumerate(series))
    return _svg(out) + f'<div class="legend">{legend}</div>'


def _frame(y0: float, y1: float, sy: Any, x0: float, x1: float, y_label: str) -> str:
    ticks = []
    for k in range(5):
        v = y0 + (y1 - y0) * k / 4
        y = sy(v)
        ticks.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    return ("".join(ticks)
            + f'<text x="{LEFT}" y="{H - 8}">{_time_label(x0)}</text>'
            + f'<text x="{W - RIGHT}" y="{H - 8}" text-anchor="end">{_time_label(x1)}</text>'
            + f'<text x="{(LEFT + W - RIGHT) / 2:.0f}" y="{H - 8}" text-anchor="middle" class="axis">'
            f'{escape(y_label)} (UTC)</text>')


def _svg(parts: list[str], width: int = W, height: int = H) -> str:
    return (f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="xMidYMid meet" role="img" '
            f'class="chart">{"".join(parts)}</svg>')


def heat_map(features: Sequence[str], windows: Sequence[dict[str, Any]],
             cells: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Rows: features; columns: monitoring windows. Colour: the score as a share of its
    threshold (white 0, orange at the threshold, red at twice it); a drifted cell is outlined."""
    if not features or not windows:
        return '<p class="empty">No monitoring window yet: run flywheel monitor.</p>'
    label_w, cell_h = 120, 16
    cell_w = max(4.0, (W - label_w - RIGHT) / len(windows))
    height = TOP + cell_h * len(features) + 40
    out = []
    for r, feature in enumerate(features):
        y = TOP + r * cell_h
        out.append(f'<text x="{label_w - 4}" y="{y + 12}" text-anchor="end">{escape(feature[:18])}</text>')
        for c, window in enumerate(windows):
            cell = cells.get(feature, {}).get(str(window["id"]))
            if cell is None:
                continue
            ratio = cell["score"] / cell["threshold"] if cell["threshold"] else 0.0
            x = label_w + c * cell_w
            stroke = ' stroke="#7f1d1d" stroke-width="1.5"' if cell["drifted"] else ""
            out.append(f'<rect class="cell" x="{x:.1f}" y="{y}" width="{cell_w - 1:.1f}" '
                       f'height="{cell_h - 1}" fill="{_heat(ratio)}"{stroke}><title>{escape(feature)}, '
                       f'window {window["id"]} '
                       f'({window["start"] or "?"} to {window["end"] or "?"}): score {_fmt(cell["score"])}, '
                       f'threshold {_fmt(cell["threshold"])}{", drifted" if cell["drifted"] else ""}'
                       f'</title></rect>')
    y = TOP + cell_h * len(features)
    for c, window in enumerate(windows):
        x = label_w + c * cell_w
        colour = "#dc2626" if window["drifted"] else "#16a34a"
        out.append(f'<rect class="verdict" x="{x:.1f}" y="{y + 4}" width="{cell_w - 1:.1f}" height="8" '
                   f'fill="{colour}"><title>window {window["id"]}: drift share {_fmt(window["drift_share"])}'
                   f' ({"drift" if window["drifted"] else "no drift"})</title></rect>')
    out.append(f'<text x="{label_w - 4}" y="{y + 12}" text-anchor="end">dataset</text>')
    return _svg(out, W, height)


def _heat(ratio: float) -> str:
    r = max(0.0, min(ratio / 2, 1.0))
    if r <= 0.5:  # white to orange
        t = r / 0.5
        return f"rgb({255},{int(255 - t * 90)},{int(255 - t * 200)})"
    t = (r - 0.5) / 0.5  # orange to red
    return f"rgb({int(255 - t * 35)},{int(165 - t * 127)},{int(55 - t * 17)})"


def histogram(edges: Sequence[float], counts: Sequence[int], *, x_label: str) -> str:
    if not counts or not sum(counts):
        return '<p class="empty">No predictions logged yet.</p>'
    top = max(counts)
    width = (W - LEFT - RIGHT) / len(counts)
    out = []
    for i, n in enumerate(counts):
        h = (H - TOP - BOTTOM) * n / top
        x = LEFT + i * width
        out.append(f'<rect class="bar" x="{x:.1f}" y="{H - BOTTOM - h:.1f}" width="{width - 1:.1f}" '
                   f'height="{h:.1f}" fill="#2563eb"><title>{_fmt(edges[i])} to {_fmt(edges[i + 1])}: '
                   f'{n}</title></rect>')
    out.append(f'<text x="{LEFT}" y="{H - 8}">{_fmt(edges[0])}</text>'
               f'<text x="{W - RIGHT}" y="{H - 8}" text-anchor="end">{_fmt(edges[-1])}</text>'
               f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" class="axis">{escape(x_label)}</text>'
               f'<text x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">{top}</text>')
    return _svg(out)


def class_bars(counts: dict[str, int]) -> str:
    keys = list(counts)
    return histogram(list(range(len(keys) + 1)), [counts[k] for k in keys], x_label=", ".join(keys)[:80])
