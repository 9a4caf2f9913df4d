"""The namespace test's workload on loopback and in namespaces, without faults: round times side by side.

    .venv/bin/python benchmarks/netns_loopback.py [--rounds 15] [--modes loopback,netns] [--out runs/netns_loopback]

tests/netns/test_namespaces.py runs six daemons, each in its own network namespace on a
bridge with ``tc tbf`` links (20 Mbit/s), and injects faults (a partition, a link down, a
SIGKILL). This runs the same six daemons with the same configuration (bootstrap via
nodes 0 and 3, round_timeout 3 s, min_neighbours 1, digits split six ways) until each
has finished ``--rounds`` rounds, with no faults: ``loopback`` (127.0.0.1, one port per
node) and ``netns`` (the test's own :class:`tests.netns.lab.Lab`; root only). Per mode:
median round time, wall seconds per round (first round start to the last node's last
round), final accuracy range. The fault run's own figures: ``make netns`` (its report line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p2pfl.core.crypto import Identity
from tests.netns.lab import Daemon, Lab, six_node_file, why_not

N = 6
LOOPBACK_PORT = 17551




def start_loopback(work: Path, i: int, config: Path) -> Daemon:
    daemon = Daemon(i, config, work / f"node{i}.log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    daemon.process = subprocess.Popen(
        [sys.executable, "-m", "p2pfl.cli.main", "node", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=daemon.log.open("ab"), env=env, cwd=work)
    return daemon


def run(mode: str, rounds: int, work: Path, timeout: float) -> dict[str, Any]:
    """Run the six daemons in ``mode`` until each finished ``rounds`` rounds; return the figures."""
    work.mkdir(parents=True, exist_ok=True)
    identities = [Identity.generate() for _ in range(N)]
    for i, identity in enumerate(identities):
        identity.save(work / f"node{i}.pem")
    port = None if mode == "netns" else LOOPBACK_PORT
    configs = [six_node_file(work, i, [x.peer_id for x in identities], loopback_port=port) for i in range(N)]
    lab = Lab(N, work) if mode == "netns" else None
    daemons: list[Daemon] = []
    try:
        daemons += [lab.start(i, configs[i]) if lab else start_loopback(work, i, configs[i]) for i in range(N)]
        deadline = time.monotonic() + timeout
        while not all(d.round >= rounds for d in daemons):
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: timed out; rounds {[d.round for d in daemons]}")
            time.sleep(0.5)  # polling other processes' logs
    finally:
        if lab:
            lab.close()
        else:
            for daemon in daemons:
                if daemon.process is not None:
                    daemon.process.terminate()
                    daemon.process.wait(timeout=30)
    firsts = [d.rounds[0][0] - d.rounds[0][4] for d in daemons]
    lasts = [next(r[0] for r in d.rounds if r[1] == rounds - 1) for d in daemons]
    durations = [r[4] for d in daemons for r in d.rounds if r[1] < rounds]
    finals = [next(r[2] for r in d.rounds if r[1] == rounds - 1) for d in daemons]
    return {"mode": mode, "median": statistics.median(durations), "p90": statistics.quantiles(durations, n=10)[-1],
            "wall": (max(lasts) - min(firsts)) / rounds, "acc_min": min(finals), "acc_max": max(finals),
            "load": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--modes", default="loopback,netns")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("runs/netns_loopback"))
    args = parser.parse_args()
    modes = args.modes.split(",")
    if "netns" in modes and (reason := why_not()) is not None:
        print(f"netns mode skipped: {reason}")
        modes.remove("netns")
    results = [run(mode, args.rounds, (args.out / mode).resolve(), args.timeout) for mode in modes]
    print(f"\n{N} daemons, the namespace test's configuration, no faults, {args.rounds} rounds each")
    print(f"{'mode':<9} {'median round s':>14} {'p90 round s':>11} {'wall s/round':>12} {'final accuracy':>15} {'load':>5}")
    for r in results:
        print(f"{r['mode']:<9} {r['median']:>14.2f} {r['p90']:>11.2f} {r['wall']:>12.2f} "
              f"{r['acc_min']:>7.3f}-{r['acc_max']:.3f} {r['load']:>5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
