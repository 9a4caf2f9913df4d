"""Where a 16-node test network's CPU goes, by event-loop task, per node-round.

    P2PFL_TASK_CPU_DIR=runs/taskcpu PYTHONPATH=benchmarks/task_cpu:. \\
        .venv/bin/python -m p2pfl.cli.main testnet --nodes 16 --rounds 10 --partition iid
    .venv/bin/python benchmarks/task_cpu_report.py runs/taskcpu [more dirs ...]

Reads the ``node<i>.json`` files written by ``benchmarks/task_cpu/sitecustomize.py``
and prints, per node-round between each node's first and last finished round, the
process and main-thread CPU and the thread CPU of the event-loop task steps by label
(with steps per node-round). The instrument adds its own cost to the totals (not to
the labels).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args()
    cpu, steps = Counter[str](), Counter[str]()
    rounds, process, main_thread = 0, 0.0, 0.0
    for path in (p for d in args.dirs for p in sorted(d.glob("node*.json"))):
        marks = {int(k): v for k, v in json.loads(path.read_text())["marks"].items()}
        if len(marks) < 3:
            continue
        first, last = marks[min(marks)], marks[max(marks)]
        rounds += max(marks) - min(marks)
        process += last["process"] - first["process"]
        main_thread += last["main"] - first["main"]
        for label, (n, seconds) in last["tasks"].items():
            before = first["tasks"].get(label, [0, 0.0])
            cpu[label] += seconds - before[1]
            steps[label] += n - before[0]
    if not rounds:
        raise SystemExit("no node finished three rounds")
    print(f"node-rounds {rounds}; ms per node-round: process {1000 * process / rounds:.1f}, "
          f"main thread {1000 * main_thread / rounds:.1f}, in task steps {1000 * sum(cpu.values()) / rounds:.1f}")
    for label, seconds in cpu.most_common():
        if seconds * 1000 / rounds >= 0.05:
            print(f"{1000 * seconds / rounds:7.2f} ms {steps[label] / rounds:7.1f} steps  {label}")


if __name__ == "__main__":
    main()
