"""One libp2p peer in its own OS process, driven by JSON lines (tests/real only).

Usage: ``python tests/real/netpeer.py '<json options>'``. Options: ``secret`` (hex),
``network``, ``port``, ``bootstrap`` (list), ``forger`` (accept anything: the hostile
peer), ``maintenance``, ``max_backoff``.

Prints ``{"event": "ready", "peer_id", "addrs"}`` once listening, then one JSON line per
announcement received (``{"event": "announcement", "origin", "data", "t"}``, ``t`` =
``time.time()`` at delivery) and one reply per command read from stdin
(``{"id": n, ...}``). Commands: ``neighbours``, ``publish`` (data), ``serve`` (size,
seed), ``fetch`` (peer, digest, max_size, timeout), ``stats``, ``score`` (peer), ``ban``
(peer, seconds), ``quit``. Every network wait inside is bounded by the transport.

Honest peers accept only announcements starting with ``valid:``; a forger accepts all.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from typing import Any

import trio

from p2pfl.config import Limits, NetConfig
from p2pfl.errors import P2PFLError
from p2pfl.net.libp2p_transport import Libp2pTransport, open_libp2p_transport
from p2pfl.net.patches import apply_process_tweaks


def honest(origin: str, data: bytes) -> str:
    if not data.startswith(b"valid:"):
        raise ValueError("not a valid announcement")
    return origin


def forger(origin: str, data: bytes) -> str:
    return origin


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def pump_announcements(transport: Libp2pTransport) -> None:
    async for item in transport.announcements():
        emit({"event": "announcement", "origin": item.origin, "data": item.data.hex(),
              "t": time.time()})


async def command(transport: Libp2pTransport, request: dict[str, Any]) -> dict[str, Any]:
    cmd = request["cmd"]
    if cmd == "neighbours":
        return {"neighbours": list(transport.neighbours())}
    if cmd == "publish":
        await transport.publish(bytes.fromhex(request["data"]))
        return {"t": time.time()}
    if cmd == "serve":
        data = payload(request["size"], request["seed"])
        digest = hashlib.sha256(data).digest()
        transport.serve(digest, data)
        return {"digest": digest.hex()}
    if cmd == "fetch":
        return await fetch(transport, request)
    if cmd == "stats":
        stats = transport.stats()
        return {"stats": stats.__repr__(), "rejected_in": stats.rejected_in,
                "announcements_in": stats.announcements_in}
    if cmd == "score":
        return {"score": transport.gossip.score(request["peer"])}
    if cmd == "ban":
        transport.ban(request["peer"], seconds=request["seconds"])
        return {}
    raise ValueError(f"unknown command {cmd!r}")


async def fetch(transport: Libp2pTransport, request: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    emit({"event": "fetch-started", "id": request["id"]})
    try:
        data = await transport.fetch(request["peer"], bytes.fromhex(request["digest"]),
                                     max_size=request["max_size"], timeout=request["timeout"])
    except P2PFLError as error:
        return {"error": type(error).__name__, "message": str(error),
                "seconds": time.perf_counter() - start}
    return {"size": len(data), "sha256": hashlib.sha256(data.data).hexdigest(),
            "seconds": time.perf_counter() - start}


async def serve_commands(transport: Libp2pTransport, nursery: trio.Nursery) -> None:
    stdin = trio.wrap_file(sys.stdin)
    async for line in stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        nursery.start_soon(answer, transport, request)
    nursery.cancel_scope.cancel()  # quit, or the driver went away (EOF)


async def answer(transport: Libp2pTransport, request: dict[str, Any]) -> None:
    try:
        reply = await command(transport, request)
    except Exception as error:  # report, keep serving: the driver asserts on it
        reply = {"error": type(error).__name__, "message": str(error)}
    emit({"id": request["id"], **reply})


async def main(options: dict[str, Any]) -> None:
    config = NetConfig(
        port=options.get("port", 0),
        bootstrap=tuple(options.get("bootstrap", ())),
        maintenance_interval=options.get("maintenance", 0.5),
        max_backoff=options.get("max_backoff", 2.0),
        dial_timeout=2.0,
        transfer_timeout=30.0,
    )
    async with open_libp2p_transport(
        secret=bytes.fromhex(options["secret"]),
        network_id=options.get("network", "real"),
        config=config,
        limits=Limits(),
        validator=forger if options.get("forger") else honest,
    ) as transport:
        emit({"event": "ready", "peer_id": transport.peer_id, "addrs": transport.listen_addrs})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_announcements, transport)
            nursery.start_soon(serve_commands, transport, nursery)


if __name__ == "__main__":
    apply_process_tweaks()  # a node process of a test network, as the daemon does
    trio.run(main, json.loads(sys.argv[1]))
