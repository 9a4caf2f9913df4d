"""Issue 17's bars, attack by attack, from defence-sweep lines.

usage: python benchmarks/bars.py SWEEP.jsonl[,MORE.jsonl...] VARIANT SETTING SEEDS [MEAN_VARIANT]

Reads the JSON lines that benchmarks/defence_sweep.py appends (one per run; several
files, comma-separated, are read in order), keeps
VARIANT's runs on SETTING for every seed in SEEDS (comma-separated; an attack missing a
seed is left out), averages over seeds and prints a markdown table against the bars of
issue 17, measured from the same variant's run without attack:

- mean: honest mean within 5 points of no attack;
- node: the lowest honest node within 10 points of the lowest without attack;
- class: the worst class within 10 points of the worst class without attack;
- flagged: attackers at weight 0 at the end >= 80% of their honest observers, where the
  attack costs more than 2 points of honest mean; in brackets, where the runs record it,
  the attackers' share of their honest observers' neighbour weight at the end (the
  scorecard's ``byzantine_weight_share``: influence left whether flagged or not);
- FP: honest peers ever flagged <= 5%; in brackets, where the runs record it, the same
  among sheltered honest peers (not exposed: fewer than half of their neighbours attack);
- plain mean: MEAN_VARIANT's runs (rule mean) of the same attack, where there are any:
  the default must never be below them.

Where the variant has runs of ``forge`` (every message the attackers send is rejected:
the attackers are absent, and their data with them), a last column gives each attack's
honest mean against that: what the attack costs beyond the data a perfect defence would
lose too (with non-IID data, the classes the attackers hold).

Only runs of the setting's own length count (benchmarks/defence_settings.py): the sweep
files also hold shorter runs of the same variant (session 16's horizon checks).

A cell that misses its bar is in bold. Worst node and worst class are means over seeds
of each run's value.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defence_settings import setting as defence_setting

MEAN_BAR, NODE_BAR, CLASS_BAR, COSTS, RECALL_BAR, FP_BAR = 0.05, 0.10, 0.10, 0.02, 0.80, 0.05


def load(path: str, variant: str, setting: str, seeds: set[int], rounds: int) -> dict[str, dict[str, float]]:
    """Per attack: the seed-mean of each figure, for attacks run on every seed for ``rounds``."""
    runs: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for name in path.split(","):
        with open(name) as lines:
            for line in lines:
                run = json.loads(line)
                if (run["variant"], run["setting"], run["rounds"]) == (variant, setting, rounds) and run["seed"] in seeds:
                    runs[run["attack"].replace("'", "")][run["seed"]] = run  # the last run of a seed counts
    out = {}
    for attack, by_seed in runs.items():
        if set(by_seed) != seeds:
            continue
        figures = {}
        for key in ("mean", "min", "worst_class", "recall", "fp_peers", "fp_sheltered", "fp_peers_final", "byz_share"):
            values = [r[key] for r in by_seed.values() if r.get(key) is not None]
            figures[key] = sum(values) / len(values) if values else float("nan")
        out[attack] = figures
    return out


def mark(text: str, ok: bool) -> str:
    return text if ok else f"**{text}**"


def table(runs: dict[str, dict[str, float]], plain: dict[str, dict[str, float]]) -> str:
    """The markdown table of every attack in ``runs`` against the run without attack."""
    base = runs["none"]
    absent = runs.get("forge")
    extra = " vs absent |" if absent else ""
    rows = ["| attack | mean (bar) | worst node | worst class | flagged | honest FP | plain mean |" + extra,
            "|---|---|---|---|---|---|---|" + ("---|" if absent else "")]
    misses: dict[str, int] = defaultdict(int)
    sheltered_over = 0
    for attack in sorted(runs, key=lambda a: (a != "none", a)):
        r = runs[attack]
        fp = mark(f"{r['fp_peers']:.2f}", r["fp_peers"] <= FP_BAR)
        if not math.isnan(r["fp_sheltered"]):  # recorded (session 18 on)
            fp += f" ({r['fp_sheltered']:.2f})"
            sheltered_over += r["fp_sheltered"] > FP_BAR
        if attack == "none":
            rows.append(f"| none | {r['mean']:.3f} | {r['min']:.3f} | {r['worst_class']:.3f} | - | {fp} | - |"
                        + (" - |" if absent else ""))
            continue
        cost = base["mean"] - r["mean"]
        checks = {
            "mean": cost <= MEAN_BAR,
            "node": base["min"] - r["min"] <= NODE_BAR,
            "class": base["worst_class"] - r["worst_class"] <= CLASS_BAR,
            "flagged": cost <= COSTS or r["recall"] >= RECALL_BAR,
            "FP": r["fp_peers"] <= FP_BAR,
        }
        below = attack in plain and r["mean"] < plain[attack]["mean"]
        for name, ok in checks.items():
            misses[name] += not ok
        misses["plain mean"] += below
        plain_cell = "-" if attack not in plain else mark(f"{plain[attack]['mean']:.3f}", not below)
        cells = [
            mark(f"{r['mean']:.3f} ({-cost:+.3f})", checks["mean"]),
            mark(f"{r['min']:.3f}", checks["node"]),
            mark(f"{r['worst_class']:.3f}", checks["class"]),
            mark(f"{r['recall']:.2f}", checks["flagged"])
            + ("" if math.isnan(r["byz_share"]) else f" ({r['byz_share']:.2f})"),
            fp,
            plain_cell,
            *([f"{r['mean'] - absent['mean']:+.3f}"] if absent else []),
        ]
        rows.append(f"| {attack} | " + " | ".join(cells) + " |")
    summary = ", ".join(f"{name} {count}" for name, count in misses.items())
    sheltered = f" Honest FP among sheltered peers over {FP_BAR:.2f} (not a bar): {sheltered_over}." \
        if any(not math.isnan(r["fp_sheltered"]) for r in runs.values()) else ""
    recorded = [r["fp_peers_final"] for r in runs.values() if not math.isnan(r["fp_peers_final"])]
    final = f" Honest FP at the end (as recall counts attackers) over {FP_BAR:.2f} (not a bar): " \
        f"{sum(x > FP_BAR for x in recorded)} of {len(recorded)} recorded." if recorded else ""
    return "\n".join(rows) + f"\n\nAttacks missing each bar: {summary} (of {len(runs) - 1}).{sheltered}{final}\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    path, variant, setting, seed_list = argv[:4]
    seeds = {int(s) for s in seed_list.split(",")}
    rounds = defence_setting(setting).rounds
    runs = load(path, variant, setting, seeds, rounds)
    if "none" not in runs:
        print(f"bars: no run of {variant} on {setting} without attack for seeds {sorted(seeds)}",
              file=sys.stderr)
        return 1
    plain = load(path, argv[4], setting, seeds, rounds) if len(argv) == 5 else {}
    print(table(runs, plain))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
