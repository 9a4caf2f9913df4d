"""Circuit relay v2 and dial-back on loopback (issue 15); real NATs are in tests/netns/test_nat.py.

On loopback every node is reachable, so "behind NAT" is a recorded dial-back answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from libp2p.connection_types import ConnectionType
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeer
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from p2pfl.config import Limits, NetConfig
from p2pfl.core.crypto import Identity, short_id
from p2pfl.errors import P2PFLError, PeerUnreachable, TransferError, TransferTimeout
from p2pfl.net import patches
from p2pfl.net.discovery import PROTOCOL_ID as PEX
from p2pfl.net.discovery import encode_reply
from p2pfl.net.host import connect, listen_addrs, open_host
from p2pfl.net.libp2p_transport import Libp2pTransport, open_libp2p_transport
from p2pfl.net.reach import is_relayed, probe
from p2pfl.net.relay import dial_circuit
from p2pfl.net.relaybook import BROKEN, relay_in, relay_of
from p2pfl.net.transfer import fetch_checked_payload
from p2pfl.net.transport import sha256
from tests.net.polling import wait_for

# A refused stream is reset by its handler: the reset lands while the opener still
# negotiates the protocol (StreamFailure) or at its first read (StreamReset), or, when
# yamux sees the remote close before the reset frame (seen under load), as an end of
# stream with no byte (StreamEOF): in every case the opener gets nothing.
RESET = (StreamFailure, StreamReset, StreamEOF)


@contextlib.asynccontextmanager
async def node(**net: Any) -> AsyncIterator[Libp2pTransport]:
    config = NetConfig(**{"maintenance_interval": 0.2, "dial_timeout": 2.0, **net})
    async with open_libp2p_transport(secret=Identity.generate().secret_bytes(), network_id="t",
                                     config=config, limits=Limits(), validator=lambda o, d: d) as t:
        yield t


async def behind_nat(transport: Libp2pTransport, *, settle: bool = True) -> None:
    """Replace the (loopback: reached) dial-back answers by what a NAT would give, for good.

    ``settle``: first wait for a real answer, so that none in flight overwrites ours.
    """
    reach = transport.relaying.reach
    if settle:
        await wait_for(lambda: reach.state != "unknown")

    async def not_reached(peers: list[str]) -> None:
        for peer in peers:
            reach.record(peer, reached=False)

    reach.check = not_reached  # type: ignore[method-assign]
    await not_reached(sorted(transport.neighbourhood.connected()))
    assert reach.state == "private"


def stay_relayed(transport: Libp2pTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``transport`` from dialling the peers it reaches through a relay directly (on
    loopback they are all dialable). With :data:`STAY_RELAYED`, no hole punching on the
    far end and neighbours enough there (no discovery dials), the only path between it and
    a new peer is its relay's."""
    async def no_upgrade(relayed: object) -> None:
        return None

    monkeypatch.setattr(transport.relaying, "upgrade", no_upgrade)




async def answer_probe(stream: Any) -> None:
    """Answer peer exchange for network "t" with no address (a peer only reachable inbound)."""
    await stream.write(encode_reply("t", []))
    await stream.close()


async def reserve(host: Any, relay: Any) -> Any:
    stream = await host.new_stream(relay, [HOP])
    await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
    return await read_delimited_msg(stream, HopMessage)


async def open_and_read(host: Any, peer: Any, protocol: Any) -> bytes:
    stream = await host.new_stream(peer, [protocol])
    return bytes(await stream.read(1))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Options of a node others reach only through its relay: a dead direct address, no DCUtR.
STAY_RELAYED: dict[str, Any] = {"announce_addrs": (f"/ip4/127.0.0.1/tcp/{closed_port()}",),
                                "hole_punching": False}


class _Address:
    """A transport address that counts how often it is rendered as text."""

    rendered = 0

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        _Address.rendered += 1
        return self.text


class _Conn:
    def __init__(self, *addrs: str) -> None:
        self.addrs = [_Address(a) for a in addrs]

    def get_connection_type(self) -> ConnectionType:
        return ConnectionType.DIRECT

    def get_transport_addresses(self) -> list[_Address]:
        return self.addrs


def test_a_connection_is_judged_once_per_address_list() -> None:
    conn = _Conn("/ip4/10.0.0.1/tcp/4001")
    _Address.rendered = 0
    assert [is_relayed(conn) for _ in range(5)] == [False] * 5
    assert _Address.rendered == 1  # the same list: judged once
    conn.addrs = [_Address("/ip4/10.0.0.2/tcp/4001/p2p/QmRelay/p2p-circuit")]  # new transport info
    assert is_relayed(conn)
    assert not is_relayed(_Conn("/ip4/10.0.0.3/tcp/4001"))  # judged per connection


async def test_dial_back_tells_a_listener_from_a_closed_port() -> None:
    async with node() as relay, node(bootstrap=(relay.listen_addrs[0],)) as peer:
        await wait_for(lambda: relay.relaying.reach.state == "public" == peer.relaying.reach.state)
        port = int(relay.listen_addrs[0].split("/")[4])
        assert await probe("127.0.0.1", port, timeout=2.0)
        assert not await probe("127.0.0.1", closed_port(), timeout=2.0)
        assert relay.stats().reachability == "public"


async def test_a_payload_crosses_a_relay_end_to_end_encrypted(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []
    forward = patches.relay._forward

    async def capture(relay: Any, dst_stream: Any, data: bytes) -> None:
        await forward(relay, dst_stream, data)  # counted once written, like the relay's own count
        seen.append(bytes(data))

    monkeypatch.setattr(patches.relay, "_forward", capture)
    async with (node() as relay, node(bootstrap=(relay.listen_addrs[0],)) as natted,
                open_host(os.urandom(32)) as other):
        await behind_nat(natted)
        other.set_stream_handler(PEX, answer_probe)  # alive to natted, no address to dial back
        await wait_for(lambda: bool(natted.relaying.slots))
        relayed = natted.listen_addrs[0]
        assert relayed == f"{relay.listen_addrs[0]}/p2p-circuit/p2p/{natted.peer_id}"
        assert natted.stats().relays == (relay.peer_id,)
        payload = b"PLAINTEXT-MARKER" * 4096 + os.urandom(1000)
        natted.serve(sha256(payload), payload)
        assert await connect(other, relayed, timeout=5) == natted.peer_id
        [conn] = other.get_network().get_connections(natted.host.get_id())
        assert is_relayed(conn)
        got = await fetch_checked_payload(other, natted.peer_id, sha256(payload), max_size=1 << 20,
                                          timeout=10)
        assert got.data == payload
        await wait_for(lambda: natted.stats().payload_relayed == len(payload))
        assert natted.relayed_peers() == (other.get_id().to_string(),)
        forwarded = b"".join(seen)  # the circuit stays in use (probes): the count only grows
        assert relay.stats().relay_forwarded >= len(forwarded) > len(payload)
        assert b"PLAINTEXT-MARKER" not in forwarded  # Noise between the two ends


async def test_a_reservation_is_booked_for_the_peer_that_asks() -> None:
    async with node() as relay, open_host(os.urandom(32)) as asker:
        await connect(asker, relay.listen_addrs[0], timeout=5)
        victim = Identity.generate().peer_id
        stream = await asker.new_stream(relay.host.get_id(), [HOP])
        from libp2p.peer.id import ID
        await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                     peer=CircuitPeer(id=ID.from_base58(victim).to_bytes())))
        with trio.fail_after(5):
            reply = await read_delimited_msg(stream, HopMessage)
        assert reply.status == 100
        booked = {p.to_string() for p in relay.relaying.protocol.resource_manager._reservations}
        assert booked == {asker.get_id().to_string()}


async def test_a_relay_behind_nat_and_strangers_stop_streams_are_refused() -> None:
    async with node() as relay, open_host(os.urandom(32)) as stranger:
        await connect(stranger, relay.listen_addrs[0], timeout=5)
        await behind_nat(relay, settle=False)  # a plain host answers no dial-back
        with trio.fail_after(5), pytest.raises(RESET):
            await reserve(stranger, relay.host.get_id())
        assert not relay.relaying.protocol.resource_manager._reservations
        with trio.fail_after(5), pytest.raises(RESET):  # no slot of relay's here
            await open_and_read(stranger, relay.host.get_id(), STOP)
        assert relay.relayed_peers() == ()


async def test_a_full_relay_sends_the_next_node_elsewhere() -> None:
    async with node(relay_max_reservations=1) as full, node(bootstrap=(full.listen_addrs[0],)) as first:
        await behind_nat(first)
        await wait_for(lambda: full.peer_id in first.relaying.slots)  # full's one slot is taken
        async with (node() as spare,
                    node(bootstrap=(full.listen_addrs[0], spare.listen_addrs[0])) as second):
            await behind_nat(second)  # wants 2 slots: the full relay (and `first`, private) refuse
            await wait_for(lambda: full.peer_id in second.relaying._refused
                           and set(second.relaying.slots) == {spare.peer_id})


async def test_a_dead_relay_address_fails_within_the_deadline() -> None:
    async with node() as ours:
        dead = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{Identity.generate().peer_id}"
        with trio.fail_after(5), pytest.raises(PeerUnreachable):
            await dial_circuit(ours.host, f"{dead}/p2p-circuit/p2p/{Identity.generate().peer_id}",
                               timeout=2.0)
        assert listen_addrs(ours.host)  # still listening


async def test_two_circuits_to_one_peer_outlive_each_other() -> None:
    async with (node() as relay, node(bootstrap=(relay.listen_addrs[0],), relays=1) as natted,
                open_host(os.urandom(32)) as first, open_host(os.urandom(32)) as second):
        await behind_nat(natted)
        await wait_for(lambda: bool(natted.relaying.slots))
        payload = os.urandom(200_000)
        natted.serve(sha256(payload), payload)
        for host in (first, second):
            host.set_stream_handler(PEX, answer_probe)
            await connect(host, natted.listen_addrs[0], timeout=5)
        circuit = set(natted.host.get_network().get_connections(first.get_id()))
        await first.disconnect(natted.host.get_id())  # its circuit ends ...
        # (natted's discovery may dial a new connection to first meanwhile: not this circuit)
        await wait_for(lambda: not circuit & set(natted.host.get_network().get_connections(first.get_id())))
        for _ in range(3):  # ... and the other one keeps working, transfer after transfer
            got = await fetch_checked_payload(second, natted.peer_id, sha256(payload),
                                              max_size=1 << 20, timeout=5)
            assert got.data == payload
        assert relay.stats().relay_forwarded > 3 * len(payload)


async def test_a_relayed_connection_to_a_reachable_peer_is_replaced_by_a_direct_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfl.net.relay")
    async with (node() as relay, node(bootstrap=(relay.listen_addrs[0],), relays=1) as natted,
                node() as public):
        await behind_nat(natted)
        await wait_for(lambda: bool(natted.relaying.slots))
        await connect(public.host, natted.listen_addrs[0], timeout=5)  # in through the relay
        await wait_for(lambda: any("replaces the relayed one" in r.getMessage() for r in caplog.records)
                       and natted.peer_id in public.neighbours() and not natted.relayed_peers())
        # The relayed connection may take a moment to close after its replacement opened. Both
        # ends may also have dialled directly at once: two direct connections, both kept
        # (close_peer_keeps_newcomers); what matters is that none is relayed any more.
        def connections() -> list[Any]:
            return list(natted.host.get_network().get_connections(public.host.get_id()))

        await wait_for(lambda: bool(connections()) and not any(is_relayed(c) for c in connections()))


async def test_a_relay_that_garbles_breaks_the_circuit_and_delivers_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forward = patches.relay._forward

    async def garble(relay: Any, dst_stream: Any, data: bytes) -> None:
        if len(data) > 1000:  # past the handshakes: flip one byte of the payload's ciphertext
            data = data[:500] + bytes([data[500] ^ 1]) + data[501:]
        await forward(relay, dst_stream, data)

    async with (node() as relay, node(bootstrap=(relay.listen_addrs[0],), relays=1) as natted,
                open_host(os.urandom(32)) as other):
        other.set_stream_handler(PEX, answer_probe)
        await behind_nat(natted)
        await wait_for(lambda: bool(natted.relaying.slots))
        payload = os.urandom(200_000)
        natted.serve(sha256(payload), payload)
        await connect(other, natted.listen_addrs[0], timeout=5)
        monkeypatch.setattr(patches.relay, "_forward", garble)
        with trio.fail_after(10), pytest.raises(P2PFLError):  # Noise refuses the frame: no bytes
            await fetch_checked_payload(other, natted.peer_id, sha256(payload), max_size=1 << 20,
                                        timeout=5)


async def test_both_ends_of_a_circuit_name_its_relay() -> None:
    async with (node() as relay, node(bootstrap=(relay.listen_addrs[0],), relays=1) as natted,
                open_host(os.urandom(32)) as other):
        other.set_stream_handler(PEX, answer_probe)
        await behind_nat(natted)
        await wait_for(lambda: bool(natted.relaying.slots))
        await connect(other, natted.listen_addrs[0], timeout=5)
        await wait_for(lambda: natted.relayed_peers() == (other.get_id().to_string(),))
        [inbound] = natted.host.get_network().get_connections(other.get_id())
        [outbound] = other.get_network().get_connections(natted.host.get_id())
        assert relay_of(inbound) == relay_of(outbound) == relay.peer_id


async def test_a_relay_that_breaks_a_circuit_falls_to_the_bottom_and_out_of_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forward = patches.relay._forward
    async with (node() as bad, node() as good,
                node(bootstrap=(bad.listen_addrs[0], good.listen_addrs[0]), **STAY_RELAYED,
                     target_neighbours=2) as natted,
                node(target_neighbours=1, hole_punching=False) as other):

        async def garble(relay: Any, dst_stream: Any, data: bytes) -> None:
            if relay is bad.relaying.protocol and len(data) > 1000:  # the payload, not handshakes
                data = data[:500] + bytes([data[500] ^ 1]) + data[501:]
            await forward(relay, dst_stream, data)

        await behind_nat(natted)
        stay_relayed(natted, monkeypatch)
        await wait_for(lambda: set(natted.relaying.slots) == {bad.peer_id, good.peer_id})
        via = {relay_in(a): a for a in natted.listen_addrs if relay_in(a)}
        payload = os.urandom(200_000)
        natted.serve(sha256(payload), payload)
        relays = other.relaying.book
        assert await connect(other.host, via[bad.peer_id], timeout=5, relays=relays) == natted.peer_id
        monkeypatch.setattr(patches.relay, "_forward", garble)
        with trio.fail_after(10), pytest.raises(TransferError):  # Noise refuses the frame
            await other.fetch(natted.peer_id, sha256(payload), max_size=1 << 20, timeout=5)
        assert relays.weight(bad.peer_id) == 0 < relays.weight(good.peer_id)
        assert dict(other.stats().relay_scores)[bad.peer_id] == 0
        [first, *rest] = relays.rank_addrs(natted.listen_addrs)
        assert first == via[good.peer_id]
        assert via[bad.peer_id] not in rest
        await wait_for(lambda: not other.host.get_network().get_connections(natted.host.get_id()))
        assert await connect(other.host, first, timeout=5, relays=relays) == natted.peer_id
        got = await other.fetch(natted.peer_id, sha256(payload), max_size=1 << 20, timeout=5)
        assert got.data == payload
        assert other.stats().payload_relayed == len(payload)


@contextlib.asynccontextmanager
async def relayed_through_one(
    monkeypatch: pytest.MonkeyPatch, **other_settings: Any
) -> AsyncIterator[tuple[Libp2pTransport, Libp2pTransport, Libp2pTransport]]:
    """A relay, a node behind NAT that stays relayed with its one slot on it, and a public
    node (no hole punching) to reach it through the relay."""
    async with (node() as relay,
                node(bootstrap=(relay.listen_addrs[0],), relays=1, **STAY_RELAYED,
                     target_neighbours=1) as natted,
                node(target_neighbours=1, hole_punching=False, **other_settings) as other):
        await behind_nat(natted)
        stay_relayed(natted, monkeypatch)
        await wait_for(lambda: bool(natted.relaying.slots))
        yield relay, natted, other


async def test_a_relay_that_stalls_a_pull_is_left_and_its_connection_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forward = patches.relay._forward
    async with relayed_through_one(monkeypatch) as (bad, natted, other):

        async def stall(relay: Any, dst_stream: Any, data: bytes) -> None:
            if len(data) > 1000:  # the payload: forward nothing more, keep the circuit open
                await trio.sleep_forever()
            await forward(relay, dst_stream, data)

        payload = os.urandom(200_000)
        natted.serve(sha256(payload), payload)
        await connect(other.host, natted.listen_addrs[0], timeout=5, relays=other.relaying.book)
        monkeypatch.setattr(patches.relay, "_forward", stall)
        with trio.fail_after(10), pytest.raises(TransferTimeout):
            await other.fetch(natted.peer_id, sha256(payload), max_size=1 << 20, timeout=2)
        assert other.relaying.book.weight(bad.peer_id) == 0  # unknown, then stalled: at the bottom
        await wait_for(lambda: not other.host.get_network().get_connections(natted.host.get_id()))


async def test_a_slot_on_a_relay_at_the_bottom_is_given_up_for_another() -> None:
    async with (node() as bad, node() as good,
                node(bootstrap=(bad.listen_addrs[0], good.listen_addrs[0])) as natted):
        await behind_nat(natted)
        await wait_for(lambda: set(natted.relaying.slots) == {bad.peer_id, good.peer_id})
        natted.relaying.book.record(bad.peer_id, BROKEN, "a relayed connection died under a pull")
        await wait_for(lambda: set(natted.relaying.slots) == {good.peer_id})
        assert [relay_in(a) for a in natted.listen_addrs if relay_in(a)] == [good.peer_id]
        assert natted.stats().relays == (good.peer_id,)


async def test_a_relay_that_stalls_a_peer_exchange_or_a_stream_opening_loses_standing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forward = patches.relay._forward
    async with relayed_through_one(monkeypatch, maintenance_interval=60.0) as (bad, natted, other):

        async def stall(relay: Any, dst_stream: Any, data: bytes) -> None:
            await trio.sleep_forever()  # from now on nothing crosses, the circuit stays open

        await connect(other.host, natted.listen_addrs[0], timeout=5, relays=other.relaying.book)
        monkeypatch.setattr(patches.relay, "_forward", stall)
        with trio.fail_after(10):
            await other.neighbourhood._probe(natted.peer_id)  # the peer exchange times out
        reasons = [e.reason for e in other.relaying.book.book.history(bad.peer_id)]
        assert reasons == ["a peer exchange through it failed"]
        monkeypatch.setattr(patches.relay, "_forward", forward)
        await connect(other.host, natted.listen_addrs[0], timeout=5, relays=other.relaying.book)
        monkeypatch.setattr(patches.relay, "_forward", stall)
        with trio.fail_after(10), pytest.raises(P2PFLError):
            await other.fetch(natted.peer_id, bytes(32), max_size=1 << 20, timeout=2)
        reasons = [e.reason for e in other.relaying.book.book.history(bad.peer_id)]
        assert reasons[-1] in ("a pull through it stalled", "a pull through it could not open a stream")
        assert other.relaying.book.weight(bad.peer_id) == 0


async def test_a_circuit_the_far_end_redials_soon_is_judged_at_our_end_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A relay that garbles or drops a circuit: the dialling end redials through it, and the
    # accepting end (which may never dial through it itself) counts that against it too.
    async with relayed_through_one(monkeypatch, maintenance_interval=60.0) as (relay, natted, other):
        book, them = natted.relaying.book, other.host.get_id()
        await connect(other.host, natted.listen_addrs[0], timeout=5)
        await wait_for(lambda: natted.relayed_peers() == (them.to_string(),))
        await connect(other.host, natted.listen_addrs[0], timeout=5)  # connected: no new circuit
        assert [e.reason for e in book.book.history(relay.peer_id)] == ["reservation"]
        await other.host.disconnect(natted.host.get_id())
        await wait_for(lambda: not natted.host.get_network().get_connections(them))
        await connect(other.host, natted.listen_addrs[0], timeout=5)  # a redial within EARLY
        await wait_for(lambda: natted.relayed_peers() == (them.to_string(),))
        assert book.book.history(relay.peer_id)[-1].reason.startswith(f"its circuit to {short_id(them.to_string())}")
        assert book.weight(relay.peer_id) == 0
