"""Byzantine behaviours, switched on by name in ``p2pfl testnet`` and ``p2pfl sim``.

Each attack is a :class:`~p2pfl.node.behaviour.Behaviour` subclass (its ``name`` shows in
the node's statistics) built by :func:`make_attack`. None is omniscient: they read only
``view.neighbour_states()``, what the attacker legitimately receives.

- :mod:`p2pfl.attacks.model` — model poisoning: ``sign_flip``, ``gaussian``,
  ``label_flip`` (data poisoning through :func:`attack_label_map`), ``alie``, ``ipm``,
  ``dissensus``, ``sybil`` (with :func:`sybil_identities` and a shared
  :class:`SybilGroup`).
- :mod:`p2pfl.attacks.protocol` — protocol abuse: ``free_rider``, ``replay``, ``forge``,
  ``equivocate``, ``flood``.
- :mod:`p2pfl.attacks.adaptive` — attacks that adapt to distance and clipping defences:
  ``min_max``, ``min_sum``, ``clip_aware``, ``boiling_frog`` (colluders share a
  :class:`Pool`), and ``targeted_flip`` (data poisoning of one class).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from p2pfl.attacks.adaptive import (
    BoilingFrog,
    ClipAware,
    MinMax,
    MinSum,
    Pool,
    TargetedFlip,
    ipm,
    retarget,
)
from p2pfl.attacks.model import (
    Alie,
    Dissensus,
    Gaussian,
    LabelFlip,
    SignFlip,
    Sybil,
    SybilGroup,
    alie_z,
    flip_labels,
    sybil_identities,
)
from p2pfl.attacks.protocol import Equivocate, Flood, Forge, FreeRider, Replay
from p2pfl.errors import ConfigError
from p2pfl.node.behaviour import Behaviour

LabelMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """What the CLI and the simulator need to know about one attack."""

    name: str
    factory: Callable[..., Behaviour]
    paper: str
    omniscient: bool
    params: Mapping[str, str]  # parameter -> what it does and its default
    label_map: Callable[..., torch.Tensor] | None = None  # (labels, **params) -> labels


def _spec(name: str, factory: Callable[..., Behaviour], paper: str, label_map: Any = None,
          **params: str) -> AttackSpec:
    return AttackSpec(name, factory, paper, False, MappingProxyType(params), label_map)


_SPECS = [
    _spec("sign_flip", SignFlip, "sign flipping (e.g. Allen-Zhu et al. 2021), model space",
          scale="announce m - scale*(own - m), m = mean of observed models (default 10)"),
    _spec("gaussian", Gaussian, "Blanchard et al. 2017 (Krum paper), Gaussian attack",
          sigma="noise std added to the observed mean (default 1.0)",
          seed="noise generator seed (default 0)"),
    _spec("label_flip", LabelFlip, "label flipping (Biggio et al. 2012; Fang et al. 2020)",
          flip_labels, classes="number of classes C; labels y -> C-1-y (default 10)"),
    _spec("alie", Alie, "Baruch, Baruch, Goldberg 2019, A little is enough",
          n="workers in the paper's formula (default: observed models + 1; sim and testnet "
            "pass the network's node count)",
          f="Byzantine workers in the formula (default 1; sim and testnet: the attacker count)",
          z="explicit z, overrides n and f (default: the paper's z_max)",
          signs="minus (the paper: mean - z*std) or random: mean + z*s*std, s a fixed random "
                "sign per coordinate, the same every round (default minus)",
          direction="seed of the random signs; attackers with the same one collude (default 0)"),
    _spec("ipm", ipm, "Xie, Koyejo, Gupta 2020, inner product manipulation",
          eps="announce -eps * mean of observed models (default 10)",
          space="model (as above, default) or update: -eps * the honest mean update",
          pool="update space: a shared Pool of colluders' observations"),
    _spec("dissensus", Dissensus, "He, Karimireddy, Jaggi 2022, ClippedGossip (dissensus)",
          eps="push strength; 1 cancels the victim's honest pull (default 1.5)",
          byzantine="Byzantine neighbours sharing the push (default 1)"),
    _spec("free_rider", FreeRider, "free riding (Lin et al. 2019, free-rider attacks on FL)",
          mode="copy (a neighbour's model, re-signed) or stale (own first model + noise)",
          jitter="stale mode noise std (default 1e-4; 0 repeats the digest)",
          seed="stale mode noise seed (default 0)"),
    _spec("replay", Replay, "replay of signed updates (protocol attack)"),
    _spec("forge", Forge, "forged signer / tampered payloads (protocol attack)",
          mode="all, signer, payload or malformed (default all)",
          seed="throwaway key and garbage seed (default 0)"),
    _spec("equivocate", Equivocate, "equivocation: two signed updates for one round",
          scale="sign-flip scale of the second update (default 10)"),
    _spec("sybil", Sybil, "Douceur 2002 (Sybil) colluding with Baruch et al. 2019 (ALIE)",
          group="a shared SybilGroup object, one per attacker (default: a private one)",
          z="explicit z (default: alie_z(honest + members, members))",
          jitter="per-member noise std keeping digests distinct (default 1e-6)"),
    _spec("flood", Flood, "announcement flooding (protocol attack)",
          rate="spam headers per round (default 50)", seed="random digests seed (default 0)"),
    _spec("min_max", MinMax, "Shejwalkar & Houmansadr, NDSS 2021, min-max (AGR-agnostic)",
          perturbation="std, unit or sign: -std of honest models, -unit or -sign of their "
                       "mean update (default std)",
          gamma="explicit gamma (default: the largest keeping the max distance to the honest "
                "models within their own max pairwise distance)",
          pool="a shared Pool of colluders' observations (default: a private one)"),
    _spec("min_sum", MinSum, "Shejwalkar & Houmansadr, NDSS 2021, min-sum (AGR-agnostic)",
          perturbation="std, unit or sign (default std)",
          gamma="explicit gamma (default: the largest keeping the summed squared distance "
                "within the largest honest one)",
          pool="a shared Pool of colluders' observations (default: a private one)"),
    _spec("clip_aware", ClipAware, "clipping-aware push along minus the honest mean update",
          margin="distance to each honest neighbour, as a fraction of its median honest "
                 "distance (default 0.95)",
          pool="a shared Pool of colluders' observations (default: a private one)"),
    _spec("boiling_frog", BoilingFrog, "slow drift: honest, then a growing consistent bias",
          start="honest rounds before the drift (default 10)",
          step="bias growth per round, in honest spreads (default 0.3)",
          pool="a shared Pool of colluders' observations (default: a private one)"),
    _spec("targeted_flip", TargetedFlip, "targeted label flipping (Tolpegin et al. 2020)",
          retarget, source="class relabelled (default 7)", target="label it gets (default 1)"),
]
ATTACKS: dict[str, AttackSpec] = {spec.name: spec for spec in _SPECS}


def _lookup(name: str, params: Mapping[str, object]) -> AttackSpec:
    spec = ATTACKS.get(name)
    if spec is None:
        raise ConfigError(f"unknown attack {name!r}; choose one of {', '.join(sorted(ATTACKS))}")
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        valid = ", ".join(spec.params) or "none"
        raise ConfigError(f"attack {name}: unknown parameter(s) {', '.join(unknown)}; valid: {valid}")
    return spec


def make_attack(name: str, **params: object) -> Behaviour:
    """Build the named attack; parameter values may be strings (as from the command line).

    Raises:
        ConfigError: unknown attack (the message lists the valid ones), unknown
            parameter, or invalid value.
    """
    return _lookup(name, params).factory(**params)


def with_accomplices(name: str, params: Mapping[str, object], shared: dict[str, Any]) -> dict[str, object]:
    """Return ``params`` plus what the attackers of one process share (sybils: a group).

    ``shared`` is one dict per process (or simulation run); every attacker built with it
    colludes with the others.
    """
    params = dict(params)
    if "group" in _lookup(name, params).params and "group" not in params:
        params["group"] = shared.setdefault("group", SybilGroup())
    if "pool" in _lookup(name, params).params and "pool" not in params:
        params["pool"] = shared.setdefault("pool", Pool())
    return params


def network_defaults(name: str, nodes: int, byzantine: int) -> dict[str, int]:
    """Return the parameters a test network fills in from its size: ALIE's ``n`` and ``f``.

    The paper's z_max is a function of the number of workers and of Byzantine ones; a
    simulation or test network knows both, where a lone attacker would have to guess.
    """
    spec = _lookup(name, {})
    if not {"n", "f"} <= spec.params.keys():
        return {}
    defaults = {"n": nodes, "f": byzantine}
    try:
        spec.factory(**defaults)
    except ConfigError:  # half or more attack: the formula has no answer; keep the default
        return {}
    return defaults


def attack_label_map(name: str, **params: object) -> LabelMap | None:
    """Return the training-label rewrite of the named attack (data poisoning), else None.

    Raises:
        ConfigError: as :func:`make_attack`.
    """
    spec = _lookup(name, params)
    if spec.label_map is None:
        return None
    behaviour = spec.factory(**params)  # validates, like make_attack
    values = {key: getattr(behaviour, key) for key in spec.params}
    label_map = spec.label_map
    return lambda labels: label_map(labels, **values)


__all__ = [
    "ATTACKS",
    "AttackSpec",
    "Pool",
    "SybilGroup",
    "alie_z",
    "attack_label_map",
    "flip_labels",
    "make_attack",
    "network_defaults",
    "sybil_identities",
    "with_accomplices",
]
