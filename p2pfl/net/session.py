"""``/p2pfl/update/1.2.0``: many pulls, one after another, on one long-lived stream per peer.

Version 1.0.0 (:mod:`p2pfl.net.transfer`) opens a stream per pull: a Yamux open and
close at each end, a multistream negotiation, a handler task, ~30 trio task steps at
each end (session 8's task profile), for a payload that is often one frame. 1.2.0 keeps
1.0.0's request and reply and carries a sequence of them on one stream; a puller keeps
one idle session per peer. A node serves 1.0.0, 1.1.0 and 1.2.0; a 1.0.0-only peer is
pulled from over 1.0.0 (below).

Wire format (all integers unsigned big-endian)
----------------------------------------------
Request: 41 bytes, ``u8 version = 3 | digest (32) | u64 max_size``, as 1.0.0's but
*not* followed by a write-close. Reply: 1.0.0's ``u8 status | u64 length | body``
(body for OK only), not followed by a write-close either. The client sends its next
request only once the previous reply is read in full: one request per stream at a time.
The client ends a session by closing its write side (the server then closes its own);
the server closes (FIN) a session idle for :data:`SERVER_IDLE` seconds and resets one
that broke the protocol.

Server: waits 1.0.0's request deadline for the first request (the opener asks at once)
and :data:`SERVER_IDLE` for each next one to begin, then reads the rest of it within
1.0.0's request deadline; answers exactly as 1.0.0 does (same store, caps, statuses,
slots, BUSY queue and write deadlines); then reads the next. A request that is short,
of another version, or arrives after a half-close gets a reset. A peer holding
:data:`SESSIONS_PER_PEER` sessions gets one reply on any more, then FIN: the extra
session is a one-shot pull. Requests queued behind the one in progress are never read
ahead: Yamux's stream window bounds what a peer can buffer, as for any stream.

Client (:class:`Sessions`): takes the peer's idle session, or opens one (the request is
not pipelined into the negotiation: a 1.0.0-only listener resets a stream on bytes after
a protocol it refused, and the refusal would be lost); reads the reply with 1.0.0's checks in order (status
known; ``length <= max_size`` before reading; exactly ``length`` bytes; sha256), all
under the pull's one deadline. After an OK, NOT_FOUND or BUSY reply the session is
idle again; after any other outcome (a timeout, a cancel, a reset, garbage: the same
errors a 1.0.0 pull raises) it is reset and dropped, and the next pull opens a fresh
one. Bytes a peer sent after its last reply are found when the session is next taken:
``ProtocolViolation``, as 1.0.0's trailing bytes. A reused session that ends cleanly
before the first reply byte (the server's idle close crossed our request) is retried
once on a fresh stream, not blamed. Idle sessions are closed after :data:`CLIENT_IDLE`
(below the server's, so the server rarely closes one under a request). A peer whose
multistream refuses 1.2.0 is pulled from over 1.0.0 and asked again after
:data:`OLD_PEER_RECHECK` seconds.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, OrderedDict
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF

from p2pfl.core.bounded import BoundedMap
from p2pfl.core.envelope import CheckedPayload
from p2pfl.errors import PayloadNotFound, PeerBusy, PeerUnreachable, ProtocolViolation
from p2pfl.net import transfer
from p2pfl.net.streamio import (
    as_protocol_errors,
    close_quietly,
    parse_peer_id,
    read_exact,
    reset_quietly,
)
from p2pfl.net.transfer import REPLY_HEADER, REQUEST_TIMEOUT, _Malformed, _remote_peer, _Server

logger = logging.getLogger(__name__)

SESSION_PROTOCOL_ID = TProtocol("/p2pfl/update/1.2.0")
VERSION = 3
REQUEST = struct.Struct(">B32sQ")  # version, digest, max_size: 41 bytes, as 1.0.0
SERVER_IDLE = 30.0  # a session without a request this long is closed by the server
CLIENT_IDLE = 20.0  # ... and by the client after this (below SERVER_IDLE: fewer races)
SESSIONS_PER_PEER = 4  # sessions a server keeps open per peer; more get one reply each
IDLE_SESSIONS = 256  # idle sessions a client keeps (one per peer); the oldest closed first
OLD_PEERS = 1024  # peers remembered as speaking 1.0.0 only
OLD_PEER_RECHECK = 600.0  # ... for this long (a peer may upgrade)
KEPT_AFTER = (PayloadNotFound, PeerBusy)  # replies that end cleanly without a body


# ---------------------------------------------------------------------------- server


class SessionServer:
    """The 1.2.0 handler, sharing a 1.0.0 server's store, slots and deadlines."""

    def __init__(self, server: _Server, *, idle: float = SERVER_IDLE) -> None:
        self._server, self._idle = server, idle
        self.open: Counter[str] = Counter()  # peer -> sessions being served

    async def handle(self, stream: INetStream) -> None:
        """Serve one session until the peer closes it or it idles; never raise an ``Exception``."""
        peer = _remote_peer(stream)
        extra = self.open[peer] >= SESSIONS_PER_PEER
        self.open[peer] += 1
        # The opener asks at once: its first request has 1.0.0's request deadline, the
        # next ones the idle deadline (a silent opener holds a stream no longer than today).
        wait = min(REQUEST_TIMEOUT, self._server.serve_timeout)
        try:
            while (request := await self._next_request(stream, wait)) is not None:
                await self._server._reply(stream, peer, *request, close=False)
                if extra:
                    break
                wait = self._idle
            await close_quietly(stream)
        except Exception as exc:  # hostile or vanished peer: drop this session only
            logger.info("update session from %s failed: %r", peer[-8:], exc)
            await reset_quietly(stream)
        finally:
            self.open[peer] -= 1
            if self.open[peer] <= 0:
                del self.open[peer]

    async def _next_request(self, stream: INetStream, wait: float) -> tuple[bytes, int] | None:
        """The next (digest, max_size), or None once the peer closed or ``wait`` s passed first."""
        first = b""
        with trio.move_on_after(wait):
            try:
                first = await stream.read(REQUEST.size)
            except StreamEOF:
                return None
        if not first:
            return None
        with trio.fail_after(min(REQUEST_TIMEOUT, self._server.serve_timeout)):
            raw = first + await read_exact(stream, REQUEST.size - len(first))
        version, digest, max_size = REQUEST.unpack(raw)
        if version != VERSION:
            raise _Malformed(f"unsupported version {version}")
        return digest, max_size


def install_session_protocol(host: IHost, server: _Server, *, idle: float = SERVER_IDLE) -> SessionServer:
    """Serve 1.2.0 on ``host`` from the store of ``server`` (a 1.0.0 server, same slots)."""
    sessions = SessionServer(server, idle=idle)
    host.set_stream_handler(SESSION_PROTOCOL_ID, sessions.handle)
    return sessions


# ---------------------------------------------------------------------------- client


class _Ended(Exception):
    """A reused session ended before the first reply byte (internal: retry on a fresh one)."""


class Sessions:
    """A puller's 1.2.0 sessions: at most one idle per peer, and who speaks 1.0.0 only."""

    def __init__(self, host: IHost, *, idle: float = CLIENT_IDLE) -> None:
        self._host, self._idle_after = host, idle
        self._idle: OrderedDict[str, tuple[INetStream, float]] = OrderedDict()  # peer -> (session, since)
        self._old: BoundedMap[str, bool] = BoundedMap(OLD_PEERS)
        self.opened = 0  # sessions opened since start (tests and benchmarks read it)

    async def fetch(self, peer_id: str, digest: bytes, *, max_size: int, timeout: float) -> CheckedPayload:
        """Pull ``digest`` from ``peer_id`` as :func:`p2pfl.net.transfer.fetch_checked_payload`
        does (same checks, same errors), over the peer's session when it speaks 1.2.0."""
        transfer.check_request(digest, max_size)
        return await transfer.within(
            timeout, f"no payload from {peer_id[-8:]}", lambda: self._fetch(peer_id, digest, max_size)
        )

    async def run(self) -> None:
        """Close idle sessions as they pass :data:`CLIENT_IDLE`, until cancelled."""
        while True:
            await trio.sleep(self._idle_after / 4)
            await self.close_idle(trio.current_time() - self._idle_after)

    async def close_idle(self, before: float = float("inf")) -> None:
        """Close the idle sessions last used before ``before`` (default: all)."""
        for peer, (session, since) in list(self._idle.items()):
            if since < before and self._idle.get(peer, (None,))[0] is session:
                del self._idle[peer]
                await close_quietly(session)

    def idle_peers(self) -> tuple[str, ...]:
        """Peers with an idle session, oldest first."""
        return tuple(self._idle)

    async def _fetch(self, peer: str, digest: bytes, max_size: int) -> CheckedPayload:
        now = trio.current_time()
        if self._old.peek(peer, now=now):
            return await transfer.fetch_once(self._host, peer, digest, max_size)
        request = REQUEST.pack(VERSION, digest, max_size)
        if (session := await self._take(peer)) is not None:
            try:
                return await self._pull(peer, session, request, digest, max_size, reused=True)
            except _Ended:
                logger.debug("session to %s ended while idle; opening another", peer[-8:])
        try:  # the request is not pipelined here: a 1.0.0-only listener would reset on it
            session = await self._host.new_stream(parse_peer_id(peer), [SESSION_PROTOCOL_ID])
        except Exception as exc:
            if not _refused(exc):
                raise PeerUnreachable(f"cannot open {SESSION_PROTOCOL_ID} to {peer[-8:]}: {exc!r}") from exc
            logger.info("%s speaks no %s; pulling over 1.0.0", peer[-8:], SESSION_PROTOCOL_ID)
            self._old.put(peer, True, expires_at=now + OLD_PEER_RECHECK)
            return await transfer.fetch_once(self._host, peer, digest, max_size)
        self.opened += 1
        return await self._pull(peer, session, request, digest, max_size, reused=False)

    async def _take(self, peer: str) -> INetStream | None:
        """The peer's idle session if it is still usable (the peer has not closed it)."""
        if (entry := self._idle.pop(peer, None)) is None:
            return None
        session = entry[0]
        if _unread(session):
            await reset_quietly(session)
            raise ProtocolViolation("bytes after a reply on an idle session")
        if _peer_closed(session):
            await close_quietly(session)
            return None
        return session

    async def _pull(
        self, peer: str, session: INetStream, request: bytes, digest: bytes, max_size: int, *, reused: bool
    ) -> CheckedPayload:
        """One exchange on ``session``, then idle it, or drop it if anything went wrong."""
        try:
            payload = await _exchange(session, request, digest, max_size, reused=reused)
        except KEPT_AFTER:
            await self._put_back(peer, session)
            raise
        except BaseException:
            await reset_quietly(session)
            raise
        await self._put_back(peer, session)
        return payload

    async def _put_back(self, peer: str, session: INetStream) -> None:
        extra = self._idle.pop(peer, None)  # a concurrent pull's session to the same peer
        if extra is None and len(self._idle) >= IDLE_SESSIONS:
            extra = self._idle.popitem(last=False)[1]
        self._idle[peer] = (session, trio.current_time())
        if extra is not None:
            await close_quietly(extra[0])


async def _exchange(
    session: INetStream, request: bytes, digest: bytes, max_size: int, *, reused: bool
) -> CheckedPayload:
    """Write ``request``, read its reply (on a ``reused`` session an EOF first is benign)."""
    with as_protocol_errors():
        head = await _first_reply_bytes(session, request)
        if not head and not reused:
            raise ProtocolViolation("stream ended before the reply")
    if not head:
        raise _Ended
    with as_protocol_errors():
        head += await read_exact(session, REPLY_HEADER.size - len(head))
        status, length = REPLY_HEADER.unpack(head)
        transfer.check_reply_status(status, length, max_size)
        return await transfer.read_body(session, length, digest)


async def _first_reply_bytes(session: INetStream, request: bytes) -> bytes:
    """Write ``request``; return the first reply bytes (b"": the peer had closed the session)."""
    await session.write(request)
    try:
        head = await session.read(REPLY_HEADER.size)
    except StreamEOF:
        head = b""
    if not head and getattr(_muxed(session), "reset_received", False):  # 0.8.1 reads b"" then
        raise ProtocolViolation("stream reset by peer")
    return head


def _muxed(session: INetStream) -> Any:
    return getattr(session, "muxed_stream", None)


def _unread(session: INetStream) -> int:
    """Bytes the peer sent on ``session`` that nobody read (Yamux streams; 0 otherwise)."""
    muxed = _muxed(session)
    buffers = getattr(getattr(muxed, "conn", None), "stream_buffers", None)
    return len(buffers.get(muxed.stream_id, b"")) if isinstance(buffers, dict) else 0


def _peer_closed(session: INetStream) -> bool:
    """Whether the peer closed its side (FIN; a reset is found by the next read), or the
    connection under ``session`` is gone."""
    muxed = _muxed(session)
    if getattr(muxed, "reset_received", False):
        return False
    conn = getattr(muxed, "conn", None)
    return bool(getattr(muxed, "recv_closed", False) or getattr(conn, "is_closed", False))


def _refused(error: BaseException) -> bool:
    """Whether opening a stream failed because the peer's multistream said ``na``."""
    seen: BaseException | None = error
    for _ in range(8):  # the cause chain of host.new_stream's StreamFailure
        if seen is None:
            return False
        if "protocols not supported" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


__all__ = [
    "SESSION_PROTOCOL_ID",
    "SessionServer",
    "Sessions",
    "install_session_protocol",
]
