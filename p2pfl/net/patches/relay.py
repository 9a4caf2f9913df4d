"""Circuit relay v2 (``libp2p.relay.circuit_v2.protocol.CircuitV2Protocol``) as a relay.

- :func:`reserve_self`: a RESERVE may name any PeerId in its ``peer`` field and the
  relay books the slot for that id: one connected peer could fill every reservation with
  ids it made up. The slot is booked for the peer at the other end of the stream (what
  the spec says: the field is ignored by go and rust relays).
- :func:`relay_data`: the relay files each circuit's streams under the PeerIds of its
  ends, so a second circuit to the same peer overwrites the first one's entry, and
  whichever circuit ends first closes the other's streams (two peers relayed to one node
  behind NAT cut each other off every few seconds). It also counts none of the bytes it
  forwards. The replacement forwards under the same limits (circuit lifetime, bytes both
  ways together, a write deadline), resets only its own two streams when either way
  ends, and adds what it wrote to ``forwarded_bytes`` on the protocol instance.
- :func:`stop_address`: a connection accepted through a relay (STOP) is addressed
  ``/p2p/<our own id>/p2p-circuit/p2p/<remote>``: nobody can tell which relay carries
  it (``p2pfl.net.relaybook`` judges relays by their circuits). The relay's id, the peer
  at the other end of the STOP stream, goes in its place.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Any

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

READ_BYTES = 1 << 20  # one read of a relayed stream at most (libp2p's MAX_READ_LEN is 64 KiB)


def reserve_self() -> None:
    original = CircuitV2Protocol._handle_reserve

    @functools.wraps(original)
    async def _handle_reserve(self: Any, stream: Any, msg: Any) -> None:
        msg.ClearField("peer")  # the slot is for whoever asks, nobody else
        await original(self, stream, msg)

    CircuitV2Protocol._handle_reserve = _handle_reserve  # type: ignore[method-assign]


async def _forward(relay: Any, dst_stream: Any, data: bytes) -> None:
    """Write one chunk of a circuit within the relay's write deadline, and count it."""
    with trio.fail_after(relay.write_timeout):
        await dst_stream.write(data)
    relay.forwarded_bytes = getattr(relay, "forwarded_bytes", 0) + len(data)


async def _relay_data(
    self: Any, src_stream: Any, dst_stream: Any, peer_id: Any,
    deadline: float | None = None, circuit_data_limit: list[int] | None = None,
) -> None:
    """Forward ``src_stream`` to ``dst_stream`` until EOF, a limit or an error; reset both."""
    try:
        while True:
            left = math.inf if deadline is None else deadline - time.monotonic()
            data = b""
            with trio.move_on_after(max(0.0, left)):
                data = await src_stream.read(READ_BYTES)
            if not data:  # the circuit's lifetime is over
                return
            if circuit_data_limit is not None:
                if len(data) > circuit_data_limit[0]:
                    return  # the circuit's bytes are used up
                circuit_data_limit[0] -= len(data)
            await _forward(self, dst_stream, data)
    except Exception:  # EOF, a reset, a write past its deadline: the circuit ends
        return
    finally:
        for stream in (src_stream, dst_stream):
            with trio.move_on_after(1.0), contextlib.suppress(Exception):  # already gone
                await stream.reset()


def relay_data() -> None:
    CircuitV2Protocol._relay_data = _relay_data  # type: ignore[method-assign]


async def _handle_incoming_connection(self: Any, stream: Any, remote_peer_id: bytes) -> None:
    """Upgrade a relayed inbound stream to a connection addressed through its relay."""
    try:
        peer_id = ID(remote_peer_id)
        relay = stream.muxed_conn.peer_id
        address = multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{peer_id.to_base58()}")
        raw = RawConnection(stream=stream, initiator=False, connection_type=ConnectionType.RELAYED,
                            addresses=[address])
        muxed = await self.host.upgrade_inbound_connection(raw, address)
        for conn in self.host.get_network().get_connections(peer_id):
            if getattr(conn, "muxed_conn", None) is muxed:
                conn.set_transport_info([address], ConnectionType.RELAYED)
    except Exception as error:
        await stream.close()
        raise ConnectionError(f"Failed to handle incoming connection: {error}") from error


def stop_address() -> None:
    CircuitV2Protocol.handle_incoming_connection = _handle_incoming_connection  # type: ignore[method-assign]
