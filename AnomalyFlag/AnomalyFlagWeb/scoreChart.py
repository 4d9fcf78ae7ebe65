"""The score along the slices as an SVG for the page: normalised score per slice, the threshold line, the
flagged slices as markers coloured by their decision and the current slice as a vertical line."""

import math
from xml.sax.saxutils import escape

DECISION_COLORS = {None: "#e53935", "accepted": "#43a047", "skipped": "#9e9e9e", "recontoured": "#1e88e5",
                   "abnormal": "#8e24aa"}  # fmt: skip
"""Marker colours of the flagged slices by decision (None: still to review)."""


def scoreChartSvg(table, threshold, queue, currentSlice=None, width=420, height=150) -> str:
    """SVG text of the chart. `table` is the slice table of AnomalyFlagLib.io.scored_case.read_scored_case,
    `queue` the controller's reviewQueue() (flagged slices with their decisions)."""
    points = [(int(row["slice"]), row.get("normalised")) for row in table]
    points = [(i, float(v)) for i, v in points if v is not None and math.isfinite(float(v))]
    left, right, top, bottom = 34, 8, 8, 20
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"></svg>'
    values = [v for _i, v in points] + ([float(threshold)] if threshold is not None else [])
    low, high = min(values), max(values)
    if high - low < 1e-6:
        high = low + 1.0
    last = max(i for i, _v in points) or 1

    def x(i):
        return left + (width - left - right) * i / last

    def y(v):
        return top + (height - top - bottom) * (high - v) / (high - low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" id="score-chart">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>',
        '<polyline fill="none" stroke="#455a64" stroke-width="1.5" points="'
        + " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in points)
        + '"/>',
    ]
    if threshold is not None:
        ty = y(float(threshold))
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#d32f2f" '
                     f'stroke-dasharray="4 3" id="threshold-line"/>')  # fmt: skip
        parts.append(f'<text x="{width - right}" y="{ty - 3:.1f}" font-size="10" text-anchor="end" fill="#d32f2f">'
                     f"threshold {float(threshold):.3g}</text>")  # fmt: skip
    scores = dict(points)
    for item in queue:
        index = int(item["slice"])
        if index in scores:
            color = DECISION_COLORS.get(item.get("decision"), DECISION_COLORS[None])
            parts.append(f'<circle cx="{x(index):.1f}" cy="{y(scores[index]):.1f}" r="3.5" fill="{color}" '
                         f'data-slice="{index}"/>')  # fmt: skip
    if currentSlice is not None:
        cx = x(int(currentSlice))
        parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{top}" y2="{height - bottom}" stroke="#ff9800" '
                     'stroke-width="1.5" id="current-slice-line"/>')  # fmt: skip
    for v in (low, high):
        parts.append(f'<text x="{left - 3}" y="{y(v) + 3:.1f}" font-size="10" text-anchor="end">{v:.1f}</text>')
    parts.append(f'<text x="{left}" y="{height - 5}" font-size="10">0</text>')
    parts.append(
        f'<text x="{width - right}" y="{height - 5}" font-size="10" text-anchor="end">{escape(str(last))}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)
