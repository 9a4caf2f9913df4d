"""Stream helpers every protocol of ours shares: error translation, a quiet reset."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from p2pfl.errors import ProtocolViolation, TransferError

logger = logging.getLogger(__name__)

RESET_TIMEOUT = 1.0  # a reset writes one frame; a full socket must not hold us


async def reset_quietly(stream: INetStream) -> None:
    """Reset ``stream``, bounded in time and shielded from the caller's cancellation (a
    stream given up on at a deadline is still reset)."""
    with trio.CancelScope(shield=True), trio.move_on_after(RESET_TIMEOUT):
        try:
            await stream.reset()
        except Exception:  # the stream is already broken; nothing left to do
            logger.debug("stream reset failed", exc_info=True)


@contextlib.contextmanager
def as_protocol_errors() -> Iterator[None]:
    """Let our TransferErrors through; turn anything else raised inside (an early end, a
    reset, malformed bytes, whatever libp2p raises) into ProtocolViolation."""
    try:
        yield
    except TransferError:
        raise
    except StreamEOF as exc:
        raise ProtocolViolation("stream ended early") from exc
    except StreamReset as exc:
        raise ProtocolViolation("stream reset by peer") from exc
    except Exception as exc:  # _Malformed, StreamError, anything libp2p raises
        raise ProtocolViolation(f"{type(exc).__name__}: {exc}") from exc


__all__ = ["RESET_TIMEOUT", "as_protocol_errors", "reset_quietly"]
