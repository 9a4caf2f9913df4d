"""Model-poisoning attacks: the node follows the protocol but announces a crafted model.

Every attack here is *non-omniscient*: it sees only what the attacker legitimately
receives, ``view.neighbour_states()`` (the freshest verified model it holds from each
peer), plus its own honestly trained model ``own``. The papers define most of these
attacks on gradients sent to a server; in gossip learning nodes exchange models, so each
class states the model-space adaptation it uses. ``m`` below is always the
coordinate-wise mean of the observed models (``own`` when nothing is observed yet).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from statistics import NormalDist

import torch

from p2pfl.attacks._common import (
    StateLike,
    add_noise,
    choice,
    combine,
    integer,
    mean_of,
    number,
    observed_states,
    seeded_generator,
)
from p2pfl.core.crypto import Identity
from p2pfl.errors import ConfigError, KeyFileError
from p2pfl.node.behaviour import Behaviour, PeerView, State


class SignFlip(Behaviour):
    """Announce the negated, amplified update ``m - scale * (own - m)``.

    Sign flipping is defined on gradients (the Byzantine worker sends ``-scale * g``, e.g.
    Allen-Zhu et al. 2021; Karimireddy et al. 2021). Model-space adaptation: the update
    direction is ``own - m`` (where local training took us relative to what the
    neighbours hold), and we announce ``m`` moved ``scale`` times that far the other way.
    Before anything is observed (round 0) there is no reference point and we announce
    ``-scale * own``. With the default ``scale=10``, one attacker among six digits nodes
    halves the honest accuracy averaged over 5 rounds under a plain ``mean`` (0.36 vs
    0.76; tests/attacks), while ``clipped_gossip`` loses ~0.02.
    """

    name = "sign_flip"

    def __init__(self, scale: object = 10.0) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        self.scale = number(self.name, "scale", scale, low=0.0, strict=True)

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return the flipped model."""
        observed = list(observed_states(view).values())
        return flipped(own, observed, self.scale)


def flipped(own: StateLike, observed: list[StateLike], scale: float) -> State:
    """Return ``m - scale * (own - m)``, or ``-scale * own`` when nothing is observed."""
    if not observed:
        return combine(own, [], lambda mine, _: -scale * mine)
    return combine(own, observed, lambda mine, stack: (m := stack.mean(dim=0)) - scale * (mine - m))


class Gaussian(Behaviour):
    """Announce ``m + N(0, sigma^2)`` per coordinate, from a seeded generator.

    The Gaussian attack of Blanchard et al. 2017 ("Machine learning with adversaries",
    Krum) sends Gaussian noise as a gradient; in model space we add the noise to the
    observed consensus ``m`` so the announced model is centred where honest ones are.
    """

    name = "gaussian"

    def __init__(self, sigma: object = 1.0, seed: object = 0) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        self.sigma = number(self.name, "sigma", sigma, low=0.0)
        self.generator = seeded_generator("gaussian", integer(self.name, "seed", seed))

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return the noisy consensus."""
        observed = list(observed_states(view).values())
        return add_noise(mean_of(own, observed), self.sigma, self.generator)


class LabelFlip(Behaviour):
    """Train honestly on flipped labels ``y -> C-1-y`` (Biggio et al. 2012; Fang et al. 2020).

    Data poisoning: the behaviour itself announces what it trained. The learner factory
    applies :func:`flip_labels` (``attack_label_map("label_flip")``) to the training set.
    """

    name = "label_flip"

    def __init__(self, classes: object = 10) -> None:
        """Check and keep the number of classes ``C``."""
        self.classes = integer(self.name, "classes", classes, low=2)


def flip_labels(labels: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """Return ``classes - 1 - labels``."""
    return (classes - 1) - labels


def alie_z(n: int, f: int) -> float:
    """Return Baruch et al.'s z_max: ``s = floor(n/2 + 1) - f``, ``z = Phi^-1((n - s) / n)``.

    ``s`` is the number of honest workers the attacker needs on its side of the mean for
    its value to be chosen by a majority-based rule.

    Raises:
        ConfigError: ``n < 2``, ``f`` outside ``[0, n)``, or ``(n - s) / n`` outside (0, 1)
            (e.g. ``f`` of at least half of ``n``: the formula has no finite answer).
    """
    if n < 2 or not 0 <= f < n:
        raise ConfigError(f"attack alie: need n >= 2 and 0 <= f < n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ConfigError(f"attack alie: (n - s)/n = {p:.3f} for n={n}, f={f} is not in (0, 1)")
    return NormalDist().inv_cdf(p)


def _alie_state(own: StateLike, observed: list[StateLike], z: float, seed: int | None = None) -> State:
    """Return ``mean - z * std`` of ``observed`` (unbiased std; 0 with one observation).

    With a ``seed``, ``mean + z * s * std`` instead, ``s`` a fixed random sign per
    coordinate drawn from the seed: the same direction every round, and for every
    attacker given that seed.
    """
    correction = 1 if len(observed) > 1 else 0
    mean = mean_of(own, observed)
    std = combine(own, observed, lambda _, s: s.std(dim=0, correction=correction))
    def sign(key: str, like: torch.Tensor) -> torch.Tensor | float:
        if seed is None:
            return -1.0
        drawn = torch.randint(0, 2, tuple(like.shape), generator=seeded_generator("alie", seed, key))
        return (drawn * 2 - 1).to(like.dtype)

    return {key: m + z * sign(key, m) * std[key] if m.is_floating_point() else m for key, m in mean.items()}


class Alie(Behaviour):
    """Announce ALIE, "A little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019).

    The model is ``mu - z * sigma`` coordinate-wise, ``mu`` and ``sigma`` the mean and
    (unbiased) standard deviation of the observed honest models: a shift small enough to
    sit inside the honest spread, so distance- and median-based rules keep it. The paper
    applies this to gradients estimated from the corrupt workers' own data; we apply it to
    the models we receive. ``z`` is given, or :func:`alie_z` of ``n`` (default: models
    observed + 1) and ``f`` (default 1). Note the paper's z is small for small ``n``
    (n = 6, f = 1 gives z = 0): pass ``z`` to force a stronger shift.

    ``signs = "random"`` shifts each coordinate by ``z * sigma`` up or down by a fixed
    random sign drawn from ``direction`` (a seed) instead of always down: the same
    direction every round and for every attacker given the same ``direction`` (all of
    them by default), so colluders drift the network together along one direction inside
    the honest spread (docs/RESULTS.md, "Session 14").
    """

    name = "alie"

    def __init__(self, n: object = None, f: object = 1, z: object = None, signs: object = "minus",
                 direction: object = 0) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        self.n = None if n is None else integer(self.name, "n", n, low=2)
        self.f = integer(self.name, "f", f, low=0)
        self.z = None if z is None else number(self.name, "z", z)
        if self.n is not None and self.z is None:
            alie_z(self.n, self.f)  # fail now, not in round 3
        random = choice(self.name, "signs", signs, ("minus", "random")) == "random"
        seed = integer(self.name, "direction", direction)
        self.direction = seed if random else None

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return ``mean - z * std`` (or ``mean + z * signs * std``) of what we observe."""
        observed = list(observed_states(view).values())
        if not observed:  # nothing to hide among yet
            return {key: tensor.clone() for key, tensor in own.items()}
        z = self.z if self.z is not None else alie_z(self.n or len(observed) + 1, self.f)
        return _alie_state(own, observed, z, self.direction)


class Ipm(Behaviour):
    """Announce inner product manipulation (Xie, Koyejo, Gupta, UAI 2020, "Fall of empires").

    The paper sends ``-eps`` times the mean of the honest gradients, so that the inner
    product of the aggregate with the true gradient turns negative. Model-space
    adaptation, literally: announce ``-eps * m``. Small ``eps`` (0.1-0.5) targets
    Krum/median; large ``eps`` (default 10) breaks a plain mean.
    """

    name = "ipm"

    def __init__(self, eps: object = 10.0) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        self.eps = number(self.name, "eps", eps, low=0.0, strict=True)

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return ``-eps`` times the observed mean."""
        observed = list(observed_states(view).values())
        return combine(own, observed, lambda _, stack: -self.eps * stack.mean(dim=0))


class Dissensus(Behaviour):
    """Announce the dissensus attack (He, Karimireddy, Jaggi 2022, ClippedGossip paper).

    The paper's Byzantine neighbour ``j`` of honest node ``i`` sends
    ``x_j = x_i - eps * sum_{k honest} W_ik (x_k - x_i) / sum_{j byz} W_ij``: with
    ``eps = 1`` it cancels the pull of i's honest neighbours (no consensus), above 1 it
    pushes i away from them. That message is per receiver; our announcements are
    broadcast, so each round targets one victim ``i``, round-robin over the observed peers
    (sorted), with uniform weights: ``x = x_i - eps * h/b * (m_i - x_i)``, ``m_i`` the mean
    of the other observed models (``own`` if there are none), ``h`` their count, ``b`` the
    number of Byzantine neighbours (param ``byzantine``, default 1).
    """

    name = "dissensus"

    def __init__(self, eps: object = 1.5, byzantine: object = 1) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        self.eps = number(self.name, "eps", eps, low=0.0)
        self.byzantine = integer(self.name, "byzantine", byzantine, low=1)

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return the model that pushes this round's victim away from its neighbours."""
        observed = observed_states(view)
        if not observed:
            return {key: tensor.clone() for key, tensor in own.items()}
        peers = list(observed)
        victim = peers[round % len(peers)]
        others = [observed[p] for p in peers if p != victim] or [own]
        pull = self.eps * len(others) / self.byzantine
        # Stack row 0 is the victim x_i, the rest its other neighbours.
        return combine(
            own, [observed[victim], *others],
            lambda _, stack: stack[0] - pull * (stack[1:].mean(dim=0) - stack[0]),
        )


class SybilGroup:
    """What colluding sybils share: their member ids and the union of their observations."""

    def __init__(self) -> None:
        """Create an empty group; members join when they first craft."""
        self.members: set[str] = set()
        self.observed: dict[str, StateLike] = {}  # freshest model per honest peer

    def observe(self, member: str, held: Mapping[str, StateLike]) -> list[StateLike]:
        """Register ``member`` and its observations; return every honest model known."""
        self.members.add(member)
        self.observed.update(held)
        for peer in self.members & self.observed.keys():
            del self.observed[peer]
        return [self.observed[peer] for peer in sorted(self.observed)]


class Sybil(Behaviour):
    """Run one of k colluding identities announcing one ALIE model (Douceur 2002; Baruch 2019).

    Every member adds what it observes to the shared :class:`SybilGroup` and announces
    ALIE over the union of the honest models any member holds (members' models
    excluded), with ``f`` = number of members and ``n`` = honest models + ``f``, or a
    given ``z``. Identical bytes would be flagged DUPLICATE_OF_OTHER, so each member adds
    its own tiny N(0, jitter^2) noise (seeded by its id and the round). The group is a
    Python object: collusion works within one process (``p2pfl sim``); OS-process
    sybils (``p2pfl testnet``) each get a private group, i.e. plain ALIE with f = 1.
    """

    name = "sybil"

    def __init__(self, group: SybilGroup | None = None, z: object = None,
                 jitter: object = 1e-6) -> None:
        """Check and keep the parameters; without ``group`` the node colludes with nobody."""
        if group is not None and not isinstance(group, SybilGroup):
            raise ConfigError(f"attack sybil: group must be a SybilGroup, got {type(group).__name__}")
        self.group = group if group is not None else SybilGroup()
        self.z = None if z is None else number(self.name, "z", z)
        self.jitter = number(self.name, "jitter", jitter, low=0.0)

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return the group's ALIE model plus this member's jitter."""
        honest = self.group.observe(view.peer_id, view.neighbour_states())
        f = len(self.group.members)
        z = self.z if self.z is not None else _sybil_z(len(honest) + f, f)
        crafted = _alie_state(own, honest, z)
        return add_noise(crafted, self.jitter, seeded_generator("sybil", view.peer_id, round))


def _sybil_z(n: int, f: int) -> float:
    """Return :func:`alie_z` where defined, else 1 (too few honest models for the formula)."""
    try:
        return alie_z(n, f)
    except ConfigError:
        return 1.0


def sybil_identities(k: int, seed: int = 0) -> list[Identity]:
    """Return ``k`` deterministic identities for one attacker's sybils (distinct per seed)."""
    found: list[Identity] = []
    for counter in range(4 * k + 4):  # a hash above the curve order is ~2^-128 rare
        if len(found) == k:
            break
        secret = hashlib.sha256(f"p2pfl-sybil/{seed}/{counter}".encode()).digest()
        try:
            found.append(Identity.from_secret(secret))
        except KeyFileError:
            continue
    return found
