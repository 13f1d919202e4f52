"""The plots of a run, drawn once here for the HTML report and the dashboard: PNG bytes from metrics dicts."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"teacher": "#1f4e79", "student-alone": "#c0504d", "student-distilled": "#2e8b57", "other": "#8064a2"}


def _color(name: str) -> str:
    if name.startswith("teacher"):
        return COLORS["teacher"]
    return COLORS.get(name, COLORS["other"])


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def learning_curves(history: dict[str, list[dict[str, float]]], metric: str = "test_accuracy") -> bytes:
    """Left: `metric` after each epoch of every run; right: the students' mean loss terms per epoch (kd, ce and
    feature terms). The x axis is the optimizer step, so runs over data of different sizes line up."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = ["-", "--", ":", "-."]
    for name, records in history.items():
        steps = [r["step"] for r in records if metric in r]
        values = [(100 if "accuracy" in metric else 1) * r[metric] for r in records if metric in r]
        faded = name.startswith("teacher-") and name != "teacher-0"
        if values:
            left.plot(steps, values, label=name, color=_color(name), alpha=0.5 if faded else 1.0)
        if name.startswith("teacher"):
            continue
        terms = [k for k in (records[0] if records else {}) if k in ("kd", "ce") or ":" in k]
        for i, term in enumerate(terms):
            points = [(r["step"], r[term]) for r in records if term in r]
            right.plot(*zip(*points), styles[i % len(styles)], color=_color(name), label=f"{name} {term}")
    unit = " (%)" if "accuracy" in metric else ""
    left.set(
        xlabel="optimizer step",
        ylabel=metric.replace("_", " ") + unit,
        title=f"{metric.replace('_', ' ')} during training",
    )
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    right.set(xlabel="optimizer step", ylabel="loss", title="Loss terms (students)", yscale="log")
    right.grid(alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    return _png(fig)


def accuracy_vs_size(
    points: Sequence[dict[str, Any]], xlabel: str = "parameters", ylabel: str = "test accuracy (%)"
) -> bytes:
    """One marker per model: `{"name", "params", "accuracy"}`; log-scaled size axis."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for point in points:
        ax.scatter(point["params"], 100 * point["accuracy"], s=70, color=_color(point["name"]), zorder=3)
        ax.annotate(
            point["name"],
            (point["params"], 100 * point["accuracy"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title="Quality against size")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def reliability(diagrams: dict[str, dict[str, Any]]) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, for each model, with the diagonal."""
    fig, axes = plt.subplots(1, len(diagrams), figsize=(3.6 * len(diagrams), 3.6), squeeze=False)
    for ax, (name, table) in zip(axes[0], diagrams.items()):
        edges = table["edges"]
        widths = [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
        heights = [0.0 if (a is None or (isinstance(a, float) and math.isnan(a))) else a for a in table["accuracy"]]
        ax.bar(edges[:-1], heights, width=widths, align="edge", color=_color(name), alpha=0.75, edgecolor="white")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence",
            ylabel="accuracy",
            title=f"{name}\nECE {100 * table['ece']:.1f} %",
        )
    return _png(fig)
