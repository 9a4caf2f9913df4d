"""The libp2p :class:`~p2pfl.net.transport.Transport`: host + gossip + transfer + neighbours.

``open_libp2p_transport`` composes, in start-up order:

1. a hardened Noise/Yamux host (``host``), listening on the configured address;
2. the payload protocols ``/p2pfl/update/1.0.0`` (``transfer``), ``1.1.0`` (pieces,
   ``ranged``) and ``1.2.0`` (many pulls per stream, ``session``: what this node pulls
   whole with) serving one :class:`PayloadStore`, and peer exchange (``discovery``);
3. GossipSub on the network's topic (``gossip``) — before any connection, so identify
   advertises ``/meshsub/*``;
4. the neighbour maintenance task, whose first pass (bootstrap dials, bounded by the dial
   timeout) completes before the transport is handed out;
5. reachability by dial-back (``reach``) and circuit relay v2 (``relay``): a relay for
   others while reachable, a slot on relays while not, in one task; hole punching
   (DCUtR) between peers that reach each other through a relay; one relay book
   (``relaybook``) judging relays by what the reservations, dials and pulls through
   them did, for slots and dials alike;
6. if ``enable_mdns``, LAN discovery on ``mdns_interface`` only (``mdns``), feeding the
   neighbourhood's address book.

Every task lives in the nursery the context manager owns; leaving it cancels them all
and stops the host.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence

import trio
from libp2p.abc import IHost, INetConn

from p2pfl.config import Limits, NetConfig
from p2pfl.core.bounded import BoundedMap
from p2pfl.core.crypto import short_id
from p2pfl.core.envelope import CheckedPayload
from p2pfl.errors import PayloadTooLarge, PeerUnreachable, TransferError, TransferTimeout
from p2pfl.net.discovery import Neighbourhood
from p2pfl.net.gossip import UNLISTED_AFTER, Gossip, open_gossip
from p2pfl.net.host import connect, dialback_port, open_host
from p2pfl.net.mdns import advertised_addrs, require_local_interface, run_mdns
from p2pfl.net.notifee import BanGate
from p2pfl.net.peerpaths import PathLog, PeerPaths
from p2pfl.net.ranged import (
    PIECE_BYTES,
    Partial,
    fetch_have,
    fetch_piece_map,
    fetch_range,
    install_ranged_protocol,
)
from p2pfl.net.reach import Reachability, is_relayed
from p2pfl.net.relay import Relaying, open_hole_punching
from p2pfl.net.relaybook import BROKEN, STALLED, WORKED, relay_of
from p2pfl.net.session import Sessions, install_session_protocol
from p2pfl.net.streamio import parse_peer_id
from p2pfl.net.swarm import fetch_from_holders
from p2pfl.net.transfer import PayloadStore, _Server, install_update_protocol
from p2pfl.net.transport import Announcement, TrafficStats, Validator

logger = logging.getLogger(__name__)

# How many maximal payloads the store may reference at once before evicting the oldest:
# a node serves its own update and the verified ones it holds for a round or two.
STORE_PAYLOADS = 16
# A piece request waits at most this share of the whole pull's deadline: a stalled holder
# is dropped after it, and meanwhile the end game has asked another holder anyway.
REQUEST_SHARE = 0.25


class Libp2pTransport:
    """A node's network over libp2p (see :class:`~p2pfl.net.transport.Transport`)."""

    def __init__(
        self,
        host: IHost,
        gossip: Gossip,
        neighbourhood: Neighbourhood,
        store: PayloadStore,
        *,
        limits: Limits,
        nursery: trio.Nursery,
        relaying: Relaying,
    ) -> None:
        self.host = host
        self.gossip = gossip
        self.neighbourhood = neighbourhood
        self.store = store
        self.limits = limits
        self.relaying = relaying
        self._nursery = nursery
        self._fetched_bytes = 0
        self._served_bytes = 0
        self._relayed_bytes = 0  # payload bytes in or out over relayed connections
        self._paths = PathLog()
        self._pulled: dict[bytes, set[str]] = {}  # served digest -> peers that pulled it
        self.relisted = 0  # neighbours reconnected because gossip had lost them
        self.peer_paths = PeerPaths(host, gossip)  # failed pulls, /status lines per neighbour
        self.sessions = Sessions(host)  # one long-lived pull stream per peer (1.2.0)
        self._pulling: Counter[str] = Counter()  # peer -> our pulls from it in progress
        self.partials: dict[bytes, Partial] = {}  # our multi-source pulls in progress, served
        self.pulled: BoundedMap[bytes, bool] = BoundedMap(1024)  # digests we pulled (not ours): >> served
        self.server: _Server | None = None  # set once the update protocols are installed

    @property
    def peer_id(self) -> str:
        """This node's PeerId string (``16Uiu2…``)."""
        return self.host.get_id().to_string()

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs other nodes can dial: through relays first (behind NAT), then
        the listen addresses (``[net] announce_addrs`` if set)."""
        return self.neighbourhood.own_addrs()

    def bootstrap_report(self) -> list[str]:
        """One ``<address>: <what it answered last>`` line per bootstrap peer."""
        return self.neighbourhood.book.bootstrap_report(self.neighbourhood.connected())

    async def publish(self, data: bytes) -> None:
        """Broadcast a small announcement (see :meth:`Gossip.publish`)."""
        await self.gossip.publish(data)

    def announcements(self) -> trio.MemoryReceiveChannel[Announcement]:
        """Return the one bounded, lossy stream of validated announcements."""
        return self.gossip.announcements()

    async def fetch(
        self, peer: str, digest: bytes, *, max_size: int, timeout: float
    ) -> CheckedPayload:
        """Pull the payload named ``digest`` from ``peer`` within ``timeout`` seconds.

        Dials ``peer`` first if it is known but not connected (any holder may serve).

        Raises:
            PeerUnreachable: ``peer`` is banned, unknown and unconnected, or undialable.
            TransferError: see :func:`p2pfl.net.transfer.fetch_payload`.
        """
        max_size = min(max_size, self.limits.max_payload_bytes)
        deadline = trio.current_time() + timeout
        await self._ensure_connected(peer, timeout)
        remaining = max(0.0, deadline - trio.current_time())
        with self._judging_relay(peer) as relayed:
            payload = await self.sessions.fetch(peer, digest, max_size=max_size, timeout=remaining)
        self._fetched_bytes += len(payload)
        self.pulled.put(digest, True)
        self._count_relayed(relayed, len(payload))
        self.neighbourhood.seen_alive(peer)
        return payload

    def relayed_peers(self) -> tuple[str, ...]:
        """Connected peers whose every connection runs through a relay, sorted."""
        network = self.host.get_network()
        return tuple(sorted(
            p.to_string() for p in self.host.get_connected_peers()
            if (conns := network.get_connections(p)) and all(is_relayed(c) for c in conns)
        ))

    def direct_peers(self) -> list[str]:
        """Connected peers with a direct (not relayed) connection."""
        relayed = set(self.relayed_peers())
        return [p for p in sorted(self.neighbourhood.connected()) if p not in relayed]

    def _relayed_conn(self, peer: str) -> INetConn | None:
        """``peer``'s connection if every one of them runs through a relay, else None."""
        conns = self.host.get_network().get_connections(parse_peer_id(peer))
        return conns[0] if conns and all(is_relayed(c) for c in conns) else None

    def _count_relayed(self, conn: INetConn | None, size: int) -> None:
        self._relayed_bytes += size if conn is not None else 0

    @contextlib.contextmanager
    def _judging_relay(self, peer: str) -> Iterator[INetConn | None]:
        """Around a pull from ``peer``: yield its relayed connection (None: direct); count
        the pull in progress (:meth:`busy_peers`); note a failure, and what the relay did in
        the relay book (:mod:`p2pfl.net.relaybook`)."""
        conn = self._relayed_conn(peer)
        relay = relay_of(conn) if conn is not None else None
        self._pulling[peer] += 1
        try:
            yield conn
        except (TransferError, PeerUnreachable) as error:
            self.peer_paths.failures.record(peer, error)
            if relay is not None:
                self._judge_failed_pull(relay, conn, error)
            raise
        finally:
            self._pulling -= Counter({peer: 1})  # drops the peer at 0
        if relay is not None:
            self.relaying.book.record(relay, WORKED, "a pull through it")

    def busy_peers(self) -> set[str]:
        """Peers a payload is moving to or from right now (either way: they are alive)."""
        serving = self.server.serving if self.server is not None else {}
        return {*self._pulling, *serving}

    def _judge_failed_pull(self, relay: str, conn: INetConn | None, error: Exception) -> None:
        if isinstance(error, TransferTimeout | PeerUnreachable):  # stalled, or no stream opened
            what = "stalled" if isinstance(error, TransferTimeout) else "could not open a stream"
            self.relaying.book.record(relay, STALLED, f"a pull through it {what}")
            if self.relaying.book.weight(relay) == 0:  # redial through another relay
                self._nursery.start_soon(conn.close)  # type: ignore[union-attr]
        elif conn.is_closed or conn.muxed_conn.is_closed:  # type: ignore[union-attr]
            self.relaying.book.record(relay, BROKEN, "a relayed connection died under a pull")

    def log_paths(self) -> None:
        """Log each connected peer's path (direct or through a relay) when it changes."""
        self._paths.update(self.neighbourhood.connected(), self.relayed_peers())

    async def _ensure_connected(self, peer: str, timeout: float) -> None:
        if self.neighbourhood.book.is_banned(peer, trio.current_time()):
            raise PeerUnreachable(f"{short_id(peer)} is banned")
        if peer in self.neighbourhood.connected():
            return
        record = self.neighbourhood.book.peers.get(peer)
        if record is None or not record.addrs:
            raise PeerUnreachable(f"{short_id(peer)} is neither connected nor known")
        with trio.move_on_after(timeout):
            for address in self.relaying.book.rank_addrs(record.addrs):
                try:
                    await connect(self.host, address, timeout=timeout, relays=self.relaying.book)
                    return
                except PeerUnreachable as error:
                    logger.debug("fetch: %s", error)
        raise PeerUnreachable(f"cannot dial {short_id(peer)} to fetch from it")

    async def fetch_from_holders(
        self, author: str, digest: bytes, *, size: int, holders: Callable[[], Iterable[str]],
        blame: Callable[[str, str], None], timeout: float, on_map: Callable[[], None] | None = None,
    ) -> CheckedPayload:
        """Pull a payload of at least one piece from ``author`` and up to ``fetch_sources - 1``
        of ``holders()`` at once (:mod:`p2pfl.net.swarm`, serving it to co-pullers meanwhile;
        ``on_map()`` once it is); smaller ones whole from ``author``."""
        sources = self.neighbourhood.config.fetch_sources
        if sources <= 1 or size < PIECE_BYTES:
            return await self.fetch(author, digest, max_size=size, timeout=timeout)
        if size > self.limits.max_payload_bytes:
            raise PayloadTooLarge(f"{size} bytes announced, cap is {self.limits.max_payload_bytes}")
        deadline = trio.current_time() + timeout
        self.pulled.put(digest, True)  # not ours: its pieces wait for our own (ranged.OWN_FIRST_FOR)

        def connected_holders() -> list[str]:  # none is dialled: a dialled peer is a neighbour
            return [peer for peer in holders() if peer in self.neighbourhood.connected()]
        try:
            return await fetch_from_holders(
                self, digest, size=size, author=author, holders=connected_holders, blame=blame, timeout=timeout,
                request_timeout=max(1.0, timeout * REQUEST_SHARE), max_sources=sources,
                me=self.peer_id, partials=self.partials, on_map=on_map)
        except TransferTimeout:
            raise
        except TransferError as error:  # no piece map (1.0.0 peers), or holders all failed
            logger.info("pieces of %s: %s; whole from the author", digest.hex()[:12], error)
        self._check_pullable(author)  # not redialled here either: the caller pulls again later
        return await self.fetch(author, digest, max_size=size, timeout=max(0.0, deadline - trio.current_time()))

    async def piece_map(self, peer: str, digest: bytes, *, size: int, timeout: float) -> Sequence[bytes]:
        """The piece map of ``digest`` as ``peer`` says (a :class:`~p2pfl.net.swarm.PieceSource`)."""
        self._check_pullable(peer)
        with self._judging_relay(peer):
            return await fetch_piece_map(self.host, peer, digest, size=size, timeout=timeout)

    async def pieces(
        self, peer: str, digest: bytes, *, size: int, first: int, count: int, timeout: float
    ) -> Sequence[bytes]:
        """Pieces of ``digest`` as ``peer`` sends them (a :class:`~p2pfl.net.swarm.PieceSource`);
        never dials (a puller redialling an author that had just trimmed it kept a hub full)."""
        self._check_pullable(peer)
        with self._judging_relay(peer) as relayed:
            got = await fetch_range(self.host, peer, digest, size=size, first=first, count=count,
                                    timeout=timeout)
        self._fetched_bytes += sum(map(len, got))
        self._count_relayed(relayed, sum(map(len, got)))
        self.neighbourhood.seen_alive(peer)
        return got

    async def have(self, peer: str, digest: bytes, *, size: int, timeout: float) -> Sequence[bool]:
        """The pieces of ``digest`` ``peer`` holds, as it says (a few bytes: no pull is judged)."""
        self._check_pullable(peer)
        return await fetch_have(self.host, peer, digest, size=size, timeout=timeout)

    def _check_pullable(self, peer: str) -> None:
        if self.neighbourhood.book.is_banned(peer, trio.current_time()) or peer not in self.neighbourhood.connected():
            raise PeerUnreachable(f"{short_id(peer)} is banned or not connected")

    def serve(self, digest: bytes, payload: bytes) -> None:
        """Offer ``payload`` (whose sha256 is ``digest``) to every peer."""
        self.store.put(digest, payload)
        self._pulled.setdefault(digest, set())

    def unserve(self, digest: bytes) -> None:
        """Stop offering a payload; unknown digests are ignored."""
        self.store.discard(digest)
        self._pulled.pop(digest, None)

    def pulled_by(self, digest: bytes) -> frozenset[str]:
        """Peers that pulled ``digest`` from us in full while we served it."""
        return frozenset(self._pulled.get(digest, ()))

    def neighbours(self) -> tuple[str, ...]:
        """PeerIds currently connected and usable, sorted."""
        return self.neighbourhood.neighbours()

    def ban(self, peer: str, *, seconds: float) -> None:
        """Disconnect ``peer``, refuse it for ``seconds`` and graylist it in GossipSub."""
        self.neighbourhood.ban(peer, seconds)
        self.gossip.penalise(peer)
        self._nursery.start_soon(self.neighbourhood.disconnect, peer)

    def stats(self) -> TrafficStats:
        """Counters since the transport opened."""
        counters = self.gossip.counters
        return TrafficStats(
            bytes_in=counters.bytes_in + self._fetched_bytes,
            bytes_out=counters.bytes_out + self._served_bytes,
            payload_in=self._fetched_bytes,
            payload_out=self._served_bytes,
            announcements_in=counters.delivered,
            announcements_out=counters.published,
            rejected_in=counters.rejected + counters.oversize,
            reachability=self.relaying.reach.state,
            relays=tuple(sorted(self.relaying.slots)),
            relayed_peers=self.relayed_peers(),
            payload_relayed=self._relayed_bytes,
            relay_scores=self.relaying.book.scores(),
            relay_forwarded=self.relaying.forwarded_bytes,
            gossip_reconnects=self.relisted,
            peer_paths=self.peer_paths.lines(self.neighbours),
        )

    def _on_range(self, peer: str, digest: bytes, size: int) -> None:
        self._served_bytes += size
        self._count_relayed(self._relayed_conn(peer), size)
        self.neighbourhood.seen_alive(peer)

    def _on_served(self, peer: str, digest: bytes, size: int) -> None:
        self._on_range(peer, digest, size)
        if (pullers := self._pulled.get(digest)) is not None:  # bounded: served digests x peers
            pullers.add(peer)

    def __repr__(self) -> str:
        return f"Libp2pTransport({short_id(self.peer_id)})"


@contextlib.asynccontextmanager
async def open_libp2p_transport(
    *, secret: bytes, network_id: str, config: NetConfig, limits: Limits, validator: Validator
) -> AsyncIterator[Libp2pTransport]:
    """Start a node's libp2p network; yield its transport; stop everything on exit.

    Args:
        secret: the node's 32-byte secp256k1 secret (``Identity.secret_bytes()``).
        network_id: binds gossip topic and peer exchange to one network/task.
        config: listen address, bootstrap, neighbour and timing settings.
        limits: caps on announcements and payloads.
        validator: runs on every announcement, received or published.

    Raises:
        ConfigError: ``config.mdns_interface`` is not an address of this machine.
    """
    if config.enable_mdns and config.mdns_interface is not None:
        require_local_interface(config.mdns_interface)  # before anything starts
    async with open_host(
        secret,
        listen_host=config.listen_host,
        port=config.port,
        dial_timeout=config.dial_timeout,
        max_inbound_streams_per_peer=config.max_inbound_streams_per_peer,
    ) as host:
        store = PayloadStore(max_total_bytes=STORE_PAYLOADS * limits.max_payload_bytes)
        neighbourhood = Neighbourhood(host, network_id=network_id, config=config)
        reach = Reachability(host, port=dialback_port(host, config.announce_addrs), dial_timeout=config.dial_timeout)
        relaying = Relaying(host, config=config, reach=reach)
        neighbourhood.relayed_addrs = relaying.relayed_addrs
        neighbourhood.relays = relaying.book  # one judgement of relays, for dials and slots
        async with (
            open_gossip(
                host,
                network_id=network_id,
                limits=limits,
                validator=validator,
                heartbeat_interval=config.heartbeat_interval,
                publish_rate=config.publish_rate,
                buffer=config.announcement_buffer,
            ) as gossip,
            open_hole_punching(host, config=config),
            trio.open_nursery() as nursery,
        ):
            transport = Libp2pTransport(
                host, gossip, neighbourhood, store, limits=limits, nursery=nursery, relaying=relaying
            )
            server = install_update_protocol(
                host,
                store,
                limits=limits,
                serve_timeout=config.transfer_timeout,
                on_served=transport._on_served,
            )
            install_ranged_protocol(host, server, on_range=transport._on_range, partials=transport.partials,
                                    pulled=lambda digest: digest in transport.pulled)
            transport.server = server
            neighbourhood.busy = transport.busy_peers  # spared probes, trims and reconnects
            install_session_protocol(host, server)
            host.get_network().register_notifee(BanGate(lambda p: neighbourhood.book.is_banned(p, trio.current_time()), neighbourhood.disconnect, nursery))
            logger.info("%s listening; peers can dial %s", short_id(transport.peer_id),
                        " ".join(transport.listen_addrs))
            await neighbourhood.maintain()  # bootstrap before handing the transport out
            nursery.start_soon(neighbourhood.run)
            nursery.start_soon(transport.sessions.run)
            nursery.start_soon(_keep_reachable, transport, reach, config.maintenance_interval)
            if config.enable_mdns and config.mdns_interface is not None:
                nursery.start_soon(functools.partial(
                    run_mdns, peer_id=transport.peer_id, network_id=network_id,
                    interface=config.mdns_interface,
                    addrs=advertised_addrs(transport.listen_addrs, config.mdns_interface),
                    on_peer=neighbourhood.learn_local))
            try:
                yield transport
            finally:
                nursery.cancel_scope.cancel()


async def _keep_reachable(transport: Libp2pTransport, reach: Reachability, interval: float) -> None:
    """Ask for dial-backs, keep relay slots while private, dial relayed peers directly
    where they can be, log paths, reconnect neighbours gossip lost; every ``interval``."""
    while True:
        try:
            direct = transport.direct_peers()
            await reach.check(direct)
            await transport.relaying.maintain(direct)
            book = transport.neighbourhood.book.peers
            await transport.relaying.upgrade({p: list(book[p].addrs) for p in transport.relayed_peers()
                                              if p in book})
            await transport.relaying.retire_circuits()
            transport.log_paths()
            busy = transport.busy_peers()  # a transfer in progress is not cut: reconnect after it
            idle = [p for p in transport.neighbours() if p not in busy]
            for peer in transport.gossip.unlisted(idle):  # both ends say hello again
                logger.info("neighbour %s: not subscribed in gossip, or no stream of ours, for %.0f s; reconnecting",
                            short_id(peer), UNLISTED_AFTER)
                transport.relisted += 1
                await transport.neighbourhood.disconnect(peer)
        except Exception:  # a libp2p surprise must not take the node's network down
            logger.exception("reachability pass failed; retrying next interval")
        await trio.sleep(interval)


__all__ = ["Libp2pTransport", "open_libp2p_transport"]
