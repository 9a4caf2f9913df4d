"""Real OS processes on 127.0.0.1: the libp2p transport end to end.

Every wait is bounded (``fail_after``); every process is stopped or killed on exit.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2pfl.net.gossip import PUBLISH_THRESHOLD
from p2pfl.net.host import connection_config, key_pair_from_secret, run_host
from tests.real.driver import Peer

pytestmark = pytest.mark.real

MB = 1_000_000
POLL = 0.2


@asynccontextmanager
async def cluster(tmp_path: Path, n: int, **first_options: object) -> AsyncIterator[list[Peer]]:
    """Start ``n`` peers: one first, then the rest bootstrapping from it, in parallel."""
    async with trio.open_nursery() as nursery:
        peers: list[Peer] = []
        try:
            first = await Peer.start(nursery, tmp_path / "peer0.log", **first_options)
            peers.append(first)

            async def start_one(i: int) -> None:
                peers.append(await Peer.start(nursery, tmp_path / f"peer{i}.log",
                                              bootstrap=first.addrs))

            async with trio.open_nursery() as starting:
                for i in range(1, n):
                    starting.start_soon(start_one, i)
            peers[1:] = sorted(peers[1:], key=lambda p: p.peer_id)
            yield peers
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as stopping:
                    for peer in peers:
                        stopping.start_soon(peer.stop)
            nursery.cancel_scope.cancel()


async def poll(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll another process's state until ``condition()``; bounded in time and count."""
    with trio.fail_after(timeout):
        for _ in range(int(timeout / POLL)):
            if await condition():
                return
            await trio.sleep(POLL)
    raise AssertionError("condition not reached in time")


async def neighbours(peer: Peer) -> list[str]:
    return (await peer.call("neighbours"))["neighbours"]


async def neighbours_of(peer: Peer, peers: list[Peer]) -> list[Peer]:
    """The peers of ``peers`` that are ``peer``'s neighbours."""
    ids = set(await neighbours(peer))
    return [p for p in peers if p.peer_id in ids]


async def wait_neighbours(peers: list[Peer], at_least: int) -> None:
    for peer in peers:
        async def enough(peer: Peer = peer) -> bool:
            return len(await neighbours(peer)) >= at_least

        await poll(enough)


async def publish_and_wait(sender: Peer, receivers: list[Peer], data: bytes) -> list[float]:
    """Publish from ``sender``; return each receiver's delivery latency in seconds."""
    sent = (await sender.call("publish", data=data.hex()))["t"]
    latencies = []
    for peer in receivers:
        def got(peer: Peer = peer) -> bool:
            return any(a["data"] == data.hex() for a in peer.announcements)

        await peer.wait_for(got, timeout=10)
        hit = next(a for a in peer.announcements if a["data"] == data.hex())
        assert hit["origin"] == sender.peer_id
        latencies.append(hit["t"] - sent)
    return latencies


async def publish_until_meshed(sender: Peer, receivers: list[Peer]) -> None:
    """Re-announce (as p2pfl does) until every receiver has one; GossipSub meshes in ~1 s."""
    with trio.fail_after(20):
        for i in range(40):
            data = b"valid:warmup %d" % i
            await sender.call("publish", data=data.hex())
            with trio.move_on_after(0.5):
                await publish_and_wait_quietly(receivers, data)
                return


async def publish_and_wait_quietly(receivers: list[Peer], data: bytes) -> None:
    for peer in receivers:
        await peer.wait_for(
            lambda peer=peer: any(a["data"] == data.hex() for a in peer.announcements), 10)


async def test_two_processes_gossip_fetch_and_refuse_plaintext(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as (a, b):
        await wait_neighbours([a, b], 1)
        await publish_until_meshed(b, [a])
        await publish_and_wait(b, [a], b"valid:hello")
        digest = (await a.call("serve", size=MB, seed=1))["digest"]
        got = await b.call("fetch", peer=a.peer_id, digest=digest, max_size=2 * MB, timeout=20, wait=30)
        assert got["sha256"] == digest
        assert got["size"] == MB

        # A plaintext-only dialer cannot connect to a real p2pfl process.
        key_pair = key_pair_from_secret(os.urandom(32))
        plaintext = new_host(
            key_pair=key_pair,
            sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            connection_config=connection_config(dial_timeout=2, auto_connect=False),
        )
        async with run_host(plaintext, listen_host="127.0.0.1", port=0):
            info = info_from_p2p_addr(multiaddr.Multiaddr(a.addrs[0]))
            with trio.move_on_after(5):
                with suppress(Exception):
                    await plaintext.connect(info)
            assert info.peer_id not in plaintext.get_connected_peers()


async def test_eight_processes(tmp_path: Path) -> None:
    async with cluster(tmp_path, 8) as peers:
        started = trio.current_time()
        await wait_neighbours(peers, 3)
        print(f"8 peers with >= 3 neighbours {trio.current_time() - started:.2f} s after start")
        # Announcements are first-hand (patch neighbour_only): they reach the origin's
        # neighbours, who are the only ones to aggregate its updates.
        origin = peers[3]
        others = await neighbours_of(origin, peers)
        await publish_until_meshed(origin, others)
        latencies = []
        for i in range(3):
            latencies += await publish_and_wait(origin, others, b"valid:round %d" % i)
        print(f"gossip to {len(others)} neighbours: median {statistics.median(latencies) * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms")
        assert max(latencies) < 5.0

        # 1 MB pulled by everyone from the holder; 50 MB by one; all sha256-verified.
        digest = (await origin.call("serve", size=MB, seed=2))["digest"]
        async with trio.open_nursery() as pulls:
            results: list[dict[str, object]] = []

            async def pull(peer: Peer) -> None:
                results.append(await peer.call("fetch", peer=origin.peer_id, digest=digest,
                                               max_size=MB, timeout=30, wait=70))

            for peer in others:
                pulls.start_soon(pull, peer)
        assert [r.get("sha256") for r in results] == [digest] * len(others), results
        big = (await peers[5].call("serve", size=50 * MB, seed=3, wait=30))["digest"]
        got = await peers[6].call("fetch", peer=peers[5].peer_id, digest=big,
                                  max_size=50 * MB, timeout=60, wait=70)
        assert got.get("sha256") == big, got
        print(f"50 MB pull: {got['seconds']:.2f} s")


async def test_forged_announcement_is_rejected_everywhere_and_penalised(tmp_path: Path) -> None:
    async with cluster(tmp_path, 4) as peers, trio.open_nursery() as nursery:
        forger = await Peer.start(nursery, tmp_path / "forger.log", forger=True,
                                  bootstrap=peers[0].addrs)
        try:
            await wait_neighbours([forger], 3)
            await publish_until_meshed(forger, await neighbours_of(forger, peers))
            for i in range(3):
                await forger.call("publish", data=(b"forged %d" % i).hex())
            # An honest announcement published after the forgeries still reaches the
            # publisher's neighbours (announcements are first-hand: patch neighbour_only)...
            await publish_and_wait(peers[1], await neighbours_of(peers[1], peers), b"valid:after")
            # ... but no honest peer delivered a forgery, and every honest peer that
            # received the forgeries directly now scores the forger below the publish gate.
            for peer in peers:
                assert not any(bytes.fromhex(a["data"]).startswith(b"forged")
                               for a in peer.announcements)
            rejected = [(await p.call("stats"))["rejected_in"] for p in peers]
            scores = [(await p.call("score", peer=forger.peer_id))["score"] for p in peers]
            assert sum(rejected) >= 3
            gated = [s < PUBLISH_THRESHOLD for s, r in zip(scores, rejected, strict=True) if r >= 3]
            assert gated
            assert all(gated)
        finally:
            await forger.stop()


async def test_kill_stop_and_restart(tmp_path: Path) -> None:
    async with cluster(tmp_path, 5) as (first, holder, backup, puller, frozen):
        await wait_neighbours([first, holder, backup, puller, frozen], 2)
        digest = (await holder.call("serve", size=50 * MB, seed=4, wait=30))["digest"]
        assert (await backup.call("serve", size=50 * MB, seed=4, wait=30))["digest"] == digest

        # SIGKILL the holder mid-transfer: the puller fails fast, then pulls from the backup.
        await puller.send({"id": 999, "cmd": "fetch", "peer": holder.peer_id, "digest": digest,
                           "max_size": 50 * MB, "timeout": 30})
        await puller.wait_for(lambda: any(e.get("id") == 999 for e in puller.events), 10)
        await trio.sleep(random.uniform(0.02, 0.05))  # let the body start flowing
        await holder.kill()
        await puller.wait_for(lambda: 999 in puller._replies, 30)
        failed = puller._replies.pop(999)
        assert "error" in failed, failed
        assert failed["seconds"] < 10, failed
        print(f"killed holder: {failed['error']} after {failed['seconds'] * 1000:.0f} ms")
        got = await puller.call("fetch", peer=backup.peer_id, digest=digest,
                                max_size=50 * MB, timeout=30, wait=70)
        assert got.get("sha256") == digest, got

        # A SIGSTOPped peer does not hang anyone: fetches time out on their deadline, and
        # gossip among the others goes on.
        small = (await frozen.call("serve", size=MB, seed=5))["digest"]
        frozen.signal(signal.SIGSTOP)
        with trio.fail_after(10):
            stuck = await puller.call("fetch", peer=frozen.peer_id, digest=small,
                                      max_size=MB, timeout=2, wait=10)
        # TransferTimeout if already connected; PeerUnreachable if the dial itself stalls
        # (the kernel accepts the TCP connection, the frozen process never does Noise).
        assert stuck.get("error") in {"TransferTimeout", "PeerUnreachable"}, stuck
        assert stuck["seconds"] < 4.0, stuck  # the 2 s deadline + cleanup on a loaded CI box
        await publish_until_meshed(first, [backup, puller])
        frozen.signal(signal.SIGCONT)

        # The killed holder restarts with the same key and port: it is reconnected.
        port = int(multiaddr.Multiaddr(holder.addrs[0]).value_for_protocol("tcp"))
        async with trio.open_nursery() as nursery:
            again = await Peer.start(nursery, tmp_path / "again.log", secret=holder.options["secret"],
                                     port=port, bootstrap=first.addrs)
            try:
                assert again.peer_id == holder.peer_id
                await wait_neighbours([again], 2)

                async def reconnected() -> bool:  # by a peer that knew it before the kill
                    return (again.peer_id in await neighbours(backup)
                            or again.peer_id in await neighbours(puller))

                await poll(reconnected, timeout=15)
                assert (await again.call("serve", size=MB, seed=6))["digest"] == hashlib.sha256(
                    random.Random(6).randbytes(MB)).hexdigest()
            finally:
                await again.stop()
