"""Benchmark the product: `p2pfl testnet` with real node processes over libp2p on loopback.

    .venv/bin/python benchmarks/bench_testnet.py [--nodes 8] [--rounds 10] [--out runs/bench_testnet]

Runs the digits task twice (IID, then Dirichlet(0.5)), 1 local epoch, batch 32, and
prints per round the honest mean and minimum test accuracy and the median round time,
then per run: wall time per round, bytes per node per round and peak memory per node,
beside the anchors measured on this machine with the same 8-node digits task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from p2pfl.cli.testnet import run_testnet
from p2pfl.cli.testnet_plan import TestnetPlan

ANCHORS = [  # (system, seconds per round, accuracy after 10 rounds), same task and machine
    ("P2PFL 0.4.4 (in memory)", 7.7, 0.82),
    ("Flower FedAvg simulation", 0.6, 0.83),
    ("one centralized model", None, 0.96),
]
TARGETS = (
    "targets: <= 1.0 s/round; IID mean >= 0.93; Dirichlet within 3 points; min within 5 of mean"
)


def run(nodes: int, rounds: int, partition: str, out: Path) -> dict[str, Any]:
    """Run one test network and return its report."""
    plan = TestnetPlan(
        nodes=nodes, rounds=rounds, partition=partition, alpha=0.5, out=out.resolve()
    )
    if run_testnet(plan) != 0:
        sys.exit(f"test network {partition} failed; see {out}/logs")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def summary(report: dict[str, Any]) -> dict[str, float]:
    """The figures the issue asks for, from one report."""
    nodes = report["nodes"]
    rounds = report["meta"]["rounds"]
    per_node_bytes = [
        statistics.fmean(n["bytes_in_per_round"]) + statistics.fmean(n["bytes_out_per_round"])
        for n in nodes
    ]
    statuses = json.loads((Path(report["meta"]["out"]) / "statuses.json").read_text())
    # From the first round's start to the last node's last round: start-up excluded.
    starts = [
        s["history"][0]["finished_at"] - s["history"][0]["duration"]
        for s in statuses
        if s["history"]
    ]
    ends = [s["history"][-1]["finished_at"] for s in statuses if s["history"]]
    return {
        "wall_per_round": report["meta"]["wall_seconds"] / rounds,
        "training_per_round": (max(ends) - min(starts)) / rounds,
        "median_round": statistics.median(r["median_round_seconds"] for r in report["per_round"]),
        "final_mean": report["verdict"]["honest_mean_accuracy"],
        "final_min": report["verdict"]["honest_min_accuracy"],
        "bytes_per_node_round": statistics.fmean(per_node_bytes),
        "peak_rss_mb": max(n["peak_rss_bytes"] or 0 for n in nodes) / 2**20,
    }


def print_rounds(name: str, report: dict[str, Any]) -> None:
    print(f"\n{name}: per round (honest nodes)")
    print(f"{'round':>5}  {'mean acc':>8}  {'min acc':>8}  {'median s':>8}  {'nodes':>5}")
    for row in report["per_round"]:
        print(
            f"{row['round']:>5}  {row['honest_mean_accuracy']:>8.3f}  {row['honest_min_accuracy']:>8.3f}"
            f"  {row['median_round_seconds']:>8.2f}  {row['honest_reporting']:>5}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_testnet"))
    args = parser.parse_args()
    results = {}
    for partition in ("iid", "dirichlet"):
        report = run(args.nodes, args.rounds, partition, args.out / partition)
        results[partition] = summary(report)
        print_rounds(partition, report)

    print(f"\n{args.nodes} node processes, {args.rounds} rounds, digits, 1 epoch, batch 32")
    header = f"{'run':<28} {'s/round (wall)':>14} {'s/round train':>13} {'median round s':>14} {'final mean':>10} {'final min':>9} {'KB/node/round':>13} {'peak RSS MB':>11}"
    print(header)
    for name, s in results.items():
        print(
            f"{'p2pfl ' + name:<28} {s['wall_per_round']:>14.2f} {s['training_per_round']:>13.2f} {s['median_round']:>14.2f} {s['final_mean']:>10.3f}"
            f" {s['final_min']:>9.3f} {s['bytes_per_node_round'] / 1e3:>13.1f} {s['peak_rss_mb']:>11.0f}"
        )
    for name, seconds, accuracy in ANCHORS:
        secs = f"{seconds:.2f}" if seconds else "-"
        print(
            f"{name:<28} {secs:>14} {'-':>13} {'-':>14} {accuracy:>10.3f} {'-':>9} {'-':>13} {'-':>11}"
        )
    iid, dirichlet = results["iid"], results["dirichlet"]
    print(
        f"\nratios: P2PFL s/round / p2pfl s/round = {7.7 / iid['wall_per_round']:.1f}x (wall), "
        f"{7.7 / iid['training_per_round']:.1f}x (training); "
        f"Dirichlet - IID = {100 * (dirichlet['final_mean'] - iid['final_mean']):+.1f} points; "
        f"IID min - mean = {100 * (iid['final_min'] - iid['final_mean']):+.1f} points"
    )
    print(TARGETS)
    print(
        "(s/round wall includes starting 8 Python processes; s/round train is first round start to last round end)"
    )


if __name__ == "__main__":
    main()
