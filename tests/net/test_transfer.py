"""The update protocol over real libp2p hosts on loopback, with hostile peers on both sides.

Hosts run in this trio process; deadlines are small so hostile cases finish fast. Time
is real (the network is), so nothing here uses a mock clock; no test sleeps to
synchronise: hostile peers signal with events or with what they read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from libp2p.network.stream.exceptions import StreamEOF, StreamError, StreamReset
from libp2p.peer.id import ID

from p2pfl.config import Limits, MiB
from p2pfl.errors import (
    PayloadNotFound,
    PayloadTooLarge,
    PeerBusy,
    PeerUnreachable,
    ProtocolViolation,
    TamperedPayload,
    TransferError,
    TransferTimeout,
)
from p2pfl.net import patches
from p2pfl.net.host import connect, listen_addrs, open_host
from p2pfl.net.transfer import (
    PROTOCOL_ID,
    PayloadStore,
    fetch_payload,
    install_update_protocol,
)
from tests.net.polling import wait_for

SERVE_TIMEOUT = 1.0  # the server's request and write deadlines in these tests
FETCH_TIMEOUT = 10.0  # honest fetches: generous, they finish in milliseconds
HOSTILE_TIMEOUT = 0.5  # fetches from a stalling peer end at this deadline
STATUS = struct.Struct(">BQ")

Handler = Callable[[Any], Awaitable[None]]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Net:
    """A server, a client and a third host free for hostile behaviour, all connected."""

    def __init__(self, server: Any, client: Any, rogue: Any, store: PayloadStore) -> None:
        self.server, self.client, self.rogue, self.store = server, client, rogue, store
        self.served: list[tuple[str, int]] = []
        self.handler: Any = None  # the server's update protocol handler

    @property
    def server_id(self) -> str:
        return self.server.get_id().to_string()

    async def honest_round_trip(self, size: int = 64 * 1024) -> None:
        """Check the honest path end to end on the same hosts."""
        payload = os.urandom(size)
        self.store.put(sha(payload), payload)
        got = await fetch_payload(
            self.client, self.server_id, sha(payload), max_size=size, timeout=FETCH_TIMEOUT
        )
        assert got == payload


@contextlib.asynccontextmanager
async def open_net(**server_options: Any) -> AsyncIterator[Net]:
    async with contextlib.AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(open_host(bytes([i + 1]) * 32)) for i in range(3)]
        server, client, rogue = hosts
        net = Net(server, client, rogue, PayloadStore(max_total_bytes=256 * MiB))
        options = {"serve_timeout": SERVE_TIMEOUT, **server_options}
        net.handler = install_update_protocol(
            server,
            net.store,
            limits=Limits(),
            on_served=lambda peer, digest, n: net.served.append((peer, n)),
            **options,
        )
        for target in (server, rogue):
            await connect(client, listen_addrs(target)[0], timeout=5)
        await connect(rogue, listen_addrs(server)[0], timeout=5)
        yield net


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    async with open_net() as n:
        yield n


# ---------------------------------------------------------------------------- store


def test_store_evicts_oldest_to_fit_budget() -> None:
    store = PayloadStore(max_total_bytes=10)
    store.put(b"a", b"1234")
    store.put(b"b", b"5678")
    store.put(b"c", b"90ab")  # 12 bytes > 10: "a" goes
    assert store.get(b"a") is None
    assert store.get(b"b") == b"5678"
    assert store.total_bytes == 8
    store.put(b"big", b"x" * 11)  # above the whole budget: not stored, nothing evicted
    assert store.get(b"big") is None
    assert len(store) == 2
    store.discard(b"b")
    store.discard(b"unknown")
    assert store.total_bytes == 4


# ---------------------------------------------------------------------------- honest


@pytest.mark.parametrize("size", [1_000_000, 50_000_000])
async def test_round_trip_returns_exact_payload(net: Net, size: int) -> None:
    payload = os.urandom(size)
    net.store.put(sha(payload), payload)
    got = await fetch_payload(
        net.client, net.server_id, sha(payload), max_size=size, timeout=FETCH_TIMEOUT
    )
    assert got == payload
    # Counted once the server's write returns: maybe after we have read the reply.
    await wait_for(lambda: net.served == [(net.client.get_id().to_string(), size)])


async def test_empty_payload_round_trips(net: Net) -> None:
    net.store.put(sha(b""), b"")
    got = await fetch_payload(net.client, net.server_id, sha(b""), max_size=0, timeout=5)
    assert got == b""


async def test_unknown_digest_is_not_found(net: Net) -> None:
    with pytest.raises(PayloadNotFound):
        await fetch_payload(net.client, net.server_id, sha(b"nope"), max_size=MiB, timeout=5)
    await net.honest_round_trip()


async def test_payload_above_client_cap_is_refused_by_server(net: Net) -> None:
    payload = os.urandom(2 * MiB)
    net.store.put(sha(payload), payload)
    with pytest.raises(PayloadTooLarge, match=str(2 * MiB)):
        await fetch_payload(net.client, net.server_id, sha(payload), max_size=MiB, timeout=5)
    assert net.served == []
    await net.honest_round_trip()


async def test_peer_without_connection_is_unreachable(net: Net) -> None:
    stranger = ID.from_pubkey(_other_key()).to_string()
    with pytest.raises(PeerUnreachable):
        await fetch_payload(net.client, stranger, sha(b"x"), max_size=MiB, timeout=5)


def _other_key() -> Any:
    from libp2p.crypto.secp256k1 import create_new_key_pair

    return create_new_key_pair(bytes([9]) * 32).public_key


# ---------------------------------------------------------------------------- hostile servers

BODY = os.urandom(300_000)


async def _read_request(stream: Any) -> bytes:
    data = b""
    while len(data) < 41:
        data += await stream.read(41 - len(data))
    return data


def _server_claiming(length: int, status: int = 0) -> Handler:
    async def handler(stream: Any) -> None:
        await _read_request(stream)
        await stream.write(STATUS.pack(status, length))
        await trio.sleep_forever()  # never sends the body

    return handler


async def _short_body(stream: Any) -> None:
    await _read_request(stream)
    await stream.write(STATUS.pack(0, len(BODY)) + BODY[: len(BODY) // 2])
    await stream.close()


async def _stall(stream: Any) -> None:
    await _read_request(stream)
    await trio.sleep_forever()


async def _reset_mid_body(stream: Any) -> None:
    await _read_request(stream)
    await stream.write(STATUS.pack(0, len(BODY)) + BODY[:100_000])
    await stream.reset()


async def _garbage_status(stream: Any) -> None:
    await _read_request(stream)
    await stream.write(b"\xfe" + os.urandom(40))
    await stream.close()


async def _wrong_body(stream: Any) -> None:
    await _read_request(stream)
    await stream.write(STATUS.pack(0, len(BODY)) + os.urandom(len(BODY)))
    await stream.close()


async def _trailing_bytes(stream: Any) -> None:
    await _read_request(stream)
    await stream.write(STATUS.pack(0, len(BODY)) + BODY + b"extra")
    await stream.close()


async def _short_header(stream: Any) -> None:
    await _read_request(stream)
    await stream.write(b"\x00\x00\x00")
    await stream.close()


HOSTILE_SERVERS = {
    "short_body_then_eof": (_short_body, ProtocolViolation),
    "stall": (_stall, TransferTimeout),
    "header_then_stall": (_server_claiming(len(BODY)), TransferTimeout),
    "reset_mid_body": (_reset_mid_body, ProtocolViolation),
    "garbage_status": (_garbage_status, ProtocolViolation),
    "sha256_mismatch": (_wrong_body, TamperedPayload),
    "trailing_bytes": (_trailing_bytes, ProtocolViolation),
    "short_header": (_short_header, ProtocolViolation),
    "claims_100_GB": (_server_claiming(100 * 10**9), PayloadTooLarge),
    "busy": (_server_claiming(0, status=3), TransferError),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SERVERS))
async def test_hostile_server_raises_transfer_error(net: Net, case: str) -> None:
    handler, expected = HOSTILE_SERVERS[case]
    net.rogue.set_stream_handler(PROTOCOL_ID, handler)
    rogue_id = net.rogue.get_id().to_string()
    with trio.fail_after(HOSTILE_TIMEOUT + 3), pytest.raises(expected) as caught:
        await fetch_payload(
            net.client, rogue_id, sha(BODY), max_size=len(BODY), timeout=HOSTILE_TIMEOUT
        )
    assert isinstance(caught.value, TransferError)
    await net.honest_round_trip()


async def test_huge_declared_length_is_refused_before_reading(net: Net) -> None:
    # The rogue claims 100 GB and then stalls: PayloadTooLarge (not a timeout, not a
    # MemoryError) shows the length was judged before any body read or allocation.
    net.rogue.set_stream_handler(PROTOCOL_ID, _server_claiming(100 * 10**9))
    rogue_id = net.rogue.get_id().to_string()
    start = trio.current_time()
    with pytest.raises(PayloadTooLarge, match="100000000000"):
        await fetch_payload(net.client, rogue_id, sha(BODY), max_size=256 * MiB, timeout=5)
    assert trio.current_time() - start < 4


# ---------------------------------------------------------------------------- hostile clients


async def _raw_stream(net: Net) -> Any:
    return await net.rogue.new_stream(ID.from_base58(net.server_id), [PROTOCOL_ID])


async def _read_all_until_error(stream: Any) -> bytes:
    """Return what the server sent before ending or resetting the stream."""
    received = b""
    with trio.fail_after(SERVE_TIMEOUT + 3):
        while True:
            try:
                received += await stream.read(1 << 16)
            except (StreamEOF, StreamReset, StreamError):
                return received


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage" * 10,  # longer than a request
        b"\x07" + bytes(40),  # unknown version
        b"\x01" + bytes(10),  # short request, then FIN
    ],
    ids=["long_garbage", "bad_version", "short"],
)
async def test_malformed_request_gets_no_reply(net: Net, request_bytes: bytes) -> None:
    payload = b"secret payload"
    net.store.put(sha(payload), payload)
    stream = await _raw_stream(net)
    await stream.write(request_bytes)
    await stream.close_write()
    assert await _read_all_until_error(stream) == b""
    await net.honest_round_trip()


async def test_request_without_close_is_dropped_at_request_deadline(net: Net) -> None:
    payload = b"p" * 100
    net.store.put(sha(payload), payload)
    stream = await _raw_stream(net)
    await stream.write(struct.pack(">B32sQ", 1, sha(payload), 100))  # valid, but no FIN
    assert await _read_all_until_error(stream) == b""
    await net.honest_round_trip()


async def test_client_vanishing_mid_request_leaves_server_serving(net: Net) -> None:
    stream = await _raw_stream(net)
    await stream.write(b"\x01" + bytes(10))
    await stream.reset()
    await net.honest_round_trip()
    await wait_for(lambda: [n for _, n in net.served] == [64 * 1024])


async def _hold_slot_without_reading(net: Net, size: int) -> Any:
    """Request a big payload, read only the reply header, then never read again."""
    payload = os.urandom(size)
    net.store.put(sha(payload), payload)
    stream = await _raw_stream(net)
    await stream.write(struct.pack(">B32sQ", 1, sha(payload), size))
    await stream.close_write()
    header = await stream.read(STATUS.size)
    assert STATUS.unpack(header) == (0, size)  # the server is now writing the body
    return stream


async def test_reader_that_never_reads_is_freed_by_write_deadline() -> None:
    async with open_net(max_concurrent=1, max_queued=4) as net:
        await _hold_slot_without_reading(net, 24 * MiB)
        stuck = net.rogue.get_id().to_string()
        assert net.handler.serving == {stuck: 1}  # a payload is moving to it: busy, alive
        small = b"s" * 1000
        net.store.put(sha(small), small)
        # The only slot is held by the stuck reply: a short fetch times out in the queue.
        with pytest.raises(TransferTimeout):
            await fetch_payload(net.client, net.server_id, sha(small), max_size=1000, timeout=0.2)
        # Once the write deadline frees the slot, the server serves others again.
        got = await fetch_payload(
            net.client, net.server_id, sha(small), max_size=1000, timeout=SERVE_TIMEOUT + 5
        )
        assert got == small
        await net.honest_round_trip(size=4 * MiB)
        await wait_for(lambda: not net.handler.serving)  # nothing moving: nobody busy


async def test_full_queue_answers_busy() -> None:
    async with open_net(max_concurrent=1, max_queued=0) as net:
        await _hold_slot_without_reading(net, 24 * MiB)
        net.store.put(sha(b"x"), b"x")
        with pytest.raises(PeerBusy):
            await fetch_payload(net.client, net.server_id, sha(b"x"), max_size=10, timeout=5)
        # Answers that move no payload need no slot: still prompt while the slot is held.
        with trio.fail_after(2), pytest.raises(PayloadNotFound):
            await fetch_payload(net.client, net.server_id, sha(b"?"), max_size=10, timeout=5)


class ExplodingStream:
    """A stream whose every operation fails the way a broken library might."""

    def __init__(self, error: Exception) -> None:
        self.error, self.resets = error, 0

    async def read(self, n: int | None = None) -> bytes:
        raise self.error

    async def reset(self) -> None:
        self.resets += 1
        raise self.error


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), StreamReset(), UnicodeDecodeError("utf-8", b"", 0, 1, "x")]
)
async def test_handler_never_raises_into_libp2p(error: Exception) -> None:
    # Even without p2pfl.net.hardening, a raising handler would stop a stock host.
    host = FakeHost()
    install_update_protocol(host, PayloadStore(max_total_bytes=10), limits=Limits())
    stream = ExplodingStream(error)
    await host.handlers[PROTOCOL_ID](stream)  # returns normally
    assert stream.resets == 1


class FakeHost:
    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def set_stream_handler(self, protocol: str, handler: Handler) -> None:
        self.handlers[protocol] = handler


# ---------------------------------------------------------------------------- tuning

STOCK_PEER = """
import hashlib, sys, trio
from p2pfl.config import Limits
from p2pfl.net import patches
patches.disable()
from p2pfl.net.host import connect, listen_addrs, open_host
from p2pfl.net.transfer import PayloadStore, fetch_payload, install_update_protocol

async def main():
    payload = bytes(range(256)) * 40_000  # ~10 MB: many frames and Noise messages
    store = PayloadStore(max_total_bytes=len(payload))
    store.put(hashlib.sha256(payload).digest(), payload)
    async with open_host(bytes([7]) * 32) as host:
        install_update_protocol(host, store, limits=Limits())
        knobs = ",".join(patches.applied()) or "stock"
        print(listen_addrs(host)[0], hashlib.sha256(payload).hexdigest(), knobs, flush=True)
        addr, digest, size = (await trio.to_thread.run_sync(sys.stdin.readline)).split()
        peer = await connect(host, addr, timeout=10)
        got = await fetch_payload(host, peer, bytes.fromhex(digest), max_size=int(size), timeout=30)
        print("stock pulled", len(got), flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)

trio.run(main)
"""


async def test_tuned_and_stock_peers_interoperate(net: Net) -> None:
    # This process runs with every patch (open_host applied them); the child with none.
    assert set(patches.applied()) == {n for n, p in patches.PATCHES.items() if not p.per_host}
    payload = os.urandom(12 * MiB + 7)
    net.store.put(sha(payload), payload)
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", STOCK_PEER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("PY_YAMUX_")},
    )
    try:
        assert child.stdin is not None
        assert child.stdout is not None
        lines = TextLines(child.stdout)
        with trio.fail_after(30):
            addr, digest, knobs = (await lines.next()).split()
            assert knobs == "stock"
            peer = await connect(net.client, addr, timeout=10)
            stock_payload = await fetch_payload(
                net.client, peer, bytes.fromhex(digest), max_size=20 * MiB, timeout=20
            )
            assert sha(stock_payload).hex() == digest  # stock writer -> tuned reader
            await connect(net.server, addr, timeout=10)
            line = f"{listen_addrs(net.server)[0]} {sha(payload).hex()} {len(payload)}\n"
            await child.stdin.send_all(line.encode())
            assert await lines.next() == f"stock pulled {len(payload)}"  # tuned -> stock
            await child.stdin.send_all(b"bye\n")
            assert await child.wait() == 0
    finally:
        if child.returncode is None:
            child.kill()
            with trio.CancelScope(shield=True):
                await child.wait()


class TextLines:
    """Read text lines from a trio receive stream."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.pending = stream, b""

    async def next(self) -> str:
        while b"\n" not in self.pending:
            chunk = await self.stream.receive_some()
            if not chunk:
                raise EOFError("child exited")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode().strip()


def test_patches_apply_is_idempotent() -> None:
    before = patches.applied()
    patches.apply()
    patches.apply(["yamux_frame"])
    assert patches.applied() == before
