"""Replay and equivocation memory: which digest each sender announced for which round.

Fed every verified announcement's ``(sender, round, digest)``; :class:`Observation` says
whether it is new, a harmless resend, a second digest for one round (equivocation), a
digest re-announced for another round (replay), or too old to judge (stale).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from p2pfl.config import require
from p2pfl.core.bounded import BoundedMap


class Observation(enum.Enum):
    """What the ledger makes of one (sender, round, digest) sighting."""

    NEW = "new"  # first digest for this (sender, round)
    DUPLICATE = "duplicate"  # the same digest again: a harmless resend
    EQUIVOCATION = "equivocation"  # a second, different digest for one (sender, round)
    REPLAY = "replay"  # a digest this sender already announced for another round
    STALE = "stale"  # older than the ledger remembers for this sender


# An equivocator could flood distinct digests for one round; two prove the offence.
_MAX_DIGESTS_PER_ROUND = 4


@dataclass(slots=True)
class _SenderMemory:
    newest: int
    rounds: dict[int, list[bytes]] = field(default_factory=dict)
    first_round: dict[bytes, int] = field(default_factory=dict)  # digest -> round
    equivocated: bool = False


class UpdateLedger:
    """Bounded memory of which digests each sender announced for which round.

    Per sender, rounds in ``[newest - window, newest]`` are remembered; older ones are
    STALE. At most ``max_senders`` senders are tracked, least recently seen evicted
    first. The node should reject far-future rounds *before* observing them: a jump
    forward would otherwise push a sender's real history out of the window.
    """

    def __init__(self, *, window: int = 8, max_senders: int = 4096) -> None:
        """Create an empty ledger; raise ConfigError on a negative window or no senders."""
        def whole(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        require(whole(window), "ledger.window", f"must be an integer >= 0, got {window!r}")
        require(
            whole(max_senders) and max_senders > 0,
            "ledger.max_senders",
            f"must be a positive integer, got {max_senders!r}",
        )
        self._window = window
        self._senders: BoundedMap[str, _SenderMemory] = BoundedMap(max_senders)

    def observe(self, sender: str, round: int, digest: bytes) -> Observation:
        """Record one sighting and classify it (see :class:`Observation`)."""
        memory = self._memory(sender, round)
        if round < memory.newest - self._window:
            return Observation.STALE
        seen = memory.rounds.get(round, [])
        if digest in seen:
            return Observation.DUPLICATE
        if memory.first_round.get(digest, round) != round:
            return Observation.REPLAY
        if seen:
            memory.equivocated = True
            if len(seen) < _MAX_DIGESTS_PER_ROUND:
                self._remember(memory, round, [*seen, digest])
            return Observation.EQUIVOCATION
        self._remember(memory, round, [digest])
        if round > memory.newest:
            self._advance(memory, round)
        return Observation.NEW

    def digests(self, sender: str, round: int) -> tuple[bytes, ...]:
        """Return the distinct digests remembered for ``(sender, round)``."""
        memory = self._senders.peek(sender)
        if memory is None:
            return ()
        return tuple(memory.rounds.get(round, ()))

    def equivocated(self, sender: str) -> bool:
        """Tell whether ``sender`` was caught equivocating while remembered."""
        memory = self._senders.peek(sender)
        return memory is not None and memory.equivocated

    def __len__(self) -> int:
        return len(self._senders)

    def _memory(self, sender: str, round: int) -> _SenderMemory:
        memory = self._senders.get(sender)  # the least recently seen sender goes first
        if memory is None:
            memory = _SenderMemory(newest=round)
            self._senders.put(sender, memory)
        return memory

    @staticmethod
    def _remember(memory: _SenderMemory, round: int, digests: list[bytes]) -> None:
        memory.rounds[round] = digests
        memory.first_round.setdefault(digests[-1], round)

    def _advance(self, memory: _SenderMemory, newest: int) -> None:
        memory.newest = newest
        oldest = newest - self._window
        for old in [r for r in memory.rounds if r < oldest]:
            for digest in memory.rounds.pop(old):
                if memory.first_round.get(digest) == old:
                    del memory.first_round[digest]


__all__ = ["Observation", "UpdateLedger"]
