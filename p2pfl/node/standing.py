"""Where each peer stands with this node: its reputation book and the evidence tallies.

Every part of the node that judges a peer (ingress, the fetcher, the mixer, the round
loop) records its evidence here; the round loop reads weights and bans back.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

from p2pfl.core.crypto import short_id
from p2pfl.core.reputation import Evidence, ReputationBook, ReputationConfig

log = logging.getLogger(__name__)


class Standing:
    """The reputation book plus the counts :meth:`Node.statistics` reports."""

    def __init__(self, config: ReputationConfig) -> None:
        """Start with an empty book."""
        self.config = config
        self.book = ReputationBook(config)
        self.accepted = 0  # updates used in full
        self.rejected: Counter[str] = Counter()  # evidence name -> count

    def restore(self, record: Mapping[str, Any]) -> None:
        """Replace the book with one saved by ``book.to_record()`` (a checkpoint)."""
        self.book = ReputationBook.from_record(dict(record), self.config)

    def record(
        self, peer: str, evidence: Evidence, number: int, reason: str, *, amount: float = 1.0
    ) -> None:
        """Record ``evidence`` about ``peer`` in round ``number``."""
        if evidence not in (Evidence.ACCEPTED, Evidence.CLIPPED):
            self.rejected[evidence.value] += 1
            log.info("peer %s: %s (%s)", short_id(peer), evidence.value, reason)
        self.book.record(peer, evidence, round=number, amount=amount, reason=reason)

    def record_trust(self, peer: str, trust: float, number: int) -> None:
        """Record what an aggregation's ``trust`` in ``peer``'s update says about it."""
        evidence, amount = self.config.evidence_from_trust(trust)
        if evidence is Evidence.ACCEPTED:
            self.accepted += 1
        reason = f"trust {trust:.2f}" if trust < 1 else "used in full"
        self.record(peer, evidence, number, reason, amount=amount)

    def weight(self, peer: str) -> float:
        """The peer's mixing weight (0 below the threshold or banned)."""
        return self.book.weight(peer)

    def banned(self, peer: str, *, round: int) -> bool:
        """Whether ``peer`` is banned in round ``round``."""
        return self.book.banned(peer, round=round)

    def end_round(self, number: int) -> None:
        """Close round ``number`` in the book (decay, drops)."""
        for peer in self.book.end_round(number):
            after = self.config.drop_after
            log.info("peer %s: updates discarded in %d rounds, dropped", short_id(peer), after)

    def banned_peers(self, number: int) -> list[str]:
        """Every peer banned in round ``number``."""
        return [peer for peer in self.book.peers() if self.book.banned(peer, round=number)]
