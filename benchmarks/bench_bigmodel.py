"""Big models through the network: a 25M-parameter update across 8 daemons in namespaces.

Run as root from the project root (issue 12, item 3; ~15 min; not part of the suite)::

    .venv/bin/python benchmarks/bench_bigmodel.py | tee docs/benchmarks/bigmodel.txt
    .venv/bin/python benchmarks/bench_bigmodel.py --quick     # 4 nodes, 4M parameters

Each node is a ``p2pfl node run`` daemon in its own network namespace
(``tests/netns/lab.py``), every link rate-limited by ``tc tbf`` both ways. The learner
is synthetic (:func:`synthetic`): one float32 tensor, "trained" by adding a constant,
so the two cores go to the network. Rounds close when every neighbour's update is in
(``--quorum`` 1, rule ``mean``, no harm check): a slow author holds its neighbours'
rounds back, which is what several holders of its update should prevent. With the
default quorum (0.6) its neighbours close their rounds without it and skip to its next
update, so few of its updates are pulled at all (session 12). For every configuration (codec x sources):

- node-round time (each node's own round, rounds >= 1), median and max;
- its link-rate bound ``payload bytes x neighbour updates / rate``: what the node's
  downlink must carry (and, pulling from authors only, each author's uplink) per round;
- the pieces pulled from holders other than the author (``p2pfl.net.swarm`` log lines);
- peak RSS per node (``VmHWM``), median and max; load average before and after;
- node 0's updates (the slow author with ``--slow-uplink``): seconds from their
  announcement to each neighbour holding them, median and max, and their pieces from
  node 0 / from other holders.

``P2PFL_NETNS_LOGS_ROOT=DIR`` keeps each run's daemon logs in ``DIR/<codec>-<sources>-<slow>``.

``--slow-uplink M`` also runs both source settings with node 0's uplink at M Mbit/s:
there the author's uplink is the bottleneck that holders could relieve.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pfl.learners.base import Metrics  # noqa: E402
from p2pfl.learners.tasks import TaskContext  # noqa: E402

PULLED = re.compile(r"pulled \w+: (\d+) pieces, (\d+) from its author, (\d+) from (\d+) other holders")
STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
ANNOUNCED = re.compile(STAMP + r".*announcing (\w+): round (\d+)", re.M)
DELIVERED = re.compile(STAMP + r".*delivered (\w+): round", re.M)
PULLED_BY_DIGEST = re.compile(r"pulled (\w+): \d+ pieces, (\d+) from its author, (\d+) from")
COLUMNS = 5000  # the tensor is (params / 5000) x 5000 float32


# ---------------------------------------------------------------------------- the learner


class SyntheticLearner:
    """One big float32 tensor; fit adds a constant, evaluate returns a constant."""

    def __init__(self, params: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.w = torch.rand(max(1, params // COLUMNS), COLUMNS, generator=generator)
        self.step = 1e-3 * (seed + 1)

    def get_state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w.clone()}

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.w.copy_(state["w"])

    def fit(self, epochs: int) -> int:
        self.w.add_(self.step)
        return 100

    def evaluate(self) -> Metrics:
        return Metrics(loss=0.0, accuracy=1.0, samples=1)

    @property
    def num_train_samples(self) -> int:
        return 100

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}

    def restore_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.set_state(state)


def synthetic(context: TaskContext) -> SyntheticLearner:
    """The task factory (``params = N``), reached through ``bigmodel_task.py`` in the work dir."""
    torch.set_num_threads(1)
    return SyntheticLearner(int(context.options.get("params", 25_000_000)), context.node_index)


# ---------------------------------------------------------------------------- one run


@dataclass
class Run:
    codec: str
    sources: int
    slow: str
    payload: int
    rounds: list[tuple[int, int, float]]  # (node, neighbour updates, seconds), rounds >= 1
    pieces: tuple[int, int]  # (from authors, from other holders)
    slow_pulls: list[float]  # seconds from node 0's announcement to a neighbour holding it
    slow_pieces: tuple[int, int]  # node 0's updates: pieces from node 0 / from other holders
    rss_mb: list[float]
    load: tuple[float, float]
    wall: float


def node_file(work: Path, i: int, n: int, peers: list[str], args: argparse.Namespace,
              codec: str, sources: int) -> Path:
    from tests.netns.lab import PORT, Lab

    boot = [f'"/ip4/{Lab.address(j)}/tcp/{PORT}/p2p/{peers[j]}"' for j in (0, n // 2) if j != i]
    path = work / f"node{i}.toml"
    path.write_text(f"""
[node]
network_id = "bigmodel"
key_file = "node{i}.pem"
data_dir = "state{i}"
http_port = 0
[net]
listen_host = "0.0.0.0"
port = {PORT}
bootstrap = [{", ".join(boot)}]
target_neighbours = {args.neighbours}
max_neighbours = {args.neighbours + 1}
codec = "{codec}"
fetch_sources = {sources}
transfer_timeout = 600.0
# Saturated links and 2 busy cores: a 5 s liveness probe or dial (the default) fails
# spuriously and drops neighbours mid-round.
dial_timeout = 30.0
max_backoff = 4.0
[task]
factory = "bigmodel_task:synthetic"
params = {args.params}
[train]
node_index = {i}
num_nodes = {n}
[aggregation]
rule = "mean"
[round]
round_timeout = 900.0
fetch_timeout = 600.0
min_neighbours = {args.neighbours}
quorum = {args.quorum}
start_timeout = 300.0
[harm_check]
enabled = false
""")
    return path


def peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match[1]) / 1024 if match else None


def payload_bytes(codec: str, params: int) -> int:
    import p2pfl.core.lossy  # noqa: F401  # registers int8 and the other lossy codecs
    from p2pfl.core.codec import codec_named

    state = {"w": torch.rand(max(1, params // COLUMNS), COLUMNS)}
    return len(codec_named(codec).encode(state))


def run(args: argparse.Namespace, codec: str, sources: int, slow: str = "") -> Run:
    from p2pfl.core.crypto import Identity
    from tests.netns.lab import Lab, sh

    n = args.nodes
    load_before = os.getloadavg()[0]
    if keep := os.environ.get("P2PFL_NETNS_LOGS_ROOT"):  # each run's daemon logs in its own folder
        os.environ["P2PFL_NETNS_LOGS"] = str(Path(keep) / f"{codec}-{sources}-{slow or 'even'}")
    with TemporaryDirectory(prefix="bigmodel") as tmp:
        work = Path(tmp)
        lab = Lab(n, work, rate=args.rate)
        try:
            if slow:  # node 0's uplink only
                sh("ip", "netns", "exec", lab.nodes[0], "tc", "qdisc", "change", "dev", "eth0", "root",
                   "tbf", "rate", slow, "burst", "64kb", "latency", "100ms")
            # The daemons' cwd; a site package named `benchmarks` hides this directory's.
            (work / "bigmodel_task.py").write_text(
                f"import sys\nsys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
                "from bench_bigmodel import synthetic  # noqa: F401\n")
            identities = [Identity.generate() for _ in range(n)]
            for i, identity in enumerate(identities):
                identity.save(work / f"node{i}.pem")
            peers = [x.peer_id for x in identities]
            started = time.monotonic()
            daemons = [lab.start(i, node_file(work, i, n, peers, args, codec, sources)) for i in range(n)]
            rss: dict[int, float] = {}
            deadline = started + args.run_timeout
            while not all(d.round >= args.rounds for d in daemons):
                if time.monotonic() > deadline:  # report what was measured, say so
                    print(f"# run timeout: rounds {[d.round for d in daemons]}", file=sys.stderr)
                    break
                for d in daemons:
                    assert d.process is not None
                    if d.process.poll() is not None:
                        raise RuntimeError(f"node {d.index} exited: {d.log.read_text()[-2000:]}")
                    if (peak := peak_rss_mb(d.process.pid)) is not None:
                        rss[d.index] = max(rss.get(d.index, 0.0), peak)
                time.sleep(1.0)  # polling other processes' logs and /proc
                if int(time.monotonic() - started) % 30 == 0:
                    print(f"#   rounds {[d.round for d in daemons]}", file=sys.stderr, flush=True)
            wall = time.monotonic() - started
            logs = [d.log.read_text(errors="replace") for d in daemons]
        finally:
            lab.close()
        rounds = [(d.index, k, seconds) for d in daemons for (_, r, _, k, seconds) in d.rounds
                  if 1 <= r < args.rounds]
        pulled = [tuple(map(int, m.groups())) for text in logs for m in PULLED.finditer(text)]
    slow_pulls, slow_pieces = node0_pulls(logs)
    return Run(codec, sources, slow, payload_bytes(codec, args.params), rounds,
               (sum(p[1] for p in pulled), sum(p[2] for p in pulled)), slow_pulls, slow_pieces,
               sorted(rss.values()), (load_before, os.getloadavg()[0]), wall)


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def node0_pulls(logs: list[str]) -> tuple[list[float], tuple[int, int]]:
    """Node 0's updates (every round: a neighbour may skip one round's for the next): seconds
    from its announcement to each puller's delivery (the daemons share one clock), and
    their pieces by source."""
    announced = {m[2]: stamp(m[1]) for m in ANNOUNCED.finditer(logs[0])}
    delays = [stamp(m[1]) - announced[m[2]] for text in logs[1:] for m in DELIVERED.finditer(text)
              if m[2] in announced]
    pulled = [m for text in logs[1:] for m in PULLED_BY_DIGEST.finditer(text) if m[1] in announced]
    return sorted(delays), (sum(int(m[2]) for m in pulled), sum(int(m[3]) for m in pulled))


# ---------------------------------------------------------------------------- report


def rate_bits(rate: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate)
    if match is None:
        raise SystemExit(f"rate {rate!r}: write it as tc does, e.g. 100mbit")
    return float(match[1]) * {"k": 1e3, "m": 1e6, "g": 1e9}[match[2]]


def report(runs: list[Run], args: argparse.Namespace) -> None:
    bits = rate_bits(args.rate)
    print(f"{args.nodes} nodes, {args.params / 1e6:.0f}M float32 parameters, links {args.rate} "
          f"both ways (tc tbf), target_neighbours {args.neighbours}, quorum {args.quorum}, rounds 1..{args.rounds - 1} "
          f"measured; {os.cpu_count()} cores shared with other work")
    print("bound = payload x neighbour updates / link rate, per node-round (its downlink;"
          " pulling from authors only, also each author's uplink)")
    header = (f"{'codec':6} {'sources':>7} {'slow up':>8} {'payload MB':>10} {'median s':>9} "
              f"{'max s':>7} {'bound s':>8} {'med/bound':>9} {'pieces author/other':>20} "
              f"{'RSS MB med/max':>15} {'load':>10}")
    print(header)
    for r in runs:
        if not r.rounds:
            print(f"{r.codec:6} {r.sources:>7} {r.slow or '-':>8}  no rounds measured")
            continue
        seconds = [s for _, _, s in r.rounds]
        ratios = [s / (r.payload * 8 * k / bits) for _, k, s in r.rounds if k]
        bound = statistics.median(r.payload * 8 * k / bits for _, k, _ in r.rounds)
        print(f"{r.codec:6} {r.sources:>7} {r.slow or '-':>8} {r.payload / 1e6:>10.1f} "
              f"{statistics.median(seconds):>9.1f} {max(seconds):>7.1f} {bound:>8.1f} "
              f"{statistics.median(ratios):>9.2f} {f'{r.pieces[0]}/{r.pieces[1]}':>20} "
              f"{f'{statistics.median(r.rss_mb):.0f}/{max(r.rss_mb):.0f}':>15} "
              f"{f'{r.load[0]:.1f}->{r.load[1]:.1f}':>10}")
    print("node 0's updates (every round): seconds from its announcement to each neighbour holding it")
    print(f"{'codec':6} {'sources':>7} {'slow up':>8} {'pulls':>6} {'median s':>9} {'max s':>7} "
          f"{'pieces from node 0/other':>25}")
    for r in runs:
        if r.slow_pulls:
            print(f"{r.codec:6} {r.sources:>7} {r.slow or '-':>8} {len(r.slow_pulls):>6} "
                  f"{statistics.median(r.slow_pulls):>9.1f} {max(r.slow_pulls):>7.1f} "
                  f"{f'{r.slow_pieces[0]}/{r.slow_pieces[1]}':>25}")
    by = {(r.codec, r.sources, r.slow): r for r in runs if r.rounds}

    def median_s(r: Run) -> float:
        return statistics.median(s for _, _, s in r.rounds)

    print("ratios of median node-round time:")
    for (codec, sources, slow), r in by.items():
        if sources == 1 and (codec, args.sources, slow) in by:
            multi = by[(codec, args.sources, slow)]
            print(f"  {codec} {slow or 'even links'}: multi-source ({args.sources}) / author-only = "
                  f"{median_s(multi) / median_s(r):.2f}")
            if r.slow_pulls and multi.slow_pulls:
                print(f"    node 0's update, median pull: multi / author-only = "
                      f"{statistics.median(multi.slow_pulls) / statistics.median(r.slow_pulls):.2f}")
        if codec == "raw" and ("int8", sources, slow) in by:
            print(f"  sources {sources} {slow or 'even links'}: int8 / raw = "
                  f"{median_s(by[('int8', sources, slow)]) / median_s(r):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--rate", default="100mbit", help="every link, both ways (tc syntax)")
    parser.add_argument("--rounds", type=int, default=3, help="round 0 (start-up) is not measured")
    parser.add_argument("--neighbours", type=int, default=3, help="[net] target_neighbours")
    parser.add_argument("--sources", type=int, default=4, help="[net] fetch_sources of multi-source runs")
    parser.add_argument("--codecs", default="raw,int8")
    parser.add_argument("--quorum", type=float, default=1.0, help="[round] quorum of every node")
    parser.add_argument("--slow-uplink", default="", help="also run with node 0's uplink at this rate")
    parser.add_argument("--run-timeout", type=float, default=900.0)
    parser.add_argument("--slow-only", action="store_true", help="skip the even-link runs (iterating)")
    parser.add_argument("--quick", action="store_true", help="4 nodes, 4M parameters, 2 rounds")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the daemons, remove the namespaces
    if args.quick:
        args.nodes, args.params, args.rounds, args.neighbours = 4, 4_000_000, 2, 2
    from tests.netns.lab import why_not

    if (reason := why_not()) is not None:
        raise SystemExit(f"cannot run: {reason}")
    plan = [] if args.slow_only else [
        (codec, sources, "") for codec in args.codecs.split(",") for sources in (1, args.sources)]
    if args.slow_uplink:
        plan += [("raw", sources, args.slow_uplink) for sources in (1, args.sources)]
    for codec in args.codecs.split(","):
        payload_bytes(codec, 1000)  # an unknown codec fails here, not after the runs
    runs = []
    for codec, sources, slow in plan:
        print(f"# running codec={codec} sources={sources} slow_uplink={slow or '-'}", file=sys.stderr, flush=True)
        runs.append(run(args, codec, sources, slow))
        print(f"# done: {runs[-1]}", file=sys.stderr, flush=True)  # kept if a later run fails
    report(runs, args)


if __name__ == "__main__":
    main()
