"""``/p2pfl/update/1.1.0``: a payload's piece map and ranges of its pieces, from any holder.

Version 1.0.0 (:mod:`p2pfl.net.transfer`) moves a whole payload from one peer. 1.1.0
lets a puller take one payload from several holders at once (:mod:`p2pfl.net.swarm`):
it asks one holder for the sha256 of every piece, then asks each holder for ranges of
pieces and checks every piece as it arrives. A node serves both versions; a client
opens a 1.1.0 stream and, if the peer does not speak it (multistream refuses), pulls
the whole payload over 1.0.0 instead.

Wire format (all integers unsigned big-endian)
----------------------------------------------
One request and one reply per libp2p stream. A payload of ``size`` bytes is cut into
``n = ceil(size / PIECE_BYTES)`` pieces of :data:`PIECE_BYTES` (1 MiB; the last one
may be shorter).

Request, client -> server, exactly 42 bytes, then the client closes its write side::

    +---------+-------+-------------------+-----------+-----------+
    | version | op    | digest            | first     | count     |
    | u8 = 2  | u8    | 32 bytes (sha256) | u32       | u32       |
    +---------+-------+-------------------+-----------+-----------+

``op`` 1 PIECES (``first`` = ``count`` = 0): the piece map. ``op`` 2 RANGE: pieces
``first .. first + count - 1``, with ``1 <= count <= MAX_RANGE_PIECES`` (16) and
``first + count <= n``. ``op`` 3 HAVE (``first`` = ``count`` = 0; an extension of
session 10): which pieces the peer holds. Anything else (short, long, other version
or op, no write-close before the request deadline) gets a reset: that is how a peer
of an earlier release refuses HAVE, and the client then takes it for a complete
holder (all an earlier release's HOLDS can mean).

Reply, server -> client, then the server closes its write side: ``u8 status | u64
length | body``, the status values of 1.0.0 plus BAD_RANGE 5 (a range outside the
payload; ``length`` = the payload size, no body). For OK:

- PIECES: ``length = 32 * n``, body = the sha256 of each piece in order;
- RANGE: ``length`` = the bytes of those pieces (``count * PIECE_BYTES``, less at the
  end of the payload), body = those bytes;
- HAVE: ``length = ceil(n / 8)``, body = a bitfield, bit ``i`` (byte ``i // 8``, most
  significant bit first) set if piece ``i`` is held; the pad bits after ``n`` are 0.

The client knows ``size`` from the signed header, so it knows the exact length an OK
reply must declare and refuses any other before reading a body byte
(``ProtocolViolation``); it then reads exactly that many bytes and the end of stream.
A piece map is the holder's word only: the puller checks pieces against it and the
whole payload against the signed digest (see :mod:`p2pfl.net.swarm`).

Server side: RANGE replies share the 1.0.0 server's slots, queue and deadlines; HAVE and
PIECES replies (a few hundred bytes; 32 bytes per MiB of payload) are written at once
under the request deadline, outside the slots (since session 11: a map request
answered BUSY behind other pullers' ranges used to cost a whole-payload pull). A piece
map is hashed once per payload in a worker thread and cached (:data:`MAP_CACHE`
payloads). Besides the payloads it serves whole, a server answers from the pulls in
progress it is given (``partials``, see :mod:`p2pfl.net.swarm`): PIECES with the map
the pull checks its pieces against, RANGE only if every piece asked for is in
(NOT_FOUND otherwise: "not yet"; the pieces joined for at most :data:`PARTIAL_REPLIES`
replies at once), HAVE with the pieces in.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from enum import IntEnum
from typing import Protocol

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2pfl.config import MiB
from p2pfl.core.bounded import BoundedMap
from p2pfl.errors import PeerUnreachable, ProtocolViolation
from p2pfl.net.streamio import as_protocol_errors, read_exact, reset_quietly, settled
from p2pfl.net.transfer import (
    REPLY_HEADER,
    REQUEST_TIMEOUT,
    Status,
    _at_eof,
    _Malformed,
    _remote_peer,
    _Server,
    check_reply_status,
    within,
)

logger = logging.getLogger(__name__)

RANGED_PROTOCOL_ID = TProtocol("/p2pfl/update/1.1.0")
VERSION = 2
REQUEST = struct.Struct(">BB32sII")  # version, op, digest, first, count: 42 bytes
PIECE_BYTES = 1 * MiB
MAX_RANGE_PIECES = 16  # 16 MiB per request at most
MAP_CACHE = 64  # piece maps kept (32 bytes per MiB of payload each)
# Replies from pulls in progress join their pieces (a copy of up to 16 MiB, 4 MiB for
# our own requests): at most this many exist at once, the others wait for one.
PARTIAL_REPLIES = 2
# Own payloads first: while a RANGE of a payload this node did not pull (its own update)
# is being sent, or was within this many seconds, pieces of payloads it pulled (held or
# in progress) are not offered: HAVE answers none, RANGE NOT_FOUND ("not yet"). A node's
# uplink carries its own update before it helps swap others' (session 11: a slow uplink
# that served its co-pulled neighbours' pieces delayed its own update).
OWN_FIRST_FOR = 1.0
READ_CHUNK = 4 * MiB


class Op(IntEnum):
    """What a 1.1.0 request asks for."""

    PIECES = 1
    RANGE = 2
    HAVE = 3


class Partial(Protocol):
    """A payload being pulled: the piece map it is checked against, the pieces in so far."""

    @property
    def size(self) -> int:
        """The payload's size in bytes (from its signed header)."""
        ...

    @property
    def hashes(self) -> Sequence[bytes]:
        """The sha256 of every piece."""
        ...

    @property
    def pieces(self) -> Sequence[bytes | None]:
        """Every piece, None until it is in and matched its hash."""
        ...


def piece_count(size: int) -> int:
    """Return how many pieces a payload of ``size`` bytes has."""
    return -(-size // PIECE_BYTES)


def range_bytes(size: int, first: int, count: int) -> int:
    """Return the bytes of pieces ``first .. first + count - 1`` of a ``size``-byte payload."""
    return max(0, min(size, (first + count) * PIECE_BYTES) - first * PIECE_BYTES)


def bitfield(held: Sequence[bool]) -> bytes:
    """Pack ``held`` as a HAVE body: bit ``i`` of byte ``i // 8``, most significant first."""
    out = bytearray(-(-len(held) // 8))
    for i, bit in enumerate(held):
        if bit:
            out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


def unpack_bitfield(body: bytes, n: int) -> list[bool]:
    """Return the ``n`` bits of a HAVE body; raise ``ProtocolViolation`` if it is not one."""
    if len(body) != -(-n // 8):
        raise ProtocolViolation(f"a HAVE of {n} pieces has {-(-n // 8)} bytes, not {len(body)}")
    bits = [bool(body[i // 8] & (0x80 >> (i % 8))) for i in range(n)]
    if bitfield(bits) != body:
        raise ProtocolViolation("a HAVE sets bits past the last piece")
    return bits


def piece_map(payload: bytes | memoryview) -> bytes:
    """Return the sha256 of each piece of ``payload``, concatenated (CPU: run in a thread)."""
    view = memoryview(payload)
    return b"".join(
        hashlib.sha256(view[start : start + PIECE_BYTES]).digest()
        for start in range(0, len(view), PIECE_BYTES)
    )


# ---------------------------------------------------------------------------- server


class RangedServer:
    """The 1.1.0 handler, sharing a 1.0.0 server's store, slots and deadlines.

    ``partials`` maps the digests of pulls in progress to their state (read only).
    """

    def __init__(
        self, server: _Server, on_range: Callable[[str, bytes, int], None] | None,
        partials: Mapping[bytes, Partial] | None = None, pulled: Callable[[bytes], bool] | None = None,
    ) -> None:
        self._server, self._on_range = server, on_range
        self._partials: Mapping[bytes, Partial] = partials if partials is not None else {}
        self._pulled = pulled  # digests this node pulled; None: no priority (every payload its own)
        self._own_sending, self._own_until = 0, float("-inf")
        self._maps: BoundedMap[bytes, bytes] = BoundedMap(MAP_CACHE)
        self._hashing = trio.Lock()  # one map hashed at a time; waiters find it cached
        self._joining = trio.CapacityLimiter(PARTIAL_REPLIES)

    async def handle(self, stream: INetStream) -> None:
        """Serve one stream; never raise an ``Exception`` into libp2p."""
        peer = _remote_peer(stream)
        try:
            op, digest, first, count = await self._read_request(stream)
            if (payload := self._server.store.get(digest)) is not None:  # a reference: survives discard()
                await self._reply(stream, peer, op, digest, first, count, payload)
            elif (partial := self._partials.get(digest)) is not None:
                await self._reply_partial(stream, peer, op, digest, first, count, partial)
            else:
                await self._server._send_status(stream, Status.NOT_FOUND)
        except Exception as exc:  # hostile or vanished peer: drop this stream only
            logger.info("ranged stream from %s failed: %r", peer[-8:], exc)
            await reset_quietly(stream)

    async def _read_request(self, stream: INetStream) -> tuple[Op, bytes, int, int]:
        with trio.fail_after(min(REQUEST_TIMEOUT, self._server.serve_timeout)):
            raw = await read_exact(stream, REQUEST.size)
            if not await _at_eof(stream):
                raise _Malformed("request longer than 42 bytes or not closed")
        version, op, digest, first, count = REQUEST.unpack(raw)
        if version != VERSION or op not in tuple(Op):
            raise _Malformed(f"unsupported version {version} or op {op}")
        if op != Op.RANGE and (first or count):
            raise _Malformed("a PIECES or HAVE request has first = count = 0")
        return Op(op), digest, first, count

    async def _reply(
        self, stream: INetStream, peer: str, op: Op, digest: bytes, first: int, count: int, payload: bytes
    ) -> None:
        server = self._server
        held = self._pulled is not None and self._pulled(digest)
        if len(payload) > server.limits.max_payload_bytes:
            await server._send_status(stream, Status.TOO_LARGE, len(payload))
        elif op is Op.HAVE:
            await self._send_small(stream, bitfield([not (held and self._own_first())] * piece_count(len(payload))))
        elif op is Op.RANGE and held and self._own_first():
            await server._send_status(stream, Status.NOT_FOUND)  # not yet: our own update first
        elif op is Op.RANGE and not _inside(first, count, piece_count(len(payload))):
            await server._send_status(stream, Status.BAD_RANGE, len(payload))
        elif op is Op.PIECES:  # 32 bytes a MiB: outside the slots, like HAVE (no BUSY for a map)
            await self._send_map(stream, peer, digest, await self._map(digest, payload))
        else:

            async def body() -> bytes | memoryview:
                start = first * PIECE_BYTES
                return memoryview(payload)[start : start + range_bytes(len(payload), first, count)]

            self._own_sending += not held
            try:
                await self._send(stream, peer, digest, body)
            finally:
                self._own_sending -= not held
                if not held:
                    self._own_until = trio.current_time() + OWN_FIRST_FOR

    async def _reply_partial(
        self, stream: INetStream, peer: str, op: Op, digest: bytes, first: int, count: int, partial: Partial
    ) -> None:
        """Answer from a pull in progress: only pieces that are in (checked against its map)."""
        server, n, later = self._server, len(partial.hashes), self._own_first()
        if op is Op.HAVE:
            await self._send_small(stream, bitfield([p is not None and not later for p in partial.pieces]))
        elif op is Op.PIECES:
            await self._send_map(stream, peer, digest, b"".join(partial.hashes))
        elif not _inside(first, count, n):
            await server._send_status(stream, Status.BAD_RANGE, partial.size)
        else:
            held = list(partial.pieces[first : first + count])
            if later or any(p is None for p in held):
                await server._send_status(stream, Status.NOT_FOUND)  # not yet
                return

            async def pieces() -> bytes:
                return b"".join(p for p in held if p is not None)  # one range: <= 16 MiB

            with trio.fail_after(server.serve_timeout):
                await self._joining.acquire()
            try:
                await self._send(stream, peer, digest, pieces)
            finally:
                self._joining.release()

    async def _send(
        self, stream: INetStream, peer: str, digest: bytes, body: Callable[[], Awaitable[bytes | memoryview]]
    ) -> None:
        sent = await self._server.send_admitted(stream, body, peer=peer)
        if sent is not None and self._on_range is not None:
            self._on_range(peer, digest, sent)

    def _own_first(self) -> bool:
        """Whether an own payload's RANGE reply is under way or just ended (:data:`OWN_FIRST_FOR`)."""
        return self._pulled is not None and (self._own_sending > 0 or trio.current_time() < self._own_until)

    async def _send_map(self, stream: INetStream, peer: str, digest: bytes, body: bytes) -> None:
        await self._send_small(stream, body)
        if self._on_range is not None:
            self._on_range(peer, digest, len(body))

    async def _send_small(self, stream: INetStream, body: bytes) -> None:
        """Write a short OK reply at once, outside the slots (a HAVE: n / 8 bytes; a map: 32 n)."""
        with trio.fail_after(min(REQUEST_TIMEOUT, self._server.serve_timeout)):
            await stream.write(REPLY_HEADER.pack(Status.OK, len(body)) + body)
            await stream.close()

    async def _map(self, digest: bytes, payload: bytes) -> bytes:
        async with self._hashing:
            if (cached := self._maps.peek(digest)) is None:
                cached = await trio.to_thread.run_sync(piece_map, payload)
                self._maps.put(digest, cached)
        return cached


def _inside(first: int, count: int, n: int) -> bool:
    return 1 <= count <= MAX_RANGE_PIECES and first + count <= n


def install_ranged_protocol(
    host: IHost, server: _Server, *, on_range: Callable[[str, bytes, int], None] | None = None,
    partials: Mapping[bytes, Partial] | None = None, pulled: Callable[[bytes], bool] | None = None,
) -> None:
    """Serve 1.1.0 on ``host`` from the store of ``server`` (a 1.0.0 server, same slots)
    and from the pulls in progress in ``partials``.

    ``on_range(peer, digest, bytes)`` is called after each reply written in full;
    ``pulled(digest)``: whether this node pulled that payload (others' pieces wait for
    its own, :data:`OWN_FIRST_FOR`).
    """
    host.set_stream_handler(RANGED_PROTOCOL_ID, RangedServer(server, on_range, partials, pulled).handle)


# ---------------------------------------------------------------------------- client


async def fetch_piece_map(
    host: IHost, peer_id: str, digest: bytes, *, size: int, timeout: float
) -> list[bytes]:
    """Return the sha256 of each piece of the ``size``-byte payload ``digest``, from ``peer_id``.

    Raises:
        PeerUnreachable: no 1.1.0 stream could be opened (also: the peer speaks 1.0.0 only).
        TransferError: see :func:`p2pfl.net.transfer.fetch_checked_payload`.
    """
    n = piece_count(size)
    body = await _request(host, peer_id, REQUEST.pack(VERSION, Op.PIECES, digest, 0, 0), 32 * n, timeout)
    return [body[i : i + 32] for i in range(0, len(body), 32)]


async def fetch_range(
    host: IHost, peer_id: str, digest: bytes, *, size: int, first: int, count: int, timeout: float
) -> list[bytes]:
    """Return pieces ``first .. first + count - 1`` of payload ``digest`` from ``peer_id``, unchecked.

    Raises:
        ValueError: the range is not inside a ``size``-byte payload (caller bug).
        PeerUnreachable, TransferError: as :func:`fetch_piece_map`.
    """
    if not (1 <= count <= MAX_RANGE_PIECES and first >= 0 and first + count <= piece_count(size)):
        raise ValueError(f"pieces {first}+{count} are not inside {size} bytes")
    request = REQUEST.pack(VERSION, Op.RANGE, digest, first, count)
    body = await _request(host, peer_id, request, range_bytes(size, first, count), timeout)
    return [body[i : i + PIECE_BYTES] for i in range(0, len(body), PIECE_BYTES)]


async def fetch_have(host: IHost, peer_id: str, digest: bytes, *, size: int, timeout: float) -> list[bool]:
    """Return which pieces of the ``size``-byte payload ``digest`` ``peer_id`` says it holds.

    Raises:
        PeerUnreachable, TransferError: as :func:`fetch_piece_map` (a peer of an earlier
            release resets the stream: ``ProtocolViolation``).
    """
    n = piece_count(size)
    body = await _request(host, peer_id, REQUEST.pack(VERSION, Op.HAVE, digest, 0, 0), -(-n // 8), timeout)
    return unpack_bitfield(body, n)


async def _request(host: IHost, peer_id: str, request: bytes, expected: int, timeout: float) -> bytes:
    return await within(timeout, f"no reply from {peer_id[-8:]}", lambda: _exchange(host, peer_id, request, expected))


async def _exchange(host: IHost, peer_id: str, request: bytes, expected: int) -> bytes:
    try:
        stream = await host.new_stream(ID.from_base58(peer_id), [RANGED_PROTOCOL_ID])
    except Exception as exc:
        raise PeerUnreachable(f"cannot open {RANGED_PROTOCOL_ID} to {peer_id[-8:]}: {exc!r}") from exc
    return await settled(stream, lambda s: _ask(s, request, expected))


async def _ask(stream: INetStream, request: bytes, expected: int) -> bytes:
    """Send ``request``; return the body of an OK reply of exactly ``expected`` bytes."""
    with as_protocol_errors():
        await stream.write(request)
        await stream.close_write()  # type: ignore[attr-defined]  # NetStream half-closes
        status, length = REPLY_HEADER.unpack(await read_exact(stream, REPLY_HEADER.size))
        check_reply_status(status, length, expected)
        if length != expected:
            raise ProtocolViolation(f"peer declared {length} bytes, the request asks {expected}")
        body = await read_exact(stream, length, chunk=READ_CHUNK)
        if not await _at_eof(stream):
            raise _Malformed("trailing bytes after the body")
        return body


__all__ = [
    "MAX_RANGE_PIECES",
    "Partial",
    "PIECE_BYTES",
    "RANGED_PROTOCOL_ID",
    "RangedServer",
    "bitfield",
    "fetch_have",
    "fetch_piece_map",
    "fetch_range",
    "install_ranged_protocol",
    "piece_count",
    "piece_map",
    "range_bytes",
    "unpack_bitfield",
]
