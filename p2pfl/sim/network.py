"""Two measures that keep large simulations cheap without changing what a node computes.

- ``MemoryNetwork(neighbours_only=True)`` delivers announcements to direct neighbours
  only (nodes act on their neighbours' announcements only), instead of to every
  reachable peer as GossipSub's mesh would.
- :class:`VerificationCache` shares successful announcement parses between the nodes
  of a run: the ecdsa check (~2-5 ms) is done once per distinct announcement, not once
  per receiver. Only successes are cached, keyed by the exact bytes; an UPDATE hit is
  re-checked for origin == signer, so every rejection still happens at the receiver.

tests/sim/test_runner.py checks that runs give identical results with and without them.
"""

from __future__ import annotations

from typing import Any

from p2pfl.core.envelope import AnnouncementKind, ParsedAnnouncement
from p2pfl.net.transport import Validator


class VerificationCache:
    """Successful announcement parses shared by the nodes of one run (same network id)."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: dict[bytes, ParsedAnnouncement] = {}

    def wrap(self, validator: Validator) -> Validator:
        """Return ``validator`` answering from the cache when the same bytes passed before."""

        def validate(origin: str, data: bytes) -> Any:
            hit = self._entries.get(data)
            if hit is not None and (
                hit.kind is not AnnouncementKind.UPDATE or hit.update.header.sender == origin
            ):
                self.hits += 1
                return ParsedAnnouncement(hit.kind, hit.update, origin)
            self.misses += 1
            value = validator(origin, data)  # raises on rejection: nothing is cached
            if isinstance(value, ParsedAnnouncement) and self.capacity:
                if len(self._entries) >= self.capacity:
                    del self._entries[next(iter(self._entries))]  # oldest first
                self._entries[bytes(data)] = value
            return value

        return validate


__all__ = ["VerificationCache"]
