"""What makes one node, as plain data: :class:`NodeSpec` and the daemon's :class:`Service`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from p2pfl.config import NetConfig, PrivacyConfig, require
from p2pfl.learners.tasks import DEFAULT_TASK, LabelMap, TaskContext
from p2pfl.node.config import NodeConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeSpec:
    """Everything :func:`~p2pfl.assembly.build.build_node` needs to make one node."""

    node: NodeConfig = field(default_factory=NodeConfig)
    # libp2p settings; unused when build_node is given a transport (simulations).
    net: NetConfig = field(default_factory=NetConfig)
    task: str = DEFAULT_TASK  # a name in p2pfl.learners.tasks.TASKS
    task_options: Mapping[str, Any] = field(default_factory=dict)  # checked by the task
    node_index: int = 0  # this node's part of the data...
    num_nodes: int = 1  # ...among this many
    seed: int = 0  # same on every node: same split, same initial model
    device: str = "cpu"
    data_dir: Path | None = None  # the task's data; None: its bundled data
    attack: str | None = None  # a name in p2pfl.attacks.ATTACKS; None: honest
    attack_params: Mapping[str, Any] = field(default_factory=dict)
    # The node's key (created on first start); None: the caller passes an identity.
    key_file: Path | None = None
    # DP-SGD within a budget (docs/PRIVACY.md); None: training is not private.
    privacy: PrivacyConfig | None = None

    def __post_init__(self) -> None:
        require(self.attack is not None or not self.attack_params, "attack",
                "parameters given without an attack name")
        for name in ("task_options", "attack_params"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def task_context(self, label_map: LabelMap | None = None) -> TaskContext:
        """Return what the task factory knows about this node."""
        return TaskContext(node_index=self.node_index, num_nodes=self.num_nodes, seed=self.seed,
                           device=self.device, data_dir=self.data_dir, options=self.task_options,
                           label_map=label_map)


@dataclass(frozen=True, kw_only=True, slots=True)
class Service:
    """What `p2pfl node run` adds around a node: how long it runs and its status port."""

    rounds: int | None = None  # stop after this many rounds; None: run until stopped
    # /status and /metrics on 127.0.0.1; 0: off. Not 9100 (Prometheus node_exporter's).
    http_port: int = 7352
    exit_when_done: bool = False  # after `rounds`, keep serving peers until a signal

    def __post_init__(self) -> None:
        require(self.rounds is None or self.rounds >= 1, "node.rounds",
                "must be a positive integer (omit to run until stopped)")
        require(0 <= self.http_port < 65536, "node.http_port", "must be a TCP port (0 = off)")


__all__ = ["NodeSpec", "Service"]
