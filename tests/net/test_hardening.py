"""Every input that kills a stock py-libp2p 0.8.1 node, thrown at a hardened p2pfl host.

Each test: a hostile peer sends one killer input to ``ours``, then a *fresh* peer must
still be able to connect, complete a stream round trip and exchange a gossip message
with ``ours`` (``assert_alive``). Both hosts run in this one trio process.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12
from libp2p.utils.varint import encode_delim, encode_varint_prefixed

from p2pfl.config import Limits
from p2pfl.net import patches
from p2pfl.net.gossip import PUBLISH_THRESHOLD, Gossip, open_gossip
from p2pfl.net.host import connect, listen_addrs, open_host
from p2pfl.net.patches import streams
from tests.net.polling import wait_for

ECHO = TProtocol("/test/echo/1.0.0")
RAISE = TProtocol("/test/raise/1.0.0")
RAISE_EOF = TProtocol("/test/raise-eof/1.0.0")
HOLD = TProtocol("/test/hold/1.0.0")
CAP = 4  # inbound streams per peer on ``ours``
NON_UTF8 = b"\xff\xfe\xfd/evil"


def strict_validator(origin: str, data: bytes) -> bytes:
    """Accept only b'ok…'; anything else raises a non-ValidationError, like cbor2 does."""
    if not data.startswith(b"ok"):
        raise TypeError(f"hostile bytes {data[:8]!r}")
    return data


@dataclass
class Ours:
    host: IHost
    gossip: Gossip


async def echo(stream: INetStream) -> None:
    data = await stream.read(1024)
    await stream.write(data)
    await stream.close()


async def raise_value_error(stream: INetStream) -> None:
    raise ValueError("handler bug")


async def raise_stream_eof(stream: INetStream) -> None:
    raise StreamEOF("handler sees an early EOF")


async def hold(stream: INetStream) -> None:
    await trio.sleep_forever()


@asynccontextmanager
async def gossiping_host(validator=strict_validator) -> AsyncIterator[Ours]:  # type: ignore[no-untyped-def]
    async with (
        open_host(os.urandom(32), max_inbound_streams_per_peer=CAP) as host,
        open_gossip(host, network_id="t", limits=Limits(), validator=validator) as gossip,
    ):
        for protocol, handler in ((ECHO, echo), (RAISE, raise_value_error),
                                  (RAISE_EOF, raise_stream_eof), (HOLD, hold)):
            host.set_stream_handler(protocol, handler)
        yield Ours(host, gossip)


async def wait_mesh(a: Gossip, b: Gossip) -> None:
    await wait_for(lambda: b.host.get_id().to_string() in a.subscribed_peers()
                   and a.host.get_id().to_string() in b.subscribed_peers())


async def echo_round_trip(client: IHost, server: IHost) -> None:
    with trio.fail_after(5):
        stream = await client.new_stream(server.get_id(), [ECHO])
        await stream.write(b"ping")
        assert await stream.read(1024) == b"ping"
        await stream.close()


async def assert_alive(ours: Ours) -> None:
    """A fresh peer connects, round-trips a stream and gossips both ways with ``ours``."""
    async with gossiping_host() as fresh:
        await connect(fresh.host, listen_addrs(ours.host)[0], timeout=5)
        await echo_round_trip(fresh.host, ours.host)
        await wait_mesh(ours.gossip, fresh.gossip)
        await fresh.gossip.publish(b"ok from fresh")
        await ours.gossip.publish(b"ok from ours")
        with trio.fail_after(5):
            got = await ours.gossip.announcements().receive()
            assert got.data == b"ok from fresh"
            assert got.origin == fresh.host.get_id().to_string()
            assert (await fresh.gossip.announcements().receive()).data == b"ok from ours"



@pytest.fixture
async def ours() -> AsyncIterator[Ours]:
    async with gossiping_host() as node:
        yield node


@pytest.fixture
async def hostile() -> AsyncIterator[IHost]:
    async with open_host(os.urandom(32)) as host:
        yield host


async def test_patches_are_named_idempotent_and_pinned(ours: Ours) -> None:
    assert {"multistream_utf8", "pubsub_decode_error"} <= set(patches.apply())
    guarded = ours.host.get_network().common_stream_handler
    streams.guard_dispatcher(ours.host)
    assert ours.host.get_network().common_stream_handler is guarded
    assert patches.version_ok()


async def test_non_utf8_protocol_id_on_a_stream(ours: Ours, hostile: IHost) -> None:
    await connect(hostile, listen_addrs(ours.host)[0], timeout=5)
    stream = await hostile.get_network().new_stream(ours.host.get_id())  # no negotiation
    before = streams.COUNTERS.bad_protocol_ids
    await stream.write(encode_delim(b"/multistream/1.0.0") + encode_delim(NON_UTF8))
    await wait_for(lambda: streams.COUNTERS.bad_protocol_ids > before)
    await assert_alive(ours)
    await echo_round_trip(hostile, ours.host)  # the hostile connection itself still works


async def test_non_utf8_protocol_id_on_a_raw_tcp_connection(ours: Ours) -> None:
    port = int(ours.host.get_addrs()[0].value_for_protocol("tcp"))
    before = streams.COUNTERS.bad_protocol_ids
    with trio.fail_after(5):
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        async with sock:
            await sock.send_all(encode_delim(b"/multistream/1.0.0") + encode_delim(NON_UTF8))
            await wait_for(lambda: streams.COUNTERS.bad_protocol_ids > before)
    await assert_alive(ours)


async def test_invalid_protobuf_frame_on_meshsub(ours: Ours, hostile: IHost) -> None:
    await connect(hostile, listen_addrs(ours.host)[0], timeout=5)
    stream = await hostile.new_stream(ours.host.get_id(), [PROTOCOL_ID_V12])
    before = streams.COUNTERS.bad_pubsub_frames
    # Field 1 (subscriptions), length-delimited, declaring far more bytes than follow.
    await stream.write(encode_varint_prefixed(b"\x0a\xff\xff\xff\x0f\x01"))
    await wait_for(lambda: streams.COUNTERS.bad_pubsub_frames > before)
    await assert_alive(ours)


async def open_write_read(client: IHost, server: IHost, protocol: TProtocol) -> bytes:
    stream = await client.new_stream(server.get_id(), [protocol])
    await stream.write(b"x")
    return await stream.read(1)


@pytest.mark.parametrize("protocol", [RAISE, RAISE_EOF])
async def test_handler_that_raises(ours: Ours, hostile: IHost, protocol: TProtocol) -> None:
    await connect(hostile, listen_addrs(ours.host)[0], timeout=5)
    for _ in range(3):
        # The reset may race the negotiation ack, so either call may fail.
        with trio.fail_after(5), pytest.raises(Exception):  # noqa: B017 - reset or EOF
            await open_write_read(hostile, ours.host, protocol)
    assert streams.host_counters(ours.host).contained_errors == 3
    # The same connection still accepts new streams (a reset/EOF-type error escaping a
    # stock handler ends the connection's accept loop silently).
    await echo_round_trip(hostile, ours.host)
    await assert_alive(ours)


async def test_validator_that_raises_and_penalises_the_forger(ours: Ours) -> None:
    async with gossiping_host(validator=lambda origin, data: data) as forger:
        await connect(forger.host, listen_addrs(ours.host)[0], timeout=5)
        await wait_mesh(ours.gossip, forger.gossip)
        for i in range(3):
            await forger.gossip.publish(b"forged %d" % i)
        forger_id = forger.host.get_id().to_string()
        await wait_for(lambda: ours.gossip.counters.rejected >= 3)
        assert ours.gossip.score(forger_id) < PUBLISH_THRESHOLD  # gated and graylisted
        # Gated now: even a valid message from the forger is dropped unvalidated.
        await forger.gossip.publish(b"ok but from a forger")
        await assert_alive(ours)
        assert ours.gossip.counters.rejected == 3
        assert all(a.origin != forger_id for a in _drain(ours.gossip))


def _drain(gossip: Gossip) -> list:  # type: ignore[type-arg]
    out = []
    while True:
        try:
            out.append(gossip.announcements().receive_nowait())
        except trio.WouldBlock:
            return out


async def test_inbound_streams_per_peer_are_capped(ours: Ours, hostile: IHost) -> None:
    await connect(hostile, listen_addrs(ours.host)[0], timeout=5)
    guarded = ours.host.get_network().common_stream_handler
    opened = []
    with trio.fail_after(10):
        for _ in range(CAP + 3):
            with suppress(Exception):
                opened.append(await hostile.new_stream(ours.host.get_id(), [HOLD]))
        peer = hostile.get_id().to_string()
        assert guarded.active[peer] == CAP  # type: ignore[attr-defined]
        assert streams.host_counters(ours.host).refused_streams == 3
    for stream in opened:
        await stream.reset()
    await assert_alive(ours)


@pytest.mark.parametrize(
    "request_bytes",
    [b"\xff\xfe not utf-8\n", b"p2pfl-pex/1 other-network\n", b"p2pfl-pex/1 t\n" + b"x" * 20_000],
)
async def test_peer_exchange_refuses_garbage(ours: Ours, hostile: IHost, request_bytes: bytes) -> None:
    from p2pfl.config import NetConfig
    from p2pfl.net.discovery import PROTOCOL_ID as PEX
    from p2pfl.net.discovery import Neighbourhood, read_bounded

    neighbourhood = Neighbourhood(ours.host, network_id="t", config=NetConfig())
    await connect(hostile, listen_addrs(ours.host)[0], timeout=5)
    stream = await hostile.new_stream(ours.host.get_id(), [PEX])
    with trio.fail_after(5):
        try:
            await stream.write(request_bytes)
            await stream.close_write()  # type: ignore[attr-defined]
            reply = await read_bounded(stream, 1 << 16)
        except Exception:  # reset: the expected refusal
            reply = b""
    # No peers handed to a stranger; another network's node learns only which network we are.
    assert reply == (b"p2pfl-pex/1 t\n" if request_bytes == b"p2pfl-pex/1 other-network\n" else b"")
    assert hostile.get_id().to_string() not in neighbourhood.book.peers
    await assert_alive(ours)
