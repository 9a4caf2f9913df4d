"""CPU per node-round outside learning, broken down, against a baseline commit in the same run.

    .venv/bin/python benchmarks/bench_round_cpu.py [--nodes 16] [--rounds 10] [--reps 2]
        [--baseline REF] [--out runs/bench_round_cpu]

Runs ``p2pfl testnet`` (digits, IID, 1 epoch, batch 32) alternately from this checkout
and from ``--baseline`` (any git ref, extracted with ``git archive`` into the output
directory), back to back in ABBA order (each side runs first in every other
repetition), so both see the same load on a shared machine. Per run it
prints the machine's 1-minute load before the run, the median round time, and the mean
CPU seconds per node-round (first round excluded: it includes start-up), split as:

- learning: local training and the node's own test evaluation (``Worker.timed``);
- compute: the node's other work off the event loop: payload decoding, the defence's
  probe forward passes and checks, aggregation, encoding, checkpoints;
- event loop: the rest of the process CPU (libp2p, announcements, pulls and serves,
  discovery, the /status endpoint the test network polls, logging).

"outside learning" = compute + event loop (the issue-12 target: <= 50 ms). A baseline
older than the compute split shows its compute inside the event loop column. The last
lines give each column's ratio, this checkout over the baseline, over all repetitions,
then each side's node-rounds pooled over its runs by neighbours used that round
(report.json ``used``): mean outside-learning ms per degree, overall mean and median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("total", "learning", "compute", "event loop", "outside learning")


def extract(ref: str, into: Path) -> Path:
    """Write the tree of git ``ref`` into ``into`` (once) and return it."""
    if not (into / "p2pfl").is_dir():
        into.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run_testnet(source: Path, nodes: int, rounds: int, out: Path) -> dict[str, Any]:
    """Run one test network from ``source``'s code; return its report plus the load before."""
    load = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(source)}
    argv = [sys.executable, "-m", "p2pfl.cli.main", "testnet", "--nodes", str(nodes),
            "--rounds", str(rounds), "--partition", "iid", "--out", str(out)]
    done = subprocess.run(argv, cwd=source, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"testnet from {source} failed ({done.returncode}); see {out}/logs\n{done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    report["load_before"] = load
    return report


def breakdown(report: dict[str, Any]) -> dict[str, float]:
    """Mean CPU seconds per node-round by column, first round of every node excluded."""
    rows: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for node in report["nodes"]:
        total = node.get("cpu_per_round") or []
        learning = node.get("learning_cpu_per_round") or [0.0] * len(total)
        compute = node.get("compute_cpu_per_round") or [0.0] * len(total)
        for t, lc, cc in list(zip(total, learning, compute, strict=False))[1:]:
            for column, value in zip(COLUMNS, (t, lc, cc, t - lc - cc, t - lc), strict=True):
                rows[column].append(value)
    return {c: statistics.fmean(v) if v else float("nan") for c, v in rows.items()}


def by_degree(report: dict[str, Any]) -> list[tuple[int, float]]:
    """(neighbours used, outside-learning CPU seconds) of every node-round but each node's first."""
    rows = []
    for node in report["nodes"]:
        total = node.get("cpu_per_round") or []
        learning = node.get("learning_cpu_per_round") or [0.0] * len(total)
        used = node.get("used") or [0] * len(total)
        rows += [(u, t - lc) for t, lc, u in list(zip(total, learning, used, strict=False))[1:]]
    return rows


def degree_line(name: str, rows: list[tuple[int, float]]) -> str:
    cells: dict[int, list[float]] = {}
    for used, seconds in rows:
        cells.setdefault(used, []).append(seconds)
    table = ", ".join(f"{u}: {1000 * statistics.fmean(v):.1f} ({len(v)})" for u, v in sorted(cells.items()))
    values = [s for _, s in rows]
    return (f"{name}: node-rounds {len(rows)}, mean neighbours {statistics.fmean(u for u, _ in rows):.2f}, "
            f"mean {1000 * statistics.fmean(values):.1f} ms, median {1000 * statistics.median(values):.1f} ms\n"
            f"  by neighbours used (ms, node-rounds): {table}")


def median_round(report: dict[str, Any]) -> float:
    return statistics.median(r["median_round_seconds"] for r in report["per_round"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--baseline", default=None, help="git ref to compare with (default: none)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_round_cpu"))
    args = parser.parse_args()
    out = args.out.resolve()
    variants = {"this checkout": ROOT}
    if args.baseline:
        variants = {f"baseline {args.baseline}": extract(args.baseline, out / "baseline-src"), **variants}
    print(f"{args.nodes} node processes, {args.rounds} rounds, digits IID; ms of CPU per node-round")
    print(f"{'run':<28} {'load':>5} {'round s':>7} " + " ".join(f"{c:>16}" for c in COLUMNS))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    pooled: dict[str, list[tuple[int, float]]] = {name: [] for name in variants}
    for rep in range(args.reps):
        # ABBA: the load a run leaves behind lands on the other side as often as on this one.
        order = list(variants.items()) if rep % 2 == 0 else list(reversed(variants.items()))
        for name, source in order:
            index = list(variants).index(name)
            report = run_testnet(source, args.nodes, args.rounds, out / f"rep{rep}-{index}")
            figures = breakdown(report)
            results[name].append(figures)
            pooled[name] += by_degree(report)
            print(f"{name:<28} {report['load_before']:>5.1f} {median_round(report):>7.2f} "
                  + " ".join(f"{1000 * figures[c]:>16.1f}" for c in COLUMNS), flush=True)
    if len(variants) == 2:
        (base, base_runs), (_, ours) = results.items()
        cells = []
        for column in COLUMNS:
            before = statistics.fmean(r[column] for r in base_runs)
            after = statistics.fmean(r[column] for r in ours)
            cells.append(f"{after / before:>16.2f}" if before > 0 else f"{'-':>16}")
        print(f"{'ratio this / ' + base.split()[-1]:<42} " + " ".join(cells))
    for name, rows in pooled.items():
        if rows:
            print(degree_line(name, rows))


if __name__ == "__main__":
    main()
