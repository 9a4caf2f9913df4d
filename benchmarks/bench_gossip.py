"""Announcement latency over GossipSub: 8 processes on loopback, one announcement to 7 peers.

    .venv/bin/python benchmarks/bench_gossip.py [--announcements 30]

Starts 8 peer processes (the real-network test peer, p2pfl's libp2p host, gossip and
validator), waits for the mesh, then publishes announcements from rotating origins and
prints the first-delivery and all-delivered latency to the 7 other peers (median, p95),
beside a loopback TCP round trip measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.real.test_real_net import (
    cluster,
    publish_and_wait,
    publish_until_meshed,
    wait_neighbours,
)


async def tcp_round_trip_ms(samples: int = 200) -> float:
    """Median loopback TCP echo of a 300-byte message: the floor under any gossip hop."""

    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            await stream.send_all(b"x" * 300)
            received = 0
            while received < 300:
                received += len(await stream.receive_some(300 - received))
            times.append(time.perf_counter() - start)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return statistics.median(times) * 1000


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


async def main(announcements: int) -> None:
    baseline = await tcp_round_trip_ms()
    with tempfile.TemporaryDirectory() as tmp:
        async with cluster(Path(tmp), 8) as peers:
            await wait_neighbours(peers, 3)
            for peer in peers:
                await publish_until_meshed(peer, [p for p in peers if p is not peer])
            first, last = [], []
            for i in range(announcements):
                origin = peers[i % len(peers)]
                others = [p for p in peers if p is not origin]
                latencies = await publish_and_wait(origin, others, b"valid:bench %d" % i)
                first.append(min(latencies) * 1000)
                last.append(max(latencies) * 1000)
    print(f"8 processes, {announcements} announcements (~300 bytes) from rotating origins")
    print(f"{'':<28} {'median ms':>9} {'p95 ms':>7}")
    print(f"{'first of 7 peers':<28} {statistics.median(first):>9.1f} {p95(first):>7.1f}")
    print(f"{'all 7 peers':<28} {statistics.median(last):>9.1f} {p95(last):>7.1f}")
    print(f"{'raw TCP round trip':<28} {baseline:>9.2f}")
    print(f"ratio all-7 median / TCP round trip: {statistics.median(last) / baseline:.0f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--announcements", type=int, default=30)
    trio.run(main, parser.parse_args().announcements)
