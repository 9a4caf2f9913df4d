"""Tasks by name: what a node trains, built from its place in the network.

:data:`TASKS` maps a task name (``[task] name`` in a node or scenario file) to a
:class:`Task`: a factory ``(TaskContext) -> Learner`` and the record its options (the
remaining ``[task]`` keys) are checked against. The context says who the node is: its
index among ``num_nodes``, the shared seed, the device, a data directory, the options,
and the label rewrite of a data-poisoning attacker.

Adding a task: write ``def my_task(context: TaskContext) -> Learner``, an options
dataclass (frozen, keyword-only, validated; every field becomes a ``[task]`` key), and
register it with ``TASKS["my_task"] = Task(my_task, MyOptions)``. A task whose options
are checked by the factory itself registers ``options=None``.

A task outside p2pfl needs no registration: ``[task] factory = "package.module:function"``
(``p2pfl testnet --task package.module:function``) names a function of that signature;
the module is imported from the current directory or ``sys.path``, and the remaining
``[task]`` keys reach it as ``context.options``. Bundled: ``digits`` and ``table``
(:mod:`p2pfl.learners.table`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from p2pfl.config import record_from_table, require
from p2pfl.errors import ConfigError
from p2pfl.learners.base import Learner
from p2pfl.learners.datasets import MAX_HOLDOUT, PARTITIONS, make_digits_learner
from p2pfl.learners.device import resolve_device
from p2pfl.learners.table import TableOptions, make_table_learner

LabelMap = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_TASK = "digits"


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskContext:
    """What a task factory knows about the node it builds a learner for."""

    node_index: int = 0
    num_nodes: int = 1
    # Same on every node of a network: same data split, same initial model.
    seed: int = 0
    # auto | cpu | cuda | cuda:N | mps; resolved on construction (auto -> what torch sees).
    device: str = "cpu"
    # Where the task reads its data from; None: the task's bundled data.
    data_dir: Path | None = None
    # The remaining [task] keys, checked against the task's options record.
    options: Mapping[str, Any] = field(default_factory=dict)
    # Training-label rewrite of a data-poisoning attacker (label_flip); None: honest.
    label_map: LabelMap | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.num_nodes, int) and self.num_nodes >= 1, "train.num_nodes",
                f"must be an integer >= 1, got {self.num_nodes!r}")
        require(isinstance(self.node_index, int) and 0 <= self.node_index < self.num_nodes,
                "train.node_index", f"must be in [0, {self.num_nodes}), got {self.node_index!r}")
        object.__setattr__(self, "device", resolve_device(self.device))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


@dataclass(frozen=True, slots=True)
class Task:
    """A registered task: its factory and the record its options must fit."""

    build: Callable[[TaskContext], Learner]
    options: type | None = None  # a config dataclass; None: the factory checks its options


@dataclass(frozen=True, kw_only=True, slots=True)
class DigitsOptions:
    """Options of the bundled digits task (scikit-learn's 8x8 digits: no downloads)."""

    partition: str = "iid"  # iid | dirichlet | shards | halves: how the train split is shared
    alpha: float = 0.5  # Dirichlet concentration (smaller = more label skew)
    batch_size: int = 32
    lr: float = 0.2  # with momentum 0.9: FedAvg reaches ~0.95 in 10 rounds of 1 epoch
    momentum: float = 0.9
    # Samples per class left out of training and test, for a public reference set made
    # by `p2pfl reference make --per-class N` (the same N); 0: none held out.
    holdout: int = 0

    def __post_init__(self) -> None:
        require(self.partition in PARTITIONS, "partition", f"choose one of {', '.join(sorted(PARTITIONS))}")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", "must be > 0")
        require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        require(0 <= self.holdout <= MAX_HOLDOUT, "holdout", f"must be in [0, {MAX_HOLDOUT}] samples per class")


def _digits(context: TaskContext) -> Learner:
    options = record_from_table(DigitsOptions, context.options, "[task]")
    return make_digits_learner(
        node_index=context.node_index,
        num_nodes=context.num_nodes,
        seed=context.seed,
        label_map=context.label_map,
        device=context.device,
        **{f.name: getattr(options, f.name) for f in dataclasses.fields(options)},
    )


def _table(context: TaskContext) -> Learner:
    options = record_from_table(TableOptions, context.options, "[task]")
    return make_table_learner(options, node_index=context.node_index, num_nodes=context.num_nodes,
                              seed=context.seed, data_dir=context.data_dir, device=context.device,
                              label_map=context.label_map)


TASKS: dict[str, Task] = {"digits": Task(_digits, DigitsOptions), "table": Task(_table, TableOptions)}


def task_named(name: str) -> Task:
    """Return the task ``name``: registered, or a factory ``"package.module:function"``.

    Raises:
        ConfigError: unknown name, or a factory path that does not import or is no function.
    """
    if ":" in name:
        return Task(load_factory(name), None)
    task = TASKS.get(name)
    if task is None:
        raise ConfigError(f"[task] name: unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}"
                          ' or give [task] factory = "package.module:function"')
    return task


def load_factory(path: str) -> Callable[[TaskContext], Learner]:
    """Import the task factory ``"package.module:function"`` (current directory first)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute.isidentifier():
        raise ConfigError(f'[task] factory: {path!r} is not "package.module:function"')
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `p2pfl` is a console script: cwd is not on sys.path
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"[task] factory: cannot import {module_name!r} ({exc}); run from the directory "
                          "that holds it or add that directory to PYTHONPATH") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"[task] factory: {module_name} has no function {attribute!r}; "
                          "define def " f"{attribute}(context: TaskContext) -> Learner")
    return factory  # type: ignore[no-any-return]


def make_learner(name: str, context: TaskContext) -> Learner:
    """Build node ``context.node_index``'s learner for the task ``name``."""
    learner = task_named(name).build(context)
    if not isinstance(learner, Learner):
        raise ConfigError(f"[task] {'factory' if ':' in name else 'name'}: {name} returned a "
                          f"{type(learner).__name__}, not a Learner; return e.g. a p2pfl.TorchLearner")
    return learner


__all__ = ["DEFAULT_TASK", "TASKS", "DigitsOptions", "LabelMap", "TableOptions", "Task", "TaskContext",
           "load_factory", "make_learner", "task_named"]
