"""Start-up tuning of py-libp2p 0.8.1 for the data plane (wire-compatible).

``apply()`` is called by ``p2pfl.net.host`` before a host is created; only the first
call in a process does anything. Every knob keeps the bytes on the wire valid for stock
peers (tuned and untuned nodes interoperate); it only changes how this process frames,
buffers and allocates. Knobs that patch libp2p internals are pinned to
:data:`PINNED_VERSION` and skipped, with a warning, on any other version.

Figures: 100 MB pulls between two processes on loopback (``benchmarks/bench_transfer.py
--knob-sweep`` / ``--ablation``, 2 shared, loaded cores), in ms of process CPU per MB,
client (puller) / holder. Throughput on that machine swings 2-3x with other load, so
CPU per MB is the figure to compare. Stock 0.8.1: 7.3 / 5.0 ms/MB (25-130 MB/s).
All knobs: 2.9 / 1.5 ms/MB (130-250 MB/s). "Without" = all knobs but that one.

``yamux_release_on_read``  (without: 3.1 / 1.6)
    ``PY_YAMUX_RELEASE_ON_READ=0`` (only if unset): credit goes back in batched window
    updates instead of on every partial read.
``malloc``  (without: 3.8 / 1.6)
    glibc ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` and ``mallopt(M_TRIM_THRESHOLD,
    256 MiB)``: with big frames, buffers just above the dynamic mmap threshold are
    otherwise mapped and unmapped on every frame (minor page faults). Skipped silently
    where glibc is absent.
``yamux_frame`` (patch; without: 3.9 / 2.3; the largest single gain in the sweep)
    ``yamux.MAX_MESSAGE_SIZE`` 64 KiB -> 16 x 65,519 bytes. The stock 65,536-byte Yamux
    frame becomes two Noise messages (65,519 + 17 bytes); a frame of exactly sixteen
    full Noise messages cuts per-frame overhead 16-fold. Receivers accept any frame
    within the stream window, so stock peers are unaffected.
``noise_reader`` (patch; without: 4.0 / 1.9)
    The Noise transport reader does two socket reads per message (length, then body)
    through a locked reader. Patched to read up to 256 KiB at a time and slice
    messages out of a buffer. Only the post-handshake reader buffers, so no handshake
    byte can be swallowed.
``noise_writer`` (patch; without: 2.8 / 1.7, holder side only)
    A write larger than one Noise message is encrypted message by message and each is
    sent with its own locked ``send_all``. Patched to encrypt all messages first and
    send them with one ``send_all``: same bytes on the wire.
``secure_read`` (patch; without: 3.0 / 1.6)
    ``SecureSession.read(n)`` (Yamux reads each frame body through it) grows a
    bytearray message by message and copies it once more into ``bytes``. Patched to
    join the decrypted messages once.

Tried without gain: hashing received chunks in a worker thread (2 cores are already
busy with the two ends).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)

PINNED_VERSION = "0.8.1"
"""The libp2p version whose internals the patches were measured against."""

YAMUX_FRAME_BYTES = 16 * 65_519  # sixteen full Noise messages of plaintext
NOISE_READ_BYTES = 256 * 1024
M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 256 << 20

_state: dict[str, Any] = {"done": False, "applied": []}


def apply(knobs: Iterable[str] | None = None) -> None:
    """Apply the named knobs (default: all of :data:`KNOBS`) once per process."""
    if _state["done"]:
        return
    _state["done"] = True
    names = list(KNOBS) if knobs is None else list(knobs)
    unknown = set(names) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown tuning knobs {sorted(unknown)}; known: {sorted(KNOBS)}")
    version = _libp2p_version()
    for name in names:
        if name in PATCHES and version != PINNED_VERSION:
            logger.warning("libp2p %s is not %s: %s skipped", version, PINNED_VERSION, name)
            continue
        if KNOBS[name]():
            _state["applied"].append(name)
    logger.debug("data-plane tuning applied: %s", _state["applied"])


def disable() -> None:
    """Make later :func:`apply` calls do nothing (benchmarks measure the stock stack)."""
    _state["done"] = True


def applied() -> tuple[str, ...]:
    """Return the names of the knobs applied in this process."""
    return tuple(_state["applied"])


def _libp2p_version() -> str:
    try:
        return metadata.version("libp2p")
    except metadata.PackageNotFoundError:
        return "unknown"


def _release_on_read() -> bool:
    # Read by yamux at call time; an explicit setting by the operator wins.
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
    return True


def _malloc() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok


def _yamux_frame() -> bool:
    from libp2p.stream_muxer.yamux import yamux

    yamux.MAX_MESSAGE_SIZE = YAMUX_FRAME_BYTES
    return True


def _noise_reader() -> bool:
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
    return True


def _secure_read() -> bool:
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
    return True


def _noise_writer() -> bool:
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
    return True


KNOBS: dict[str, Callable[[], bool]] = {
    "yamux_release_on_read": _release_on_read,
    "malloc": _malloc,
    "yamux_frame": _yamux_frame,
    "noise_reader": _noise_reader,
    "noise_writer": _noise_writer,
    "secure_read": _secure_read,
}
"""Every knob by name, in the order applied."""

PATCHES = frozenset({"yamux_frame", "noise_reader", "noise_writer", "secure_read"})
"""Knobs that replace libp2p internals (pinned to :data:`PINNED_VERSION`)."""


__all__ = ["KNOBS", "PATCHES", "PINNED_VERSION", "applied", "apply", "disable"]
