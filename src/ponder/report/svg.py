"""Scatter / line plots as self-contained SVG text (no matplotlib, no JavaScript).

One :class:`Series` per run group: a line through its operating points (``connect``) or single
markers, error bars from the spread over seeds, a legend on the right, ticks on both axes, an
optional logarithmic x axis. Each point carries a tooltip (an SVG ``<title>``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence
from xml.sax.saxutils import escape, quoteattr

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
MARKERS = ("circle", "square", "triangle", "diamond")


@dataclass
class PlotPoint:
    """A point at ``(x, y)`` with error half-widths ``xerr`` / ``yerr`` (0: none) and a tooltip."""

    x: float
    y: float
    xerr: float = 0.0
    yerr: float = 0.0
    tip: str = ""


@dataclass
class Series:
    """One legend entry: its points, joined by a line (sorted by x) when ``connect``; ``style`` picks its
    colour and marker (give a run group the same style in every plot)."""

    label: str
    points: list[PlotPoint] = field(default_factory=list)
    connect: bool = False
    style: int = 0


def si(v: float) -> str:
    """Compact count for tick labels: ``40M``, ``1.5G``, ``250K``, ``12``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten), about ``target`` of them, in ``[lo, hi]``."""
    span = hi - lo
    if span <= 0:
        return [lo]
    mag = 10 ** math.floor(math.log10(span / target))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if span / (m * mag) <= target + 1)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    i = first
    while i * step <= hi + step * 1e-9:
        ticks.append(float(round(i * step, 12)))
        i += 1
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis: powers of ten, with 2x and 5x when the range spans few decades."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = [10.0 ** k for k in range(k0, k1 + 1) if lo <= 10.0 ** k <= hi]
    if len(decades) >= 3:
        return decades
    fine = [d * 10.0 ** k for k in range(k0, k1 + 1) for d in (1, 2, 5) if lo <= d * 10.0 ** k <= hi]
    return fine if len(fine) >= 3 else [t for t in nice_ticks(lo, hi) if t > 0]


class _Axis:
    """Maps data values in ``[lo, hi]`` (padded) to pixels ``[p0, p1]``, linearly or logarithmically."""

    def __init__(self, values: Sequence[float], p0: float, p1: float, log: bool):
        self.log = log
        vals = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
        lo, hi = (min(vals), max(vals)) if vals else (1.0, 10.0)
        if log:
            a, b = math.log10(lo), math.log10(hi)
            pad = 0.06 * (b - a) if b > a else 0.1
            self.lo, self.hi = 10 ** (a - pad), 10 ** (b + pad)
        else:
            pad = 0.06 * (hi - lo) if hi > lo else (0.05 * abs(lo) or 1.0)
            self.lo, self.hi = lo - pad, hi + pad
        self.p0, self.p1 = p0, p1

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, v: float) -> float:
        f = (self._t(v) - self._t(self.lo)) / (self._t(self.hi) - self._t(self.lo))
        return self.p0 + f * (self.p1 - self.p0)

    def ticks(self) -> list[float]:
        return log_ticks(self.lo, self.hi) if self.log else nice_ticks(self.lo, self.hi)


def _marker(shape: str, x: float, y: float, color: str, r: float = 4.2) -> str:
    style = f'fill="{color}" stroke="#ffffff" stroke-width="0.8"'
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {style}/>'
    if shape == "square":
        side = r * 1.7
        return f'<rect x="{x - side / 2:.1f}" y="{y - side / 2:.1f}" width="{side:.1f}" height="{side:.1f}" {style}/>'
    if shape == "triangle":
        pts = [(x, y - r * 1.1), (x - r, y + r * 0.75), (x + r, y + r * 0.75)]
    else:  # diamond
        pts = [(x, y - r * 1.15), (x + r, y), (x, y + r * 1.15), (x - r, y)]
    return f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}" {style}/>'


def legend_lines(label: str, width: int = 44, most: int = 3) -> list[str]:
    """``label`` broken after its `` · `` separators (or spaces) into lines of about ``width`` characters;
    more than ``most`` lines are cut, the last ending in an ellipsis."""
    lines: list[str] = []
    for word in label.replace(" · ", "\u00a0· ").split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines += [word[i:i + width] for i in range(0, len(word), width)]
    lines = [line.replace("\u00a0", " ").strip() for line in lines]
    if len(lines) > most:
        lines = lines[:most]
        lines[-1] = lines[-1][: width - 1] + "…"
    return lines


def svg_plot(series: Sequence[Series], *, title: str, x_label: str, y_label: str, log_x: bool = False,
             x_format: Callable[[float], str] = si, y_format: Callable[[float], str] = lambda v: f"{v:g}",
             width: int = 860) -> str:
    """An SVG document (a string) plotting ``series``; ``<g class="series">`` per series, in order."""
    legend_w, left, top, bottom_pad = 320, 66, 34, 50
    legends = [legend_lines(s.label) for s in series]
    height = max(400, top + sum(8 + 15 * len(lines) for lines in legends) + 30)
    px0, px1, py0, py1 = left, width - legend_w - 18, height - bottom_pad, top
    pts = [p for s in series for p in s.points]
    xs = [v for p in pts for v in (p.x - p.xerr, p.x + p.xerr)]
    if log_x:
        xs = [v for v in xs if v > 0] + [p.x for p in pts]
    xa = _Axis(xs, px0, px1, log_x)
    ya = _Axis([v for p in pts for v in (p.y - p.yerr, p.y + p.yerr)], py0, py1, False)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label={quoteattr(title)} '
           f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<title>{escape(title)}</title>',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{px0}" y="{top - 14}" font-size="14" font-weight="bold">{escape(title)}</text>']
    grid, labels = [], []
    for t in xa.ticks():
        x = xa(t)
        grid.append(f'<line x1="{x:.1f}" y1="{py0}" x2="{x:.1f}" y2="{py1}" stroke="#e4e4e4"/>')
        labels.append(f'<line x1="{x:.1f}" y1="{py0}" x2="{x:.1f}" y2="{py0 + 5}" stroke="#333333"/>'
                      f'<text x="{x:.1f}" y="{py0 + 18}" text-anchor="middle">{escape(x_format(t))}</text>')
    for t in ya.ticks():
        y = ya(t)
        grid.append(f'<line x1="{px0}" y1="{y:.1f}" x2="{px1}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        labels.append(f'<line x1="{px0 - 5}" y1="{y:.1f}" x2="{px0}" y2="{y:.1f}" stroke="#333333"/>'
                      f'<text x="{px0 - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(y_format(t))}</text>')
    out += ['<g class="grid">', *grid, "</g>",
            f'<rect x="{px0}" y="{py1}" width="{px1 - px0}" height="{py0 - py1}" fill="none" stroke="#333333"/>',
            '<g class="ticks">', *labels, "</g>",
            f'<text x="{(px0 + px1) / 2:.1f}" y="{height - 12}" text-anchor="middle">{escape(x_label)}</text>',
            f'<text transform="translate(16 {(py0 + py1) / 2:.1f}) rotate(-90)" text-anchor="middle">'
            f"{escape(y_label)}</text>"]
    ly = top + 8
    for i, s in enumerate(series):
        color, shape = PALETTE[s.style % len(PALETTE)], MARKERS[(s.style // len(PALETTE) + s.style) % len(MARKERS)]
        out.append(f'<g class="series" data-label={quoteattr(s.label)}>')
        ordered = sorted(s.points, key=lambda p: p.x)
        if s.connect and len(ordered) > 1:
            line = " ".join(f"{xa(p.x):.1f},{ya(p.y):.1f}" for p in ordered)
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        for p in ordered:
            x, y = xa(p.x), ya(p.y)
            bars = []
            if p.yerr > 0:
                y_lo, y_hi = ya(p.y - p.yerr), ya(p.y + p.yerr)
                bars.append(f'<path d="M{x:.1f},{y_lo:.1f}V{y_hi:.1f}M{x - 3:.1f},{y_lo:.1f}H{x + 3:.1f}'
                            f'M{x - 3:.1f},{y_hi:.1f}H{x + 3:.1f}" stroke="{color}" fill="none"/>')
            if p.xerr > 0 and (not log_x or p.x - p.xerr > 0):
                x_lo, x_hi = xa(p.x - p.xerr), xa(p.x + p.xerr)
                bars.append(f'<path d="M{x_lo:.1f},{y:.1f}H{x_hi:.1f}M{x_lo:.1f},{y - 3:.1f}V{y + 3:.1f}'
                            f'M{x_hi:.1f},{y - 3:.1f}V{y + 3:.1f}" stroke="{color}" fill="none"/>')
            out.append(f'<g class="point"><title>{escape(p.tip or s.label)}</title>{"".join(bars)}'
                       f'{_marker(shape, x, y, color)}</g>')
        lx = px1 + 24
        line = (f'<line x1="{lx - 8}" y1="{ly}" x2="{lx + 8}" y2="{ly}" stroke="{color}" stroke-width="1.6"/>'
                if s.connect and len(ordered) > 1 else "")
        text = "".join(f'<tspan x="{lx + 16}" dy="{0 if k == 0 else 15}">{escape(t)}</tspan>'
                       for k, t in enumerate(legends[i]))
        out.append(f'<g class="legend">{line}{_marker(shape, lx, ly, color)}'
                   f'<text x="{lx + 16}" y="{ly + 4}"><title>{escape(s.label)}</title>{text}</text></g>')
        out.append("</g>")
        ly += 8 + 15 * len(legends[i])
    out.append("</svg>")
    return "\n".join(out)
