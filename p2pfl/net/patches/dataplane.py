"""Data-plane patches of py-libp2p 0.8.1: same bytes on the wire, less CPU per MB.

Registered in :data:`p2pfl.net.patches.PATCHES`. Figures: 100 MB pulls between two
processes on loopback (``benchmarks/bench_transfer.py --knob-sweep`` / ``--ablation``,
2 shared, loaded cores), in ms of process CPU per MB, client (puller) / holder.
Throughput on that machine swings 2-3x with other load, so CPU per MB is the figure to
compare. Stock 0.8.1: 7.3 / 5.0 ms/MB (25-130 MB/s). All knobs, process tweaks
included: 2.9 / 1.5 ms/MB (130-250 MB/s). "Without" = all knobs but that one.
Tuned and stock peers interoperate (tests/net/test_transfer.py).

``yamux_frame`` (without: 3.9 / 2.3; the largest single gain in the sweep)
    ``yamux.MAX_MESSAGE_SIZE`` 64 KiB -> 16 x 65,519 bytes. The stock 65,536-byte Yamux
    frame becomes two Noise messages (65,519 + 17 bytes); a frame of exactly sixteen
    full Noise messages cuts per-frame overhead 16-fold. Receivers accept any frame
    within the stream window, so stock peers are unaffected.
``listener_one_write`` (a small pull: one frame fewer, the listener's)
    A listener answers a stream's negotiation in two writes: its multistream header at
    once, then the protocol id it accepts. Patched: when the opener sent its protocol id
    with its header (``pipelined_select``: the bytes are already buffered on the stream
    when the header has been read), the header waits and goes with the answer, in one
    write. An opener that waits for our header before proposing (stock 0.8.1) finds
    nothing buffered: the header goes at once, as stock.
``noise_reader`` (without: 4.0 / 1.9)
    The Noise transport reader does two socket reads per message (length, then body)
    through a locked reader. Patched to read up to 256 KiB at a time and slice
    messages out of a buffer. Only the post-handshake reader buffers, so no handshake
    byte can be swallowed.
``noise_writer`` (without: 2.8 / 1.7, holder side only)
    A write larger than one Noise message is encrypted message by message and each is
    sent with its own locked ``send_all``. Patched to encrypt all messages first and
    send them with one ``send_all``: same bytes on the wire.
``yamux_credit`` (small streams: half the frames)
    A stream's reader sends a WINDOW_UPDATE after nearly every read (0.8.1 credits any
    slack below the half-window threshold at once): a 19 KB pull cost 11 window-update
    frames besides its 11 others, each encrypted, sent, woken for and parsed. Patched to
    credit back only once the reader has consumed 64 KiB (or half the window, if less;
    go-yamux waits for half, but 0.8.1's senders poll a closed window every 10 ms, and a
    50 MB pull then took 4x as long), with 0.8.1's window auto-tuning kept. A small
    pull sends no window update at all. Credit never exceeds the bytes consumed, so
    stock senders are unaffected.
``pipelined_select`` (a small pull: two frames and two round trips fewer)
    Opening a stream for one protocol writes the multistream header, waits for the
    listener's, then writes the protocol id and waits again. Patched to send header and
    protocol id in one write (what go-libp2p's lazy client does; multistream-select lets
    the dialer pipeline them) and read both answers. Only on streams for one protocol:
    a list of protocols, and the connection's security and muxer negotiation, run stock.
    A stream opened with :func:`open_with_request` also carries the request itself in
    that write: a listener reads the multistream lines exactly and leaves the rest to the
    protocol handler (stock listeners too); one that answers ``na`` fails the stream as
    before.
``yamux_open_flags`` (one frame fewer at each end of every stream)
    ``open_stream`` sends a bare WINDOW_UPDATE with SYN, and the listener answers with a
    bare one with ACK, before either end has a byte to send. Patched: the SYN rides on the
    stream's first frame (0.8.1 receivers and the Yamux spec accept SYN on DATA and on
    FIN/RST frames), the ACK on the listener's first DATA frame (its multistream answer).
    0.8.1 ignores FIN and RST on a frame that carries ACK, so before such a frame the ACK
    goes as its own frame, in the same socket write. Stock per-frame debug formatting
    (f-strings built for a disabled logger) is skipped too. A stream reset by the peer
    before we sent a frame on it never takes its pending flag: the flags of streams the
    connection no longer holds are dropped whenever they outnumber its streams (a peer
    opening and resetting streams at once cannot grow the table).
``secure_read`` (without: 3.0 / 1.6)
    ``SecureSession.read(n)`` (Yamux reads each frame body through it) grows a
    bytearray message by message and copies it once more into ``bytes``. Patched to
    join the decrypted messages once.

Tried without gain: hashing received chunks in a worker thread (2 cores are already
busy with the two ends).
"""

from __future__ import annotations

import contextvars
import struct
from typing import Any

import trio

YAMUX_FRAME_BYTES = 16 * 65_519  # sixteen full Noise messages of plaintext
NOISE_READ_BYTES = 256 * 1024
CREDIT_BYTES = 64 * 1024  # see yamux_credit
# The request a stream being opened by open_with_request carries in its negotiation write.
EARLY_REQUEST: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "p2pfl_early_request", default=None)


def yamux_frame() -> None:
    """Send Yamux frames of sixteen full Noise messages."""
    from libp2p.stream_muxer.yamux import yamux

    yamux.MAX_MESSAGE_SIZE = YAMUX_FRAME_BYTES


class _HeaderWithAnswer:
    """A listener's negotiation stream that holds its first write (the multistream header)
    until the next write, or until a read that would wait for the opener."""

    def __init__(self, stream: Any, buffered: Any) -> None:
        self.stream = stream
        self.buffered = buffered  # () -> bytes received on the stream and not yet read
        self.held: bytes | None = None
        self.writes = 0

    async def write(self, data: bytes) -> None:
        self.writes += 1
        if self.writes == 1:
            self.held = bytes(data)
            return
        await self.stream.write(self.release() + bytes(data))

    async def read(self, n: int | None = None) -> bytes:
        if self.held is not None and not self.buffered():  # the opener waits for our header
            await self.stream.write(self.release())
        return bytes(await self.stream.read(n))

    def release(self) -> bytes:
        held, self.held = self.held or b"", None
        return held

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def listener_one_write() -> None:
    """Send a listener's multistream header with its answer when the opener pipelined."""
    from libp2p.protocol_muxer.multiselect import Multiselect
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    stock = Multiselect.negotiate

    async def negotiate(self: Any, communicator: Any, *args: Any, **kwargs: Any) -> Any:
        stream = getattr(communicator, "read_writer", None)
        muxed = getattr(stream, "muxed_stream", None)
        if not isinstance(muxed, YamuxStream):
            return await stock(self, communicator, *args, **kwargs)

        def buffered() -> int:
            return len(muxed.conn.stream_buffers.get(muxed.stream_id, b""))

        communicator.read_writer = _HeaderWithAnswer(stream, buffered)
        try:
            return await stock(self, communicator, *args, **kwargs)
        finally:
            communicator.read_writer = stream

    Multiselect.negotiate = negotiate  # type: ignore[method-assign]


def yamux_credit() -> None:
    """Send a stream's WINDOW_UPDATE only once half its receive window is consumed."""
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    async def update_window(self: Any, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            # Bytes the reader consumed that the sender has not been credited for.
            consumed = self.target_recv_window - (self.recv_window + buffered)
            if consumed <= 0 or consumed < min(self._grow_threshold(), CREDIT_BYTES):
                return
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        await self.send_window_update(increment, skip_lock=True)

    YamuxStream._auto_tune_and_send_window_update = update_window  # type: ignore[method-assign]


def pipelined_select() -> None:
    """Send the multistream header and a stream's one protocol id in one write."""
    from libp2p.abc import INetStream
    from libp2p.io.exceptions import IOException
    from libp2p.protocol_muxer import multiselect_client as client
    from libp2p.protocol_muxer.exceptions import (
        MultiselectClientError,
        MultiselectCommunicatorError,
    )
    from libp2p.protocol_muxer.multiselect import MULTISELECT_PROTOCOL_ID, PROTOCOL_NOT_FOUND_MSG
    from libp2p.utils import encode_delim

    stock = client.MultiselectClient.select_one_of

    async def select_one_of(
        self: Any, protocols: Any, communicator: Any, negotiate_timeout: int = client.DEFAULT_NEGOTIATE_TIMEOUT
    ) -> Any:
        stream = getattr(communicator, "read_writer", None)
        if len(protocols) != 1 or not isinstance(stream, INetStream):
            return await stock(self, protocols, communicator, negotiate_timeout)
        protocol = protocols[0]
        with trio.move_on_after(negotiate_timeout):
            try:
                # Only the stream it was meant for: a task spawned meanwhile (identify on a
                # fresh connection) inherits the context variable too.
                early = EARLY_REQUEST.get()
                if early is not None and (early["sent"] or early["protocol"] != protocol):
                    early = None
                request = b"" if early is None else early["data"]
                await stream.write(
                    encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(protocol.encode()) + request
                )
                if early is not None:
                    early["sent"] = True
                handshake = await communicator.read()
                answer = await communicator.read() if handshake == MULTISELECT_PROTOCOL_ID else None
            except (IOException, MultiselectCommunicatorError, AssertionError, ValueError) as error:
                raise MultiselectClientError(f"negotiating {protocol}: {error}") from error
            if answer is None:
                raise MultiselectClientError(f"multiselect protocol ID mismatch: got {handshake!r}")
            if answer == protocol:
                return protocol
            if answer == PROTOCOL_NOT_FOUND_MSG:  # the message callers recognise, as stock
                raise MultiselectClientError(client._build_protocols_not_supported_message(
                    protocols, negotiate_timeout, [f"protocol not supported: {protocol}"]))
            if answer == MULTISELECT_PROTOCOL_ID:  # the peer restarted the handshake: as stock
                return await self.try_select(communicator, protocol)
            raise MultiselectClientError(f"unrecognized response {answer!r} to {protocol}")
        raise MultiselectClientError(f"response timed out after {negotiate_timeout}s, protocols tried: [{protocol}]")

    client.MultiselectClient.select_one_of = select_one_of  # type: ignore[method-assign]


def noise_reader() -> None:
    """Read Noise messages out of 256 KiB socket reads."""
    from libp2p.io.exceptions import IncompleteReadError
    from libp2p.security.noise.io import NoiseTransportReadWriter

    async def read_msg(self: Any, prefix_encoded: bool = False) -> bytes:
        # State kept on the reader (not in locals, so a cancelled read loses nothing):
        # bytes received but not yet parsed, and the parse offset into them.
        state = self.__dict__
        conn = self.read_writer.read_write_closer
        while True:
            buf, pos = state.get("_p2pfl_rx", (b"", 0))
            if len(buf) - pos >= 2:
                end = pos + 2 + int.from_bytes(buf[pos : pos + 2], "big")
                if end <= len(buf):
                    encrypted = buf[pos + 2 : end]
                    state["_p2pfl_rx"] = (buf, end)
                    break
            chunk = await conn.read(NOISE_READ_BYTES)
            if not chunk:
                raise IncompleteReadError(
                    "Connection closed during a Noise message",
                    expected_bytes=2,
                    received_bytes=len(buf) - pos,
                )
            state["_p2pfl_rx"] = (buf[pos:] + chunk if pos < len(buf) else chunk), 0
        if prefix_encoded:
            encrypted = encrypted[len(self.prefix) :]
        return bytes(self.decrypt(encrypted))

    NoiseTransportReadWriter.read_msg = read_msg  # type: ignore[method-assign]


def secure_read() -> None:
    """Join the decrypted messages of one ``SecureSession.read`` once."""
    from libp2p.io.exceptions import ConnectionClosedError
    from libp2p.security.secure_session import SecureSession

    stock_read = SecureSession.read

    async def read(self: Any, n: int | None = None) -> bytes:
        if not n:
            return await stock_read(self, n)
        first = self._drain(n)
        parts, got = [first], len(first)
        while got < n:
            msg = await self.conn.read_msg()
            if msg == b"":
                if got:
                    return b"".join(parts)
                raise ConnectionClosedError("Connection closed")
            if len(msg) > n - got:
                self._fill(msg[n - got :])
                msg = msg[: n - got]
            parts.append(msg)
            got += len(msg)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    SecureSession.read = read  # type: ignore[method-assign]


def noise_writer() -> None:
    """Encrypt a whole write, then send it with one ``send_all``."""
    from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter

    async def write_msg(self: Any, msg: bytes, prefix_encoded: bool = False) -> None:
        view = memoryview(msg)
        parts: list[bytes] = []
        for start in range(0, max(len(view), 1), MAX_PLAINTEXT_LENGTH):
            encrypted = self.encrypt(bytes(view[start : start + MAX_PLAINTEXT_LENGTH]))
            if prefix_encoded and start == 0:
                encrypted = self.prefix + encrypted
            parts.append(len(encrypted).to_bytes(2, "big"))
            parts.append(encrypted)
        await self.read_writer.read_write_closer.write(b"".join(parts))

    NoiseTransportReadWriter.write_msg = write_msg  # type: ignore[method-assign]


def yamux_open_flags() -> None:
    """Send a stream's SYN on its first frame and its ACK on the listener's first data."""
    from libp2p.stream_muxer.yamux import yamux

    header = struct.Struct(yamux.YAMUX_HEADER_FORMAT)
    size, data_type, window_type = header.size, yamux.TYPE_DATA, yamux.TYPE_WINDOW_UPDATE
    syn, ack, closing = yamux.FLAG_SYN, yamux.FLAG_ACK, yamux.FLAG_FIN | yamux.FLAG_RST

    async def write_frame(self: Any, data: bytes) -> None:
        pending = self.__dict__.setdefault("_p2pfl_open_flags", {})  # stream id -> flag
        version, kind, flags, stream_id, length = header.unpack_from(data)
        if kind == window_type and flags in (syn, ack) and length == 0 and len(data) == size:
            if len(pending) >= len(self.streams):  # some belong to streams gone: drop those
                for gone in [s for s in pending if s not in self.streams]:
                    del pending[gone]
            pending[stream_id] = flags  # nothing to say yet: wait for the stream's next frame
            return
        flag = pending.pop(stream_id, 0) if pending else 0
        if flag == syn or (flag == ack and kind == data_type and not flags & closing):
            data = header.pack(version, kind, flags | flag, stream_id, length) + data[size:]
        elif flag == ack:
            data = header.pack(version, window_type, ack, stream_id, 0) + data
        async with self._write_lock:
            await self.secured_conn.write(data)
        await trio.lowlevel.checkpoint()

    yamux.Yamux._write_frame = write_frame  # type: ignore[method-assign]


KNOBS = ("yamux_frame", "yamux_credit", "pipelined_select", "noise_reader", "noise_writer", "secure_read")
"""The registry names of these patches (``benchmarks/bench_transfer.py`` sweeps them)."""

__all__ = [
    "EARLY_REQUEST",
    "KNOBS",
    "listener_one_write",
    "noise_reader",
    "noise_writer",
    "pipelined_select",
    "secure_read",
    "yamux_credit",
    "yamux_frame",
    "yamux_open_flags",
]
