"""Small charts drawn on the server as SVG (no script, no library in the browser).

Each function returns markup ready for a template: a labelled ``<svg role="img">`` whose
``<title>`` says in words what it shows (screen readers read that), with the exact
figure of every bar in its own ``<title>`` (a tooltip).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

INK = "#1f2937"
MUTED = "#6b7280"
GRID = "#e5e7eb"
SERIES = ("#2563eb", "#16a34a", "#dc2626", "#9333ea", "#d97706")


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e9:
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def bars(
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    width: int = 560,
    height: int = 180,
    unit: str = "",
    every: int = 1,
) -> Markup:
    """Vertical bars, one group per label, one bar per series (stacked side by side).
    ``every``: label only every n-th group (time axes)."""
    left, bottom, top = 40, 22, 10
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max((v for _, values in series for v in values), default=0.0) or 1.0
    groups = max(1, len(labels))
    slot = plot_w / groups
    bar_w = max(1.0, (slot * 0.8) / max(1, len(series)))
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">',
        f"<title>{escape(title)}</title>",
    ]
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        parts.append(
            f'<line x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10" '
            f'fill="{MUTED}">{_fmt(peak * frac)}{escape(unit)}</text>'
        )
    for i, label in enumerate(labels):
        x0 = left + i * slot + slot * 0.1
        for j, (name, values) in enumerate(series):
            value = values[i] if i < len(values) else 0.0
            h = plot_h * value / peak
            parts.append(
                f'<rect x="{x0 + j * bar_w:.1f}" y="{top + plot_h - h:.1f}" '
                f'width="{bar_w:.1f}" height="{h:.1f}" fill="{SERIES[j % len(SERIES)]}">'
                f"<title>{escape(label)} {escape(name)}: {_fmt(value)}{escape(unit)}</title>"
                "</rect>"
            )
        if i % every == 0:
            parts.append(
                f'<text x="{x0 + slot * 0.4:.1f}" y="{height - 6}" text-anchor="middle" '
                f'font-size="10" fill="{MUTED}">{escape(label)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def hbars(
    title: str,
    rows: Sequence[tuple[str, float, str]],
    *,
    width: int = 560,
    color: str = SERIES[0],
) -> Markup:
    """Horizontal bars: ``(label, value, shown text)`` per row."""
    row_h, label_w = 22, 190
    height = max(1, len(rows)) * row_h + 6
    peak = max((v for _, v, _ in rows), default=0.0) or 1.0
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for i, (label, value, shown) in enumerate(rows):
        y = 3 + i * row_h
        w = (width - label_w - 90) * value / peak
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="12" '
            f'fill="{INK}">{escape(label[:28])}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row_h - 8}" '
            f'rx="2" fill="{color}"><title>{escape(label)}: {escape(shown)}</title></rect>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" font-size="12" '
            f'fill="{INK}">{escape(shown)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
