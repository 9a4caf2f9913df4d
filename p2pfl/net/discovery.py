"""Finding peers of the same network and keeping a few of them as neighbours.

Discovery: bootstrap multiaddrs from config (a node with none is the first), then a
small peer-exchange stream protocol, ``/p2pfl/peers/1.0.0``, spoken with every
neighbour. Chosen over Kademlia and rendezvous for py-libp2p 0.8.1 on loopback because
it is one bounded request/reply, needs no extra service started before connecting
(KadDHT must be, trap 14), no rendezvous server (a central point), and doubles as the
liveness probe a lingering dead connection needs (trap 12: a real stream).

Wire format (version 1, UTF-8 text, ``\\n``-separated lines, both sides bounded):

- request (client, then closes its write side; at most 8 KiB): the line
  ``p2pfl-pex/1 <network-id>`` followed by the client's own listen multiaddrs;
- reply (server, then closes; at most 16 KiB): the same ``p2pfl-pex/1 <network-id>``
  line, then up to 32 multiaddrs of peers the server is connected to, its own first. A
  server of another network answers its own first line only (so both sides can log
  both network ids) and closes; a reply without that first line (an empty one included:
  a reset can read as a clean EOF) is a failed exchange. A peer of our network must
  answer: one that does not is probed as dead.

A peer that does not speak ``/p2pfl/peers/1.0.0`` at all (a plain libp2p node used as
bootstrap or relay) is kept connected as a GossipSub relay: never a neighbour, never
probed, never redialled while connected.

Claimed addresses are only dialled, never trusted: Noise authenticates the PeerId at
the end of each. The address book is bounded (``max_known_peers``); bootstrap entries
are never evicted.

Neighbour maintenance (one task): every ``maintenance_interval`` it exchanges peers
with each neighbour that moved no payload with us since the last pass (a failed
exchange = dead: disconnect, back off), drops banned and
surplus peers, and dials candidates until ``target_neighbours``; failed dials back off
exponentially (0.5 s doubling, capped at ``max_backoff``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError, ProtocolNotSupportedError

from p2pfl.config import NetConfig
from p2pfl.core.crypto import short_id
from p2pfl.errors import DecodeError, NetworkError, P2PFLError
from p2pfl.net.host import connect, listen_addrs
from p2pfl.net.peerbook import (  # re-exported: discovery's public names
    BASE_BACKOFF,
    COOL_OFF,
    MAX_ADDR_CHARS,
    MAX_ADDRS_PER_PEER,
    ConnectionAges,
    PeerBook,
    PeerRecord,
    parse_p2p_addr,
)
from p2pfl.net.relaybook import STALLED, RelayBook, relay_of
from p2pfl.net.streamio import open_with_request, parse_peer_id, reset_quietly

logger = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/p2pfl/peers/1.0.0")
MAGIC = "p2pfl-pex/1"
MAX_REQUEST_BYTES = 8 * 1024
MAX_REPLY_BYTES = 16 * 1024
MAX_REPLY_ADDRS = 32
# A neighbour busy moving payloads (alive without a probe) still gets a peer exchange every
# this many maintenance passes: it is how a node learns of peers that joined since.
EXCHANGE_EVERY = 10
# Our listen addresses are looked up again after this long (py-libp2p builds them afresh
# on every call, ~0.5 ms; each peer exchange, both ends, needs them).
OWN_ADDRS_SECONDS = 5.0


def encode_request(network_id: str, own: list[str]) -> bytes:
    """Return a peer-exchange request (bounded)."""
    return _encode_lines([f"{MAGIC} {network_id}", *own], MAX_REQUEST_BYTES)


def encode_reply(network_id: str, addrs: list[str]) -> bytes:
    """Return a peer-exchange reply (bounded)."""
    return _encode_lines([f"{MAGIC} {network_id}", *addrs[:MAX_REPLY_ADDRS]], MAX_REPLY_BYTES)


def _encode_lines(lines: list[str], limit: int) -> bytes:
    out = b""
    for line in lines:
        encoded = line.encode() + b"\n"
        if len(out) + len(encoded) > limit:
            break
        out += encoded
    return out


def decode_lines(data: bytes, *, max_lines: int) -> list[str]:
    """Split a request/reply into lines (DecodeError on non-UTF-8)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DecodeError("peer exchange message is not UTF-8") from error
    return [line for line in text.split("\n") if line][:max_lines]


async def read_bounded(stream: INetStream, limit: int) -> bytes:
    """Read until EOF; DecodeError if the peer sends more than ``limit`` bytes."""
    data = bytearray()
    while True:
        try:
            chunk = await stream.read(limit + 1 - len(data))
        except StreamEOF:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise DecodeError(f"peer exchange message over {limit} bytes")


class Neighbourhood:
    """Bootstrap, peer exchange and neighbour maintenance for one host and network."""

    def __init__(self, host: IHost, *, network_id: str, config: NetConfig) -> None:
        self.host = host
        self.network_id = network_id
        self.config = config
        self.me = host.get_id().to_string()
        self.book = PeerBook(me=self.me, capacity=config.max_known_peers,
                             max_backoff=config.max_backoff)
        for address in config.bootstrap:
            self.book.learn(address, bootstrap=True)
        self._magic = f"{MAGIC} {network_id}"
        self.changed = trio.Event()  # set whenever neighbours may have changed
        self._wake = trio.Event()  # set to run the next maintenance pass early
        self._alive: dict[str, float] = {}  # peer -> when a payload last moved between us
        self._exchanged: dict[str, float] = {}  # connected peer -> our last exchange with it
        self.ages = ConnectionAges()  # trims cut the youngest; a peer that cut us soon rests
        # Peers a payload is moving to or from (set by the transport): alive, and not cut off.
        self.busy: Callable[[], set[str]] = set
        self._listen: tuple[float, list[str]] | None = None  # (when, our listen addresses)
        # This node's addresses through relays (p2pfl.net.relay), announced before the
        # direct ones: behind NAT those are the ones that work.
        self.relayed_addrs: Callable[[], list[str]] = list
        # How the relays we dialled through behaved: orders a peer's relayed addresses.
        self.relays = RelayBook()
        host.set_stream_handler(PROTOCOL_ID, self.handle_exchange)

    def own_addrs(self) -> list[str]:
        """The addresses this node announces: relayed ones first, then direct ones."""
        now = trio.current_time()
        if self._listen is None or not self._listen[1] or now - self._listen[0] >= OWN_ADDRS_SECONDS:
            self._listen = (now, listen_addrs(self.host, self.config.announce_addrs))
        return [*self.relayed_addrs(), *self._listen[1]]

    def seen_alive(self, peer: str) -> None:
        """Note that a payload just moved between us and ``peer``: no probe needed for a while."""
        if peer in self.connected():  # bounded by our connections
            self._alive[peer] = trio.current_time()

    # -- queries ---------------------------------------------------------------------

    def connected(self) -> set[str]:
        """Return the PeerIds with an open connection."""
        return {p.to_string() for p in self.host.get_connected_peers()}

    def neighbours(self) -> tuple[str, ...]:
        """Return connected, confirmed, unbanned peers, sorted."""
        now = trio.current_time()
        return tuple(sorted(
            p for p in self.connected()
            if p in self.book.peers and self.book.peers[p].confirmed
            and not self.book.is_banned(p, now)
        ))

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -- protocol --------------------------------------------------------------------

    async def handle_exchange(self, stream: INetStream) -> None:
        """Serve one peer-exchange request (never raises into libp2p)."""
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(self.config.dial_timeout):
                lines = decode_lines(await read_bounded(stream, MAX_REQUEST_BYTES),
                                     max_lines=MAX_REPLY_ADDRS + 1)
                if lines and lines[0].startswith(f"{MAGIC} ") and lines[0] != self._magic:
                    _log_other_network(peer, lines[0], self.network_id)
                    await stream.write(encode_reply(self.network_id, []))  # name ours, share none
                    await stream.close()
                    return
                if not lines or lines[0] != self._magic:
                    raise DecodeError(f"not our network's peer exchange: {lines[:1]!r}")
                if self.book.is_banned(peer, trio.current_time()):
                    raise NetworkError("banned")
                self._learn_from(peer, lines[1:], claimed_by=peer)
                await stream.write(encode_reply(self.network_id, self._shareable()))
                await stream.close()
        except Exception as error:  # hostile input or a dead peer: refuse, never raise
            logger.debug("peer exchange from %s refused: %r", short_id(peer), error)
            await reset_quietly(stream, shield=False)

    def _learn_from(self, peer: str, addrs: list[str], *, claimed_by: str | None) -> None:
        """Record addresses; those claimed by ``peer`` for itself must carry its id.

        The book puts the newest address first: learn in reverse so the peer's own
        order (its preferred address first) is kept.
        """
        for address in reversed(addrs):
            if claimed_by is not None and parse_p2p_addr(address) != claimed_by:
                continue
            self.book.learn(address)
        if claimed_by is not None and claimed_by in self.book.peers:
            self.book.succeeded(claimed_by)
            self._notify()

    def learn_local(self, addrs: list[str]) -> str | None:
        """Record addresses a LAN announcement (mDNS) claims for one peer; return its id.

        Like bootstrap addresses they are only dialled, never trusted: the peer becomes a
        neighbour only once it answers our network's peer exchange. A new peer wakes
        maintenance so it is dialled without waiting a full interval.
        """
        claimed = {parse_p2p_addr(a) for a in addrs}
        if len(claimed) != 1 or None in claimed:
            return None
        peer = claimed.pop()
        is_new = peer not in self.book.peers
        for address in addrs:
            self.book.learn(address)
        if is_new and peer in self.book.peers:
            self._wake.set()
        return peer if peer in self.book.peers else None

    def _shareable(self) -> list[str]:
        """Our addresses, then one address of each connected confirmed neighbour."""
        out = self.own_addrs()
        for peer in self.neighbours():
            out.extend(self.book.peers[peer].addrs[:1])
        return out

    async def exchange(self, peer: str) -> None:
        """Swap addresses with a connected ``peer`` (also its liveness probe).

        Raises:
            NoPeerExchange: ``peer`` does not speak ``/p2pfl/peers/1.0.0`` (plain libp2p).
            OtherNetwork: ``peer`` answered for another network id.
            NetworkError: no stream, a reset, a timeout or a malformed reply.
        """
        try:
            with trio.fail_after(self.config.dial_timeout):
                reply = await self._request(peer)
            lines = decode_lines(reply, max_lines=MAX_REPLY_ADDRS + 1)
        except P2PFLError as error:
            raise NetworkError(f"peer exchange with {short_id(peer)}: {error}") from error
        except Exception as error:  # libp2p stream/mux errors and trio.TooSlowError
            if _protocol_unsupported(error):
                raise NoPeerExchange(f"{short_id(peer)} does not speak {PROTOCOL_ID} "
                                     "(a plain libp2p node)") from error
            raise NetworkError(f"peer exchange with {short_id(peer)} failed: {error!r}") from error
        if lines and lines[0].startswith(f"{MAGIC} ") and lines[0] != self._magic:
            theirs = lines[0].removeprefix(f"{MAGIC} ")[:64]
            raise OtherNetwork(f"{short_id(peer)} is on network {theirs!r}, "
                               f"this node on {self.network_id!r}")
        if not lines or lines[0] != self._magic:
            raise NetworkError(f"{short_id(peer)} does not speak our network's peer exchange")
        addrs = lines[1:]
        self._exchanged[peer] = trio.current_time()
        own = [a for a in addrs if parse_p2p_addr(a) == peer]
        self.ages.degree[peer] = len({parse_p2p_addr(a) for a in addrs} - {peer, None})  # us included
        self._learn_from(peer, own, claimed_by=peer)
        self._learn_from(peer, [a for a in addrs if a not in own], claimed_by=None)

    async def _request(self, peer: str) -> bytes:
        request = encode_request(self.network_id, self.own_addrs())
        stream = await open_with_request(self.host, parse_peer_id(peer), PROTOCOL_ID, request)
        try:
            await stream.close_write()  # type: ignore[attr-defined]  # NetStream has it
            return await read_bounded(stream, MAX_REPLY_BYTES)
        finally:
            await reset_quietly(stream, shield=False)

    # -- maintenance -----------------------------------------------------------------

    async def run(self) -> None:
        """Maintain neighbours forever (cancel to stop)."""
        while True:
            with trio.move_on_after(self.config.maintenance_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.maintain()
            except Exception:  # a libp2p surprise must not take the node's network down
                logger.exception("neighbour maintenance pass failed; retrying next interval")

    async def maintain(self) -> None:
        """Run one maintenance pass: drop banned/dead/surplus, then top up."""
        now = trio.current_time()
        connected = self.connected()
        for peer in self.ages.update(connected, now):
            self.book.cool(peer, now + COOL_OFF)
        for peer in connected:
            if self.book.is_banned(peer, now):
                await self.disconnect(peer)
        # A neighbour that served or pulled a payload since the last pass is alive: its
        # probe (a stream, a peer exchange) is what a busy network would pay every pass.
        # Still exchange with it every EXCHANGE_EVERY passes: a node behind NAT finds
        # peers only by asking (nobody can dial it to introduce themselves).
        recent = {p for p, t in self._alive.items() if now - t < self.config.maintenance_interval}
        self._alive = {p: t for p, t in self._alive.items() if p in recent}
        self._exchanged = {p: self._exchanged.get(p, now) for p in connected}  # new: from now
        every = EXCHANGE_EVERY * self.config.maintenance_interval
        recent = {p for p in recent if now - self._exchanged.get(p, now) < every}
        relays = {p for p in connected if p in self.book.peers and self.book.peers[p].relay_only}
        busy = self.busy()  # as alive as a peer that just moved a payload
        async with trio.open_nursery() as nursery:
            for peer in connected - recent - busy - relays - {p for p in connected if self.book.is_banned(p, now)}:
                nursery.start_soon(self._probe, peer)
        await self._trim(busy)
        await self._top_up()

    async def _probe(self, peer: str) -> None:
        relays = {relay_of(c) for c in self.host.get_network().get_connections(parse_peer_id(peer))}
        try:
            await self.exchange(peer)
        except NetworkError as error:
            logger.info("neighbour %s failed its probe: %s", short_id(peer), error)
            if len(relays) == 1 and (relay := relays.pop()) is not None:  # through that relay only
                self.relays.record(relay, STALLED, "a peer exchange through it failed")
            self.book.failed(peer, trio.current_time(), str(error))
            await self.disconnect(peer)

    async def _trim(self, busy: set[str]) -> None:
        """Drop surplus neighbours in :meth:`ConnectionAges.trim_order`: a busy one's transfers
        are cut only when the idle ones do not make up the surplus. (Sparing busy ones
        until idle kept a hub's surplus for good with a big model; cutting busy ones at
        random churned a hub's neighbours every pass, session 11; the youngest alone
        locked a node out of a full network.)"""
        neighbours = self.neighbours()
        idle = [p for p in neighbours if p not in busy]
        engaged = [p for p in neighbours if p in busy]
        order = self.ages.trim_order(random.sample(idle, len(idle)), random.sample(engaged, len(engaged)),
                                     self.book.target(self.config.target_neighbours))
        for peer in order[: max(0, len(neighbours) - self.config.max_neighbours)]:
            logger.info("trimming %s (%s, of %d)", short_id(peer), "busy" if peer in busy else "idle", len(neighbours))
            await self.disconnect(peer)

    async def _top_up(self) -> None:
        need = self.book.target(self.config.target_neighbours) - len(self.neighbours())
        # Dials are sequential and each may take dial_timeout: cap one pass's attempts so a
        # book full of dead (or planted) addresses cannot stall maintenance.
        attempts = 2 * need + 2
        for peer in self.book.candidates(trio.current_time(), exclude=self.connected()):
            if need <= 0 or attempts <= 0:
                break
            attempts -= 1
            if await self._dial(peer):
                need -= 1

    async def _dial(self, peer: str) -> bool:
        record = self.book.peers[peer]
        reason = f"{short_id(peer)} has no address"
        for address in self.relays.rank_addrs(record.addrs):
            try:
                await connect(self.host, address, timeout=self.config.dial_timeout, relays=self.relays)
                await self.exchange(peer)
            except NoPeerExchange as error:
                self._keep_as_relay(peer, str(error))
                return False
            except P2PFLError as error:
                logger.debug("dial %s via %s failed: %s", short_id(peer), address, error)
                reason = str(error)
                continue
            return True
        delay = self.book.failed(peer, trio.current_time(), reason)
        level = logging.WARNING if "is on network" in reason else logging.INFO
        if record.bootstrap or level == logging.WARNING:
            logger.log(level, "%s; retrying in %.1f s", reason, delay)  # each reason names the peer
        await self.disconnect(peer)
        return False

    def _keep_as_relay(self, peer: str, reason: str) -> None:
        """Keep a peer without our peer exchange connected as a GossipSub relay only."""
        record = self.book.peers[peer]
        if not record.relay_only:
            logger.warning("%s; kept connected as a gossip relay only (it cannot introduce "
                           "peers; give a p2pfl node as bootstrap too)", reason)
        record.relay_only, record.last_error = True, reason

    async def disconnect(self, peer: str) -> None:
        """Close every connection to ``peer`` (bounded, never raises)."""
        self.ages.ours.add(peer)  # not rested for it: we cut it (a trim, a probe, a gossip reconnect)
        with trio.move_on_after(self.config.dial_timeout):
            try:
                await self.host.disconnect(ID.from_base58(peer))
            except Exception as error:  # already gone
                logger.debug("disconnect %s: %r", short_id(peer), error)
        self._notify()

    def ban(self, peer: str, seconds: float) -> None:
        """Refuse ``peer`` for ``seconds``; the next maintenance pass disconnects it."""
        self.book.ban(peer, trio.current_time() + seconds)


class NoPeerExchange(NetworkError):
    """The peer negotiated ``na`` for ``/p2pfl/peers/1.0.0``: a plain libp2p node."""


class OtherNetwork(NetworkError):
    """The peer answered peer exchange for another network id."""


def _protocol_unsupported(error: BaseException | None) -> bool:
    """Whether a failed ``new_stream`` was the peer answering ``na`` (py-libp2p 0.8.1)."""
    while error is not None:
        if isinstance(error, ProtocolNotSupportedError) or (
            isinstance(error, MultiselectClientError) and str(error).startswith("protocols not supported")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _log_other_network(peer: str, line: str, ours: str) -> None:
    theirs = line.removeprefix(f"{MAGIC} ")[:64]
    logger.warning("peer %s is on network %r, this node on %r: refused", short_id(peer), theirs, ours)


__all__ = [
    "BASE_BACKOFF",
    "MAX_ADDRS_PER_PEER",
    "MAX_ADDR_CHARS",
    "PROTOCOL_ID",
    "Neighbourhood",
    "NoPeerExchange",
    "OtherNetwork",
    "PeerBook",
    "PeerRecord",
    "decode_lines",
    "encode_reply",
    "encode_request",
    "parse_p2p_addr",
    "read_bounded",
]
