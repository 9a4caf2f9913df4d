"""Circuit relay v2 for nodes behind NAT: relaying, reserving a slot, dialling through one.

py-libp2p 0.8.1's ``CircuitV2Protocol`` does the relaying (HOP) and accepts relayed
connections (STOP); this module guards both handlers and does the client side itself,
bounded by ``dial_timeout`` everywhere (the library's client retries for up to a minute
and reserves on every relay it dials through).

- **Relay** (``[net] relay_service``, on by default): a node not known to be behind NAT
  answers HOP. Limits from ``[net] relay_*``: reservations in total, circuits per
  reserved peer, bytes and lifetime per circuit (then it is reset), concurrent HOP
  streams per asking peer. A relay forwards Noise ciphertext between the two ends: it
  can drop, stall or garble, never read or forge (the ends authenticate each other
  through it, and every update is signed and digest-checked on top).
- **Client**: a node that :class:`~p2pfl.net.reach.Reachability` finds private keeps a
  slot on ``[net] relays`` relays among the peers it is directly connected to, best
  first in its relay book (:mod:`p2pfl.net.relaybook`: a relay at the bottom gets no
  slot while another is left, and loses the one it had), renews it at half-time,
  replaces a relay that goes away, and announces
  ``<relay address>/p2p-circuit/p2p/<its PeerId>`` (first) in peer exchange.
- **STOP** is accepted only from a relay this node holds a slot on: nobody else can
  push connections at it.
- :func:`dial_circuit` dials such an address: a direct connection to the relay, one HOP
  CONNECT, then the usual Noise + Yamux upgrade over the relayed stream; what the relay
  did goes into the caller's relay book.
- **Upgrade** (:meth:`Relaying.upgrade`): a peer reached only through a relay is dialled
  directly at the direct addresses it announced, at most every :data:`UPGRADE_RETRY`; when
  that works (a node behind NAT dialling out to a public one that had reached it through
  a relay) the relayed connection is closed.
- **Hole punching** (``[net] hole_punching``, :func:`open_hole_punching`): py-libp2p's
  DCUtR between two nodes that reach each other through a relay, each behind its own
  NAT: over the relayed connection they swap the addresses their peers observe them at
  (with their listen port: NATs tend to keep it), then both dial at once from their
  listen ports, and the relayed connection closes once the direct one works (the NAT test
  asserts it behind port-keeping NATs). Deadlines: ``dial_timeout`` for each read,
  write and dial; at most 3 attempts per peer while connected.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeer
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from p2pfl.config import NetConfig
from p2pfl.core.crypto import short_id
from p2pfl.core.reputation import Evidence
from p2pfl.errors import PeerUnreachable
from p2pfl.net.notifee import ConnectionNotifee
from p2pfl.net.reach import PRIVATE, PUBLIC, Reachability, is_relayed
from p2pfl.net.relaybook import CIRCUIT, FAILED, WORKED, RelayBook, relay_of
from p2pfl.net.streamio import reset_quietly

logger = logging.getLogger(__name__)

# Concurrent HOP streams one peer may hold on this relay (a CONNECT holds its stream for
# the circuit's life): the circuits of one reservation, plus a RESERVE in flight.
HOP_STREAMS_PER_PEER_EXTRA = 1
# A relay that refused or failed us is not asked again for this long.
RESERVE_RETRY = 10.0
# A peer reached through a relay is dialled directly again after this long.
UPGRADE_RETRY = 30.0


class _HopEndsQuietly(logging.Filter):
    """The relay's HOP handler reads on after each exchange and logs the asker closing its
    stream (every reservation, every renewal) as three ERROR lines: keep them at DEBUG."""

    NOISE = ("Error reading from hop stream", "Unexpected error handling hop stream",
             "Error sending status message", "Failed to send error response")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(self.NOISE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("libp2p.relay.circuit_v2.protocol").addFilter(_HopEndsQuietly())


class _Refused(PeerUnreachable):
    """A relay answered with a status other than OK (full, or no reservation there)."""


def is_circuit(address: str) -> bool:
    """Whether ``address`` is a relayed ``…/p2p-circuit/p2p/<id>`` multiaddr."""
    return CIRCUIT in address


@dataclass
class Slot:
    """A reservation this node holds on one relay."""

    relay_addr: str  # the relay's dialable /ip4/…/tcp/N/p2p/<relay> address
    renew_at: float  # trio time
    expires_at: float


class Relaying:
    """Relay service, STOP guard and reservations of one host (see module docstring)."""

    def __init__(self, host: IHost, *, config: NetConfig, reach: Reachability) -> None:
        self.host = host
        self.config = config
        self.reach = reach
        self.me = host.get_id().to_string()
        limits = RelayLimits(
            duration=config.relay_circuit_seconds,
            data=config.relay_circuit_bytes,
            max_circuit_conns=config.relay_max_circuits,
            max_reservations=config.relay_max_reservations,
            reservation_ttl=config.relay_reservation_seconds,
        )
        timeout = max(1, round(config.dial_timeout))
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=config.relay_service,
                                          read_timeout=timeout, write_timeout=timeout,
                                          close_timeout=timeout)
        self.slots: dict[str, Slot] = {}  # relay peer -> our reservation there
        self.book = RelayBook()  # how the relays we used behaved (p2pfl.net.relaybook)
        self._refused: dict[str, float] = {}  # relay peer -> not before (trio time)
        self._hop_streams: dict[str, int] = {}  # asking peer -> HOP streams open
        self._upgrade_tried: dict[str, float] = {}  # relayed peer -> last direct dial (trio time)
        if config.relay_service:
            host.set_stream_handler(HOP_PROTOCOL, self._handle_hop)
        host.set_stream_handler(STOP_PROTOCOL, self._handle_stop)
        host.get_network().register_notifee(_CircuitWatch(self.book))

    # -- queries ---------------------------------------------------------------------

    @property
    def forwarded_bytes(self) -> int:
        """Bytes this node forwarded as a relay (both directions of every circuit)."""
        return int(getattr(self.protocol, "forwarded_bytes", 0))

    def relayed_addrs(self) -> list[str]:
        """This node's addresses through the relays it holds a slot on."""
        return [f"{self.slots[r].relay_addr}{CIRCUIT}/p2p/{self.me}" for r in self.book.rank(self.slots)]

    # -- relay side ------------------------------------------------------------------

    async def _handle_hop(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        held = self._hop_streams.get(peer, 0)
        if self.reach.state == PRIVATE or held >= self.config.relay_max_circuits + HOP_STREAMS_PER_PEER_EXTRA:
            logger.debug("HOP from %s refused (%s)", short_id(peer),
                         "behind NAT" if self.reach.state == PRIVATE else f"{held} HOP streams open")
            await reset_quietly(stream, shield=False)
            return
        self._hop_streams[peer] = held + 1
        try:
            await self.protocol._handle_hop_stream(stream)
        except Exception as error:  # the library's own handler: never let it reach libp2p
            logger.debug("HOP from %s ended: %r", short_id(peer), error)
            await reset_quietly(stream, shield=False)
        finally:
            self._hop_streams[peer] -= 1
            if not self._hop_streams[peer]:
                del self._hop_streams[peer]

    async def _handle_stop(self, stream: INetStream) -> None:
        relay = str(stream.muxed_conn.peer_id)
        if relay not in self.slots:
            logger.debug("STOP from %s refused: no slot of ours there", short_id(relay))
            await reset_quietly(stream, shield=False)
            return
        try:
            await self.protocol._handle_stop_stream(stream)
        except Exception as error:
            logger.debug("relayed connection via %s failed: %r", short_id(relay), error)
            await reset_quietly(stream, shield=False)

    # -- client side -----------------------------------------------------------------

    async def maintain(self, direct_peers: list[str]) -> None:
        """Keep ``[net] relays`` slots while private; renew them; replace lost relays.

        ``direct_peers``: peers connected directly (not through a relay), the candidates.
        """
        now = trio.current_time()
        for relay in [r for r in self.slots if r not in direct_peers or now >= self.slots[r].expires_at]:
            logger.info("relay %s lost; %d slot(s) left", short_id(relay), len(self.slots) - 1)
            del self.slots[relay]
        usable = self.book.rank(direct_peers)  # a relay at the bottom only while no other is left
        for relay in [r for r in self.slots if r not in usable]:
            logger.info("relay %s at the bottom: its slot given up", short_id(relay))
            del self.slots[relay]
        if self.reach.state == PUBLIC and self.slots:  # dialled back after all (a port opened)
            logger.info("reachable: %d relay slot(s) given up", len(self.slots))
            self.slots.clear()
        if self.reach.state != PRIVATE:
            return
        for relay, slot in list(self.slots.items()):
            if now >= slot.renew_at:
                await self._reserve(relay)
        self._refused = {p: t for p, t in self._refused.items() if t > now}
        for relay in usable:
            if len(self.slots) >= self.config.relays:
                break
            if relay not in self.slots and relay not in self._refused:
                await self._reserve(relay)

    async def _reserve(self, relay: str) -> None:
        address = self._direct_addr(relay)
        try:
            if address is None:
                raise PeerUnreachable("no direct address")
            with trio.fail_after(self.config.dial_timeout):
                stream = await self.host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL])
                try:
                    await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                    reply = await read_delimited_msg(stream, HopMessage)
                finally:
                    await reset_quietly(stream, shield=False)
            if reply.type != HopMessage.STATUS or reply.status != StatusCode.OK:
                raise _Refused(f"refused (status {reply.status})")
        except Exception as error:  # a stream/mux error, a timeout, a refusal: try another
            self.slots.pop(relay, None)
            self._refused[relay] = trio.current_time() + RESERVE_RETRY
            logger.debug("no slot on relay %s: %r", short_id(relay), error)
            if address is not None and not isinstance(error, _Refused):  # a full relay says so
                self.book.record(relay, FAILED, f"reservation failed: {error!r}"[:160])
            return
        self.book.record(relay, WORKED, "reservation")
        assert address is not None
        ttl = self.config.relay_reservation_seconds
        if reply.HasField("reservation") and reply.reservation.expire:
            ttl = min(ttl, max(1, reply.reservation.expire - int(time.time())))  # unix seconds
        now = trio.current_time()
        is_new = relay not in self.slots
        self.slots[relay] = Slot(address, renew_at=now + ttl / 2, expires_at=now + ttl)
        if is_new:
            logger.info("reserved a slot on relay %s for %d s; peers can dial %s%s/p2p/%s",
                        short_id(relay), ttl, address, CIRCUIT, self.me)

    async def upgrade(self, relayed: dict[str, list[str]]) -> None:
        """Dial peers reached only through a relay at their direct addresses, in parallel.

        ``relayed``: such peers -> the addresses they announced (circuit ones are skipped).
        """
        now = trio.current_time()
        self._upgrade_tried = {p: t for p, t in self._upgrade_tried.items() if now - t < UPGRADE_RETRY}
        async with trio.open_nursery() as nursery:
            for peer, addrs in relayed.items():
                direct = [a for a in addrs if not is_circuit(a)]
                if direct and peer not in self._upgrade_tried:
                    self._upgrade_tried[peer] = now
                    nursery.start_soon(self._dial_direct, peer, direct)

    async def retire_circuits(self) -> None:
        """Close the relayed connections to peers we also reach directly.

        A circuit that outlived its replacement (both ends dialled directly at once, or a
        relayed redial after the direct one) holds a relay slot's bandwidth and streams
        for nothing: :meth:`upgrade` never sees such a peer, as it is not relayed only.
        """
        network = self.host.get_network()
        for peer_id in list(self.host.get_connected_peers()):
            if any(not is_relayed(c) for c in network.get_connections(peer_id)) and \
                    await self._close_circuits(peer_id):
                logger.info("peer %s: relayed connection closed, a direct one carries its traffic",
                            short_id(peer_id.to_string()))

    async def _close_circuits(self, peer_id: ID) -> int:
        """Close our relayed connections to ``peer_id``; return how many there were."""
        circuits = [c for c in self.host.get_network().get_connections(peer_id) if is_relayed(c)]
        for conn in circuits:
            try:
                await conn.close()
            except Exception as error:  # already closing under us: gone either way
                logger.debug("closing a circuit to %s: %r", short_id(peer_id.to_string()), error)
        return len(circuits)

    async def _dial_direct(self, peer: str, addrs: list[str]) -> None:
        peer_id = ID.from_base58(peer)
        network = self.host.get_network()
        for address in addrs:
            with trio.move_on_after(self.config.dial_timeout):
                try:
                    target = multiaddr.Multiaddr(address).decapsulate_code(multiaddr.protocols.P_P2P)
                    await network.dial_addr(target, peer_id)  # type: ignore[attr-defined]
                except Exception as error:  # unreachable (behind NAT too): stay relayed
                    logger.debug("direct dial of %s at %s failed: %r", short_id(peer), address, error)
                    continue
                await self._close_circuits(peer_id)
                logger.info("peer %s: direct connection at %s replaces the relayed one",
                            short_id(peer), address)
                return

    def _direct_addr(self, peer: str) -> str | None:
        """The address our direct connection to ``peer`` reached it at (+ /p2p/<peer>)."""
        for conn in self.host.get_network().get_connections(ID.from_base58(peer)):
            if is_relayed(conn):
                continue
            for address in conn.get_transport_addresses():
                text = str(address)
                if text.startswith("/ip4/") and "/tcp/" in text:
                    return text if "/p2p/" in text else f"{text}/p2p/{peer}"
        return None


@contextlib.asynccontextmanager
async def open_hole_punching(host: IHost, *, config: NetConfig) -> AsyncIterator[None]:
    """Run DCUtR on ``host`` (if ``[net] hole_punching``) while the context is open."""
    if not config.hole_punching:
        yield
        return
    timeout = max(1, round(config.dial_timeout))
    dcutr = DCUtRProtocol(host, read_timeout=timeout, write_timeout=timeout, dial_timeout=timeout)
    async with background_trio_service(dcutr):
        yield


class _CircuitWatch(ConnectionNotifee):
    """Note each circuit as it opens, whichever end dialled it (:meth:`RelayBook.dialled`):
    one through the same relay to the same peer soon after the last one ended broke. A
    circuit opened while another to that peer through that relay is up (both ends dialled
    at once) is no redial."""

    def __init__(self, book: RelayBook) -> None:
        self.book = book

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        relay = relay_of(conn) if is_relayed(conn) else None
        if relay is None:
            return
        peer = conn.muxed_conn.peer_id
        if not any(c is not conn and not c.is_closed and relay_of(c) == relay
                   for c in network.get_connections(peer)):
            self.book.dialled(relay, peer.to_string())


async def dial_circuit(host: IHost, address: str, *, timeout: float, book: RelayBook | None = None) -> str:
    """Connect to the peer behind relayed ``address`` within ``timeout``; return its PeerId.

    ``book``: where to record what the relay did (a refusal is no evidence against it).

    Raises:
        PeerUnreachable: the relay cannot be dialled, refuses, or the upgrade failed.
    """
    relay_part, _, dest_part = address.partition(CIRCUIT)
    try:
        relay_info = info_from_p2p_addr(multiaddr.Multiaddr(relay_part))
        dest = ID.from_base58(dest_part.removeprefix("/p2p/"))
    except Exception as error:
        raise PeerUnreachable(f"not a relayed address: {address[:160]!r}") from error
    if dest == host.get_id() or relay_info.peer_id == dest:
        raise PeerUnreachable(f"{address[:160]} is this host or its own relay")
    if host.get_network().get_connections(dest):
        return dest.to_string()
    relay = relay_info.peer_id.to_string()

    def judge(relay: str, what: tuple[Evidence, float], reason: str) -> None:
        if book is not None:
            book.record(relay, what, reason)

    with trio.move_on_after(timeout) as scope:
        try:
            await _dial_through(host, relay_info, dest, address)
        except Exception as error:
            if not isinstance(error, _Refused):
                judge(relay, FAILED, f"a circuit dial failed: {error!r}"[:160])
            raise PeerUnreachable(f"cannot dial {short_id(dest.to_string())} via relay "
                                  f"{short_id(relay)}: {error}") from error
    if scope.cancelled_caught:
        judge(relay, FAILED, f"a circuit dial took over {timeout} s")
        raise PeerUnreachable(f"dialling {short_id(dest.to_string())} via a relay took over {timeout} s")
    return dest.to_string()  # the circuit goes into the book as it opens (_CircuitWatch)


async def _dial_through(host: IHost, relay_info: object, dest: ID, address: str) -> None:
    network = host.get_network()
    network.unblock_peer(relay_info.peer_id)  # type: ignore[attr-defined]  # trap 11
    await host.connect(relay_info)  # type: ignore[arg-type]
    stream = await host.new_stream(relay_info.peer_id, [HOP_PROTOCOL])  # type: ignore[attr-defined]
    try:
        await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT,
                                                     peer=CircuitPeer(id=dest.to_bytes())))
        reply = await read_delimited_msg(stream, HopMessage)
        if reply.type != HopMessage.STATUS or reply.status != StatusCode.OK:
            raise _Refused(f"relay answered status {reply.status}")
        circuit = multiaddr.Multiaddr(address)
        raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,
                            addresses=[circuit])
        conn = await host.upgrade_outbound_connection(raw, dest)
        conn.set_transport_info([circuit], ConnectionType.RELAYED)  # type: ignore[attr-defined]
    except BaseException:
        await reset_quietly(stream, shield=False)
        raise
    logger.info("connected to %s through relay %s", short_id(dest.to_string()),
                short_id(relay_info.peer_id.to_string()))  # type: ignore[attr-defined]


__all__ = ["CIRCUIT", "Relaying", "Slot", "dial_circuit", "is_circuit", "open_hole_punching"]
