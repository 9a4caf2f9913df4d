"""One churn process of the soak (benchmarks/soak.py): peers that join, leave and misbehave.

    .venv/bin/python benchmarks/soak_churn.py ADDRESS --seconds 1800 --stats FILE [--lanes 6]

``lanes`` trio tasks each run cycles against the daemon at ADDRESS, as fast as they go,
with a fresh identity every ``CYCLES_PER_IDENTITY`` cycles. py-libp2p's
``host.disconnect`` waits ~0.2 s (Yamux ``close`` ends with ``trio.sleep(0.1)``) while
connecting and a stream round trip take ~30 ms: one lane is latency-bound at ~4 cycles
per second whatever the CPU, so a process runs several lanes. A cycle is one of
``KINDS``, in turn:

    pex          connect, an honest peer exchange, disconnect (a peer joining and leaving)
    pex_garbage  connect, garbage on the peer-exchange stream, disconnect
    abandon      connect, open a stream and never use it, disconnect
    bad_protocol connect, a non-UTF-8 protocol id in multistream-select (LIBP2P_NOTES)
    bad_meshsub  connect, an invalid protobuf frame on /meshsub/1.2.0 (LIBP2P_NOTES)
    tcp_garbage  raw TCP: random bytes before any handshake, close

and ``holders`` more tasks alternate between holding silent connections:

    silent       connect and hold the connection, saying nothing, for ``SILENT_S``
    tcp_silent   raw TCP: connect, then say nothing for ``SILENT_S`` (an unfinished handshake)

Counters (written to ``--stats`` as JSON every second): ``connections`` libp2p
connections that completed (Noise + Yamux), ``attempts`` libp2p dials tried, ``tcp``
raw TCP sessions, ``failures`` per kind with the last error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12
from libp2p.utils.varint import encode_delim, encode_varint_prefixed

from p2pfl.net.discovery import PROTOCOL_ID as PEX
from p2pfl.net.discovery import encode_request
from p2pfl.net.host import connect, open_host

KINDS = ("pex", "pex_garbage", "abandon", "bad_protocol", "bad_meshsub", "tcp_garbage")
SILENT_KINDS = ("silent", "tcp_silent")  # each held by its own ``holders`` tasks
CYCLES_PER_IDENTITY = 8
SILENT_S = 20.0
NON_UTF8 = b"\xff\xfe\xfd/evil"
CYCLE_DEADLINE_S = 10.0


class Churn:
    """Counters shared by the lanes of this process."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.peer = ID.from_base58(address.rsplit("/p2p/", 1)[1])
        tcp = multiaddr.Multiaddr(address)
        self.ip, self.port = tcp.value_for_protocol("ip4"), int(tcp.value_for_protocol("tcp"))
        self.counts: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.last_error = ""

    async def cycle(self, host: IHost, kind: str) -> None:
        """Run one cycle of ``kind`` (see the module docstring)."""
        if kind.startswith("tcp_"):
            await self.raw_tcp(kind)
            return
        self.counts["attempts"] += 1
        await connect(host, self.address, timeout=5)
        self.counts["connections"] += 1
        try:
            await self.misbehave(host, kind)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await host.disconnect(self.peer)

    async def misbehave(self, host: IHost, kind: str) -> None:
        if kind == "pex":
            stream = await host.new_stream(self.peer, [PEX])
            await stream.write(encode_request("soak", []))
            await stream.close_write()  # type: ignore[attr-defined]
            await stream.read(1 << 16)
        elif kind == "pex_garbage":
            stream = await host.new_stream(self.peer, [PEX])
            await stream.write(os.urandom(64) + b"\xff garbage \x00" * 100)
        elif kind == "abandon":
            await host.new_stream(self.peer, [PEX])
        elif kind == "bad_protocol":
            stream = await host.get_network().new_stream(self.peer)  # no negotiation
            await stream.write(encode_delim(b"/multistream/1.0.0") + encode_delim(NON_UTF8))
            await trio.sleep(0.05)  # let it arrive before the connection closes
        elif kind == "bad_meshsub":
            stream = await host.new_stream(self.peer, [PROTOCOL_ID_V12])
            # Field 1 (subscriptions), length-delimited, declaring far more bytes than follow.
            await stream.write(encode_varint_prefixed(b"\x0a\xff\xff\xff\x0f\x01"))
            await trio.sleep(0.05)
        elif kind == "silent":
            await trio.sleep(SILENT_S)

    async def raw_tcp(self, kind: str) -> None:
        self.counts["tcp"] += 1
        sock = await trio.open_tcp_stream(self.ip, self.port)
        async with sock:
            if kind == "tcp_garbage":
                await sock.send_all(os.urandom(256))
            else:
                await trio.sleep(SILENT_S)

    async def lane(self, kinds: tuple[str, ...], index: int, stop_at: float) -> None:
        """Cycle through ``kinds`` (starting at ``index``) until ``stop_at``."""
        turn = index
        while time.monotonic() < stop_at:
            async with open_host(os.urandom(32)) as host:
                for _ in range(CYCLES_PER_IDENTITY):
                    if time.monotonic() >= stop_at:
                        break
                    kind = kinds[turn % len(kinds)]
                    turn += 1
                    try:
                        with trio.fail_after(CYCLE_DEADLINE_S + SILENT_S):
                            await self.cycle(host, kind)
                    except Exception as error:  # every failure is counted, none stops the lane
                        self.failures[kind] += 1
                        self.last_error = f"{kind}: {type(error).__name__}: {str(error)[:120]}"

    def write(self, path: Path) -> None:
        snapshot = {**self.counts, "failures": dict(self.failures), "last_error": self.last_error}
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(snapshot))
        partial.replace(path)  # the reader never sees half a file


async def run(address: str, seconds: float, lanes: int, holders: int, stats: Path) -> None:
    churn = Churn(address)
    stop_at = time.monotonic() + seconds
    async with trio.open_nursery() as outer:

        async def report() -> None:
            while True:
                churn.write(stats)
                await trio.sleep(1)

        outer.start_soon(report)
        async with trio.open_nursery() as nursery:
            for index in range(lanes):
                nursery.start_soon(churn.lane, KINDS, index, stop_at)
            for index in range(holders):
                nursery.start_soon(churn.lane, SILENT_KINDS, index, stop_at)
        outer.cancel_scope.cancel()
    churn.write(stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="the daemon's /ip4/.../tcp/.../p2p/... address")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--lanes", type=int, default=6, help="tasks cycling through KINDS")
    parser.add_argument("--holders", type=int, default=2, help="tasks holding silent connections")
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args()
    trio.run(run, args.address, args.seconds, args.lanes, args.holders, args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
