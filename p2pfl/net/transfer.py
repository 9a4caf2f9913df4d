"""The data plane: stream protocol ``/p2pfl/update/1.0.0`` that moves payloads by digest.

A node serves the payloads in its :class:`PayloadStore`; a peer pulls one with
:func:`fetch_payload`. Payloads are opaque bytes named by their sha256 digest, maybe
hundreds of MB; both sides assume the other is hostile. ``1.2.0`` (:mod:`p2pfl.net.session`)
carries these requests and replies, many per stream; nodes pull with it.

Wire format (version 1; all integers unsigned big-endian; one request, one reply per stream)
---------------------------------------------------------------------------------------------

Request, client -> server, exactly 41 bytes, then the client closes its write side::

    +---------+----------------------+------------------+
    | version | digest               | max_size         |
    | u8 = 1  | 32 bytes (sha256)    | u64              |
    +---------+----------------------+------------------+

``max_size`` is the largest body the client accepts. The server resets the stream
(no reply) if the request is short, longer than 41 bytes, has another version, or
does not arrive with the client's write-close before the server's request deadline.

Reply, server -> client, then the server closes its write side::

    +---------+---------+------------------------------+
    | status  | length  | body                         |
    | u8      | u64     | ``length`` bytes if status OK |
    +---------+---------+------------------------------+

Status: OK 0 (``length`` = payload size <= ``max_size``, the body follows); NOT_FOUND 1
(not held; ``length`` 0); TOO_LARGE 2 (above ``max_size`` or the server's cap;
``length`` = the payload size); BUSY 3 (too many transfers queued; retry later or pull
from another holder); ERROR 4 (reserved: this implementation resets instead); BAD_RANGE
5 (1.1.0 only, :mod:`p2pfl.net.ranged`). Only OK has a body.

The client checks, in order: status known (else ``ProtocolViolation``); for OK,
``length <= max_size`` *before* reading or allocating the body (else
``PayloadTooLarge``); exactly ``length`` body bytes followed by end of stream (a short
body, a reset or trailing bytes are ``ProtocolViolation``); sha256(body) == digest
(else ``TamperedPayload``, a ``ProtocolViolation``). Every fetch runs under one deadline
(``TransferTimeout``). A stream carries nothing else; either side may reset it at any
time, which the other treats as failure.

Server side: NOT_FOUND and TOO_LARGE are answered at once; payload replies take one of
``max_concurrent`` slots, at most ``max_queued`` more wait for one, others get BUSY. The request read and the whole reply write each have a deadline,
because py-libp2p streams have no write timeout and a stopped puller would otherwise
hold a slot forever. (A reply cut off mid-write may leave half a Noise message on that
connection; the stopped peer then loses the connection, others are unaffected.) The
handler never raises into libp2p (a raising handler takes down a stock 0.8.1 host): any
failure resets the stream. Replies are written in 1 MiB slices of a memoryview.

Client side: the body is read with large reads (up to 16 MiB, never past ``length``),
hashed chunk by chunk, copied into one ``bytes`` of the announced length as it arrives,
and returned as a CheckedPayload (that hash is the only one on receipt).
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF

from p2pfl.config import Limits, MiB
from p2pfl.core.bounded import BoundedMap
from p2pfl.core.envelope import CheckedPayload, PayloadHasher
from p2pfl.errors import (
    P2PFLError,
    PayloadNotFound,
    PayloadTooLarge,
    PeerBusy,
    PeerUnreachable,
    TamperedPayload,
    TransferError,
    TransferTimeout,
)
from p2pfl.net.streamio import (
    as_protocol_errors,
    open_with_request,
    parse_peer_id,
    read_exact,
    reset_quietly,
    settled,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/p2pfl/update/1.0.0")
VERSION = 1
REQUEST = struct.Struct(">B32sQ")  # version, digest, max_size: 41 bytes
REPLY_HEADER = struct.Struct(">BQ")  # status, length: 9 bytes
WRITE_CHUNK = 1 * MiB  # ~1 MiB writes from a memoryview: 64 KiB writes cost +50-70% CPU
READ_CHUNK = 16 * MiB  # large reads: fewer copies and window updates
REQUEST_TIMEOUT = 10.0  # an honest request is 41 bytes and one FIN: far below this
STORE_MAX_PAYLOADS = 4096  # a count cap beside the byte budget: empty payloads weigh nothing


class Status(IntEnum):
    """Reply status byte."""

    OK = 0
    NOT_FOUND = 1
    TOO_LARGE = 2
    BUSY = 3
    ERROR = 4
    BAD_RANGE = 5  # 1.1.0 only (p2pfl.net.ranged): a range outside the payload


class PayloadStore:
    """Payloads this node serves, by digest; bounded by total bytes (oldest evicted)."""

    def __init__(self, *, max_total_bytes: int) -> None:
        if max_total_bytes <= 0:
            raise ValueError(f"max_total_bytes must be positive, got {max_total_bytes}")
        self._items: BoundedMap[bytes, bytes] = BoundedMap(
            STORE_MAX_PAYLOADS, weigh=len, max_weight=max_total_bytes
        )

    def put(self, digest: bytes, payload: bytes) -> None:
        """Store ``payload`` under ``digest``, evicting the oldest entries to fit.

        A payload larger than the whole budget is not stored.
        """
        if not self._items.put(digest, payload):
            logger.warning("payload of %d bytes exceeds the store budget", len(payload))

    def discard(self, digest: bytes) -> None:
        """Forget ``digest``; unknown digests are ignored."""
        self._items.pop(digest)

    def get(self, digest: bytes) -> bytes | None:
        """Return the payload stored under ``digest``, or None."""
        return self._items.peek(digest)  # serving does not refresh: the oldest put goes first

    @property
    def total_bytes(self) -> int:
        """Sum of the stored payload sizes."""
        return self._items.total_weight

    def __len__(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------------- common


class _Malformed(Exception):
    """The peer sent bytes that do not follow the protocol (internal)."""


async def _at_eof(stream: INetStream) -> bool:
    """Return True if the peer closed its write side with nothing more to read."""
    try:
        extra = await stream.read(1)
    except StreamEOF:
        return True
    return not extra


# ---------------------------------------------------------------------------- server


class _Server:
    """One host's handler for the update protocol."""

    def __init__(
        self,
        store: PayloadStore,
        limits: Limits,
        serve_timeout: float,
        on_served: Callable[[str, bytes, int], None] | None,
        max_concurrent: int,
        max_queued: int,
    ) -> None:
        self.store = store
        self.limits = limits
        self.serve_timeout = serve_timeout
        self.on_served = on_served
        self.limiter = trio.CapacityLimiter(max_concurrent)
        self.max_pending = max_concurrent + max_queued
        self.pending = 0  # requests holding or waiting for a slot
        self.serving: Counter[str] = Counter()  # peer -> its replies holding or awaiting a slot

    async def handle(self, stream: INetStream) -> None:
        """Serve one stream; never raise an ``Exception`` into libp2p."""
        peer = _remote_peer(stream)
        try:
            digest, max_size = await self._read_request(stream)
            await self._reply(stream, peer, digest, max_size)
        except Exception as exc:  # hostile or vanished peer: drop this stream only
            logger.info("update stream from %s failed: %r", peer[-8:], exc)
            await reset_quietly(stream)

    async def _read_request(self, stream: INetStream) -> tuple[bytes, int]:
        with trio.fail_after(min(REQUEST_TIMEOUT, self.serve_timeout)):
            raw = await read_exact(stream, REQUEST.size)
            if not await _at_eof(stream):
                raise _Malformed("request longer than 41 bytes or not closed")
        version, digest, max_size = REQUEST.unpack(raw)
        if version != VERSION:
            raise _Malformed(f"unsupported version {version}")
        return digest, max_size

    async def _reply(
        self, stream: INetStream, peer: str, digest: bytes, max_size: int, *, close: bool = True
    ) -> None:
        """Answer one request; ``close=False`` leaves the stream open (1.2.0 sessions)."""
        payload = self.store.get(digest)  # a reference: serving survives a discard()
        if payload is None:
            await self._send_status(stream, Status.NOT_FOUND, close=close)
        elif len(payload) > min(max_size, self.limits.max_payload_bytes):
            await self._send_status(stream, Status.TOO_LARGE, len(payload), close=close)
        else:

            async def whole() -> bytes | memoryview:
                return payload

            sent = await self.send_admitted(stream, whole, close=close, peer=peer)
            if sent is not None and self.on_served is not None:
                self.on_served(peer, digest, sent)

    async def send_admitted(
        self, stream: INetStream, body: Callable[[], Awaitable[bytes | memoryview]], *,
        close: bool = True, peer: str = "?",
    ) -> int | None:
        """Send ``await body()`` to ``peer`` in a slot, or BUSY while ``max_pending`` requests
        hold or wait for one (then None); return the bytes sent. Both protocols admit this way."""
        if self.pending >= self.max_pending:
            await self._send_status(stream, Status.BUSY, close=close)
            return None
        self.pending += 1
        self.serving[peer] += 1
        try:
            data = await body()
            await self._send_in_slot(stream, data, close=close)
        finally:
            self.pending -= 1
            self.serving -= Counter({peer: 1})  # drops the peer at 0
        return len(data)

    async def _send_in_slot(self, stream: INetStream, payload: bytes | memoryview, *, close: bool) -> None:
        with trio.fail_after(self.serve_timeout):
            await self.limiter.acquire()
        try:
            with trio.fail_after(self.serve_timeout):
                view = memoryview(payload)
                # The header rides with the first chunk: one frame fewer per payload.
                await stream.write(REPLY_HEADER.pack(Status.OK, len(payload)) + view[:WRITE_CHUNK])
                for start in range(WRITE_CHUNK, len(payload), WRITE_CHUNK):
                    await stream.write(view[start : start + WRITE_CHUNK])  # type: ignore[arg-type]
                if close:
                    await stream.close()
        finally:
            self.limiter.release()

    async def _send_status(
        self, stream: INetStream, status: Status, length: int = 0, *, close: bool = True
    ) -> None:
        with trio.fail_after(min(REQUEST_TIMEOUT, self.serve_timeout)):
            await stream.write(REPLY_HEADER.pack(status, length))
            if close:
                await stream.close()


def _remote_peer(stream: INetStream) -> str:
    try:
        return stream.muxed_conn.peer_id.to_string()
    except Exception:  # a stream without a connection: only in odd test doubles
        return "?"


def install_update_protocol(
    host: IHost,
    store: PayloadStore,
    *,
    limits: Limits,
    serve_timeout: float = 60.0,
    on_served: Callable[[str, bytes, int], None] | None = None,
    max_concurrent: int = 4,
    max_queued: int = 16,
) -> _Server:
    """Serve ``store`` on ``host`` under :data:`PROTOCOL_ID`; return the server (for 1.1.0).

    Args:
        host: A running libp2p host.
        store: The payloads to serve (read at request time).
        limits: Payloads above ``limits.max_payload_bytes`` are never served.
        serve_timeout: Deadline for waiting for a slot, and again for writing one reply.
        on_served: Called with (peer id, digest, bytes) after each payload fully written.
        max_concurrent: Replies written at the same time (serving is CPU-bound).
        max_queued: Requests waiting for a slot beyond which peers get BUSY.
    """
    server = _Server(store, limits, serve_timeout, on_served, max_concurrent, max_queued)
    host.set_stream_handler(PROTOCOL_ID, server.handle)
    return server


# ---------------------------------------------------------------------------- client


async def fetch_payload(
    host: IHost, peer_id: str, digest: bytes, *, max_size: int, timeout: float
) -> bytes:
    """Pull the payload whose sha256 is ``digest``; its bytes only (see below).

    Kept until the transports return :class:`~p2pfl.core.envelope.CheckedPayload`:
    prefer :func:`fetch_checked_payload`, whose result the node need not hash again.
    """
    checked = await fetch_checked_payload(
        host, peer_id, digest, max_size=max_size, timeout=timeout
    )
    return checked.data


async def fetch_checked_payload(
    host: IHost, peer_id: str, digest: bytes, *, max_size: int, timeout: float
) -> CheckedPayload:
    """Pull the payload whose sha256 is ``digest`` from ``peer_id``, hashed once on the way in.

    Raises:
        PeerUnreachable: No stream to the peer could be opened.
        TransferTimeout: ``timeout`` seconds passed before the payload was complete.
        PayloadTooLarge: The peer declared more than ``max_size`` bytes (nothing read).
        PayloadNotFound: The peer does not hold ``digest``.
        ProtocolViolation: The peer broke the protocol or sent bytes with another digest.
        TransferError: The peer answered BUSY or ERROR (try another holder).
        ValueError: ``digest`` is not 32 bytes or ``max_size`` is not a u64 (caller bug).
    """
    check_request(digest, max_size)
    return await within(timeout, f"no payload from {peer_id[-8:]}", lambda: fetch_once(host, peer_id, digest, max_size))


def check_request(digest: bytes, max_size: int) -> None:
    """Raise ValueError unless ``digest`` is 32 bytes and ``max_size`` a u64 (caller bugs)."""
    if len(digest) != 32:
        raise ValueError(f"digest must be 32 bytes, got {len(digest)}")
    if not 0 <= max_size < 1 << 64:
        raise ValueError(f"max_size out of range: {max_size}")


async def within(timeout: float, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()`` within ``timeout`` s, else TransferTimeout (libp2p may mask the cancel)."""
    with trio.move_on_after(timeout) as scope:
        try:
            return await call()
        except P2PFLError:
            if scope.cancel_called:
                raise TransferTimeout(f"{what} in {timeout}s") from None
            raise
    raise TransferTimeout(f"{what} in {timeout}s")


async def fetch_once(host: IHost, peer_id: str, digest: bytes, max_size: int) -> CheckedPayload:
    """One 1.0.0 pull on a stream of its own (no deadline: the caller's)."""
    stream = await _open_stream(host, peer_id, REQUEST.pack(VERSION, digest, max_size))
    return await settled(stream, lambda s: _pull(s, digest, max_size))


async def _open_stream(host: IHost, peer_id: str, request: bytes) -> INetStream:
    """Open the update stream to ``peer_id`` with ``request`` written on it."""
    try:
        return await open_with_request(host, parse_peer_id(peer_id), PROTOCOL_ID, request)
    except Exception as exc:
        raise PeerUnreachable(f"cannot open {PROTOCOL_ID} to {peer_id[-8:]}: {exc!r}") from exc


async def _pull(stream: INetStream, digest: bytes, max_size: int) -> CheckedPayload:
    """Finish one request/reply on ``stream`` (request written), translating every library error."""
    with as_protocol_errors():
        # NetStream (every stream of 0.8.1) half-closes; INetStream does not declare it.
        await stream.close_write()  # type: ignore[attr-defined]
        length = await _read_reply_header(stream, max_size)
        body = await read_body(stream, length, digest)
        if not await _at_eof(stream):
            raise _Malformed("trailing bytes after the body")
        return body


async def _read_reply_header(stream: INetStream, max_size: int) -> int:
    """Return the body length of an OK reply; raise for every other status."""
    status_byte, length = REPLY_HEADER.unpack(await read_exact(stream, REPLY_HEADER.size))
    check_reply_status(status_byte, length, max_size)
    return length


def check_reply_status(status_byte: int, length: int, max_size: int) -> None:
    """Raise unless a reply header is OK with ``length <= max_size`` (both versions)."""
    try:
        status = Status(status_byte)
    except ValueError:
        raise _Malformed(f"unknown status {status_byte}") from None
    if status is Status.OK:
        if length > max_size:
            raise PayloadTooLarge(f"peer declared {length} bytes, cap is {max_size}")
        return
    if status is Status.NOT_FOUND:
        raise PayloadNotFound("peer does not hold the digest")
    if status is Status.TOO_LARGE:
        raise PayloadTooLarge(f"peer holds {length} bytes, cap is {max_size}")
    if status is Status.BUSY:
        raise PeerBusy("peer is serving too many others")
    raise TransferError(f"peer answered {status.name}")


async def read_body(stream: INetStream, length: int, digest: bytes) -> CheckedPayload:
    """Read exactly ``length`` bytes with large reads, hashing chunks as they arrive.

    This is the one sha256 pass over a received payload: the result carries the digest
    to :func:`~p2pfl.core.envelope.check_payload`, which compares instead of rehashing.

    Chunks are copied into one ``bytes`` of ``length`` as they arrive (see
    :class:`~p2pfl.core.envelope.PayloadHasher`): one pass, and the payload is never held
    twice (chunks and their join). ``length`` is within the caller's cap before this
    allocates it. Hashing inline costs ~1 ms of loop time per 1 MiB chunk; a hashing thread gave no
    measurable gain on 2 cores.
    """
    hasher = PayloadHasher(size=length)
    got = 0
    while got < length:
        chunk = await stream.read(min(length - got, READ_CHUNK))
        if not chunk:
            raise _Malformed("empty read")
        hasher.add(chunk)
        got += len(chunk)
    payload = hasher.finish()
    if payload.digest != digest:
        raise TamperedPayload("body sha256 differs from the requested digest")
    return payload


__all__ = [
    "PROTOCOL_ID",
    "PayloadStore",
    "Status",
    "fetch_checked_payload",
    "fetch_payload",
    "install_update_protocol",
]
