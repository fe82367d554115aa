"""Figures, written as PNG files atomically: what each strategy achieves, where static batches waste slots, and
how a length predictor's answers fall against the real lengths. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .utils import UserError, share_with_umask

USEFUL_COLOR = "#2a9d8f"
WASTED_COLOR = "#e76f51"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path) -> Path:
    """Write next to the target and rename, so an interrupted run never leaves a truncated image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=120, bbox_inches="tight")
        share_with_umask(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    pyplot().close(figure)
    return path


def plot_strategies(results: list[dict], path: str | Path) -> Path:
    """Bars per strategy: throughput (real runs only), effective token ratio, mean and p90 latency."""
    plt = pyplot()
    dry_run = results[0]["dry_run"]
    labels = [result["strategy"] for result in results]
    unit = "steps" if dry_run else "s"
    panels = [
        ("effective token ratio (%)", [result["effective_token_ratio"] * 100 for result in results]),
        (f"mean latency ({unit})", [result[f"mean_latency_{unit}"] for result in results]),
    ]
    if not dry_run:
        panels.insert(0, ("throughput (samples/s)", [result["throughput_samples_per_s"] for result in results]))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(labels) + 1.6))
    for axis, (title, values) in zip(axes, panels, strict=True):
        bars = axis.barh(labels, values, color=USEFUL_COLOR)
        if title.startswith("mean latency"):  # the p90 as a tick on each bar
            axis.scatter([result[f"p90_latency_{unit}"] for result in results], labels, marker="|", s=200, color="k")
            title += ", | = p90"
        axis.bar_label(bars, fmt=lambda value: f"{value:.3g}" if value < 100 else f"{value:.0f}", padding=2, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.invert_yaxis()
        axis.margins(x=0.25)
    for axis in axes[1:]:
        axis.set_yticklabels([])
    return save_figure(figure, path)


def batch_slots(batch: dict) -> int:
    """A batch row's token slots; results written before out-of-memory splits were charged lack the field."""
    return batch.get("token_slots", batch["steps"] * batch["size"])


def plot_batches(results: list[dict], path: str | Path, scheduled: str | None = None) -> Path:
    """Token slots of each batch, in run order: the useful part (generated tokens) and the padding. One panel for
    vanilla and one for a scheduled strategy (default: the static one with the best effective token ratio)."""
    plt = pyplot()
    by_label = {result["strategy"]: result for result in results if result["batches"]}
    if "vanilla" not in by_label:
        raise UserError("the batch plot needs a vanilla result: run the benchmark with --strategies vanilla ...")
    if scheduled is None:
        others = [result for label, result in by_label.items() if label != "vanilla"]
        if not others:
            raise UserError("the batch plot needs a scheduled static strategy besides vanilla, e.g. gt")
        scheduled = max(others, key=lambda result: result["effective_token_ratio"])["strategy"]
    if scheduled not in by_label:
        raise UserError(f"no static result {scheduled!r} in the input: choose from {', '.join(by_label)}")
    chosen = [by_label["vanilla"], by_label[scheduled]]
    top = max(batch_slots(batch) for result in chosen for batch in result["batches"])
    figure, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharey=True)
    for axis, result in zip(axes, chosen, strict=True):
        batches = result["batches"]
        positions = range(len(batches))
        useful = [batch["useful_tokens"] for batch in batches]
        wasted = [batch_slots(batch) - batch["useful_tokens"] for batch in batches]
        axis.bar(positions, useful, width=1.0, color=USEFUL_COLOR, label="generated tokens")
        axis.bar(positions, wasted, width=1.0, bottom=useful, color=WASTED_COLOR, label="padding slots")
        recomputed = [index for index, batch in enumerate(batches) if batch["recompute"]]
        if recomputed:
            axis.axvspan(min(recomputed) - 0.5, max(recomputed) + 0.5, color="gray", alpha=0.15, label="FCR recompute")
        axis.set_title(
            f"{result['strategy']}: {len(batches)} batches, effective token ratio "
            f"{result['effective_token_ratio'] * 100:.1f}%",
            fontsize=10,
        )
        axis.set_ylabel("token slots")
        axis.set_ylim(0, top * 1.05)
        axis.set_xlim(-0.5, max(len(result["batches"]) for result in chosen) - 0.5)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("batch, in run order")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_predictions(path: str, predictions: list[int], targets: list[int], title: str) -> None:
    figure, axis = pyplot().subplots(figsize=(5, 5))
    axis.scatter(targets, predictions, s=6, alpha=0.4)
    top = max(max(targets), max(predictions))
    axis.plot([0, top], [0, top], color="gray", linewidth=1)
    axis.set_xlabel("L_max (tokens)")
    axis.set_ylabel("predicted length (tokens)")
    axis.set_title(title)
    save_figure(figure, path)


def plot_reliability(path: str, calibration: list[dict], title: str) -> None:
    """Reliability diagram of predicted quantiles: coverage against level, the diagonal being perfect calibration."""
    figure, axis = pyplot().subplots(figsize=(5, 5))
    levels = [row["level"] for row in calibration]
    coverages = [row["coverage"] for row in calibration]
    low = min([*levels, *coverages]) - 0.05
    axis.plot([low, 1], [low, 1], color="gray", linewidth=1, label="calibrated")
    axis.plot(levels, coverages, marker="o", label="predicted quantiles")
    for level, coverage in zip(levels, coverages, strict=True):
        axis.annotate(f"{coverage * 100:.1f} %", (level, coverage), textcoords="offset points", xytext=(4, -12))
    axis.set_xlabel("quantile level q")
    axis.set_ylabel("share of samples with length <= predicted q-quantile")
    axis.set_xlim(low, 1)
    axis.set_ylim(low, 1)
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(title)
    save_figure(figure, path)
