"""The one function that turns a :class:`~p2pfl.assembly.spec.NodeSpec` into a Node."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfl.assembly.spec import NodeSpec
from p2pfl.core.crypto import Identity
from p2pfl.errors import ConfigError, KeyFileError
from p2pfl.learners.base import Learner
from p2pfl.learners.tasks import LabelMap, make_learner
from p2pfl.node.behaviour import Behaviour
from p2pfl.node.node import Node
from p2pfl.node.transport import TransportFactory

log = logging.getLogger(__name__)


def build_node(
    spec: NodeSpec,
    *,
    identity: Identity | None = None,
    transport: TransportFactory | None = None,
    offload: bool = True,
    shared: dict[str, Any] | None = None,
    wrap_learner: Callable[[Learner], Learner] | None = None,
) -> Node:
    """Build the node ``spec`` describes: its learner, its behaviour, its key.

    Args:
        spec: The node.
        identity: Its key; default: ``spec.key_file``, created on first start.
        transport: Opens the network (simulations: the memory transport); default
            libp2p with ``spec.net``.
        offload: Train in a worker thread (daemon); False under a mock clock.
        shared: What colluding attackers of one process or run share (sybils' group).
        wrap_learner: Wraps the task's learner (the simulator records evaluations).

    Raises:
        ConfigError: unknown task or attack, bad options, no key, a model DP-SGD cannot
            train ([privacy]).
    """
    label_map, behaviour = _attack(spec, {} if shared is None else shared)
    learner = make_learner(spec.task, spec.task_context(label_map))
    if spec.privacy is not None:
        make_private(learner, spec)
    return Node(
        spec.node,
        wrap_learner(learner) if wrap_learner else learner,
        identity=identity or _identity(spec),
        transport=transport,
        net=spec.net,
        offload=offload,
        behaviour=behaviour,
    )


def make_private(learner: Learner, spec: NodeSpec) -> None:
    """Switch ``learner`` to DP-SGD for ``spec``'s planned rounds; ConfigError if it cannot."""
    from p2pfl.learners.torch_learner import TorchLearner

    privacy = spec.privacy
    assert privacy is not None
    if not isinstance(learner, TorchLearner):
        raise ConfigError(f"[privacy]: DP-SGD needs a learner built on TorchLearner; task "
                          f"{spec.task!r} built a {type(learner).__name__}")
    if privacy.rounds is None:
        raise ConfigError("[privacy] rounds: the noise is planned for a number of rounds; "
                          "set [node] rounds or [privacy] rounds")
    learner.make_private(privacy, epochs=privacy.rounds * spec.node.rounds.local_epochs)


def _attack(spec: NodeSpec, shared: dict[str, Any]) -> tuple[LabelMap | None, Behaviour | None]:
    """Return the attacker's training-label rewrite and behaviour, from the same params."""
    if spec.attack is None:
        return None, None
    from p2pfl.attacks import make_attack, with_accomplices

    params = dict(spec.attack_params)
    return attack_label_map_of(spec), make_attack(spec.attack, **with_accomplices(spec.attack, params, shared))


def attack_label_map_of(spec: NodeSpec) -> LabelMap | None:
    """Return the training-label rewrite of ``spec``'s attack, built from its parameters."""
    if spec.attack is None:
        return None
    from p2pfl.attacks import attack_label_map

    return attack_label_map(spec.attack, **dict(spec.attack_params))


def _identity(spec: NodeSpec) -> Identity:
    if spec.key_file is None:
        raise ConfigError("[node] key_file is required (p2pfl keygen writes one)")
    return load_or_create_identity(spec.key_file)


def load_or_create_identity(path: Path) -> Identity:
    """Load the node key, creating it (mode 0600) on first start."""
    try:
        return Identity.load(path)
    except KeyFileError:
        if path.exists():
            raise
    identity = Identity.generate()
    identity.save(path)
    log.info("created a new key at %s (peer id %s)", path, identity.peer_id)
    return identity


__all__ = ["attack_label_map_of", "build_node", "load_or_create_identity", "make_private"]
