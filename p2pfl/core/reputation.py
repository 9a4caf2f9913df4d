"""Per-peer reputation: a Beta-style tally of typed evidence, with forgetting.

Each peer has two tallies, ``good`` and ``bad``, starting at the prior's pseudo-counts
(``prior_strength`` split as ``prior`` : ``1 - prior``; the defaults are Beta(1, 1), score
0.5). The score is ``good / (good + bad)``, the mean of the Beta posterior, as in the
beta reputation system (Josang & Ismail, "The Beta Reputation System", Bled eConference
2002). Once per round both tallies decay toward the prior by ``forgetting``, so old
evidence fades (memory about 1 / (1 - forgetting) rounds) and a peer can recover.

Evidence and its effect (``amount`` in [0, 1] scales it):

- ACCEPTED: ``good += accepted_gain``.
- CLIPPED (``amount`` = 1 - clip ratio, the share of the update not used): the used share
  counts as good and the rest as bad: ``good += 1 - amount``,
  ``bad += clipped_strength * amount``. With the defaults a peer clipped by 0.3 every
  round stays above the threshold and one clipped by 0.5 falls below it within 2 rounds.
- OUTLIER: ``bad += outlier_strength * amount``.
- STALE, REPLAY: strong: ``bad += stale_strength`` / ``replay_strength`` (x amount).
- NO_SHOW, DUPLICATE_OF_OTHER: mild: ``no_show_strength`` / ``duplicate_strength``.
- INVALID_SIGNATURE, INVALID_FORMAT, EQUIVOCATION: severe, after ONE event: earned
  trust is wiped (tallies reset to the prior, then ``bad += severe_penalty``), which puts
  the score below the threshold, and the peer is banned for ``ban_rounds`` rounds.

From an aggregation's trust ``t`` (see :mod:`p2pfl.core.aggregation`), the node records
ACCEPTED when ``t == 1`` and CLIPPED with ``amount = 1 - t`` otherwise (CLIPPED by 1
weighs exactly as OUTLIER by 1), so an honest neighbour just past a rule's cut-off loses
little and a far outlier loses as much as an OUTLIER.

``weight(peer)`` is the score when it reaches ``threshold`` and the peer is not banned,
else 0. With ``readmit`` above the threshold (default 0: off), a peer whose score was
below the threshold at a round's end gets weight again only once its score is back at
``readmit``: an attacker hovering just over the threshold stays out (session 12: attackers
at weight 0 at the end 77-78% -> 82-87% under ``clip_aware`` and ``boiling_frog``, but
honest peers flagged by mistake stay out too: docs/DEFENCE.md section 5). With
``full_weight_at`` above the threshold (default 0: off), the weight rises from 0 at the
threshold to the full score at ``full_weight_at`` (``score x (score - threshold) /
(full_weight_at - threshold)``) instead of jumping from 0 to the score: with a lower
threshold, fewer peers are at weight exactly 0, but those spared keep almost no
influence, honest ones included (sessions 19-20: docs/DEFENCE.md section 5). A newcomer's
score is capped at ``newcomer_cap`` until it has had ``newcomer_rounds`` good rounds (a
round with ACCEPTED, or CLIPPED by at most a half).

A peer that keeps sending what we discard is dropped: after ``drop_after`` rounds at
weight 0 with evidence of something it sent, it is banned for ``ban_rounds`` with its
score kept. NO_SHOW and STALE do not count (a crashed or catching-up honest node is
late, not hostile); silent rounds neither count nor forgive; climbing back over the
threshold resets the count. Below the threshold the peer had no influence already, but
it held a neighbour slot and cost a download every round; dropped, the slot goes to
someone discovery finds (the only help for an honest node surrounded by attackers).

The book is pure: no clock, the caller passes round numbers; the latest round seen is
the book's "now" for ``weight``.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from p2pfl.config import require
from p2pfl.errors import DecodeError


class Evidence(enum.Enum):
    """What a peer did in a round, as seen by this node."""

    ACCEPTED = "accepted"
    CLIPPED = "clipped"
    OUTLIER = "outlier"
    STALE = "stale"
    REPLAY = "replay"
    EQUIVOCATION = "equivocation"
    INVALID_SIGNATURE = "invalid_signature"
    INVALID_FORMAT = "invalid_format"
    NO_SHOW = "no_show"
    DUPLICATE_OF_OTHER = "duplicate_of_other"


SEVERE = frozenset({Evidence.INVALID_SIGNATURE, Evidence.INVALID_FORMAT, Evidence.EQUIVOCATION})
LATE = frozenset({Evidence.NO_SHOW, Evidence.STALE})  # honest nodes are late too
RECORD_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class ReputationConfig:
    """How evidence moves scores. Defaults are tuned by tests/core/test_reputation.py."""

    prior: float = 0.5  # score of a peer we know nothing about
    prior_strength: float = 2.0  # pseudo-counts of the prior: Beta(1, 1) by default
    forgetting: float = 0.9  # per-round decay toward the prior: ~10 rounds of memory
    threshold: float = 0.3  # below this score a peer's aggregation weight is 0
    # A peer that fell below the threshold at a round's end gets weight again only once
    # its score is back at this (0 or <= threshold: at the threshold itself).
    readmit: float = 0.0
    # Weight rises from 0 at the threshold to the full score at this (0 or <= threshold:
    # a step, the score itself from the threshold on).
    full_weight_at: float = 0.0
    newcomer_cap: float = 0.6  # a newcomer cannot outweigh established peers at once...
    newcomer_rounds: int = 3  # ...until it has had this many good rounds
    # Rounds a peer stays banned after one severe event (forged signature, malformed or
    # tampered payload, equivocation): none is an honest accident, and a short ban only
    # let forgers back in to strike again (the attack grid showed them back at weight > 0).
    ban_rounds: int = 100
    # A peer whose updates we discard in this many rounds (at weight 0 throughout) is
    # dropped (banned, score kept) so that discovery can fill its slot; 0 never drops.
    # Ten: an honest peer pushed below the threshold by a bad patch climbs back in ~five.
    drop_after: int = 10
    accepted_gain: float = 1.0
    clipped_strength: float = 4.0  # 4: clipped by 0.3 each round stays above 0.3, by 0.4 not
    outlier_strength: float = 4.0
    stale_strength: float = 3.0
    replay_strength: float = 6.0
    no_show_strength: float = 0.5  # honest peers miss deadlines too
    duplicate_strength: float = 1.0
    severe_penalty: float = 10.0  # Beta(1, 11) after a reset: score 0.083
    history_length: int = 64  # events kept per peer for `status`
    # Only trust below this fraction counts against a peer, in proportion. 1.0 (issue 17):
    # every clipped share is evidence; the harm check forgives honest far neighbours.
    # 0.25 (before) let an attacker clipped to a quarter keep full reputation.
    clip_tolerance: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            where = f"reputation.{f.name}"
            if f.type == "int":
                require(
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    where,
                    f"must be an integer >= 0, got {value!r}",
                )
            else:
                require(
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and value >= 0,
                    where,
                    f"must be a finite number >= 0, got {value!r}",
                )
        require(0 < self.prior < 1, "reputation.prior", "must be in (0, 1)")
        require(self.prior_strength > 0, "reputation.prior_strength", "must be > 0")
        require(self.forgetting <= 1, "reputation.forgetting", "must be in [0, 1]")
        require(self.threshold < 1, "reputation.threshold", "must be in [0, 1)")
        require(self.readmit < 1, "reputation.readmit", "must be in [0, 1)")
        require(self.full_weight_at < 1, "reputation.full_weight_at", "must be in [0, 1)")
        require(self.newcomer_cap <= 1, "reputation.newcomer_cap", "must be in [0, 1]")
        require(self.history_length >= 1, "reputation.history_length", "must be >= 1")
        require(0 < self.clip_tolerance <= 1, "reputation.clip_tolerance", "must be in (0, 1]")

    def evidence_from_trust(self, trust: float) -> tuple[Evidence, float]:
        """Turn a rule's trust in one neighbour (``Aggregate.trust``) into evidence."""
        if trust >= self.clip_tolerance:
            return Evidence.ACCEPTED, 1.0
        if trust > 0:
            return Evidence.CLIPPED, 1.0 - trust / self.clip_tolerance
        return Evidence.OUTLIER, 1.0

    @property
    def prior_good(self) -> float:
        return self.prior * self.prior_strength

    @property
    def prior_bad(self) -> float:
        return (1 - self.prior) * self.prior_strength

    def effect(self, evidence: Evidence, amount: float) -> tuple[float, float]:
        """Return the (good, bad) increments of non-severe ``evidence`` scaled by ``amount``."""
        if evidence is Evidence.ACCEPTED:
            return self.accepted_gain * amount, 0.0
        if evidence is Evidence.CLIPPED:
            return 1.0 - amount, self.clipped_strength * amount
        strength = {
            Evidence.OUTLIER: self.outlier_strength,
            Evidence.STALE: self.stale_strength,
            Evidence.REPLAY: self.replay_strength,
            Evidence.NO_SHOW: self.no_show_strength,
            Evidence.DUPLICATE_OF_OTHER: self.duplicate_strength,
        }[evidence]
        return 0.0, strength * amount


@dataclass(frozen=True, slots=True)
class ReputationEvent:
    """One recorded piece of evidence and the score it left."""

    round: int
    peer: str
    evidence: Evidence
    amount: float
    score_after: float
    reason: str


@dataclass(slots=True)
class _Peer:
    good: float
    bad: float
    good_rounds: int = 0
    last_good_round: int | None = None
    banned_until: int | None = None  # first round the peer is no longer banned
    idle_rounds: int = 0  # rounds it sent us something, at weight 0 since the last recovery
    active_round: int | None = None  # last round with evidence of something it sent
    out: bool = False  # fell below the threshold, not yet back at ``readmit``
    history: deque[ReputationEvent] = field(default_factory=deque)


class ReputationBook:
    """Scores of every peer this node has evidence about."""

    def __init__(self, config: ReputationConfig | None = None) -> None:
        self.config = config or ReputationConfig()
        self._peers: dict[str, _Peer] = {}
        self._now: int | None = None  # latest round seen
        self._decayed_to: int | None = None  # last round end_round applied forgetting for

    def _peer(self, peer: str) -> _Peer:
        if peer not in self._peers:
            c = self.config
            history: deque[ReputationEvent] = deque(maxlen=c.history_length)
            self._peers[peer] = _Peer(c.prior_good, c.prior_bad, history=history)
        return self._peers[peer]

    def _see(self, round: int) -> None:
        self._now = round if self._now is None else max(self._now, round)

    def record(
        self, peer: str, evidence: Evidence, *, round: int, amount: float = 1.0, reason: str = ""
    ) -> float:
        """Record ``evidence`` about ``peer`` in ``round`` and return its new score.

        ``amount`` is clamped to [0, 1] (NaN counts as 0, i.e. no evidence).
        """
        amount = min(1.0, max(0.0, float(amount)))
        self._see(round)
        state, c = self._peer(peer), self.config
        if evidence in SEVERE:
            state.good, state.bad = c.prior_good, c.prior_bad + c.severe_penalty * amount
            state.good_rounds = 0  # back to newcomer: trust must be earned again
            if amount > 0:
                state.banned_until = max(state.banned_until or 0, round + c.ban_rounds)
        else:
            good, bad = c.effect(evidence, amount)
            state.good, state.bad = state.good + good, state.bad + bad
        if evidence not in LATE:
            state.active_round = round
        positive = evidence is Evidence.ACCEPTED or (evidence is Evidence.CLIPPED and amount <= 0.5)
        if positive and state.last_good_round != round:
            state.good_rounds += 1
            state.last_good_round = round
        score = self.score(peer)
        state.history.append(ReputationEvent(round, peer, evidence, amount, score, reason))
        return score

    def end_round(self, round: int) -> list[str]:
        """Close ``round``: decay every tally toward the prior, once per round (skipped
        rounds included), and drop the peers that keep sending what we discard.

        Returns the peers dropped now (banned for ``ban_rounds``, scores kept).
        """
        self._see(round)
        steps = 1 if self._decayed_to is None else round - self._decayed_to
        if steps <= 0:
            return []
        self._decayed_to = round
        keep, c = self.config.forgetting**steps, self.config
        for name, state in self._peers.items():
            state.good = c.prior_good + keep * (state.good - c.prior_good)
            state.bad = c.prior_bad + keep * (state.bad - c.prior_bad)
            score = self.score(name)
            state.out = score < c.threshold or (state.out and score < c.readmit)
        return self._drop_idle(round)

    def _drop_idle(self, round: int) -> list[str]:
        dropped = []
        for name, state in self._peers.items():
            if self.weight(name) > 0 or self.banned(name, round=round):
                state.idle_rounds = 0
            elif state.active_round == round:  # silent rounds neither count nor forgive
                state.idle_rounds += 1
            if self.config.drop_after and state.idle_rounds >= self.config.drop_after:
                state.banned_until = max(state.banned_until or 0, round + self.config.ban_rounds)
                state.idle_rounds = 0
                dropped.append(name)
        return dropped

    def score(self, peer: str) -> float:
        """Return the score in [0, 1]; an unknown peer has the prior, capped as a newcomer."""
        c = self.config
        state = self._peers.get(peer)
        if state is None:
            return min(c.prior, c.newcomer_cap)
        value = state.good / (state.good + state.bad)
        return min(value, c.newcomer_cap) if state.good_rounds < c.newcomer_rounds else value

    def banned(self, peer: str, *, round: int) -> bool:
        """Tell whether ``peer`` is banned in ``round``."""
        state = self._peers.get(peer)
        return state is not None and state.banned_until is not None and round < state.banned_until

    def weight(self, peer: str) -> float:
        """Return the aggregation weight: the score if >= threshold (``readmit`` once out)
        and not banned, else 0; between the threshold and ``full_weight_at``, a share of
        the score that rises from 0 to 1."""
        if self._now is not None and self.banned(peer, round=self._now):
            return 0.0
        value, state, c = self.score(peer), self._peers.get(peer), self.config
        if state is not None and state.out and value < c.readmit:
            return 0.0
        if value < c.threshold:
            return 0.0
        if value < c.full_weight_at:
            return value * (value - c.threshold) / (c.full_weight_at - c.threshold)
        return value

    def history(self, peer: str) -> tuple[ReputationEvent, ...]:
        """Return the last ``history_length`` events about ``peer``, oldest first."""
        state = self._peers.get(peer)
        return tuple(state.history) if state else ()

    def peers(self) -> tuple[str, ...]:
        """Return every peer with a record, sorted."""
        return tuple(sorted(self._peers))

    def to_record(self) -> dict[str, Any]:
        """Return plain (JSON/CBOR-able) data for a checkpoint."""
        return {
            "v": RECORD_VERSION,
            "now": self._now,
            "decayed_to": self._decayed_to,
            "peers": {name: _peer_record(state) for name, state in self._peers.items()},
        }

    @classmethod
    def from_record(
        cls, record: Mapping[str, Any], config: ReputationConfig | None = None
    ) -> ReputationBook:
        """Rebuild a book from :meth:`to_record` data; DecodeError if it is malformed."""
        book = cls(config)
        try:
            _check(record.get("v") == RECORD_VERSION, "unsupported version")
            book._now = _optional_int(record["now"])
            book._decayed_to = _optional_int(record["decayed_to"])
            peers = record["peers"]
            _check(isinstance(peers, Mapping), "peers must be a map")
            for name, data in peers.items():
                _check(isinstance(name, str), "peer ids must be strings")
                book._peers[name] = _peer_from(name, data, book.config)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, DecodeError):
                raise
            raise DecodeError(f"reputation record: {exc!r}") from None
        return book


def _peer_record(state: _Peer) -> dict[str, Any]:
    return {
        "good": state.good,
        "bad": state.bad,
        "good_rounds": state.good_rounds,
        "last_good_round": state.last_good_round,
        "banned_until": state.banned_until,
        "idle_rounds": state.idle_rounds,
        "active_round": state.active_round,
        "out": state.out,
        "history": [
            [e.round, e.evidence.value, e.amount, e.score_after, e.reason] for e in state.history
        ],
    }


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DecodeError(f"reputation record: {message}")


def _int(value: Any) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool), f"not an integer: {value!r}")
    return int(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _tally(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    _check(ok and math.isfinite(value) and value > 0, f"bad tally {value!r}")
    return float(value)


def _unit(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    _check(ok and 0 <= value <= 1, f"history amount/score {value!r} outside [0, 1]")
    return float(value)


def _event(peer: str, item: Any) -> ReputationEvent:
    _check(isinstance(item, list | tuple) and len(item) == 5, "bad history entry")
    round, evidence, amount, score, reason = item
    _check(isinstance(reason, str), "history reason must be a string")
    return ReputationEvent(
        _int(round), peer, Evidence(evidence), _unit(amount), _unit(score), reason
    )


def _peer_from(name: str, data: Any, config: ReputationConfig) -> _Peer:
    _check(isinstance(data, Mapping), f"peer {name!r} must be a map")
    history = data["history"]
    _check(isinstance(history, list), "history must be a list")
    events = deque((_event(name, e) for e in history), maxlen=config.history_length)
    good_rounds = _int(data["good_rounds"])
    idle_rounds = _int(data.get("idle_rounds", 0))  # absent from older checkpoints
    _check(good_rounds >= 0 and idle_rounds >= 0, "round counts must be >= 0")
    return _Peer(
        good=_tally(data["good"]),
        bad=_tally(data["bad"]),
        good_rounds=good_rounds,
        last_good_round=_optional_int(data["last_good_round"]),
        banned_until=_optional_int(data["banned_until"]),
        idle_rounds=idle_rounds,
        active_round=_optional_int(data.get("active_round")),
        out=data.get("out", False) is True,  # absent from older checkpoints
        history=events,
    )


__all__ = ["LATE", "SEVERE", "Evidence", "ReputationBook", "ReputationConfig", "ReputationEvent"]
