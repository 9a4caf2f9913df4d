"""One node embedded in each of two processes, from plain (not async) Python: p2pfl.run_node.

    .venv/bin/python examples/embed_two_processes.py            # starts both, prints both results

What it shows:

- How the second node learns the first's address: the first reports its multiaddr
  (``/ip4/127.0.0.1/tcp/PORT/p2p/PEERID``) through ``on_listening`` as soon as it listens;
  here it prints it on stdout, where the launcher reads it and passes it to the second
  as ``--bootstrap``. Across machines, give the first a fixed port and key and write its
  multiaddr into the second's config instead.
- ``RoundConfig(min_neighbours=1)``: round 0 waits until the other node is connected,
  so neither trains its first round alone.
- ``linger``: the node that finishes first keeps serving for a few seconds after its
  last round, so the other can still fetch its last update instead of timing out.

The API is trio-based: ``p2pfl.Node`` is used with ``async with`` under ``trio.run``
(not asyncio); ``p2pfl.run_node`` wraps that for programs without an event loop.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

import p2pfl
from p2pfl.learners import TensorBatches

ADDRESS_PREFIX = "listening on "


def learner(index: int) -> p2pfl.TorchLearner:
    """This process's private half of the breast-cancer rows, and a shared test set."""
    features, labels = load_breast_cancer(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, mine = order[:120], order[120:][index::2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # both nodes start from the same weights
        model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
    return p2pfl.TorchLearner(
        model,
        train_loader=TensorBatches(x[mine], y[mine], batch_size=16),
        test_loader=TensorBatches(x[test], y[test], batch_size=len(test), shuffle=False),
        lr=0.05,
        seed=index,
    )


def run_one(index: int, bootstrap: str | None, rounds: int) -> None:
    """Run node ``index`` in this process until its rounds are done (blocking)."""
    torch.set_num_threads(1)
    config = p2pfl.NodeConfig(network_id="two-processes", rounds=p2pfl.RoundConfig(min_neighbours=1))
    net = p2pfl.NetConfig(port=0, bootstrap=(bootstrap,) if bootstrap else ())
    stats = p2pfl.run_node(
        config, learner(index), net=net, rounds=rounds, linger=5.0,
        on_listening=lambda address: print(ADDRESS_PREFIX + address, flush=True),
    )
    print(f"node {index}: accuracy {stats.accuracy:.3f} after {stats.round} rounds", flush=True)


def launch_both(rounds: int) -> int:
    """Start node 0, read its address from its output, start node 1 bootstrapping from it."""
    me = [sys.executable, __file__, "--rounds", str(rounds)]
    first = subprocess.Popen([*me, "--index", "0"], stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None
    line = first.stdout.readline()  # the first line it prints: its multiaddr
    if not line.startswith(ADDRESS_PREFIX):
        first.kill()
        print(f"node 0 did not start: {line!r}", file=sys.stderr)
        return 1
    address = line.removeprefix(ADDRESS_PREFIX).strip()
    print(f"node 0 listens on {address}")
    second = subprocess.run([*me, "--index", "1", "--bootstrap", address], check=False)
    print(first.stdout.read(), end="")
    return first.wait() or second.returncode


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--index", type=int, help="run only this node (0 or 1) in this process")
    parser.add_argument("--bootstrap", help="the other node's multiaddr")
    args = parser.parse_args()
    if args.index is None:
        sys.exit(launch_both(args.rounds))
    run_one(args.index, args.bootstrap, args.rounds)
