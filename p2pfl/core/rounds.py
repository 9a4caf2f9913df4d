"""Round bookkeeping as plain data in, decisions out: admission, quorum, selection.

The node feeds every verified announcement to :func:`admit`, keeps the payloads it
fetched in an :class:`Inbox`, asks :meth:`Inbox.ready` whether the round can close, and
takes the updates to aggregate with :meth:`Inbox.take`; far behind, it asks
:func:`catch_up_target` where to jump and whom to start from. No clock, no network: the
deadline is the node's, the decisions are here and tested without either.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from p2pfl.core.bounded import BoundedMap
from p2pfl.core.ledger import Observation
from p2pfl.core.reputation import Evidence


class Decision(enum.Enum):
    """What to do with an announced update."""

    FETCH = "fetch"  # pull the payload and consider it
    IGNORE = "ignore"  # harmless: a resend, or not usable now
    REJECT = "reject"  # misbehaviour: count the evidence, never fetch


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision on one announced update, with the evidence it carries."""

    decision: Decision
    evidence: Evidence | None = None
    reason: str = ""


def admit(
    observation: Observation,
    update_round: int,
    current_round: int,
    *,
    max_lag: int,
    max_lead: int,
) -> Admission:
    """Decide what to do with an update of ``update_round`` seen during ``current_round``."""
    if observation is Observation.EQUIVOCATION:
        return Admission(Decision.REJECT, Evidence.EQUIVOCATION, "two digests for one round")
    if observation is Observation.REPLAY:
        return Admission(Decision.REJECT, Evidence.REPLAY, "old update re-sent as new")
    if observation is Observation.STALE:
        # Neutral: any forwarder can replay an old signed announcement (GossipSub replays
        # its message cache to every newcomer), so it says nothing about the author.
        return Admission(Decision.IGNORE, reason=f"round {update_round} is older than remembered (a replay)")
    if update_round < current_round - max_lag:
        # Honest peers fall behind (slow machine, late join): not evidence by itself.
        return Admission(Decision.IGNORE, reason=f"round {update_round} is behind")
    if update_round > current_round + max_lead:
        # A peer far ahead is not misbehaving by itself; the node may catch up instead.
        return Admission(Decision.IGNORE, reason=f"round {update_round} is far ahead")
    # NEW or a harmless resend (DUPLICATE): the node fetches it unless it already holds it.
    return Admission(Decision.FETCH)


def catch_up_target(
    freshest: Mapping[str, int],
    reputable: Sequence[str],
    current_round: int,
    *,
    after: int,
    sources: int,
) -> tuple[int, list[str]] | None:
    """Return the round to jump to and the peers to start from, or None to stay.

    ``freshest`` maps each peer to the newest round we saw it announce. Peers at least
    ``after`` rounds ahead of ``current_round`` count as ahead; at least half the
    ``reputable`` neighbours must be, so one liar claiming round 10**9 cannot drag us
    anywhere, and the median of their rounds is the target. The ``sources`` furthest
    ahead are the peers to start from.
    """
    allowed = set(reputable)
    ahead = sorted(
        (round_, peer)
        for peer, round_ in freshest.items()
        if peer in allowed and round_ >= current_round + after
    )
    if not ahead or 2 * len(ahead) < len(allowed):
        return None
    return ahead[len(ahead) // 2][0], [peer for _, peer in ahead[-sources:]]


@dataclass(frozen=True, slots=True)
class Received:
    """A verified, decoded neighbour update waiting to be aggregated."""

    sender: str
    round: int
    digest: bytes
    samples: int
    state: Mapping[str, torch.Tensor]


class Inbox:
    """Verified neighbour updates by sender and round; each round of a peer used once.

    A peer ahead of us may deliver round r+1 before we close round r: we keep both, use
    round r now and r+1 next time, so being ahead never makes a peer look absent. A round
    uses a peer's update of at most the next round; one from further ahead counts toward
    the quorum but waits for a later round of ours (see :meth:`take`).
    """

    def __init__(self, *, keep_rounds: int = 8, max_digests: int = 4096) -> None:
        self._held: dict[str, dict[int, Received]] = {}
        self._used_through: dict[str, int] = {}  # peer -> last round of it we aggregated
        self._freshest: dict[str, Received] = {}  # newest delivered per peer, used or not
        self._given_up: dict[str, int] = {}  # peer -> newest round of it we could not pull
        self._keep_rounds = keep_rounds
        self._authors: BoundedMap[bytes, str] = BoundedMap(max_digests)

    def first_author(self, digest: bytes, sender: str) -> str:
        """Return who first announced ``digest``, remembering ``sender`` if nobody did."""
        return self._authors.setdefault(digest, sender)

    def deliver(self, update: Received) -> None:
        """Keep ``update`` unless that round of the peer was used already."""
        if not self.wants(update.sender, update.round):
            return
        held = self._held.setdefault(update.sender, {})
        held[update.round] = update
        freshest = self._freshest.get(update.sender)
        if freshest is None or update.round > freshest.round:
            self._freshest[update.sender] = update
        for old in sorted(held)[: -self._keep_rounds]:
            del held[old]

    def wants(self, sender: str, update_round: int) -> bool:
        """Whether an update of this round would be new to us."""
        return update_round > self._used_through.get(
            sender, -1
        ) and update_round not in self._held.get(sender, {})

    def give_up(self, sender: str, update_round: int) -> None:
        """Stop waiting for ``sender`` while in rounds up to ``update_round``: its update of
        that round could not be pulled (every attempt failed), so waiting for it only runs
        the round to its deadline (with quorum 1 and a 900 s deadline, for 15 minutes)."""
        self._given_up[sender] = max(update_round, self._given_up.get(sender, update_round))

    def ready(self, expected: Collection[str], current_round: int, quorum: float) -> bool:
        """Whether enough expected neighbours delivered (see :meth:`delivered`); a peer we
        gave up on this round (:meth:`give_up`) is not expected."""
        expected = [p for p in expected if self._given_up.get(p, -1) < current_round]
        if not expected:
            return True
        fresh = sum(1 for peer in expected if self.delivered(peer, current_round))
        return fresh >= math.ceil(quorum * len(expected))

    def delivered(self, peer: str, current_round: int) -> bool:
        """Whether ``peer`` delivered an unused update of this round or a later one.

        An update two rounds ahead counts although this round will not use it (see
        :meth:`take`): its author is ahead, not absent, and may be waiting for us.
        """
        return bool(self._unused(peer, current_round, current_round + 10**9))

    def take(self, current_round: int, *, max_lag: int) -> list[Received]:
        """Return one unused update per peer for ``current_round`` and mark them used.

        Per peer: its latest round not after ours, else its update of our next round.
        One from further ahead waits for a later round of ours: a peer's r+2 used in our
        round r would have us wait in round r+1 for its r+3, which it trains only once it
        has our r+2 (quorum 1.0), which we train only after closing r+1. Every round then
        ran to the deadline (tests/node/test_lockstep.py).
        """
        chosen = []
        for peer in sorted(self._held):
            rounds = self._unused(peer, current_round - max_lag, current_round + 1)
            if not rounds:
                continue
            behind = [r for r in rounds if r <= current_round]
            pick = max(behind) if behind else current_round + 1
            chosen.append(self._held[peer][pick])
            self._used_through[peer] = pick
            for old in [r for r in self._held[peer] if r <= pick]:
                del self._held[peer][old]
        return chosen

    def latest(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """The newest state delivered by each peer, aggregated already or not."""
        return {peer: update.state for peer, update in self._freshest.items()}

    def forget(self, peer: str) -> None:
        """Drop what we hold from ``peer`` (banned)."""
        self._held.pop(peer, None)
        self._freshest.pop(peer, None)
        self._given_up.pop(peer, None)

    def _unused(self, peer: str, low: int, high: int) -> list[int]:
        used = self._used_through.get(peer, -1)
        return [r for r in self._held.get(peer, {}) if low <= r <= high and r > used]
