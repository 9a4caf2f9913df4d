"""Benchmark the product: `p2pfl testnet` with real node processes over libp2p on loopback.

    .venv/bin/python benchmarks/bench_testnet.py [--nodes 8] [--rounds 10] [--out runs/bench_testnet]
        [--partitions iid,dirichlet] [--codec raw] [--codec-k 0.1]

Runs the digits task twice (IID, then Dirichlet(0.5)), 1 local epoch, batch 32, and
prints per round the honest mean and minimum test accuracy and the median round time,
then per run: wall time per round, bytes per node per round (payload and control), CPU
seconds per node-round (whole process, and outside training + evaluation, from the nodes'
own round records, first round excluded; "outside learning" includes decoding, the
defence's probe forward passes, aggregation and checkpoints, and the /status requests of
the launcher; ``bench_round_cpu.py`` splits it; plus all node processes' CPU as the OS
counts it, start-up included, which also works for versions without round CPU records) and
peak memory per node, beside the anchors measured on this machine with the same 8-node
digits task. Report the machine's load (``uptime``) beside the figures: it is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def run(nodes: int, rounds: int, partition: str, out: Path, **extra: Any) -> dict[str, Any]:
    """Run one test network and return its report (plus the node processes' OS CPU)."""
    plan = TestnetPlan(
        nodes=nodes, rounds=rounds, partition=partition, alpha=0.5, out=out.resolve(), **extra
    )
    before = _children_cpu()
    if run_testnet(plan) != 0:
        sys.exit(f"test network {partition} failed; see {out}/logs")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    report["os_cpu_seconds"] = _children_cpu() - before
    report["load"] = os.getloadavg()[0]
    return report


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mean_after_first(rows: list[list[float]]) -> float | None:
    values = [v for row in rows for v in row[1:]]
    return statistics.fmean(values) if values else None


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
    payload = [
        statistics.fmean(n.get("payload_in_per_round") or [0]) + statistics.fmean(n.get("payload_out_per_round") or [0])
        for n in nodes
    ]
    cpu = _mean_after_first([n.get("cpu_per_round") or [] for n in nodes])
    learning = _mean_after_first([n.get("learning_cpu_per_round") or [] for n in nodes])
    return {
        "cpu_node_round": cpu if cpu is not None else float("nan"),
        "cpu_outside_learning": cpu - learning if cpu is not None and learning is not None else float("nan"),
        "os_cpu_node_round": report["os_cpu_seconds"] / (len(nodes) * rounds),
        "payload_per_node_round": statistics.fmean(payload),
        "load": report["load"],
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
    parser.add_argument("--partitions", default="iid,dirichlet")
    parser.add_argument("--codec", default=None, help="update codec (default: the node's)")
    parser.add_argument("--codec-k", type=float, default=None, help="topk fraction")
    args = parser.parse_args()
    extra = {k: v for k, v in (("codec", args.codec), ("codec_k", args.codec_k)) if v is not None}
    results = {}
    for partition in args.partitions.split(","):
        report = run(args.nodes, args.rounds, partition, args.out / partition, **extra)
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
    print(f"\n{'run':<28} {'CPU s/node-round':>16} {'outside learning':>16} {'OS CPU (+start)':>15} {'payload KB':>10} {'control KB':>10} {'load':>5}")
    for name, s in results.items():
        control = s["bytes_per_node_round"] - s["payload_per_node_round"]
        print(
            f"{'p2pfl ' + name:<28} {s['cpu_node_round']:>16.3f} {s['cpu_outside_learning']:>16.3f} {s['os_cpu_node_round']:>15.3f}"
            f" {s['payload_per_node_round'] / 1e3:>10.1f} {control / 1e3:>10.1f} {s['load']:>5.1f}"
        )
    for name, seconds, accuracy in ANCHORS:
        secs = f"{seconds:.2f}" if seconds else "-"
        print(
            f"{name:<28} {secs:>14} {'-':>13} {'-':>14} {accuracy:>10.3f} {'-':>9} {'-':>13} {'-':>11}"
        )
    if "iid" not in results or "dirichlet" not in results:
        return
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
