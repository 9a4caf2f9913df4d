"""One node embedded in each of two processes, from plain (not async) Python: p2pfl.run_node.

    .venv/bin/python examples/embed_two_processes.py            # starts both, prints both results

What it shows:

- How the second node learns the first's address: the first reports its multiaddr
  (``/ip4/127.0.0.1/tcp/PORT/p2p/PEERID``) through ``on_listening`` as soon as it listens;
  here it prints it on stdout, where the launcher reads it and writes it to the second's
  stdin (``--bootstrap -``; both start at once). Across machines, give the first a fixed
  port and key and write its multiaddr into the second's config instead.
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

import p2pfl

ADDRESS_PREFIX = "listening on "


def learner(index: int) -> p2pfl.TorchLearner:
    """This process's private half of the digits' training rows, and the shared test split."""
    import torch
    from torch import nn

    from p2pfl.learners import TensorBatches, load_digits_split

    train, test = load_digits_split()  # scikit-learn's bundled digits, read without importing it
    mine = train.subset(torch.arange(index, len(train), 2))  # (N/2, 64) features, (N/2,) labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # both nodes start from the same weights
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return p2pfl.TorchLearner(
        model,
        train_loader=TensorBatches(mine.features, mine.labels, batch_size=32),
        test_loader=TensorBatches(test.features, test.labels, batch_size=len(test), shuffle=False),
        lr=0.2,
        seed=index,
    )


def run_one(index: int, bootstrap: str | None, rounds: int, linger: float) -> None:
    """Run node ``index`` in this process until its rounds are done (blocking)."""
    import torch

    torch.set_num_threads(1)
    if bootstrap == "-":
        bootstrap = sys.stdin.readline().strip()  # the launcher writes the first's address
    config = p2pfl.NodeConfig(network_id="two-processes", rounds=p2pfl.RoundConfig(min_neighbours=1))
    net = p2pfl.NetConfig(port=0, bootstrap=(bootstrap,) if bootstrap else ())
    stats = p2pfl.run_node(
        config, learner(index), net=net, rounds=rounds, linger=linger,
        on_listening=lambda address: print(ADDRESS_PREFIX + address, flush=True),
    )
    print(f"node {index}: accuracy {stats.accuracy:.3f} after {stats.round} rounds", flush=True)


def launch_both(rounds: int, linger: float) -> int:
    """Start both nodes; pass node 0's address, once it prints it, to node 1's stdin."""
    me = [sys.executable, __file__, "--rounds", str(rounds), "--linger", str(linger)]
    first = subprocess.Popen([*me, "--index", "0"], stdout=subprocess.PIPE, text=True)
    second = subprocess.Popen([*me, "--index", "1", "--bootstrap", "-"], stdin=subprocess.PIPE, text=True)
    assert first.stdout is not None
    assert second.stdin is not None
    line = first.stdout.readline()  # the first line it prints: its multiaddr
    if not line.startswith(ADDRESS_PREFIX):
        first.kill()
        second.kill()
        print(f"node 0 did not start: {line!r}", file=sys.stderr)
        return 1
    address = line.removeprefix(ADDRESS_PREFIX).strip()
    print(f"node 0 listens on {address}", flush=True)
    second.stdin.write(address + "\n")
    second.stdin.close()
    print(first.stdout.read(), end="")
    return first.wait() or second.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--index", type=int, help="run only this node (0 or 1) in this process")
    parser.add_argument("--bootstrap", help="the other node's multiaddr")
    parser.add_argument("--linger", type=float, default=5.0, help="seconds to serve after the last round")
    args = parser.parse_args()
    if args.index is None:
        sys.exit(launch_both(args.rounds, args.linger))
    run_one(args.index, args.bootstrap, args.rounds, args.linger)
