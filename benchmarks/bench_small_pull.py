"""CPU of one small pull (the digits model, 19 KB) between two hosts in one process.

    .venv/bin/python benchmarks/bench_small_pull.py [--pulls 500] [--without yamux_credit,pipelined_select]
        [--count-calls] [--protocol 1.0.0]

Both ends run in this process, so the process CPU per pull is what the puller and the
holder pay together: stream open and negotiation, request, reply, close. ``--without``
leaves the named libp2p patches off (``p2pfl.net.patches.PATCHES``); run it with and
without, back to back, for the ratio (the machine is shared: absolute figures move).
``--count-calls`` counts the Python function calls per pull instead (cProfile over the
measured pulls): a figure the machine's load does not move. ``--protocol 1.0.0`` pulls
over a new stream each time (p2pfl before session 9); the default, 1.2.0, over the one
long-lived session the transport keeps per peer (``p2pfl.net.session``).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import hashlib
import logging
import os
import pstats
import time

import trio

from p2pfl.config import Limits
from p2pfl.net import patches
from p2pfl.net.host import connect, listen_addrs, open_host
from p2pfl.net.session import Sessions, install_session_protocol
from p2pfl.net.transfer import PayloadStore, fetch_checked_payload, install_update_protocol

SIZE = 19_000
WARM_UP = 20


async def measure(pulls: int, protocol: str, profile: cProfile.Profile | None = None) -> tuple[float, float]:
    """Return (CPU ms, wall ms) per pull, after a warm-up on the same connection;
    ``profile`` (if given) is enabled over the measured pulls only."""
    payload = os.urandom(SIZE)
    digest = hashlib.sha256(payload).digest()
    store = PayloadStore(max_total_bytes=SIZE)
    store.put(digest, payload)
    async with open_host(os.urandom(32)) as holder, open_host(os.urandom(32)) as puller:
        install_session_protocol(holder, install_update_protocol(holder, store, limits=Limits()))
        peer = await connect(puller, listen_addrs(holder)[0], timeout=10)
        sessions = Sessions(puller)
        fetch = sessions.fetch if protocol == "1.2.0" else functools.partial(fetch_checked_payload, puller)
        for _ in range(WARM_UP):
            await fetch(peer, digest, max_size=SIZE, timeout=10)
        await trio.sleep(0.5)  # identify and friends settle
        cpu, wall = time.process_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        for _ in range(pulls):
            await fetch(peer, digest, max_size=SIZE, timeout=10)
        if profile is not None:
            profile.disable()
        return 1000 * (time.process_time() - cpu) / pulls, 1000 * (time.perf_counter() - wall) / pulls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pulls", type=int, default=500)
    parser.add_argument("--without", default="", help="comma list of libp2p patches left off")
    parser.add_argument("--count-calls", action="store_true", help="Python calls per pull (cProfile)")
    parser.add_argument("--protocol", choices=("1.0.0", "1.2.0"), default="1.2.0",
                        help="a stream per pull (1.0.0) or one session (1.2.0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    off = {name for name in args.without.split(",") if name}
    applied = patches.apply([n for n, p in patches.PATCHES.items() if not p.per_host and n not in off])
    patches.apply_process_tweaks()
    if args.count_calls:
        profile = cProfile.Profile()
        trio.run(measure, args.pulls, args.protocol, profile)
        calls = pstats.Stats(profile).total_calls / args.pulls  # type: ignore[attr-defined]
        print(f"pull of {SIZE} B over {args.protocol}: {calls:.0f} Python calls (both ends); "
              f"patches off: {sorted(off) or 'none'}")
        return
    cpu, wall = trio.run(measure, args.pulls, args.protocol)
    print(f"pull of {SIZE} B over {args.protocol}: {cpu:.3f} ms CPU (both ends), {wall:.3f} ms wall, load "
          f"{os.getloadavg()[0]:.1f}; patches off: {sorted(off) or 'none'} ({len(applied)} on)")


if __name__ == "__main__":
    main()
