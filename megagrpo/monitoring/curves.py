"""Drawing logged metrics as curves (matplotlib): noisy per-step series as faint raw points under
a bold moving average, sparse series (evaluations) as plain markers and lines.

Used by ``tools/plot_metrics.py`` and the demo's before/after plot; matplotlib is imported by the
callers (``Agg`` backend), not here.
"""

from __future__ import annotations

#: A series with at least this many points is per-step noise worth smoothing; fewer (held-out
#: evaluations every N steps) are drawn as they are.
MIN_POINTS_TO_SMOOTH = 20


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that logged it as a number."""
    pts = [
        (r["step"], float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def smoothing_window(n: int) -> int:
    """Points averaged per moving-average value: about a tenth of the series, odd, 1 to 25."""
    w = max(1, min(25, n // 10))
    return w if w % 2 else w + 1


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average; near the ends the window shrinks to the points that exist."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half) : i + half + 1]
        out.append(sum(part) / len(part))
    return out


def draw(ax, steps: list[int], values: list[float], label: str, color=None) -> None:
    """One series on ``ax``: smoothed (faint raw points, bold moving average) when it is dense,
    else markers joined by lines."""
    if len(values) >= MIN_POINTS_TO_SMOOTH:
        window = smoothing_window(len(values))
        (raw,) = ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(
            steps,
            moving_average(values, window),
            color=raw.get_color(),
            linewidth=2.2,
            label=f"{label} (moving average of {window})",
        )
    else:
        ax.plot(steps, values, color=color, marker="o", linewidth=1.8, label=label)
