"""PNG figures of scorecards (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

HONEST, BYZANTINE = "#1f77b4", "#d62728"


def _title(card: Mapping[str, Any]) -> str:
    s = card["scenario"]
    attack = s["attack"] if s["attack"] == "none" else f"{s['attack']} x{s['byzantine']}"
    return (f"{s['name']}: {s['nodes']} nodes, {s['topology']['kind']}, rule {s['rule']}, "
            f"attack {attack}, seed {card['seed']}")


def _series(values: list[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def plot_accuracy(card: Mapping[str, Any], path: Path) -> Path:
    """Accuracy per round (honest and Byzantine nodes apart) and the consensus distance."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    rounds = np.arange(1, card["scenario"]["rounds"] + 1)
    for node in card["nodes"]:
        bad = node["byzantine"]
        top.plot(rounds, _series(node["accuracy"]), color=BYZANTINE if bad else HONEST,
                 alpha=0.8 if bad else 0.25, linewidth=1.2 if bad else 0.8, linestyle="--" if bad else "-")
    top.plot(rounds, _series(card["accuracy"]["honest_mean"]), color="black", linewidth=2.2,
             label="honest mean")
    top.plot(rounds, _series(card["accuracy"]["honest_min"]), color="black", linewidth=1.2,
             linestyle=":", label="honest min")
    top.plot([], [], color=HONEST, alpha=0.5, label="honest node")
    if card["byzantine"]:
        top.plot([], [], color=BYZANTINE, linestyle="--", label="Byzantine node")
    top.set_ylim(0, 1)
    top.set_ylabel("test accuracy")
    top.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    top.set_title(_title(card), fontsize=9)
    consensus = _series(card["consensus"])
    bottom.plot(rounds, consensus, color="#2ca02c")
    if np.nanmax(consensus, initial=0) > 0:
        bottom.set_yscale("log")
    bottom.set_ylabel("consensus dist.")
    bottom.set_xlabel("round")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def plot_reputation(card: Mapping[str, Any], path: Path) -> Path:
    """Final aggregation weight observer (row) x peer (column); blank where no neighbour."""
    matrix = np.array([[math.nan if v is None else v for v in row] for row in card["reputation"]])
    n = len(matrix)
    size = min(12.0, 3 + 0.18 * n)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, label="aggregation weight (0 = flagged)")
    byzantine = set(card["byzantine"])
    step = 1 if n <= 32 else math.ceil(n / 32)
    ticks = list(range(0, n, step))
    labels = [f"{i}{'*' if i in byzantine else ''}" for i in ticks]
    ax.set_xticks(ticks, labels, fontsize=7, rotation=90)
    ax.set_yticks(ticks, labels, fontsize=7)
    for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        if tick.get_text().endswith("*"):
            tick.set_color(BYZANTINE)
    ax.set_xlabel("peer (* Byzantine)")
    ax.set_ylabel("observer")
    ax.set_title("final reputation weights\n" + _title(card), fontsize=9)
    return _save(fig, path)


def plot_grid(summary: Mapping[str, Any], path: Path, *, title: str = "") -> Path:
    """Rules x attacks heatmap of the final honest mean accuracy (mean +/- spread over seeds)."""
    rules, attacks = summary["rules"], summary["attacks"]
    means = np.full((len(rules), len(attacks)), math.nan)
    spread = np.full_like(means, math.nan)
    for cell in summary["cells"]:
        i, j = rules.index(cell["rule"]), attacks.index(cell["attack"])
        if cell["accuracy_mean"] is not None:
            means[i, j], spread[i, j] = cell["accuracy_mean"], cell["accuracy_spread"]
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(attacks), 1.5 + 0.6 * len(rules)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(means), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, label="final honest mean accuracy")
    for i in range(len(rules)):
        for j in range(len(attacks)):
            if not math.isnan(means[i, j]):
                ax.text(j, i, f"{means[i, j]:.2f}\n±{spread[i, j]:.2f}", ha="center", va="center",
                        fontsize=7)
    ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rules)), rules, fontsize=8)
    ax.set_title(title or "rules x attacks", fontsize=9)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_accuracy", "plot_grid", "plot_reputation"]
