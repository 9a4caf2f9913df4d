"""The scorecard of a run, and of a grid of runs: plain JSON-able data plus a text table.

Per run (:func:`scorecard`):

- ``accuracy``: per round, the honest nodes' mean and minimum test accuracy, the
  Byzantine nodes' mean (their local models, for reference), and each class's accuracy
  averaged over honest nodes (``honest_class_mean``).
- ``consensus``: per round, the honest models' mean squared distance to their average
  (0 = all equal); ``final`` repeats the last round's figures and adds the worst class
  (:func:`worst_class`): by honest mean, and the worst (honest node, class) pair.
- ``detection``: over the (honest observer, neighbour) pairs of the graph, a pair is
  *flagged* when the observer gives the peer aggregation weight 0 (score below the
  reputation threshold, or banned). ``recall`` is the share of (observer, Byzantine)
  pairs flagged at the end, ``precision`` the share of flagged pairs whose peer is
  Byzantine; ``*_ever`` count a flag at any round; ``recall_within_5`` counts the
  Byzantine pairs flagged by round 4 (the first 5 rounds). ``first_flag_round`` is the
  median first round a Byzantine pair was flagged. ``false_positive_peers`` is the share of
  honest peers flagged by at least one honest neighbour at some round;
  ``false_positive_peers_sheltered`` the same among honest peers that are not exposed
  (below): an exposed node the attackers drag off can harm its neighbours' data, and
  flagging it is no mistake by their lights; ``false_positive_peers_final`` the share of
  honest peers still flagged by at least one honest neighbour at the end (counted as
  ``recall`` counts attackers). ``byzantine_weight_share`` is the influence
  left to the attackers whatever the threshold: per honest observer with a Byzantine
  neighbour, the Byzantine neighbours' share of the neighbour weight at the end, averaged
  over those observers (0 = all flagged; with ``[reputation] full_weight_at`` a peer just
  above the threshold keeps a little weight and counts here, not in ``recall``).
- ``exposed_honest``: honest nodes at least half of whose neighbours are Byzantine;
  no local rule can protect them, so expect them among the honest minimum.
  ``final.honest_min_sheltered`` is the lowest final accuracy among the other honest
  nodes (None if every honest node is exposed).
- ``traffic``: mean bytes in and out per node per round.

Per grid (:func:`grid_summary`): for each rule x attack cell, the final honest mean
accuracy over seeds (mean, spread = standard deviation, min) and the detection recall.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from p2pfl.node.stats import finite_json
from p2pfl.sim.runner import RunResult
from p2pfl.sim.scenario import NO_ATTACK, Scenario


def _mean(xs: Iterable[float | None]) -> float | None:
    values = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(values) if values else None


def _min(xs: Iterable[float | None]) -> float | None:
    values = [x for x in xs if x is not None and not math.isnan(x)]
    return min(values) if values else None



def scenario_record(scenario: Scenario) -> dict[str, Any]:
    """Describe a scenario as plain data."""
    return {
        "name": scenario.name,
        "nodes": scenario.nodes,
        "rounds": scenario.rounds,
        "topology": {"kind": scenario.topology, **scenario.topology_params},
        "partition": scenario.partition,
        "alpha": scenario.alpha,
        "rule": scenario.rule,
        "rule_params": dict(scenario.rule_params),
        "attack": scenario.attack,
        "attack_params": dict(scenario.attack_params),
        "byzantine": scenario.byzantine,
        "placement": scenario.placement,
        "link": {"latency": scenario.link.latency, "jitter": scenario.link.jitter,
                 "loss": scenario.link.loss, "bandwidth": scenario.link.bandwidth},
        "round_timeout": scenario.round_timeout,
        "delivery": scenario.delivery,
        "privacy": None if scenario.privacy is None else asdict(scenario.privacy),
    }


def _per_round(result: RunResult, members: Sequence[int]) -> tuple[list[Any], list[Any]]:
    rounds = range(result.scenario.rounds)
    means = [_mean(result.accuracy[i][r] for i in members) for r in rounds]
    mins = [_min(result.accuracy[i][r] for i in members) for r in rounds]
    return means, mins


def class_means(result: RunResult, members: Sequence[int]) -> list[list[float | None] | None]:
    """Return, per round, each class's test accuracy averaged over ``members`` (None: unknown)."""
    rows: list[list[float | None] | None] = []
    for r in range(result.scenario.rounds):
        known = [acc for i in members if i < len(result.per_class) and (acc := result.per_class[i][r])]
        width = max((len(acc) for acc in known), default=0)
        rows.append([_mean(acc[c] for acc in known if c < len(acc)) for c in range(width)] or None)
    return rows


def worst_class(result: RunResult) -> dict[str, Any]:
    """The final round's worst class: by honest mean, and over single honest nodes."""
    final = class_means(result, result.honest)[-1] or []
    by_mean = [(acc, c) for c, acc in enumerate(final) if acc is not None]
    by_node = [
        (acc, c, i) for i in result.honest
        for c, acc in enumerate(_final_classes(result, i) or []) if not math.isnan(acc)
    ]
    mean_acc, mean_class = min(by_mean) if by_mean else (None, None)
    node_acc, node_class, node = min(by_node) if by_node else (None, None, None)
    return {"worst_class": mean_acc, "worst_class_index": mean_class,
            "worst_node_class": node_acc, "worst_node_class_index": node_class, "worst_node": node}


def _last_weights(rows: Sequence[Mapping[int, float]]) -> Mapping[int, float]:
    for row in reversed(rows):
        if row:
            return row
    return {}


FLAG_DEADLINE = 5  # issue 5: attackers flagged "within 5 rounds"


def _first_flag(rows: Sequence[Mapping[int, float]], peer: int) -> int | None:
    return next((r for r, row in enumerate(rows) if row.get(peer) == 0), None)


def observed_pairs(result: RunResult) -> list[tuple[int, int]]:
    """Return (honest observer, neighbour) pairs of the graph, both directions."""
    honest = set(result.honest)
    pairs = [(a, b) for a, b in result.edges] + [(b, a) for a, b in result.edges]
    return sorted((o, p) for o, p in pairs if o in honest)


def detection(result: RunResult) -> dict[str, Any]:
    """Precision/recall of weight-0 flags against the true Byzantine set (see module doc)."""
    bad = set(result.byzantine)
    pairs = observed_pairs(result)
    final = {(o, p) for o, p in pairs if _last_weights(result.weights[o]).get(p) == 0}
    first = {(o, p): _first_flag(result.weights[o], p) for o, p in pairs}
    ever = {pair for pair, r in first.items() if r is not None}
    byz_pairs = [pair for pair in pairs if pair[1] in bad]
    honest_peers = {p for _, p in pairs if p not in bad}
    flagged_honest = {p for (_, p) in ever if p not in bad}
    sheltered = honest_peers - set(exposed_honest(result))
    first_rounds = [r for pair in byz_pairs if (r := first[pair]) is not None]
    return {
        "pairs": len(byz_pairs),
        "recall": _ratio(sum(1 for pair in byz_pairs if pair in final), len(byz_pairs)),
        "precision": _ratio(sum(1 for pair in final if pair[1] in bad), len(final)),
        "recall_ever": _ratio(sum(1 for pair in byz_pairs if pair in ever), len(byz_pairs)),
        "recall_within_5": _ratio(
            sum(1 for pair in byz_pairs if (r := first[pair]) is not None and r < FLAG_DEADLINE),
            len(byz_pairs),
        ),
        "precision_ever": _ratio(sum(1 for pair in ever if pair[1] in bad), len(ever)),
        "first_flag_round": statistics.median(first_rounds) if first_rounds else None,
        "false_positive_peers": _ratio(len(flagged_honest), len(honest_peers)),
        "false_positive_peers_sheltered": _ratio(len(flagged_honest & sheltered), len(sheltered)),
        "false_positive_peers_final": _ratio(len({p for _, p in final if p not in bad}), len(honest_peers)),
        "false_positive_pairs_final": _ratio(
            sum(1 for pair in final if pair[1] not in bad), len(pairs) - len(byz_pairs)
        ),
        "byzantine_weight_share": _byzantine_share(result, pairs, bad),
    }


def _byzantine_share(result: RunResult, pairs: Sequence[tuple[int, int]], bad: set[int]) -> float | None:
    shares = []
    for observer in sorted({o for o, p in pairs if p in bad}):
        last = _last_weights(result.weights[observer])
        weights = [(last.get(p, 0.0), p in bad) for o, p in pairs if o == observer]
        total = sum(w for w, _ in weights)
        shares.append(sum(w for w, byz in weights if byz) / total if total > 0 else 0.0)
    return _mean(shares)


def exposed_honest(result: RunResult) -> list[int]:
    """Return honest nodes at least half of whose neighbours are Byzantine.

    No local rule can protect such a node: its neighbourhood has no honest majority.
    """
    bad = set(result.byzantine)
    neighbours: dict[int, list[int]] = {}
    for a, b in result.edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    return [
        i for i in result.honest
        if neighbours.get(i) and 2 * sum(p in bad for p in neighbours[i]) >= len(neighbours[i])
    ]


def sheltered_min(result: RunResult) -> float | None:
    """Return the lowest final accuracy of the honest nodes that are not exposed."""
    exposed = set(exposed_honest(result))
    return _min(result.accuracy[i][-1] for i in result.honest if i not in exposed and result.accuracy[i])


def _ratio(count: int, total: int) -> float | None:
    return count / total if total else None


def reputation_matrix(result: RunResult) -> list[list[float | None]]:
    """Return the final weight each node (row) gives each other node (column); None if unknown."""
    n = result.scenario.nodes
    matrix: list[list[float | None]] = []
    for observer in range(n):
        row = _last_weights(result.weights[observer])
        matrix.append([row.get(peer) if peer != observer else None for peer in range(n)])
    return matrix


def _final_classes(result: RunResult, index: int) -> list[float] | None:
    rows = result.per_class[index] if index < len(result.per_class) else ()
    return list(rows[-1]) if rows and rows[-1] else None


def scorecard(result: RunResult) -> dict[str, Any]:
    """Return the scorecard of one run as JSON-able data."""
    scenario, honest = result.scenario, result.honest
    means, mins = _per_round(result, honest)
    byz_means, _ = _per_round(result, result.byzantine)
    rounds = max(1, scenario.rounds)
    card = {
        "scenario": scenario_record(scenario),
        "seed": result.seed,
        "byzantine": list(result.byzantine),
        "edges": [list(e) for e in result.edges],
        "accuracy": {"honest_mean": means, "honest_min": mins, "byzantine_mean": byz_means,
                     "honest_class_mean": class_means(result, honest)},
        "consensus": list(result.consensus),
        "final": {
            "honest_mean": means[-1],
            "honest_min": mins[-1],
            "honest_min_sheltered": sheltered_min(result),
            "consensus": result.consensus[-1] if result.consensus else None,
            **worst_class(result),
        },
        "detection": detection(result),
        "exposed_honest": exposed_honest(result),
        "traffic": {
            "bytes_in_per_node_round": _mean(b / rounds for b in result.bytes_in),
            "bytes_out_per_node_round": _mean(b / rounds for b in result.bytes_out),
        },
        "nodes": [
            {"index": i, "byzantine": i in result.byzantine, "accuracy": list(result.accuracy[i]),
             "class_accuracy": _final_classes(result, i), "rejected": dict(result.rejected[i])}
            for i in range(scenario.nodes)
        ],
        "reputation": reputation_matrix(result),
        "timing": {"wall_seconds": result.wall_seconds, "sim_seconds": result.sim_seconds,
                   "verifications_shared": result.cache_hits,
                   "verifications_done": result.cache_misses},
    }
    return finite_json(card)


# -- grids -----------------------------------------------------------------------------


def grid_summary(cards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summarise run scorecards by (rule, attack) cell over their seeds."""
    cells: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for card in cards:
        key = (card["scenario"]["rule"], card["scenario"]["attack"])
        cells.setdefault(key, []).append(card)
    rules = list(dict.fromkeys(rule for rule, _ in cells))
    attacks = list(dict.fromkeys(attack for _, attack in cells))
    summary = []
    for (rule, attack), group in cells.items():
        finals = [c["final"]["honest_mean"] for c in group if c["final"]["honest_mean"] is not None]
        recalls = [c["detection"]["recall"] for c in group if c["detection"]["recall"] is not None]
        summary.append({
            "rule": rule,
            "attack": attack,
            "seeds": [c["seed"] for c in group],
            "accuracy_mean": _mean(finals),
            "accuracy_spread": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "accuracy_min": _min(finals),
            "honest_min_mean": _mean(c["final"]["honest_min"] for c in group),
            "honest_min_sheltered_mean": _mean(c["final"].get("honest_min_sheltered") for c in group),
            "worst_class_mean": _mean(c["final"].get("worst_class") for c in group),
            "worst_node_class_mean": _mean(c["final"].get("worst_node_class") for c in group),
            "recall_mean": _mean(recalls),
            "recall_within_5_mean": _mean(
                r for c in group if (r := c["detection"].get("recall_within_5")) is not None
            ),
            "false_positive_mean": _mean(c["detection"]["false_positive_peers"] for c in group),
        })
    return finite_json({"rules": rules, "attacks": attacks, "cells": summary})


def _cell(summary: Mapping[str, Any], rule: str, attack: str) -> Mapping[str, Any] | None:
    return next(
        (c for c in summary["cells"] if c["rule"] == rule and c["attack"] == attack), None
    )


def grid_table(summary: Mapping[str, Any]) -> str:
    """Render rules x attacks as text: final honest mean accuracy, mean +/- spread over seeds."""
    from p2pfl.term import table

    attacks = summary["attacks"]
    rows = []
    for rule in summary["rules"]:
        row = [rule]
        for attack in attacks:
            cell = _cell(summary, rule, attack)
            if cell is None or cell["accuracy_mean"] is None:
                row.append("-")
            else:
                row.append(f"{cell['accuracy_mean']:.3f}±{cell['accuracy_spread']:.3f}")
        rows.append(row)
    return table(["rule \\ attack", *attacks], rows, align="l" + "r" * len(attacks))


def run_line(card: Mapping[str, Any]) -> str:
    """One line about a run: rule, attack, seed, final accuracy, detection."""
    s, final, det = card["scenario"], card["final"], card["detection"]
    attack = s["attack"] if s["attack"] == NO_ATTACK else f"{s['attack']} x{s['byzantine']}"
    acc = "-" if final["honest_mean"] is None else f"{final['honest_mean']:.3f}"
    low = "-" if final["honest_min"] is None else f"{final['honest_min']:.3f}"
    recall = "" if det["recall"] is None else f", detected {det['recall']:.0%}"
    worst = final.get("worst_class")
    klass = "" if worst is None else f", worst class {final['worst_class_index']} {worst:.3f}"
    return (f"{s['rule']} / {attack} / seed {card['seed']}: honest accuracy {acc} (min {low})"
            f"{klass}{recall}")


__all__ = [
    "class_means",
    "detection",
    "exposed_honest",
    "grid_summary",
    "grid_table",
    "observed_pairs",
    "reputation_matrix",
    "run_line",
    "scenario_record",
    "scorecard",
    "worst_class",
]
