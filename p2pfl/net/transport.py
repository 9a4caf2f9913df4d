"""The seam between the node and the network.

A :class:`Transport` moves opaque bytes: small *announcements* broadcast to the
network (gossip, lossy, authenticated by origin) and *payloads* fetched from one peer
by their sha256 digest (reliable, bounded, deadline-bound). It knows nothing of
tensors or update headers.

Two implementations share these semantics:

- ``p2pfl.net.libp2p_transport`` — GossipSub for announcements, the stream protocols
  ``/p2pfl/update/1.2.0`` (many pulls on one stream per peer; ``1.0.0``, a stream per
  pull, with peers of earlier releases) for payloads, over TCP + Noise + Yamux.
- ``p2pfl.net.memory`` — many transports in one process, with configurable latency,
  loss and partitions, for simulations and tests under trio's ``MockClock``.

Contract, identical in both:

- Every announcement passes the ``Validator`` given at construction before anyone sees
  it, on the receiving side *and* on the publishing side. A validator returns any value
  (delivered as ``Announcement.value``) or raises to reject; a rejected message is not
  forwarded and its origin is penalised by the transport (GossipSub P4 in libp2p).
  Any exception counts as a rejection: validators see hostile bytes.
- Announcements may be lost, duplicated or reordered. Publishers re-announce; receivers
  dedupe.
- ``fetch`` returns exactly the bytes whose sha256 is ``digest``, as a
  :class:`~p2pfl.core.envelope.CheckedPayload` (so nobody hashes them again), or raises a
  :class:`~p2pfl.errors.TransferError` subclass (or ``PeerUnreachable``) within
  ``timeout`` seconds. It never reads more than ``max_size`` bytes from the peer.
- ``fetch_from_holders`` may take a big payload from several peers at once (the
  author and the holders it names), piece by piece; same result and errors as ``fetch``,
  and ``blame(peer, reason)`` names each holder that served bytes that were not the
  payload (known only once the payload verified); while it pulls, it may serve the
  pieces it checked to the other pullers (then it calls ``on_map()``). The memory
  transport pulls from the author alone.
- ``serve`` makes a payload available to every peer until ``unserve``; ``pulled_by``
  names the peers that pulled it in full meanwhile (re-announce only for the others).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import trio

from p2pfl.core.envelope import CheckedPayload

Validator = Callable[[str, bytes], Any]
"""``validate(origin_peer_id, data) -> value``; raise to reject the message."""


@dataclass(frozen=True, slots=True)
class Announcement:
    """A validated announcement as the node receives it."""

    origin: str  # authenticated PeerId of the publisher (not of the forwarder)
    data: bytes
    value: Any  # what the validator returned for ``data``


@dataclass(frozen=True, slots=True)
class TrafficStats:
    """Byte and message counters of one transport since it opened."""

    bytes_in: int = 0  # everything: payloads + announcements
    bytes_out: int = 0
    payload_in: int = 0  # the data plane alone (bytes of payloads pulled / served)
    payload_out: int = 0
    announcements_in: int = 0
    announcements_out: int = 0
    rejected_in: int = 0
    # Behind NAT (p2pfl.net.reach, p2pfl.net.relay); an in-memory transport has no NAT.
    reachability: str = "unknown"  # public | private | unknown (not yet dialled back)
    relays: tuple[str, ...] = ()  # relays this node holds a slot on
    relayed_peers: tuple[str, ...] = ()  # connected peers reached only through a relay
    payload_relayed: int = 0  # of payload_in + payload_out, bytes over relayed connections
    relay_forwarded: int = 0  # bytes this node forwarded as a relay for others
    # relays this node used (reserved on, dialled or pulled through) -> weight, 0: at the bottom
    relay_scores: tuple[tuple[str, float], ...] = ()
    # neighbours reconnected because gossip had stopped sending to them (Gossip.unlisted)
    gossip_reconnects: int = 0
    # neighbour -> how its announcements and payloads reach us (p2pfl.net.peerpaths)
    peer_paths: tuple[tuple[str, str], ...] = ()


@runtime_checkable
class Transport(Protocol):
    """What a node needs from the network."""

    @property
    def peer_id(self) -> str:
        """This node's PeerId string (``16Uiu2…``)."""
        ...

    async def publish(self, data: bytes) -> None:
        """Broadcast a small announcement (at most ``Limits.max_message_bytes``)."""
        ...

    def announcements(self) -> trio.MemoryReceiveChannel[Announcement]:
        """The one stream of validated announcements from other peers (bounded; lossy)."""
        ...

    async def fetch(
        self, peer: str, digest: bytes, *, max_size: int, timeout: float
    ) -> CheckedPayload:
        """Pull the payload with this sha256 ``digest`` from ``peer``, hashed once on receipt."""
        ...

    async def fetch_from_holders(
        self,
        author: str,
        digest: bytes,
        *,
        size: int,
        holders: Callable[[], Iterable[str]],
        blame: Callable[[str, str], None],
        timeout: float,
        on_map: Callable[[], None] | None = None,
    ) -> CheckedPayload:
        """Pull the ``size``-byte payload ``digest`` from ``author`` and ``holders()`` at once;
        ``on_map()`` once the pull serves its checked pieces to co-pullers (if it does)."""
        ...

    def serve(self, digest: bytes, payload: bytes) -> None:
        """Offer ``payload`` (whose sha256 is ``digest``) to every peer."""
        ...

    def unserve(self, digest: bytes) -> None:
        """Stop offering a payload; unknown digests are ignored."""
        ...

    def pulled_by(self, digest: bytes) -> frozenset[str]:
        """Peers that pulled ``digest`` from us in full while we served it."""
        ...

    def neighbours(self) -> tuple[str, ...]:
        """PeerIds currently connected and usable, sorted."""
        ...

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs other nodes can dial (``/ip4/…/tcp/N/p2p/<id>``)."""
        ...

    def bootstrap_report(self) -> list[str]:
        """One ``<address>: <what it answered last>`` line per bootstrap peer."""
        ...

    def ban(self, peer: str, *, seconds: float) -> None:
        """Refuse and disconnect ``peer`` for a while (reputation fell below threshold)."""
        ...

    def stats(self) -> TrafficStats:
        """Counters since the transport opened."""
        ...


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    """Return the 32-byte sha256 digest that names a payload."""
    return hashlib.sha256(data).digest()


__all__ = ["Announcement", "TrafficStats", "Transport", "Validator", "sha256"]
