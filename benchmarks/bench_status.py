"""CPU of one transport ``stats()`` call (what every /status poll and every round end pay).

    .venv/bin/python benchmarks/bench_status.py [--neighbours 6,10,15] [--calls 2000]

Opens ``1 + max(neighbours)`` libp2p transports in this process, all bootstrapped from the
first (so it keeps them all as neighbours), lets them subscribe, then times the first
transport's ``stats()`` and, for each neighbour count, ``describe_all`` over that many of
its neighbours (the ``peer_paths`` lines). Prints ms per call and the 1-minute load.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from contextlib import AsyncExitStack

import trio

from p2pfl.config import Limits, NetConfig
from p2pfl.net import patches
from p2pfl.net.libp2p_transport import Libp2pTransport, open_libp2p_transport
from p2pfl.net.peerpaths import describe_all


def echo(origin: str, data: bytes) -> bytes:
    return data


def per_call(fn: object, calls: int) -> float:
    """CPU ms per call of ``fn()``."""
    start = time.process_time()
    for _ in range(calls):
        fn()  # type: ignore[operator]
    return 1000 * (time.process_time() - start) / calls


async def measure(counts: list[int], calls: int) -> None:
    async with AsyncExitStack() as stack:
        def open_one(config: NetConfig) -> object:
            return open_libp2p_transport(secret=os.urandom(32), network_id="bench", config=config,
                                         limits=Limits(), validator=echo)
        first: Libp2pTransport = await stack.enter_async_context(open_one(NetConfig()))  # type: ignore[arg-type]
        config = NetConfig(bootstrap=tuple(first.listen_addrs), target_neighbours=1)
        for _ in range(max(counts)):
            await stack.enter_async_context(open_one(config))  # type: ignore[arg-type]
        with trio.fail_after(60):
            while len(first.neighbours()) < max(counts) or len(first.gossip.subscribed_peers()) < max(counts):  # noqa: ASYNC110 (no event to wait on)
                await trio.sleep(0.2)
        await trio.sleep(1)
        load = os.getloadavg()[0]
        print(f"stats() with {len(first.neighbours())} neighbours: {per_call(first.stats, calls):.3f} ms CPU "
              f"(load {load:.1f})")
        for n in counts:
            peers = first.neighbours()[:n]
            ms = per_call(lambda p=peers: describe_all(first.host, first.gossip, first.peer_paths.failures, p), calls)
            print(f"peer_paths of {n:>2} neighbours: {ms:.3f} ms CPU (load {os.getloadavg()[0]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbours", default="6,10,15")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    patches.apply([n for n, p in patches.PATCHES.items() if not p.per_host])
    patches.apply_process_tweaks()
    trio.run(measure, [int(n) for n in args.neighbours.split(",")], args.calls)


if __name__ == "__main__":
    main()
