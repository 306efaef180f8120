"""Training curves as a PNG: `jaxlm plot RUN [RUN ...]`, and `<run_dir>/curves.png`, redrawn by a
run at every eval. Four panels against step: train loss (raw, faint, and smoothed), eval loss,
learning rate and tokens/s; one colour per run, named in the legend.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global figure state), so it
works headless and from the training process.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Records = list[dict[str, Any]]

# (metrics key, panel title)
PANELS = (("loss", "train loss"), ("eval_loss", "eval loss"), ("lr", "learning rate"),
          ("tokens_per_s", "tokens/s"))
SMOOTHING = 0.9  # weight of the past in the train-loss moving average


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard shows it)."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**i))
    return smoothed


def _series(records: Records, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def draw(runs: dict[str, Records]) -> Figure:
    """One figure of the four panels, every run overlaid in its own colour."""
    figure = Figure(figsize=(12, 8), dpi=80, layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    for (_, title), ax in zip(PANELS, axes):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for index, (label, records) in enumerate(runs.items()):
        color = f"C{index % 10}"
        steps, losses = _series(records, "loss")
        if steps:
            axes[0].plot(steps, losses, color=color, alpha=0.25, linewidth=1)
            axes[0].plot(steps, smooth(losses), color=color, linewidth=2, label=label)
        for (key, _), ax in zip(PANELS[1:], axes[1:]):
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, color=color, linewidth=2, marker="o" if len(steps) < 50 else None,
                        label=label)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def render(runs: dict[str, Records]) -> bytes:
    """The PNG of `runs` ({legend label: metrics records})."""
    return png_bytes(draw(runs))
