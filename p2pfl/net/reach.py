"""Whether this node can be dialled from outside: a dial-back by its peers.

A node behind NAT (or a firewall that refuses inbound connections) can dial out but
nobody can dial it; it then needs a relay (:mod:`p2pfl.net.relay`). It learns which it
is by asking connected peers to dial it back, over ``/p2pfl/dialback/1.0.0``:

- request, 2 bytes: ``u16 port`` (big-endian), the TCP port the asker listens on;
- reply, 1 byte: ``0`` reached, ``1`` not reached, ``2`` refused (busy, asked too often,
  or asked over a relayed connection, whose far end is the relay).

The server dials the port **at the IP address the request came from** (never an
address the asker names: no reflection onto third parties), with a plain TCP connect
under ``dial_timeout``, and counts it reached only if a libp2p listener answers (its
multistream-select header ``/multistream/1.0.0``). One dial-back per peer per
:data:`MIN_INTERVAL` and :data:`MAX_CONCURRENT` at once; anything more is refused.

The asker keeps the answers of its last :data:`MAX_ANSWERS` askings for
:data:`ANSWER_TTL`: reachable when most say reached, unreachable when most say not.
A lying peer can only sway one vote. A peer asked is not asked again within
:data:`MIN_INTERVAL` (it would refuse), so a pass moves on to peers not asked yet: plain
libp2p bootstraps, which never answer, cannot keep a node unknown (and without a relay)
forever.
"""

from __future__ import annotations

import logging
import struct
import weakref
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2pfl.core.crypto import short_id
from p2pfl.net.streamio import read_exact, reset_quietly

logger = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/p2pfl/dialback/1.0.0")
REACHED, NOT_REACHED, REFUSED = 0, 1, 2
MULTISTREAM_HEADER = b"\x13/multistream/1.0.0\n"
MIN_INTERVAL = 30.0  # seconds between two dial-backs for one peer
MAX_CONCURRENT = 4
MAX_ANSWERS = 5
ANSWER_TTL = 300.0  # seconds; then peers are asked again (the network may have changed)

PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"


# connection -> (the address list judged, its answer): rendering a multiaddr as text costs
# ~30 us and every pull and serve asks, for the same few connections, over and over.
_JUDGED: weakref.WeakKeyDictionary[object, tuple[object, bool]] = weakref.WeakKeyDictionary()


def is_relayed(conn: object) -> bool:
    """Whether a swarm connection runs through a relay (``/p2p-circuit``)."""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:  # type: ignore[attr-defined]
            return True
        addrs = conn.get_transport_addresses()  # type: ignore[attr-defined]
    except Exception:  # a half-built connection: treat as direct, the dial-back is bounded anyway
        return False
    try:
        judged = _JUDGED.get(conn)
    except TypeError:  # not weakly referable: judge it every time
        return _through_circuit(addrs)
    if judged is not None and judged[0] is addrs:  # the same list: set once per connection
        return judged[1]
    answer = _through_circuit(addrs)
    _JUDGED[conn] = (addrs, answer)
    return answer


def _through_circuit(addrs: object) -> bool:
    try:
        return any("/p2p-circuit" in str(a) for a in addrs)  # type: ignore[attr-defined]
    except Exception:  # a half-built connection, as above
        return False


def remote_ip(conn: object) -> str | None:
    """The IPv4 address a direct connection comes from, or None."""
    try:
        for address in conn.get_transport_addresses():  # type: ignore[attr-defined]
            text = str(address)
            if text.startswith("/ip4/") and "/p2p-circuit" not in text:
                return text.split("/")[2]
    except Exception:
        return None
    return None


async def probe(ip: str, port: int, *, timeout: float) -> bool:
    """Whether a libp2p listener answers at ``ip:port`` within ``timeout``."""
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        async with stream:
            seen = b""
            while len(seen) < len(MULTISTREAM_HEADER):
                chunk = await stream.receive_some(len(MULTISTREAM_HEADER) - len(seen))
                if not chunk:
                    return False
                seen += chunk
            return seen == MULTISTREAM_HEADER
    return False


@dataclass
class _Answer:
    reached: bool
    at: float


class Reachability:
    """Asks peers to dial this node back and answers their requests (see module docstring)."""

    def __init__(self, host: IHost, *, port: int, dial_timeout: float) -> None:
        self.host = host
        self.port = port
        self.dial_timeout = dial_timeout
        self._answers: dict[str, _Answer] = {}  # asked peer -> its answer (<= MAX_ANSWERS)
        self._served: dict[str, float] = {}  # peer -> when we last dialled it back
        self._asked: dict[str, float] = {}  # peer -> when we last asked it (answered or not)
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT)
        host.set_stream_handler(PROTOCOL_ID, self.handle)

    @property
    def state(self) -> str:
        """``public``, ``private`` or ``unknown`` (no answer yet)."""
        now = trio.current_time()
        votes = [a.reached for a in self._answers.values() if now - a.at < ANSWER_TTL]
        if not votes:
            return UNKNOWN
        return PUBLIC if 2 * sum(votes) >= len(votes) else PRIVATE

    # -- asking ----------------------------------------------------------------------

    async def check(self, peers: list[str]) -> None:
        """Ask up to two of ``peers`` (direct connections) whose answer is missing or old
        and that were not asked in the last :data:`MIN_INTERVAL`."""
        now = trio.current_time()
        fresh = {p for p, a in self._answers.items() if now - a.at < ANSWER_TTL}
        self._asked = {p: t for p, t in self._asked.items() if now - t < MIN_INTERVAL}
        wanted = [p for p in peers if p not in fresh and p not in self._asked][:2]
        if len(fresh) >= MAX_ANSWERS or not wanted:
            return
        async with trio.open_nursery() as nursery:
            for peer in wanted:
                self._asked[peer] = now
                nursery.start_soon(self._ask, peer)

    async def _ask(self, peer: str) -> None:
        before = self.state
        try:
            with trio.fail_after(2 * self.dial_timeout):  # its dial-back takes up to one
                stream = await self.host.new_stream(ID.from_base58(peer), [PROTOCOL_ID])
                try:
                    await stream.write(struct.pack(">H", self.port))
                    reply = await stream.read(1)
                finally:
                    await reset_quietly(stream, shield=False)
        except Exception as error:  # no answer (a peer without the protocol included): no vote
            logger.debug("dial-back by %s: no answer (%r)", short_id(peer), error)
            return
        if reply[:1] in (bytes([REACHED]), bytes([NOT_REACHED])):
            self.record(peer, reached=reply[0] == REACHED)
            if self.state != before:
                logger.info("reachability: %s (dial-back by %s: %s)", self.state, short_id(peer),
                            "reached" if reply[0] == REACHED else "not reached")

    def record(self, peer: str, *, reached: bool) -> None:
        """Keep ``peer``'s dial-back answer (the oldest answer goes beyond MAX_ANSWERS)."""
        self._answers[peer] = _Answer(reached, trio.current_time())
        while len(self._answers) > MAX_ANSWERS:
            del self._answers[min(self._answers, key=lambda p: self._answers[p].at)]

    # -- answering -------------------------------------------------------------------

    async def handle(self, stream: INetStream) -> None:
        """Answer one dial-back request (never raises into libp2p)."""
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(2 * self.dial_timeout):
                request = await read_exact(stream, 2)
                verdict = await self._dial_back(peer, stream, struct.unpack(">H", request)[0])
                await stream.write(bytes([verdict]))
                await stream.close()
        except Exception as error:  # hostile or dead asker: refuse, never raise
            logger.debug("dial-back request from %s refused: %r", short_id(peer), error)
            await reset_quietly(stream, shield=False)

    async def _dial_back(self, peer: str, stream: INetStream, port: int) -> int:
        now = trio.current_time()
        self._served = {p: t for p, t in self._served.items() if now - t < MIN_INTERVAL}
        conn = _swarm_conn_of(self.host, stream)
        ip = remote_ip(conn) if conn is not None and not is_relayed(conn) else None
        if ip is None or port == 0 or peer in self._served:
            return REFUSED
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            return REFUSED
        try:
            self._served[peer] = now
            return REACHED if await probe(ip, port, timeout=self.dial_timeout) else NOT_REACHED
        finally:
            self._limiter.release()


def _swarm_conn_of(host: IHost, stream: INetStream) -> object | None:
    for conn in host.get_network().get_connections(stream.muxed_conn.peer_id):
        if conn.muxed_conn is stream.muxed_conn:
            return conn
    return None


__all__ = ["PRIVATE", "PROTOCOL_ID", "PUBLIC", "UNKNOWN", "Reachability", "is_relayed", "probe",
           "remote_ip"]
