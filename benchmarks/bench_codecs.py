"""Update codecs against raw in the same session: payload bytes and accuracy, with and without attack.

    .venv/bin/python benchmarks/bench_codecs.py [--nodes 8] [--rounds 10] [--codecs raw,int8,topk]
        [--attacks none,ipm] [--byzantine 2] [--seeds 0] [--out runs/bench_codecs]

Runs ``p2pfl testnet`` (one OS process per node over libp2p, digits, IID) once per codec,
attack and seed, and prints per run: payload bytes out per node-round (all rounds, and
rounds after the first, when every codec that sends a full model first has done so),
their ratio to raw's in the same attack setting and seed, honest mean/min final
accuracy, the difference to raw in points, and for attacks how many attackers were
flagged and honest nodes wrongly zeroed. Report the machine's load beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from p2pfl.cli.testnet import run_testnet
from p2pfl.cli.testnet_plan import TestnetPlan


def run(args: argparse.Namespace, codec: str, attack: str, seed: int) -> dict[str, Any]:
    """Run one test network; return its figures."""
    out = (args.out / f"{codec}-{attack}-{seed}").resolve()
    extra: dict[str, Any] = {"byzantine": args.byzantine, "attack": attack} if attack != "none" else {}
    plan = TestnetPlan(nodes=args.nodes, rounds=args.rounds, codec=codec, codec_k=args.codec_k, seed=seed,
                       out=out, **extra)
    if run_testnet(plan) != 0:
        sys.exit(f"test network {codec}/{attack}/{seed} failed; see {out}/logs")
    report = json.loads((out / "report.json").read_text())
    honest = [n for n in report["nodes"] if n["role"] == "honest"]
    verdict = report["verdict"]
    return {
        "codec": codec, "attack": attack, "seed": seed, "load": os.getloadavg()[0],
        "payload": statistics.fmean(statistics.fmean(n["payload_out_per_round"]) for n in honest),
        "payload_later": statistics.fmean(statistics.fmean(n["payload_out_per_round"][1:]) for n in honest),
        "mean": verdict["honest_mean_accuracy"], "min": verdict["honest_min_accuracy"],
        "flagged": f"{verdict['attackers_flagged']}/{verdict['attackers']}" if verdict["attackers"] else "-",
        "zeroed": verdict["honest_zeroed"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--codecs", default="raw,int8,topk")
    parser.add_argument("--codec-k", type=float, default=0.1)
    parser.add_argument("--attacks", default="none,ipm")
    parser.add_argument("--byzantine", type=int, default=2)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_codecs"))
    args = parser.parse_args()
    codecs = args.codecs.split(",")
    if codecs[0] != "raw":
        parser.error("--codecs must start with raw (the baseline)")
    rows = [run(args, codec, attack, int(seed))
            for seed in args.seeds.split(",") for attack in args.attacks.split(",") for codec in codecs]
    print(f"\n{args.nodes} node processes, {args.rounds} rounds, digits IID; topk k = {args.codec_k}; "
          f"attacks with {args.byzantine} Byzantine nodes; payload = bytes out per honest node-round")
    print(f"{'codec':<6} {'attack':<6} {'seed':>4} {'payload KB':>10} {'x raw':>6} {'after r0':>9} {'x raw':>6} "
          f"{'mean acc':>8} {'min acc':>7} {'vs raw':>7} {'flagged':>7} {'zeroed':>6} {'load':>5}")
    for row in rows:
        raw = next(r for r in rows if r["codec"] == "raw" and r["attack"] == row["attack"] and r["seed"] == row["seed"])
        print(f"{row['codec']:<6} {row['attack']:<6} {row['seed']:>4} {row['payload'] / 1e3:>10.1f} "
              f"{row['payload'] / raw['payload']:>6.3f} {row['payload_later'] / 1e3:>9.1f} "
              f"{row['payload_later'] / raw['payload_later']:>6.3f} {row['mean']:>8.3f} {row['min']:>7.3f} "
              f"{100 * (row['mean'] - raw['mean']):>+7.1f} {row['flagged']:>7} {row['zeroed']:>6} {row['load']:>5.1f}")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
