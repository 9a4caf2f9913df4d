"""Stream-level patches against hostile peers (LIBP2P_NOTES, "Inputs that kill a stock node").

``multistream_utf8``
    ``MultiselectCommunicator.read`` decodes the peer's protocol id with ``bytes.decode``
    and the ``UnicodeDecodeError`` escapes negotiation (on streams *and* on the raw
    connection's security/muxer negotiation). Patched to raise the
    ``MultiselectCommunicatorError`` every caller already handles.
``guard_dispatcher`` (per host)
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
from typing import Any

from libp2p.abc import IHost, INetStream
from libp2p.protocol_muxer import multiselect_communicator
from libp2p.protocol_muxer.exceptions import MultiselectCommunicatorError

logger = logging.getLogger(__name__)

DEFAULT_MAX_INBOUND_STREAMS_PER_PEER = 32
_GUARDED = "__p2pfl_guarded__"

StreamHandler = Callable[[INetStream], Awaitable[None]]


@dataclass
class HardeningCounters:
    """How often each guard fired (process-wide for patches, per host for the dispatcher)."""

    bad_protocol_ids: int = 0
    bad_pubsub_frames: int = 0
    contained_errors: int = 0
    refused_streams: int = 0


COUNTERS = HardeningCounters()
"""Process-wide counts of the class patches firing."""


def multistream_utf8() -> None:
    """Turn a non-UTF-8 protocol id into the negotiation error callers handle."""
    cls = multiselect_communicator.MultiselectCommunicator
    original = cls.read

    @functools.wraps(original)
    async def read(self: Any) -> str:
        try:
            return await original(self)
        except UnicodeDecodeError as error:
            COUNTERS.bad_protocol_ids += 1
            raise MultiselectCommunicatorError("protocol id is not valid UTF-8") from error

    cls.read = read  # type: ignore[method-assign]


async def reset_quietly(stream: INetStream) -> None:
    """Reset ``stream``, ignoring a connection that is already gone."""
    try:
        await stream.reset()
    except Exception as error:  # the connection may already be gone
        logger.debug("reset failed: %r", error)


def guarded_handler(handler: StreamHandler, *, max_streams_per_peer: int) -> StreamHandler:
    """Wrap an inbound stream dispatcher: contain handler errors, cap streams per peer."""
    active: Counter[str] = Counter()
    counters = HardeningCounters()

    async def guarded(stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if active[peer] >= max_streams_per_peer:
            counters.refused_streams += 1
            logger.info("peer %s exceeds %d inbound streams; resetting", peer[-8:], max_streams_per_peer)
            await reset_quietly(stream)
            return
        active[peer] += 1
        try:
            await handler(stream)
        except Exception as error:
            counters.contained_errors += 1
            logger.warning("inbound stream from %s failed: %r; resetting it", peer[-8:], error)
            await reset_quietly(stream)
        finally:
            active[peer] -= 1
            if active[peer] <= 0:
                del active[peer]

    setattr(guarded, _GUARDED, True)
    guarded.active = active  # type: ignore[attr-defined]  # exposed for tests/stats
    guarded.counters = counters  # type: ignore[attr-defined]
    return guarded


def guard_dispatcher(host: IHost, *, max_streams_per_peer: int = DEFAULT_MAX_INBOUND_STREAMS_PER_PEER) -> None:
    """Guard ``host``'s inbound stream dispatcher (idempotent)."""
    network: Any = host.get_network()  # Swarm; the interface omits the dispatcher
    current = network.common_stream_handler
    if getattr(current, _GUARDED, False):
        return
    network.common_stream_handler = guarded_handler(current, max_streams_per_peer=max_streams_per_peer)


def host_counters(host: IHost) -> HardeningCounters:
    """Return the dispatcher counters of a guarded host (zeros if not guarded)."""
    network: Any = host.get_network()
    return getattr(network.common_stream_handler, "counters", HardeningCounters())


def is_guarded(host: IHost) -> bool:
    """Return whether ``host``'s inbound dispatcher is guarded."""
    network: Any = host.get_network()
    return bool(getattr(network.common_stream_handler, _GUARDED, False))


__all__ = [
    "COUNTERS",
    "DEFAULT_MAX_INBOUND_STREAMS_PER_PEER",
    "HardeningCounters",
    "guard_dispatcher",
    "guarded_handler",
    "host_counters",
    "is_guarded",
    "multistream_utf8",
    "reset_quietly",
]
