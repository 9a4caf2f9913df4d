"""The test-network report: numbers (report.json), pictures (PNG) and a terminal summary.

Input is the final ``/status`` document of every node plus which of them are Byzantine.
Everything is computed from those documents, so a report can be rebuilt from saved
statuses without rerunning the network.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from p2pfl.core.crypto import short_id
from p2pfl.node.stats import finite_json
from p2pfl.term import fmt_float, fmt_pct, table

# An attacker counts as flagged when at least this fraction of the honest nodes that
# hold a score for it give it zero aggregation weight.
FLAG_FRACTION = 0.5
MB = 1e6


def build_report(statuses: list[dict], *, byzantine: Collection[str], meta: dict) -> dict:
    """Compute the report of a test network from its nodes' final statuses.

    Args:
        statuses: one ``/status`` document per node, in node-index order.
        byzantine: peer ids of the attackers (nodes that say ``byzantine`` are added).
        meta: run parameters copied into the report (nodes, rounds, attack, ...).
    """
    attackers = set(byzantine) | {s["peer_id"] for s in statuses if s.get("byzantine")}
    nodes = [_node_entry(index, s, s["peer_id"] in attackers) for index, s in enumerate(statuses)]
    honest = [n for n in nodes if n["role"] == "honest"]
    reputation = _reputation_matrix(statuses, nodes)
    detection = _detection(reputation, nodes)
    finals = [n["final_accuracy"] for n in honest if n["final_accuracy"] is not None]
    flagged = sum(d["flagged"] for d in detection["attackers"].values())
    spent = [n["epsilon_spent"] for n in honest if n["epsilon_spent"] is not None]
    return {
        "meta": dict(meta),
        "nodes": nodes,
        "per_round": _per_round(nodes),
        "reputation": reputation,
        "detection": detection,
        "verdict": {
            "honest_mean_accuracy": statistics.fmean(finals) if finals else None,
            "honest_min_accuracy": min(finals) if finals else None,
            "attackers": len(detection["attackers"]),
            "attackers_flagged": flagged,
            "honest_zeroed": len(detection["honest_zeroed"]),
            # Differential privacy: the budget and the most any honest node spent.
            "epsilon_target": next((n["epsilon_target"] for n in honest if n["epsilon_target"]), None),
            "epsilon_spent_max": max(spent) if spent else None,
        },
    }


def _node_entry(index: int, status: Mapping[str, Any], attacker: bool) -> dict[str, Any]:
    history = sorted(status.get("history") or [], key=lambda r: r["round"])
    durations = [r["duration"] for r in history if r.get("duration") is not None]
    last = history[-1] if history else {}
    return {
        "index": index,
        "peer_id": status["peer_id"],
        "short_id": short_id(status["peer_id"]),
        "role": "byzantine" if attacker else "honest",
        "attack": status.get("byzantine"),
        "state": status.get("state"),
        "rounds_trained": len(history),  # fewer than round_reached after a catch-up
        "round_reached": status.get("round", len(history)),
        "final_accuracy": last.get("accuracy", status.get("accuracy")),
        "final_loss": last.get("loss", status.get("loss")),
        "mean_round_seconds": statistics.fmean(durations) if durations else None,
        "bytes_in": status.get("bytes_in", 0),
        "bytes_out": status.get("bytes_out", 0),
        "peak_rss_bytes": status.get("peak_rss_bytes"),
        "epsilon_spent": status.get("epsilon_spent"),  # None: not private
        "epsilon_target": status.get("epsilon_target"),
        "rounds": [r["round"] for r in history],
        "accuracy": [r.get("accuracy") for r in history],
        "loss": [r.get("loss") for r in history],
        "duration": [r.get("duration") for r in history],
        "used": [r.get("used") for r in history],
        # RoundRecord bytes are cumulative; the report shows what each round cost.
        "bytes_in_per_round": _deltas([r.get("bytes_in", 0) for r in history]),
        "bytes_out_per_round": _deltas([r.get("bytes_out", 0) for r in history]),
        # Of those, the data plane (payloads); control = bytes - payload (announcements).
        "payload_in_per_round": _deltas([r.get("payload_in", 0) for r in history]),
        "payload_out_per_round": _deltas([r.get("payload_out", 0) for r in history]),
        # CPU seconds of the whole process per round; the first round includes start-up.
        "cpu_per_round": _deltas([r.get("cpu_seconds", 0.0) for r in history]),
        "learning_cpu_per_round": [r.get("learning_cpu_seconds", 0.0) for r in history],
        "compute_cpu_per_round": [r.get("compute_cpu_seconds", 0.0) for r in history],
    }


def _deltas(cumulative: Sequence[float]) -> list[float]:
    return [value - previous for previous, value in zip([0, *cumulative], cumulative, strict=False)]


def _per_round(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Honest mean/min accuracy and the median wall time of every round any node finished."""
    by_round: dict[int, dict[str, list[float]]] = {}
    for node in nodes:
        for rnd, acc, secs in zip(node["rounds"], node["accuracy"], node["duration"], strict=True):
            cell = by_round.setdefault(rnd, {"acc": [], "secs": []})
            if secs is not None:
                cell["secs"].append(secs)
            if node["role"] == "honest" and acc is not None:
                cell["acc"].append(acc)
    return [
        {
            "round": rnd,
            "honest_mean_accuracy": statistics.fmean(cell["acc"]) if cell["acc"] else None,
            "honest_min_accuracy": min(cell["acc"]) if cell["acc"] else None,
            "honest_reporting": len(cell["acc"]),
            "median_round_seconds": statistics.median(cell["secs"]) if cell["secs"] else None,
        }
        for rnd, cell in sorted(by_round.items())
    ]


def _reputation_matrix(statuses: list[dict], nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores and weights every honest node holds for every node (None: no entry)."""
    peers = [n["peer_id"] for n in nodes]
    observers = [n["peer_id"] for n in nodes if n["role"] == "honest"]
    held = {s["peer_id"]: {p["peer"]: p for p in s.get("reputation") or []} for s in statuses}
    score = [[held[o].get(p, {}).get("score") for p in peers] for o in observers]
    weight = [[held[o].get(p, {}).get("weight") for p in peers] for o in observers]
    return {"observers": observers, "peers": peers, "score": score, "weight": weight}


def _detection(reputation: Mapping[str, Any], nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """For each attacker: the fraction of honest observers that give it zero weight."""
    roles = {n["peer_id"]: n["role"] for n in nodes}
    attackers: dict[str, dict[str, Any]] = {}
    honest_zeroed: list[list[str]] = []
    for column, peer in enumerate(reputation["peers"]):
        weights = [
            (observer, row[column])
            for observer, row in zip(reputation["observers"], reputation["weight"], strict=True)
            if row[column] is not None and observer != peer
        ]
        zeroed = [observer for observer, w in weights if w == 0]
        if roles[peer] == "byzantine":
            fraction = len(zeroed) / len(weights) if weights else 0.0
            attackers[peer] = {
                "observers": len(weights),
                "zero_weight": len(zeroed),
                "fraction": fraction,
                "flagged": bool(weights) and fraction >= FLAG_FRACTION,
            }
        else:
            honest_zeroed.extend([observer, peer] for observer in zeroed)
    return {"flag_fraction": FLAG_FRACTION, "attackers": attackers, "honest_zeroed": honest_zeroed}


# --------------------------------------------------------------------------- files


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write report.json, accuracy.png and reputation.png into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(finite_json(report), indent=2) + "\n")
    paths = [json_path, _plot_accuracy(report, out_dir / "accuracy.png")]
    if report["reputation"]["observers"]:
        paths.append(_plot_reputation(report, out_dir / "reputation.png"))
    return paths



def _title(report: Mapping[str, Any]) -> str:
    meta = report["meta"]
    attack = f", {meta.get('byzantine', 0)} x {meta.get('attack')}" if meta.get("attack") else ""
    parts = [f"{len(report['nodes'])} nodes", str(meta.get("rule", "")), str(meta.get("partition", ""))]
    return ", ".join(p for p in parts if p) + attack


def _plot_accuracy(report: Mapping[str, Any], path: Path) -> Path:
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # Figure() renders with Agg; no pyplot global state
    from matplotlib.ticker import MaxNLocator

    # tab10 without its red (index 3): red means byzantine in every p2pfl picture.
    palette = [colormaps["tab10"](i) for i in range(10) if i != 3]
    label_each = len(report["nodes"]) <= 12
    fig = Figure(figsize=(9.5 if label_each else 8, 5), dpi=110)
    ax = fig.add_subplot()
    for node in report["nodes"]:
        xs, ys = _known(node["rounds"], node["accuracy"])
        name = f"n{node['index']} {node['short_id']}"
        if node["role"] == "byzantine":
            ax.plot(xs, ys, "--", marker="o", markersize=3, color="tab:red", linewidth=1.5, label=f"{name} (byzantine)" if label_each else None)
        else:
            color = palette[node["index"] % len(palette)]
            # Markers: a node that caught up may have a single point, invisible as a line.
            ax.plot(xs, ys, "-", marker="o", markersize=3, color=color, linewidth=1.0, alpha=0.8, label=name if label_each else None)
    xs, ys = _known([r["round"] for r in report["per_round"]], [r["honest_mean_accuracy"] for r in report["per_round"]])
    ax.plot(xs, ys, "-", color="black", linewidth=3, label="honest mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Accuracy per round ({_title(report)})", fontsize="medium")
    if label_each:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    else:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _known(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _plot_reputation(report: Mapping[str, Any], path: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rep = report["reputation"]
    index = {n["peer_id"]: n for n in report["nodes"]}
    scores = np.array([[np.nan if v is None else v for v in row] for row in rep["score"]], dtype=float)
    rows, cols = scores.shape
    fig = Figure(figsize=(1.2 + 0.55 * cols, 1.5 + 0.45 * rows), dpi=110)
    ax = fig.add_subplot()
    cmap = _score_cmap()
    image = ax.imshow(np.ma.masked_invalid(scores), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, label="reputation score", shrink=0.8)
    ax.set_xticks(range(cols), [_label(index[p]) for p in rep["peers"]], rotation=45, ha="right")
    ax.set_yticks(range(rows), [_label(index[o]) for o in rep["observers"]])
    for tick, peer in zip(ax.get_xticklabels(), rep["peers"], strict=True):
        if index[peer]["role"] == "byzantine":
            tick.set_color("tab:red")
            tick.set_fontweight("bold")
    for column, peer in enumerate(rep["peers"]):
        if index[peer]["role"] == "byzantine":
            ax.add_patch(Rectangle((column - 0.5, -0.5), 1, rows, fill=False, edgecolor="tab:red", linewidth=2.5))
    for row, observer in enumerate(rep["observers"]):
        if observer in rep["peers"]:
            ax.text(rep["peers"].index(observer), row, "self", ha="center", va="center", fontsize=7, color="#707070")
    if rows * cols <= 400:
        _annotate(ax, scores, rep["weight"])
    ax.set_xlabel("peer (red: byzantine)")
    ax.set_ylabel("honest observer")
    ax.set_title("Final reputation (x: zero weight, grey: no score)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _score_cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["RdYlGn"].with_extremes(bad="#d0d0d0")


def _label(node: Mapping[str, Any]) -> str:
    return f"n{node['index']} {node['short_id'][-4:]}" + (" *" if node["role"] == "byzantine" else "")


def _annotate(ax: Any, scores: Any, weights: list[list[float | None]]) -> None:
    for r, row in enumerate(scores):
        for c, value in enumerate(row):
            if math.isnan(value):
                continue
            zero = weights[r][c] == 0
            ax.text(c, r, f"{value:.2f}" + ("\nx" if zero else ""), ha="center", va="center", fontsize=7,
                    color="white" if value < 0.25 or value > 0.8 else "black")


# --------------------------------------------------------------------------- terminal


def render_summary(report: Mapping[str, Any]) -> str:
    """Render the report for a terminal: node table, reputation matrix, verdict."""
    sections = [_node_table(report["nodes"])]
    if any(v is not None for row in report["reputation"]["score"] for v in row):
        sections.append(_matrix_text(report))
    sections.append(_verdict(report))
    hint = _absence_hint(report)
    return "\n\n".join(sections) + (f"\n{hint}" if hint else "")


def _absence_hint(report: Mapping[str, Any]) -> str:
    """With non-IID data the attackers' classes leave with them: say how to measure that."""
    meta = report["meta"]
    if not report["verdict"]["attackers"] or meta.get("partition", "iid") == "iid" or meta.get("attack") == "forge":
        return ""
    return ("note: with non-IID data the honest nodes also lack the attackers' data; the same run "
            "with --attack forge (every attacker message rejected) measures what their absence alone costs")


def _node_table(nodes: list[Mapping[str, Any]]) -> str:
    rows = [
        [
            f"n{n['index']}",
            n["short_id"],
            n["role"] + (f" ({n['attack']})" if n.get("attack") else ""),
            fmt_pct(n["final_accuracy"]),
            str(n["round_reached"]),
            str(n["rounds_trained"]),
            fmt_float(n["mean_round_seconds"], 2),
            f"{n['bytes_in'] / MB:.2f}",
            f"{n['bytes_out'] / MB:.2f}",
        ]
        for n in nodes
    ]
    headers = ["#", "peer", "role", "accuracy", "round", "trained", "s/round", "MB in", "MB out"]
    return table(headers, rows, align="lllrrrrrr")


def _matrix_text(report: Mapping[str, Any]) -> str:
    rep = report["reputation"]
    index = {n["peer_id"]: n for n in report["nodes"]}
    headers = ["observer", *(f"n{index[p]['index']}" + ("*" if index[p]["role"] == "byzantine" else "") for p in rep["peers"])]
    rows = []
    for observer, scores, weights in zip(rep["observers"], rep["score"], rep["weight"], strict=True):
        cells = [_cell(s, w) for s, w in zip(scores, weights, strict=True)]
        rows.append([f"n{index[observer]['index']}", *cells])
    legend = "reputation held by honest nodes (rows) for each node (columns); * byzantine, ! zero weight, - no score"
    return legend + "\n" + table(headers, rows, align="l" + "r" * len(rep["peers"]))


def _cell(score: float | None, weight: float | None) -> str:
    if score is None:
        return "- "  # the trailing space keeps it under the digits, not under the marks
    return f"{score:.2f}" + ("!" if weight == 0 else " ")


def _verdict(report: Mapping[str, Any]) -> str:
    v = report["verdict"]
    text = (
        f"verdict: honest accuracy mean {fmt_pct(v['honest_mean_accuracy'])}, "
        f"min {fmt_pct(v['honest_min_accuracy'])}"
    )
    if v["attackers"]:
        share = f"{report['detection']['flag_fraction']:.0%}"
        text += f"; attackers flagged {v['attackers_flagged']}/{v['attackers']} (zero weight at >= {share} of their honest observers)"
    if v["honest_zeroed"]:
        text += f"; honest peers wrongly zeroed {v['honest_zeroed']}x"
    if v.get("epsilon_target") is not None:
        text += f"; privacy spent epsilon <= {fmt_float(v['epsilon_spent_max'], 2)} of {v['epsilon_target']:g}"
    return text


__all__ = ["FLAG_FRACTION", "build_report", "render_summary", "write_report"]
