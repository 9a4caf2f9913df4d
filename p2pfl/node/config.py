"""Configuration of one node: frozen, keyword-only, validated on construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from p2pfl.config import DEFAULT_RULE, Limits, require
from p2pfl.core.aggregation import RULES
from p2pfl.core.reputation import ReputationConfig


def _frozen_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(params))


ROLES = ("trainer", "observer")


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundConfig:
    """How a node runs its rounds. No global barrier: every bound here is local."""

    local_epochs: int = 1
    # Seconds to wait for neighbours' updates after announcing our own. A dead or frozen
    # neighbour costs at most this much per round; honest ones on loopback take ~0.1 s.
    round_timeout: float = 5.0
    # Close the round once this fraction of reputable neighbours has delivered. Waiting
    # for all of them makes every node as slow as the slowest in its neighbourhood, and
    # the delays cascade; a straggler's update is used in our next round instead.
    quorum: float = 0.6
    # Accept a neighbour's update from up to this many rounds behind ours (slow peers
    # still count); older ones are stale.
    max_lag: int = 2
    # Updates from further ahead than this are not used (a fast peer is buffered; a
    # peer claiming round 10**9 is ignored). A round uses at most the next round's
    # update of a peer; those further ahead wait for a later round (core/rounds.py).
    max_lead: int = 2
    # Re-announce our update this often until the round closes: gossip is lossy, but
    # every copy costs each peer ~10 ms of CPU in py-libp2p.
    reannounce_interval: float = 1.0
    # Deadline of one payload transfer.
    fetch_timeout: float = 10.0
    # A late joiner adopts the network's round and a robust aggregate of up to this many
    # neighbours' models when it is this many rounds behind.
    catch_up_after: int = 2
    catch_up_sources: int = 3
    # Before the first round, wait (at most start_timeout seconds) for this many
    # neighbours, so that nodes of a network started together train together.
    min_neighbours: int = 0
    start_timeout: float = 60.0

    def __post_init__(self) -> None:
        require(self.local_epochs >= 1, "round.local_epochs", "must be >= 1")
        require(self.round_timeout > 0, "round.round_timeout", "must be > 0 seconds")
        require(0 < self.quorum <= 1, "round.quorum", "must be a fraction in (0, 1]")
        require(self.max_lag >= 0, "round.max_lag", "must be >= 0")
        require(self.max_lead >= 0, "round.max_lead", "must be >= 0")
        require(self.reannounce_interval > 0, "round.reannounce_interval", "must be > 0")
        require(self.fetch_timeout > 0, "round.fetch_timeout", "must be > 0 seconds")
        require(self.catch_up_after >= 1, "round.catch_up_after", "must be >= 1")
        require(self.catch_up_sources >= 1, "round.catch_up_sources", "must be >= 1")
        require(self.min_neighbours >= 0, "round.min_neighbours", "must be >= 0")
        require(self.start_timeout >= 0, "round.start_timeout", "must be >= 0 seconds")


@dataclass(frozen=True, kw_only=True, slots=True)
class HarmCheck:
    """Exempt from clipping the neighbours whose model, mixed in at its weight, does not
    raise the loss on our own data by more than ``absolute + relative x own loss``
    (:mod:`p2pfl.node.harm`) in each of their last ``streak`` updates. Needs a learner
    with ``probe_losses`` (TorchLearner)."""

    enabled: bool = True
    absolute: float = 0.05
    relative: float = 0.05
    streak: int = 3
    # Probe at this multiple of the share a neighbour would have at full reputation.
    probe_scale: float = 1.0
    # ...but at no more than this share. A node with one neighbour judged it at 1/2, where
    # an honest neighbour holding other classes is "harmful" to skewed data: on the
    # Erdos-Renyi setting without attack (seed 10) such a node flagged its only neighbour
    # and trained alone (0.67; the other honest nodes 0.91-0.96). At most 1/3: 0.91. (At
    # most 1/5, the developers' setting's share, helped Erdos-Renyi more but cost nodes
    # with three attacking neighbours of four 6-27 points on the 4-regular graph; issue 17,
    # session 11.)
    max_probe_share: float = 1 / 3
    # The share of the mix the harm tolerance is set for (the developers' setting: four
    # neighbours and us). A node that got fewer models this round probes each at a larger
    # equal share (1/3 with two), and harm near a minimum grows with the square of the
    # share; so whether a neighbour *harms* us is judged against the tolerance x (equal
    # share / this)^2, never less than the tolerance. Passing (vetting) keeps the plain
    # tolerance. Counted from the models that arrived, not from weights: an attacker
    # cannot raise its own bar by gaining weight. 0: off (before session 21).
    tolerance_share: float = 0.2
    # Whose clipping is not held against its reputation: "passed" (this round's check),
    # "harmless" (no worse than our own model, whatever the reference), "typical"
    # (harmless, and from round ``settle`` on also no worse than the reference: the
    # typical neighbour's mix), "vetted" (``streak`` passes in a row), or "none".
    forgive: str = "typical"
    # A neighbour whose check fails counts as trusted at most this much (1: no evidence).
    fail_trust: float = 0.5
    # What a neighbour's mixed loss is compared with: "own" (our model's loss) or
    # "median" (the lower of that and the median neighbour's mixed loss).
    reference: str = "median"
    # How losses on our sample weigh classes: "pooled" (every sample alike), "balanced"
    # (each class present alike) or "worst" (the worst class); needs probe_class_losses.
    classes: str = "pooled"
    # Our first rounds in which a failed check is no evidence: models trained from different
    # starting points are far apart at first, honest or not (a 6-node ring flagged an honest
    # neighbour in round 2 without it).
    grace: int = 3
    # To pass, a neighbour's mix may raise our loss by at most this much per own local step
    # of distance between its model and ours (and never by more than the tolerance). A far
    # neighbour that barely changes our loss (the one across a bridge between communities:
    # ~0.001 per step) keeps its vetting; an attacker placed just inside our clipping radius
    # spends its whole distance on harm (0.006-0.014 per step) and loses it. Issue 17.
    harm_per_step: float = 0.008
    # The round from which ``forgive = "typical"`` compares with the typical neighbour:
    # before it, models trained from different starting points are still settling and the
    # neighbour across a bridge between communities is 1-2 tolerances worse than the
    # others (docs/DEFENCE.md section 3).
    settle: int = 10
    # Rounds after a failed check (one that counts: from round ``grace`` on) in which the
    # neighbour is neither forgiven its clipping nor vetted: an attacker that harms us
    # every few rounds was forgiven, or even vetted, in the rounds between (ipm eps 0.05
    # hovered at reputation 0.3-0.45 that way). 0: a failure weighs only in its own round.
    remember: int = 0
    # A failed check weighs in proportion to its excess over our own loss: in full (trust
    # capped at ``fail_trust``) from this many tolerances on, less below; 0: always in full
    # (before session 13). Honest neighbours holding other classes fail by a small margin
    # (median half a tolerance), sometimes round after round, and the flat cap flagged them:
    # honest peers ever flagged without attack 0.06 -> 0.01 (docs/DEFENCE.md section 3).
    fail_full_at: float = 1.0
    # Forgiveness by record: with N > 0 a harmless neighbour's clipping is forgiven only up
    # to the share of its checks that did not fail (a running average over ~N rounds).
    # Attackers clipped to 0.1-0.3 alternate failed rounds with harmless ones that forgave
    # them in full. 0 (default): forgiven in full. At 10 (with ``fail_full_at`` 1) recall
    # rises to 86-89% on the developers' setting, but on Erdos-Renyi with a third attacking
    # honest nodes dragged by attackers fail checks too and are forgiven less (session 13).
    forgive_memory: int = 0
    # From round ``settle`` on, a neighbour that is not vetted (``streak`` passes in a row)
    # has its clipping forgiven only up to this trust; vetted ones in full. 0.8 is the trust
    # whose evidence keeps a score at the prior (as much good as bad): forgiveness stops
    # the fall of a typical neighbour's score but no longer raises it. Attackers clipped to
    # 0.1-0.3 were forgiven in full in the rounds between their failures and hovered just
    # above the threshold; now they fall under it (docs/DEFENCE.md section 3, session 13).
    # 1: forgiven in full, vetted or not (before).
    unvetted_forgive: float = 0.8
    # The joint check: also probe the whole mix (every neighbour harmless alone, at its
    # probe share) with each of them left out in turn. One whose leaving out lowers our
    # loss by more than the tolerance beyond the median one's is neither passed (vetted)
    # nor forgiven its clipping this round. Colluders who send the same harmful model each
    # pass alone at their one share; in the mix their pulls add, and each one's part there
    # is far larger (quadratic loss: about 3x for two). Issue 17, session 17: on the
    # testnet's shape (8 nodes, every pair connected, 2 attackers, seeds 0-2) ipm 0.1
    # -9.4 -> -5.1 points against the attackers' absence, the paper's alie z 2 -7.9 ->
    # -1.3, no honest peer flagged (docs/DEFENCE.md section 3, "The joint check").
    # false: off (before session 17).
    joint: bool = True
    # The span check (:mod:`p2pfl.node.span`), opt-in: with ``span_low`` > 0 (3 measured)
    # a neighbour whose deviation from the others lies in the span of our probe's
    # per-sample gradients no more than ``span_low`` times as much as a random direction's
    # is mixed at weight 0 that round, from ``span_high`` times on in full, linear between;
    # a running mean of that ratio (this much of the last value kept each round) caps its
    # trust the same way. From round ``span_start``. Honest neighbours: 18-149 (median
    # 33); a made-up drift inside the honest spread (``alie`` with random signs), which
    # costs 6 points without it: 4-9 (median 5). It also cut the one honest neighbour of
    # nodes surrounded by attackers: not a default (docs/DEFENCE.md section 3a). 0: off.
    span_low: float = 0.0
    span_high: float = 6.0
    span_memory: float = 0.7
    span_start: int = 1

    def harm_scale(self, models: int) -> float:
        """The factor on the tolerance for the *harm* answer when ``models`` neighbours'
        models are judged this round: (their equal probe share / ``tolerance_share``)^2,
        at least 1 (see ``tolerance_share``)."""
        if not self.tolerance_share or models < 1:
            return 1.0
        share = min(self.max_probe_share, self.probe_scale / (models + 1))
        return max(1.0, (share / self.tolerance_share) ** 2)

    def __post_init__(self) -> None:
        for name in ("enabled", "joint"):
            require(isinstance(getattr(self, name), bool), f"harm_check.{name}", "must be true or false")
        require(isinstance(self.span_low, int | float) and isinstance(self.span_high, int | float)
                and 0 <= self.span_low < self.span_high < 1e6, "harm_check.span_low",
                f"must be a number >= 0 (0: off) below span_high, got {self.span_low!r} and {self.span_high!r}")
        require(isinstance(self.span_memory, int | float) and 0 <= self.span_memory < 1,
                "harm_check.span_memory", f"must be a number in [0, 1), got {self.span_memory!r}")
        require(self.classes in ("pooled", "balanced", "worst"), "harm_check.classes",
                f"must be pooled, balanced or worst, got {self.classes!r}")
        for name in ("grace", "remember", "settle", "forgive_memory", "span_start"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"harm_check.{name}", f"must be an integer >= 0, got {value!r}")
        require(self.reference in ("own", "median"), "harm_check.reference",
                f"must be own or median, got {self.reference!r}")
        require(self.forgive in ("passed", "harmless", "typical", "vetted", "none"), "harm_check.forgive",
                f"must be passed, harmless, typical, vetted or none, got {self.forgive!r}")
        require(isinstance(self.probe_scale, int | float) and not isinstance(self.probe_scale, bool)
                and 1 <= self.probe_scale <= 1e3, "harm_check.probe_scale",
                f"must be a number in [1, 1000], got {self.probe_scale!r}")
        require(isinstance(self.max_probe_share, int | float) and not isinstance(self.max_probe_share, bool)
                and 0 < self.max_probe_share <= 1, "harm_check.max_probe_share",
                f"must be a number in (0, 1], got {self.max_probe_share!r}")
        require(isinstance(self.tolerance_share, int | float) and not isinstance(self.tolerance_share, bool)
                and 0 <= self.tolerance_share <= 1, "harm_check.tolerance_share",
                f"must be a number in [0, 1] (0: off), got {self.tolerance_share!r}")
        for name in ("fail_trust", "unvetted_forgive"):
            value = getattr(self, name)
            require(isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1,
                    f"harm_check.{name}", f"must be a number in [0, 1], got {value!r}")
        for name in ("absolute", "relative", "harm_per_step", "fail_full_at"):
            value = getattr(self, name)
            require(
                isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e6,
                f"harm_check.{name}",
                f"must be a number >= 0, got {value!r}",
            )
        require(
            isinstance(self.streak, int) and not isinstance(self.streak, bool) and self.streak >= 1,
            "harm_check.streak",
            f"must be an integer >= 1, got {self.streak!r}",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReferenceConfig:
    """An opt-in public reference set (:mod:`p2pfl.node.reference`): every node of the
    network names the same file and its sha256 (``p2pfl reference make`` prints it); a
    node refuses to start if the file is missing, malformed or hashes otherwise."""

    path: Path | None = None  # None: no reference set
    sha256: str = ""
    # A neighbour without which the mix's class-balanced reference loss is lower by more
    # than this is not mixed in that round (docs/RESULTS.md: honest and flipped
    # neighbours' distributions).
    tolerance: float = 0.1
    # Whether a refusal is also evidence against the neighbour's reputation (its trust
    # capped in proportion to the excess). Off since session 21: a refusal keeps the
    # neighbour out of this round's mix only. With it, honest neighbours that train on few
    # classes were refused round after round, flagged and dropped (honest peers ever
    # flagged 0.10 without attack, up to 0.31 under attack); without it 0.02 and at most
    # 0.11, and the worst honest node higher under most attacks, for fewer label flippers
    # at weight 0 (docs/RESULTS.md, "Session 21").
    evidence: bool = False

    def __post_init__(self) -> None:
        require(isinstance(self.evidence, bool), "reference.evidence", "must be true or false")
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))
            digest = self.sha256.lower() if isinstance(self.sha256, str) else ""
            require(len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                    "reference.sha256", "must be the file's sha256 in 64 hex digits (p2pfl reference make prints it)")
        require(isinstance(self.tolerance, int | float) and 0 < self.tolerance <= 1,
                "reference.tolerance", f"must be in (0, 1], got {self.tolerance!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeConfig:
    """Everything a node needs apart from its identity, learner and transport."""

    network_id: str = "p2pfl"
    rule: str = DEFAULT_RULE
    rule_params: Mapping[str, Any] = field(default_factory=dict)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    limits: Limits = field(default_factory=Limits)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    harm_check: HarmCheck = field(default_factory=HarmCheck)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    # Where checkpoints go; None keeps no checkpoint (embedded use, simulations).
    data_dir: Path | None = None
    # Seconds a banned peer stays disconnected.
    ban_seconds: float = 600.0
    # "trainer", or "observer": receives and verifies updates, serves /status and
    # /metrics, never trains or publishes (a monitor). Peers never wait for an observer.
    role: str = "trainer"

    def __post_init__(self) -> None:
        require(
            isinstance(self.network_id, str) and 0 < len(self.network_id) <= 64,
            "network_id",
            "must be a non-empty string of at most 64 characters",
        )
        require(self.ban_seconds >= 0, "ban_seconds", "must be >= 0")
        require(self.role in ROLES, "role", f"must be one of {', '.join(ROLES)}, got {self.role!r}")
        object.__setattr__(self, "rule_params", _frozen_params(self.rule_params))
        require(
            self.rule in RULES,
            "rule",
            f"unknown rule {self.rule!r}; choose one of {', '.join(sorted(RULES))}",
        )
