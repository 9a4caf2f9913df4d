"""Make a py-libp2p 0.8.1 host survive hostile peers.

A stock 0.8.1 node is taken down by one connected peer (LIBP2P_NOTES, "Inputs that kill
a stock 0.8.1 node"). Each patch here closes one of those holes; every one is named,
idempotent, and pinned to the libp2p version it was written against:

``multistream_utf8``
    ``MultiselectCommunicator.read`` decodes the peer's protocol id with ``bytes.decode``
    and the ``UnicodeDecodeError`` escapes negotiation (on streams *and* on the raw
    connection's security/muxer negotiation). Patched to raise the
    ``MultiselectCommunicatorError`` every caller already handles.
``pubsub_decode_error``
    ``Pubsub.stream_handler`` catches its own parse errors but not protobuf's
    ``DecodeError`` from one invalid frame on ``/meshsub/*``. Patched to treat it like a
    dead peer (reset the stream, forget the peer), as pubsub does for ``ParseError``.
``guard_dispatcher`` (per host, :func:`harden`)
    The network's common inbound stream dispatcher runs every protocol handler; anything
    a handler raises tears down the host (or, for reset/EOF errors, silently ends that
    connection's accept loop). Wrapped so that any ``Exception`` resets that stream and
    is logged; ``BaseException`` (trio's ``Cancelled``) passes. The wrapper also caps
    concurrent inbound streams per peer: Yamux buffers up to 8 MiB per stream nobody
    reads, so unbounded streams are a memory attack.

Topic validators that raise are the fourth killer; ``p2pfl.net.gossip`` owns its one
validator and catches ``Exception`` there.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.abc import IHost, INetStream
from libp2p.protocol_muxer import multiselect_communicator
from libp2p.protocol_muxer.exceptions import MultiselectCommunicatorError
from libp2p.pubsub.pubsub import Pubsub

logger = logging.getLogger(__name__)

PINNED_VERSION = "0.8.1"
"""The libp2p version these patches were written and tested against."""

DEFAULT_MAX_INBOUND_STREAMS_PER_PEER = 32

_PATCHED = "__p2pfl_hardened__"
_applied: set[str] = set()


@dataclass
class HardeningCounters:
    """How often each guard fired (process-wide for patches, per host for the dispatcher)."""

    bad_protocol_ids: int = 0
    bad_pubsub_frames: int = 0
    contained_errors: int = 0
    refused_streams: int = 0


COUNTERS = HardeningCounters()
"""Process-wide counts of the global patches firing."""

StreamHandler = Callable[[INetStream], Awaitable[None]]


def check_version() -> bool:
    """Log a warning unless the installed libp2p is the pinned version; return True if it is."""
    installed = metadata.version("libp2p")
    if installed != PINNED_VERSION:
        logger.warning(
            "libp2p %s installed; p2pfl's hardening patches are pinned to %s: "
            "re-run tests/net/test_hardening.py before trusting this node with peers",
            installed,
            PINNED_VERSION,
        )
        return False
    return True


def _patch_multistream_utf8() -> None:
    cls = multiselect_communicator.MultiselectCommunicator
    original = cls.read
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    async def read(self: Any) -> str:
        try:
            return await original(self)
        except UnicodeDecodeError as error:
            COUNTERS.bad_protocol_ids += 1
            raise MultiselectCommunicatorError("protocol id is not valid UTF-8") from error

    setattr(read, _PATCHED, True)
    cls.read = read  # type: ignore[method-assign]


def _patch_pubsub_decode_error() -> None:
    original = Pubsub.stream_handler
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    async def stream_handler(self: Pubsub, stream: INetStream) -> None:
        try:
            await original(self, stream)
        except ProtobufDecodeError as error:
            COUNTERS.bad_pubsub_frames += 1
            peer_id = stream.muxed_conn.peer_id
            logger.info("invalid pubsub frame from %s: %s; dropping its stream", peer_id, error)
            await _reset_quietly(stream)
            self._handle_dead_peer(peer_id)

    setattr(stream_handler, _PATCHED, True)
    Pubsub.stream_handler = stream_handler  # type: ignore[method-assign]


_GLOBAL_PATCHES: dict[str, Callable[[], None]] = {
    "multistream_utf8": _patch_multistream_utf8,
    "pubsub_decode_error": _patch_pubsub_decode_error,
}


def apply_global_patches() -> frozenset[str]:
    """Apply the process-wide patches once; return the names applied so far."""
    if not _applied:
        check_version()
    for name, patch in _GLOBAL_PATCHES.items():
        if name not in _applied:
            patch()
            _applied.add(name)
    return frozenset(_applied)


async def _reset_quietly(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception as error:  # the connection may already be gone
        logger.debug("reset failed: %r", error)


def guard_dispatcher(handler: StreamHandler, *, max_streams_per_peer: int) -> StreamHandler:
    """Wrap the inbound stream dispatcher: contain handler errors, cap streams per peer."""
    active: Counter[str] = Counter()
    counters = HardeningCounters()

    async def guarded(stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if active[peer] >= max_streams_per_peer:
            counters.refused_streams += 1
            logger.info("peer %s exceeds %d inbound streams; resetting", peer[-8:], max_streams_per_peer)
            await _reset_quietly(stream)
            return
        active[peer] += 1
        try:
            await handler(stream)
        except Exception as error:
            counters.contained_errors += 1
            logger.warning("inbound stream from %s failed: %r; resetting it", peer[-8:], error)
            await _reset_quietly(stream)
        finally:
            active[peer] -= 1
            if active[peer] <= 0:
                del active[peer]

    setattr(guarded, _PATCHED, True)
    guarded.active = active  # type: ignore[attr-defined]  # exposed for tests/stats
    guarded.counters = counters  # type: ignore[attr-defined]
    return guarded


def harden(host: IHost, *, max_streams_per_peer: int = DEFAULT_MAX_INBOUND_STREAMS_PER_PEER) -> None:
    """Apply every patch to ``host`` (and the process-wide ones); safe to call twice."""
    apply_global_patches()
    network: Any = host.get_network()  # Swarm; the interface omits the dispatcher
    current = network.common_stream_handler
    if getattr(current, _PATCHED, False):
        return
    network.common_stream_handler = guard_dispatcher(
        current, max_streams_per_peer=max_streams_per_peer
    )


def host_counters(host: IHost) -> HardeningCounters:
    """Return the dispatcher counters of a hardened host (zeros if not hardened)."""
    network: Any = host.get_network()
    handler = network.common_stream_handler
    return getattr(handler, "counters", HardeningCounters())


def is_hardened(host: IHost) -> bool:
    """Return whether ``host``'s inbound dispatcher is guarded."""
    network: Any = host.get_network()
    return bool(getattr(network.common_stream_handler, _PATCHED, False))


__all__ = [
    "COUNTERS",
    "DEFAULT_MAX_INBOUND_STREAMS_PER_PEER",
    "PINNED_VERSION",
    "apply_global_patches",
    "check_version",
    "guard_dispatcher",
    "HardeningCounters",
    "harden",
    "host_counters",
    "is_hardened",
]
