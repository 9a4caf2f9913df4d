"""One OS process of the transfer benchmark: a holder (server) or a puller (client).

Driven by ``bench_transfer.py`` over stdin/stdout, one JSON object per line:

holder: serves deterministic payloads of the given sizes over ``/p2pfl/update/1.0.0``
    and raw TCP (request: 8-byte big-endian size; reply: that many bytes); prints
    ``{"addr", "tcp_port", "digests": {size: hex}}`` and runs until stdin closes.
puller: connects to its holder, prints ``{"ready": true}``, waits for a ``go`` line,
    pulls one payload and prints ``{"seconds": s}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import struct
import sys
import time
from typing import Any

import trio

from p2pfl.config import Limits
from p2pfl.net import patches
from p2pfl.net.host import connect, listen_addrs, open_host
from p2pfl.net.patches import dataplane
from p2pfl.net.transfer import PayloadStore, fetch_payload, install_update_protocol

SIZE = struct.Struct(">Q")


def payload_of(size: int) -> bytes:
    """Return the same pseudo-random payload of ``size`` bytes in every process."""
    return random.Random(size).randbytes(size)


KNOBS = (*patches.TWEAKS, *dataplane.KNOBS)
"""Data-plane knobs: process tweaks and data-plane patches (the others always apply)."""


def set_tuning(knobs: str) -> None:
    """Apply the named knobs ("all", "none" or a comma list) before any host exists."""
    names = list(KNOBS) if knobs == "all" else [] if knobs == "none" else knobs.split(",")
    base = [n for n, p in patches.PATCHES.items() if not p.per_host and n not in dataplane.KNOBS]
    patches.apply(base + [n for n in names if n in dataplane.KNOBS])
    patches.apply_process_tweaks([n for n in names if n in patches.TWEAKS])


def applied_knobs() -> list[str]:
    """Return the data-plane knobs in effect in this process."""
    tweaks = patches.apply_process_tweaks([])
    return [n for n in KNOBS if n in tweaks or patches.active(n)]


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def stdin_line() -> str:
    return await trio.to_thread.run_sync(sys.stdin.readline)


async def serve_raw_tcp(payloads: dict[int, bytes], task_status: Any) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            size = SIZE.unpack(await stream.receive_some(SIZE.size))[0]
            view = memoryview(payloads[size])
            for start in range(0, size, 1 << 20):
                await stream.send_all(view[start : start + (1 << 20)])

    await trio.serve_listeners(handle, listeners)


async def holder(args: argparse.Namespace) -> None:
    payloads = {size: payload_of(size) for size in args.sizes}
    store = PayloadStore(max_total_bytes=2 * sum(args.sizes) + 1)
    for payload in payloads.values():
        store.put(hashlib.sha256(payload).digest(), payload)
    async with open_host(os.urandom(32)) as host, trio.open_nursery() as nursery:
        install_update_protocol(host, store, limits=Limits(), max_concurrent=args.slots)
        port = await nursery.start(serve_raw_tcp, payloads)
        emit(
            {
                "addr": listen_addrs(host)[0],
                "tcp_port": port,
                "digests": {s: hashlib.sha256(p).digest().hex() for s, p in payloads.items()},
                "tuning": applied_knobs(),
            }
        )
        await stdin_line()  # the driver closes stdin to stop us
        nursery.cancel_scope.cancel()


async def puller(args: argparse.Namespace) -> None:
    async with open_host(os.urandom(32)) as host:
        peer = await connect(host, args.addr, timeout=30)
        emit({"ready": True})
        await stdin_line()
        start = time.perf_counter()
        data = await fetch_payload(
            host, peer, bytes.fromhex(args.digest), max_size=args.size, timeout=600
        )
        emit({"seconds": time.perf_counter() - start, "bytes": len(data)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["holder", "puller"])
    parser.add_argument("--tuning", default="all")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[])
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--addr")
    parser.add_argument("--digest")
    parser.add_argument("--size", type=int)
    args = parser.parse_args()
    # Peers vanishing at the end of a run make libp2p log dial failures: not results.
    logging.basicConfig(level=logging.CRITICAL)
    set_tuning(args.tuning)
    trio.run(holder if args.role == "holder" else puller, args)


if __name__ == "__main__":
    main()
