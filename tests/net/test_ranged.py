"""``/p2pfl/update/1.1.0`` over real libp2p hosts on loopback: pieces, hostile peers, 1.0.0 peers.

Time is real (the network is); no test sleeps to synchronise. Hostile servers stall or
lie right after reading the request; deadlines are small so those cases end fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from p2pfl.config import Limits, MiB, NetConfig
from p2pfl.errors import (
    PayloadNotFound,
    PayloadTooLarge,
    PeerUnreachable,
    ProtocolViolation,
    TransferError,
    TransferTimeout,
)
from p2pfl.net import ranged as ranged_module
from p2pfl.net.host import connect, listen_addrs, open_host
from p2pfl.net.libp2p_transport import open_libp2p_transport
from p2pfl.net.ranged import (
    PIECE_BYTES,
    RANGED_PROTOCOL_ID,
    REQUEST,
    bitfield,
    fetch_have,
    fetch_piece_map,
    fetch_range,
    install_ranged_protocol,
    piece_map,
    unpack_bitfield,
)
from p2pfl.net.session import SESSION_PROTOCOL_ID
from p2pfl.net.transfer import PayloadStore, fetch_checked_payload, install_update_protocol
from tests.net.polling import wait_for

PAYLOAD = os.urandom(3 * PIECE_BYTES + 777)  # 4 pieces, the last one short
DIGEST = hashlib.sha256(PAYLOAD).digest()
TIMEOUT = 10.0
HOSTILE_TIMEOUT = 0.5
STATUS = struct.Struct(">BQ")


class Hosts:
    def __init__(self, server: Any, client: Any, rogue: Any, old: Any) -> None:
        self.server, self.client, self.rogue, self.old = server, client, rogue, old
        self.ranges: list[int] = []
        self.partials: dict[bytes, Any] = {}  # the server's pulls in progress
        self.pulled: set[bytes] = set()  # payloads the server pulled (not its own)
        self.store: PayloadStore | None = None  # the 1.1.0 server's

    def id(self, host: Any) -> str:
        return str(host.get_id().to_string())


@pytest.fixture
async def hosts() -> AsyncIterator[Hosts]:
    """A 1.1.0 server, a client, a rogue (free for hostile handlers), a 1.0.0-only server."""
    async with contextlib.AsyncExitStack() as stack:
        made = [await stack.enter_async_context(open_host(bytes([i + 1]) * 32)) for i in range(4)]
        net = Hosts(*made)
        for server, ranged in ((net.server, True), (net.old, False)):
            store = PayloadStore(max_total_bytes=64 * MiB)
            store.put(DIGEST, PAYLOAD)
            served = install_update_protocol(server, store, limits=Limits(), serve_timeout=2.0)
            if ranged:
                install_ranged_protocol(server, served, on_range=lambda p, d, n: net.ranges.append(n),
                                        partials=net.partials, pulled=net.pulled.__contains__)
                net.store = store
        for target in (net.server, net.rogue, net.old):
            await connect(net.client, listen_addrs(target)[0], timeout=5)
        yield net


def split(joined: bytes) -> list[bytes]:
    return [joined[i : i + 32] for i in range(0, len(joined), 32)]


async def test_piece_map_and_ranges_rebuild_the_payload(hosts: Hosts) -> None:
    server = hosts.id(hosts.server)
    hashes = await fetch_piece_map(hosts.client, server, DIGEST, size=len(PAYLOAD), timeout=TIMEOUT)
    assert hashes == split(piece_map(PAYLOAD))
    got = [
        *await fetch_range(hosts.client, server, DIGEST, size=len(PAYLOAD), first=0, count=3, timeout=TIMEOUT),
        *await fetch_range(hosts.client, server, DIGEST, size=len(PAYLOAD), first=3, count=1, timeout=TIMEOUT),
    ]
    assert [len(p) for p in got] == [PIECE_BYTES] * 3 + [777]
    assert b"".join(got) == PAYLOAD
    await wait_for(lambda: hosts.ranges == [32 * 4, 3 * PIECE_BYTES, 777])  # counted once written


async def test_unknown_digest_is_not_found(hosts: Hosts) -> None:
    with pytest.raises(PayloadNotFound):
        await fetch_piece_map(hosts.client, hosts.id(hosts.server), bytes(32), size=10, timeout=TIMEOUT)


async def test_range_past_the_payload_is_refused(hosts: Hosts) -> None:
    # The client believes the payload is bigger than it is (its header lied, say).
    with pytest.raises(TransferError, match="BAD_RANGE"):
        await fetch_range(hosts.client, hosts.id(hosts.server), DIGEST, size=8 * PIECE_BYTES,
                          first=5, count=2, timeout=TIMEOUT)


def test_range_outside_the_payload_is_a_caller_bug() -> None:
    async def main() -> None:  # refused before any I/O: no host needed
        await fetch_range(Any, "x", DIGEST, size=PIECE_BYTES, first=0, count=2, timeout=1)

    with pytest.raises(ValueError):
        trio.run(main)


async def _raw_reply(hosts: Hosts, request: bytes) -> bytes:
    stream = await hosts.client.new_stream(hosts.server.get_id(), [RANGED_PROTOCOL_ID])
    await stream.write(request)
    await stream.close_write()
    data = b""
    with trio.fail_after(TIMEOUT), contextlib.suppress(Exception):
        while chunk := await stream.read(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    "request_bytes",
    [
        REQUEST.pack(1, 1, DIGEST, 0, 0),  # version of 1.0.0
        REQUEST.pack(2, 4, DIGEST, 0, 0),  # unknown op
        REQUEST.pack(2, 3, DIGEST, 0, 1),  # HAVE with a range
        REQUEST.pack(2, 1, DIGEST, 1, 0),  # PIECES with a range
        REQUEST.pack(2, 2, DIGEST, 0, 1) + b"x",  # longer than 42 bytes
        REQUEST.pack(2, 2, DIGEST, 0, 1)[:20],  # short
    ],
)
async def test_malformed_request_gets_no_reply(hosts: Hosts, request_bytes: bytes) -> None:
    assert await _raw_reply(hosts, request_bytes) == b""
    await fetch_piece_map(hosts.client, hosts.id(hosts.server), DIGEST, size=len(PAYLOAD), timeout=TIMEOUT)


async def test_too_many_pieces_in_one_request_is_bad_range(hosts: Hosts) -> None:
    reply = await _raw_reply(hosts, REQUEST.pack(2, 2, DIGEST, 0, 17))
    assert STATUS.unpack(reply) == (5, len(PAYLOAD))


# ---------------------------------------------------------------------------- HAVE and pulls in progress


class InProgress:
    """A pull in progress as the server sees it: ``size``, ``hashes``, ``pieces``."""

    def __init__(self, payload: bytes, held: set[int]) -> None:
        self.size = len(payload)
        self.hashes = split(piece_map(payload))
        self.pieces = [payload[i * PIECE_BYTES : (i + 1) * PIECE_BYTES] if i in held else None
                       for i in range(len(self.hashes))]


def test_bitfields_round_trip_and_refuse_pad_bits() -> None:
    bits = [True, False, True] + [False] * 6 + [True]
    assert bitfield(bits) == bytes([0b10100000, 0b01000000])
    assert unpack_bitfield(bitfield(bits), 10) == bits
    with pytest.raises(ProtocolViolation):
        unpack_bitfield(bytes([0, 0b00100000]), 10)  # bit 10 of 10
    with pytest.raises(ProtocolViolation):
        unpack_bitfield(bytes(3), 10)  # one byte too many


async def test_have_of_a_whole_payload_is_every_piece(hosts: Hosts) -> None:
    held = await fetch_have(hosts.client, hosts.id(hosts.server), DIGEST, size=len(PAYLOAD), timeout=TIMEOUT)
    assert held == [True] * 4


async def test_a_pull_in_progress_serves_what_it_has_and_not_yet_the_rest(hosts: Hosts) -> None:
    payload = os.urandom(3 * PIECE_BYTES + 5)
    digest = hashlib.sha256(payload).digest()
    hosts.partials[digest] = InProgress(payload, held={1, 2})
    server, size = hosts.id(hosts.server), len(payload)
    assert await fetch_have(hosts.client, server, digest, size=size, timeout=TIMEOUT) == [False, True, True, False]
    assert await fetch_piece_map(hosts.client, server, digest, size=size, timeout=TIMEOUT) == split(piece_map(payload))
    got = await fetch_range(hosts.client, server, digest, size=size, first=1, count=2, timeout=TIMEOUT)
    assert b"".join(got) == payload[PIECE_BYTES : 3 * PIECE_BYTES]
    with pytest.raises(PayloadNotFound):  # piece 3 is not in yet
        await fetch_range(hosts.client, server, digest, size=size, first=2, count=2, timeout=TIMEOUT)
    with pytest.raises(TransferError, match="BAD_RANGE"):
        await fetch_range(hosts.client, server, digest, size=8 * PIECE_BYTES, first=3, count=2, timeout=TIMEOUT)
    del hosts.partials[digest]  # the pull ended (and nobody serves it whole)
    with pytest.raises(PayloadNotFound):
        await fetch_have(hosts.client, server, digest, size=size, timeout=TIMEOUT)


@pytest.mark.parametrize("own_first_for", [0.0, 600.0])
async def test_pieces_of_pulled_payloads_wait_for_our_own(
    hosts: Hosts, monkeypatch: pytest.MonkeyPatch, own_first_for: float
) -> None:
    # Right after a RANGE of its own update, a node offers no pieces of what it pulled
    # (held whole, or in progress): its uplink carries its own update first.
    monkeypatch.setattr(ranged_module, "OWN_FIRST_FOR", own_first_for)
    own = os.urandom(2 * PIECE_BYTES)
    assert hosts.store is not None
    hosts.store.put(hashlib.sha256(own).digest(), own)
    hosts.pulled.add(DIGEST)  # held: pulled and verified
    partial = os.urandom(2 * PIECE_BYTES)
    hosts.partials[hashlib.sha256(partial).digest()] = InProgress(partial, held={0, 1})
    server, c = hosts.id(hosts.server), hosts.client
    got = await fetch_range(c, server, hashlib.sha256(own).digest(), size=len(own), first=0, count=2, timeout=TIMEOUT)
    assert b"".join(got) == own
    waiting = own_first_for > 0
    for digest, size in ((DIGEST, len(PAYLOAD)), (hashlib.sha256(partial).digest(), len(partial))):
        have = await fetch_have(c, server, digest, size=size, timeout=TIMEOUT)
        assert have == [not waiting] * len(have)
        if waiting:
            with pytest.raises(PayloadNotFound):  # "not yet": the puller asks HAVE again later
                await fetch_range(c, server, digest, size=size, first=0, count=1, timeout=TIMEOUT)
        else:
            assert len(await fetch_range(c, server, digest, size=size, first=0, count=1, timeout=TIMEOUT)) == 1
    # Our own update is never held back, nor a piece map.
    assert await fetch_have(c, server, hashlib.sha256(own).digest(), size=len(own), timeout=TIMEOUT) == [True] * 2
    assert len(await fetch_piece_map(c, server, DIGEST, size=len(PAYLOAD), timeout=TIMEOUT)) == 4


async def test_a_peer_of_an_earlier_release_refuses_have(hosts: Hosts) -> None:
    async def earlier(stream: Any) -> None:  # 1.1.0 of session 9: an unknown op is reset
        await _request(stream)
        await stream.reset()

    hosts.rogue.set_stream_handler(RANGED_PROTOCOL_ID, earlier)
    with trio.fail_after(TIMEOUT), pytest.raises(TransferError):
        await fetch_have(hosts.client, hosts.id(hosts.rogue), DIGEST, size=len(PAYLOAD), timeout=TIMEOUT)


# ---------------------------------------------------------------------------- hostile holders


async def _request(stream: Any) -> None:
    data = b""
    while len(data) < REQUEST.size:
        data += await stream.read(REQUEST.size - len(data))


def _declares(length: int, body: bytes = b"") -> Any:
    async def handler(stream: Any) -> None:
        await _request(stream)
        await stream.write(STATUS.pack(0, length) + body)
        await trio.sleep_forever()  # no (more) body: only a length check ends this early

    return handler


async def _stall(stream: Any) -> None:
    await _request(stream)
    await trio.sleep_forever()


async def _trailing(stream: Any) -> None:
    await _request(stream)
    await stream.write(STATUS.pack(0, PIECE_BYTES) + bytes(PIECE_BYTES) + b"more")
    await stream.close()


async def _short(stream: Any) -> None:
    await _request(stream)
    await stream.write(STATUS.pack(0, PIECE_BYTES) + bytes(1000))
    await stream.close()


HOSTILE = {
    "oversize_declared": (_declares(100 * 10**9), PayloadTooLarge),
    "one_byte_more_declared": (_declares(PIECE_BYTES + 1), PayloadTooLarge),
    "undersize_declared": (_declares(PIECE_BYTES - 1), ProtocolViolation),
    "stall": (_stall, TransferTimeout),
    "trailing_bytes": (_trailing, ProtocolViolation),
    "short_body": (_short, ProtocolViolation),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_holder_fails_the_request_fast(hosts: Hosts, case: str) -> None:
    handler, expected = HOSTILE[case]
    hosts.rogue.set_stream_handler(RANGED_PROTOCOL_ID, handler)
    with trio.fail_after(HOSTILE_TIMEOUT + 3), pytest.raises(expected):
        await fetch_range(hosts.client, hosts.id(hosts.rogue), DIGEST, size=len(PAYLOAD),
                          first=0, count=1, timeout=HOSTILE_TIMEOUT)


# ---------------------------------------------------------------------------- version negotiation


async def test_a_1_0_only_peer_has_no_piece_map_but_serves_whole(hosts: Hosts) -> None:
    old = hosts.id(hosts.old)
    with pytest.raises(PeerUnreachable):
        await fetch_piece_map(hosts.client, old, DIGEST, size=len(PAYLOAD), timeout=TIMEOUT)
    got = await fetch_checked_payload(hosts.client, old, DIGEST, max_size=len(PAYLOAD), timeout=TIMEOUT)
    assert got.data == PAYLOAD


async def test_new_and_1_0_only_transports_exchange_both_ways() -> None:
    """A node speaking only 1.0.0 pulls from a new one, and the new one from it."""
    payload = os.urandom(2 * PIECE_BYTES + 5)
    digest = hashlib.sha256(payload).digest()
    blamed: list[tuple[str, str]] = []
    async with contextlib.AsyncExitStack() as stack:
        new = await stack.enter_async_context(open_libp2p_transport(
            secret=os.urandom(32), network_id="t", config=NetConfig(fetch_sources=4), limits=Limits(),
            validator=lambda o, d: d))
        boot = NetConfig(bootstrap=tuple(new.listen_addrs), fetch_sources=4)
        old = await stack.enter_async_context(open_libp2p_transport(
            secret=os.urandom(32), network_id="t", config=boot, limits=Limits(),
            validator=lambda o, d: d))
        for protocol in (RANGED_PROTOCOL_ID, SESSION_PROTOCOL_ID):  # as a node of an earlier release
            old.host.remove_stream_handler(protocol)
        old.serve(digest, payload)
        new.serve(digest, payload)
        got = await new.fetch_from_holders(old.peer_id, digest, size=len(payload), holders=list,
                                           blame=lambda p, r: blamed.append((p, r)), timeout=TIMEOUT)
        assert got.data == payload
        # whole, over 1.0.0 (the server counts a reply once written: maybe after we read it)
        await wait_for(lambda: old.pulled_by(digest) == frozenset({new.peer_id}))
        # An old node pulls whole over 1.0.0, whatever the new one also speaks.
        back = await fetch_checked_payload(old.host, new.peer_id, digest, max_size=len(payload),
                                           timeout=TIMEOUT)
        assert back.data == payload
        await wait_for(lambda: new.pulled_by(digest) == frozenset({old.peer_id}))
        # Two new nodes move it in pieces: ranges served, no whole pull.
        newer = await stack.enter_async_context(open_libp2p_transport(
            secret=os.urandom(32), network_id="t", config=boot, limits=Limits(),
            validator=lambda o, d: d))
        before = new.stats().payload_out
        got = await newer.fetch_from_holders(new.peer_id, digest, size=len(payload), holders=list,
                                             blame=lambda p, r: blamed.append((p, r)), timeout=TIMEOUT)
        assert got.data == payload
        await wait_for(lambda: new.stats().payload_out - before == len(payload) + 32 * 3)  # pieces + map
        assert new.pulled_by(digest) == frozenset({old.peer_id})
    assert blamed == []


@pytest.mark.parametrize("holder_lies", [False, True])
async def test_pieces_come_from_author_and_holder_and_a_lying_holder_is_blamed(holder_lies: bool) -> None:
    """16 MiB in 4 chunks: each of the 4 requests (2 per source) takes one chunk at once."""
    payload = os.urandom(16 * PIECE_BYTES)
    digest = hashlib.sha256(payload).digest()
    blamed: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        async def transport(config: NetConfig) -> Any:
            return await stack.enter_async_context(open_libp2p_transport(
                secret=os.urandom(32), network_id="t", config=config, limits=Limits(),
                validator=lambda o, d: d))

        author = await transport(NetConfig())
        holder = await transport(NetConfig(bootstrap=tuple(author.listen_addrs)))
        puller = await transport(NetConfig(bootstrap=(*author.listen_addrs, *holder.listen_addrs),
                                           fetch_sources=4))
        author.serve(digest, payload)
        holder.serve(digest, os.urandom(len(payload)) if holder_lies else payload)  # stores do not check
        got = await puller.fetch_from_holders(
            author.peer_id, digest, size=len(payload), holders=lambda: [holder.peer_id],
            blame=lambda peer, reason: blamed.append(peer), timeout=TIMEOUT)
        assert got.data == payload
        assert holder.stats().payload_out >= 2 * 4 * PIECE_BYTES  # two chunks at least
        assert author.stats().payload_out >= 2 * 4 * PIECE_BYTES
    assert blamed == ([holder.peer_id] if holder_lies else [])


async def test_a_transport_serves_its_pulls_in_progress() -> None:
    payload = os.urandom(2 * PIECE_BYTES + 5)
    digest = hashlib.sha256(payload).digest()
    async with contextlib.AsyncExitStack() as stack:
        puller = await stack.enter_async_context(open_libp2p_transport(
            secret=os.urandom(32), network_id="t", config=NetConfig(fetch_sources=4), limits=Limits(),
            validator=lambda o, d: d))
        other = await stack.enter_async_context(open_libp2p_transport(
            secret=os.urandom(32), network_id="t", config=NetConfig(bootstrap=tuple(puller.listen_addrs),
                                                                    fetch_sources=4),
            limits=Limits(), validator=lambda o, d: d))
        puller.partials[digest] = InProgress(payload, held={0})
        assert await other.have(puller.peer_id, digest, size=len(payload), timeout=TIMEOUT) == [True, False, False]
        got = await other.pieces(puller.peer_id, digest, size=len(payload), first=0, count=1, timeout=TIMEOUT)
        assert got == [payload[:PIECE_BYTES]]
