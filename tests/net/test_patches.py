"""The libp2p patch registry: one version policy, each patch proved by a named test."""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import struct
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
import trio.testing
from libp2p.abc import IHost
from libp2p.crypto import x25519
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux.yamux import (
    FLAG_RST,
    FLAG_SYN,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT,
    Yamux,
)
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.transport.upgrader import TransportUpgrader

from p2pfl.config import Limits
from p2pfl.net import patches
from p2pfl.net.host import build_host, connect, key_pair_from_secret, listen_addrs, open_host
from p2pfl.net.patches import process
from p2pfl.net.transfer import PayloadStore, fetch_payload, install_update_protocol
from tests.net.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
PING = TProtocol("/ipfs/ping/1.0.0")


def test_every_patch_names_its_upstream_bug_and_an_existing_test() -> None:
    for patch in patches.PATCHES.values():
        path, name = patch.test.split("::")
        tree = ast.parse((ROOT / path).read_text())
        tests = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert name in tests, f"{patch.name}: {patch.test} does not exist"
        assert len(patch.upstream) > 20, patch.name


def test_hosts_run_with_every_patch_on_the_pinned_version() -> None:
    assert patches.version_ok()
    assert set(patches.apply()) == {n for n, p in patches.PATCHES.items() if not p.per_host}


def test_a_full_peerstore_keeps_our_own_identity() -> None:
    host = build_host(os.urandom(32))
    store = host.get_peerstore()
    for _ in range(store.max_peers + 100):  # churn: more distinct peers than the store keeps
        store.add_addrs(ID(os.urandom(34)), [multiaddr.Multiaddr("/ip4/10.0.0.1/tcp/4001")], 3600)
    assert len(store.peer_ids()) <= store.max_peers + 1  # still bounded
    assert host.get_public_key() == store.pubkey(host.get_id())  # stock: PeerStoreError


def test_another_version_warns_in_one_line_and_runs_stock(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(patches, "_state", {"checked": None, "done": False, "disabled": False, "applied": []})
    monkeypatch.setattr(patches.metadata, "version", lambda _: "0.9.0")
    with caplog.at_level(logging.WARNING, logger="p2pfl.net.patches"):
        assert patches.apply() == ()
        assert patches.patch_host(object(), max_streams_per_peer=4, auto_connect=False) == ()
    [record] = caplog.records
    assert "0.9.0" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_process_tweaks_are_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PY_YAMUX_RELEASE_ON_READ", raising=False)
    monkeypatch.setattr(process, "_applied", [])
    build_host(bytes([7]) * 32)
    assert "PY_YAMUX_RELEASE_ON_READ" not in os.environ
    assert "yamux_release_on_read" in patches.apply_process_tweaks()
    assert os.environ["PY_YAMUX_RELEASE_ON_READ"] == "0"


@asynccontextmanager
async def bare_dialer(server: IHost) -> AsyncIterator[trio.abc.AsyncResource]:
    """Yield a function that opens one real Noise+Yamux connection to ``server`` and drops it.

    No host on this side (no identify, no peerstore): ~20 ms a cycle instead of ~200 ms.
    The connection is established on the server once a stream is negotiated on it. Each
    cycle signs with a fresh key: with one PeerId, libp2p's one-connection-per-peer trim
    races the server noticing the previous close (and waiting for that costs ~240 ms).
    """
    port = int(server.get_addrs()[0].value_for_protocol("tcp"))

    async def cycle() -> None:
        key_pair = key_pair_from_secret(os.urandom(32))
        noise = NoiseTransport(key_pair, noise_privkey=x25519.create_new_key_pair().private_key)
        upgrader = TransportUpgrader({NOISE_PROTOCOL_ID: noise}, {TProtocol(YAMUX_PROTOCOL_ID): Yamux})
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            raw = RawConnection(TrioTCPStream(stream), True)
            secured = await upgrader.upgrade_security(raw, True, server.get_id())
            muxed = await upgrader.upgrade_connection(secured, server.get_id())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(muxed.start)
                muxed_stream = await muxed.open_stream()
                await MultiselectClient().select_one_of([PING], MultiselectCommunicator(muxed_stream))
                nursery.cancel_scope.cancel()
        finally:
            await stream.aclose()

    yield cycle  # type: ignore[misc]


async def cycles(server: IHost, count: int) -> int:
    """Connect and disconnect ``count`` times; return how many succeeded before the first failure."""
    async with bare_dialer(server) as cycle:
        for done in range(count):
            try:
                with trio.fail_after(5):
                    await cycle()  # type: ignore[operator]
            except Exception:
                return done
    return count


async def fresh_peer_connects(server: IHost) -> None:
    async with open_host(os.urandom(32)) as fresh:
        await connect(fresh, listen_addrs(server)[0], timeout=5)


async def test_1000_inbound_connections_then_a_fresh_peer_connects() -> None:
    # Stock 0.8.1 resets every inbound connection after the 300th (its slot count).
    async with open_host(os.urandom(32)) as server:
        assert await cycles(server, 1000) == 1000
        await fresh_peer_connects(server)
        swarm: Any = server.get_network()
        assert swarm._inbound_limiter.borrowed_tokens < 10  # stock: all 300 held


async def test_without_the_patch_slots_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stock handler, with 3 slots instead of 300, to keep the proof cheap.
    stock = Swarm._do_handle_inbound_connection.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(Swarm, "_do_handle_inbound_connection", stock)
    async with open_host(os.urandom(32)) as server:
        server.get_network()._inbound_limiter = trio.CapacityLimiter(3)  # type: ignore[attr-defined]
        assert await cycles(server, 10) == 3


@pytest.mark.parametrize("auto_connect", [False, True])
async def test_a_disconnect_dials_nobody_from_the_peerstore(auto_connect: bool) -> None:
    # With auto_connect=True the patch is off: the control that the connector does dial.
    async with (
        open_host(os.urandom(32), auto_connect=auto_connect) as ours,
        open_host(os.urandom(32)) as known,
    ):
        info = info_from_p2p_addr(multiaddr.Multiaddr(listen_addrs(known)[0]))
        ours.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
        swarm: Any = ours.get_network()
        with trio.fail_after(10):
            await swarm.auto_connector.maybe_connect()  # what every disconnect schedules
        assert bool(swarm.get_connections(info.peer_id)) is auto_connect


def _frames(data: bytes) -> list[tuple[int, int, int, int]]:
    """(type, flags, stream id, bytes) of each Yamux frame in one secured write."""
    out, pos = [], 0
    while pos < len(data):
        _, kind, flags, stream_id, length = struct.unpack_from(YAMUX_HEADER_FORMAT, data, pos)
        size = 12 + (length if kind == TYPE_DATA else 0)
        out.append((kind, flags, stream_id, size))
        pos += size
    return out


async def test_a_small_pull_sends_no_window_update(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stock 0.8.1: 22 frames, 11 of them WINDOW_UPDATEs credited after single reads, a bare
    # SYN and a bare ACK, and a multistream round trip per stream (yamux_credit,
    # pipelined_select, yamux_open_flags, listener_one_write).
    frames: dict[int, Counter[str]] = {}  # stream id -> frames of both ends, as sent
    stock_write = SecureSession.write

    async def counting(self: Any, data: bytes) -> Any:
        if getattr(self, "_p2pfl_count", False):
            for kind, flags, stream_id, size in _frames(bytes(data)):
                name = "data" if kind == TYPE_DATA and size > 12 else f"type {kind}"
                counts = frames.setdefault(stream_id, Counter())
                counts[name] += 1
                counts["bytes"] += size
                for flag, flag_name in ((1, "SYN"), (2, "ACK"), (4, "FIN"), (8, "RST")):
                    counts[flag_name] += bool(flags & flag)
        return await stock_write(self, data)

    payload = os.urandom(19_000)  # the digits model
    digest = hashlib.sha256(payload).digest()
    store = PayloadStore(max_total_bytes=len(payload))
    store.put(digest, payload)
    async with open_host(os.urandom(32)) as server, open_host(os.urandom(32)) as client:
        install_update_protocol(server, store, limits=Limits())
        peer = await connect(client, listen_addrs(server)[0], timeout=10)
        monkeypatch.setattr(SecureSession, "write", counting)
        for host in (client, server):
            for conn in host.get_network().get_connections():
                conn.muxed_conn.secured_conn._p2pfl_count = True
        with trio.fail_after(10):
            assert await fetch_payload(client, peer, digest, max_size=len(payload), timeout=10) == payload
    # Identify and friends share the connection: the pull is the stream that moved the payload.
    [sent] = [counts for counts in frames.values() if counts["bytes"] > len(payload)]
    assert sent["type 1"] == 2  # no WINDOW_UPDATE but the two FINs
    assert sent["FIN"] == 2
    # Client: SYN + header + protocol id + request. Server: ACK + header + protocol id
    # (listener_one_write), reply + payload.
    assert sent["data"] == 3
    assert sent["SYN"] == 1  # on a data frame, not a bare one
    assert sent["ACK"] == 1


async def test_a_connection_made_while_its_peer_is_closed_stays_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    # We close our connection to them; while it closes they dial us anew (a peer we drop
    # redials at once). Stock close_peer then drops that new, open connection from the table.
    async with open_host(os.urandom(32)) as ours, open_host(os.urandom(32)) as theirs:
        their_id, swarm = theirs.get_id(), ours.get_network()
        await connect(ours, listen_addrs(theirs)[0], timeout=5)
        [old] = swarm.get_connections(their_id)
        close = old.close

        async def redialled_meanwhile() -> None:
            monkeypatch.setattr(old, "close", close)  # once
            target = multiaddr.Multiaddr(listen_addrs(ours)[0]).decapsulate_code(multiaddr.protocols.P_P2P)
            await theirs.get_network().dial_addr(target, ours.get_id())  # type: ignore[attr-defined]
            await wait_for(lambda: len(swarm.get_connections(their_id)) == 2)
            await close()

        monkeypatch.setattr(old, "close", redialled_meanwhile)
        with trio.fail_after(10):
            await swarm.close_peer(their_id)
        listed = swarm.get_connections(their_id)  # stock: [], the new connection open but unlisted
        assert len(listed) == 1
        assert listed[0] is not old
        assert not listed[0].muxed_conn.is_closed


async def test_streams_reset_before_we_answer_leave_no_pending_flags() -> None:
    # A stock opener's bare SYN, then its RST at once: we accept each stream (our ACK waits
    # for our first frame on it, patch yamux_open_flags) and drop it before saying a word.
    payload = os.urandom(1000)
    store = PayloadStore(max_total_bytes=len(payload))
    store.put(hashlib.sha256(payload).digest(), payload)
    async with open_host(os.urandom(32)) as ours, open_host(os.urandom(32)) as theirs:
        install_update_protocol(ours, store, limits=Limits())
        await connect(theirs, listen_addrs(ours)[0], timeout=5)
        [conn] = theirs.get_network().get_connections(ours.get_id())
        [mine] = ours.get_network().get_connections(theirs.get_id())
        frame = struct.Struct(YAMUX_HEADER_FORMAT)
        for stream_id in range(10_001, 10_401, 2):  # 200 streams of the dialler's (odd) ids
            await conn.muxed_conn.secured_conn.write(
                frame.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, 0)
                + frame.pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))
        await wait_for(lambda: not mine.muxed_conn.streams)
        with trio.fail_after(10):  # the connection still serves (on one more stream)
            got = await fetch_payload(theirs, ours.get_id().to_string(), hashlib.sha256(payload).digest(),
                                      max_size=len(payload), timeout=10)
        assert got == payload
        assert len(mine.muxed_conn.__dict__.get("_p2pfl_open_flags", {})) <= 1  # unbounded: 200


class _Recorder:
    """A notifee that records each event with the task it ran in; ``raising`` ones raise too."""

    def __init__(self, raising: bool = False) -> None:
        self.events: list[tuple[str, str]] = []
        self.raising = raising

    def __getattr__(self, method: str) -> Any:
        async def record(network: Any, *args: Any) -> None:
            self.events.append((method, trio.lowlevel.current_task().name))
            if self.raising:
                raise RuntimeError("a notifee that raises")

        return record


@pytest.mark.parametrize("inline", [True, False])
async def test_stream_events_reach_every_notifee_in_the_callers_task(
    inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stock 0.8.1 spawns a nursery and a task per notifee for every stream opened and closed.
    if not inline:  # the control: stock fan-out
        monkeypatch.setattr(Swarm, "_notify", Swarm._notify.__wrapped__)  # type: ignore[attr-defined]
    async with open_host(os.urandom(32)) as server, open_host(os.urandom(32)) as client:
        raising, recorder = _Recorder(raising=True), _Recorder()
        for notifee in (raising, recorder):
            server.get_network().register_notifee(notifee)  # type: ignore[arg-type]
        server.set_stream_handler(PING, lambda stream: stream.close())
        peer = await connect(client, listen_addrs(server)[0], timeout=10)
        with trio.fail_after(10):
            stream = await client.new_stream(ID.from_base58(peer), [PING])
            await stream.close()
            await wait_for(lambda: [m for m, _ in recorder.events].count("closed_stream") >= 1)
    opened = [task for method, task in recorder.events if method == "opened_stream"]
    assert opened
    assert [m for m, _ in raising.events].count("opened_stream") == len(opened)  # the raising one too
    assert any(method == "connected" for method, _ in recorder.events)  # connection events too
    spawned = [task for method, task in recorder.events if method.endswith("_stream") and task.endswith("_call")]
    assert (spawned == []) is inline


async def test_a_free_eager_lock_takes_no_turn_and_a_held_one_queues() -> None:
    from p2pfl.net.patches.locks import EagerLock, EagerSemaphore

    me = trio.lowlevel.current_task()

    class Turns(trio.abc.Instrument):  # steps this task starts: one per scheduler turn
        count = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            self.count += task is me

    turns = Turns()
    trio.lowlevel.add_instrument(turns)
    lock, semaphore = EagerLock(), EagerSemaphore(1)
    async with trio.open_nursery() as nursery:
        async with lock, semaphore:
            pass
        assert turns.count == 0  # free: entered without a turn of the scheduler
        async with trio.Lock():
            pass
        assert turns.count == 1  # the control: trio's own lock takes one
        trio.lowlevel.remove_instrument(turns)

        order: list[str] = []

        async def waiter(name: str) -> None:
            async with lock:
                order.append(name)

        await lock.acquire()
        nursery.start_soon(waiter, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # held: both wait
        lock.release()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["first", "second"]  # FIFO, as trio.Lock
    patches.apply()
    assert isinstance(TrioTCPStream(object()).write_lock, EagerLock)  # type: ignore[arg-type]
