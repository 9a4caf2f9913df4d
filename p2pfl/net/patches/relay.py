"""Circuit relay v2 (``libp2p.relay.circuit_v2.protocol.CircuitV2Protocol``) as a relay.

- :func:`reserve_self`: a RESERVE may name any PeerId in its ``peer`` field and the
  relay books the slot for that id: one connected peer could fill every reservation with
  ids it made up. The slot is booked for the peer at the other end of the stream (what
  the spec says: the field is ignored by go and rust relays).
- :func:`count_forwarded`: the relay counts no bytes it forwards; ``forwarded_bytes`` on
  the protocol instance adds up what both directions of every circuit wrote, for
  ``/status``.
"""

from __future__ import annotations

import functools
from typing import Any, cast

from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol


def reserve_self() -> None:
    original = CircuitV2Protocol._handle_reserve

    @functools.wraps(original)
    async def _handle_reserve(self: Any, stream: Any, msg: Any) -> None:
        msg.ClearField("peer")  # the slot is for whoever asks, nobody else
        await original(self, stream, msg)

    CircuitV2Protocol._handle_reserve = _handle_reserve  # type: ignore[method-assign]


class _Counted:
    """A stream whose writes add to ``owner.forwarded_bytes``; everything else passes."""

    def __init__(self, stream: Any, owner: Any) -> None:
        self._stream = stream
        self._owner = owner

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)
        self._owner.forwarded_bytes = getattr(self._owner, "forwarded_bytes", 0) + len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def count_forwarded() -> None:
    original = CircuitV2Protocol._relay_data

    @functools.wraps(original)
    async def _relay_data(self: Any, src_stream: Any, dst_stream: Any, *args: Any, **kwargs: Any) -> None:
        await original(self, src_stream, cast(Any, _Counted(dst_stream, self)), *args, **kwargs)

    CircuitV2Protocol._relay_data = _relay_data  # type: ignore[method-assign]
