"""The one TOML reader: node files (``p2pfl node run``) and the shared sections of scenarios.

The sections mean the same wherever they appear; their keys are the fields of the
config records (:data:`RECORDS`, :class:`~p2pfl.node.config.NodeConfig`'s own scalars,
:class:`~p2pfl.assembly.spec.Service`, the task's options record), never listed by hand,
and every value is checked against its field's type::

    [node]         NodeConfig's scalars (network_id, data_dir, ban_seconds), Service
                   (rounds, http_port, exit_when_done) and key_file
    [net]          NetConfig                       [round]       RoundConfig
    [reputation]   ReputationConfig                [harm_check]  HarmCheck
    [limits]       Limits                          [aggregation] rule, params
    [reference]    ReferenceConfig (an opt-in public reference set: path, sha256)
    [task]         name (or factory = "package.module:function"), then the task's
                   options (digits: DigitsOptions, table: TableOptions)
    [train]        node_index, num_nodes, seed, device: the node's place in the task
    [attack]       name, params = {...}
    [privacy]      PrivacyConfig (DP-SGD; rounds default to [node] rounds)

Aliases kept from earlier releases (README "Changelog"): ``[train] epochs`` is
``[round] local_epochs``; ``[train] task`` is ``[task] name`` and the task's options
may sit in ``[train]``; ``[aggregation] rule_params`` is ``params``; an attack's
parameters may be keys of ``[attack]`` itself.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_type_hints

from p2pfl.assembly.spec import NodeSpec, Service
from p2pfl.config import (
    DEFAULT_RULE,
    Limits,
    NetConfig,
    PrivacyConfig,
    check_keys,
    field_names,
    record_from_table,
    typed,
)
from p2pfl.core.reputation import ReputationConfig
from p2pfl.errors import ConfigError
from p2pfl.learners.tasks import DEFAULT_TASK, task_named
from p2pfl.node.config import HarmCheck, NodeConfig, ReferenceConfig, RoundConfig

# Sections that are exactly one config record.
RECORDS: dict[str, type] = {
    "net": NetConfig,
    "round": RoundConfig,
    "reputation": ReputationConfig,
    "harm_check": HarmCheck,
    "limits": Limits,
    "reference": ReferenceConfig,
}
# NodeConfig's records: section -> field ([node] rounds is Service.rounds, a count).
NODE_RECORDS = {"round": "rounds", "reputation": "reputation", "harm_check": "harm_check", "limits": "limits",
                "reference": "reference"}
AGGREGATION = {"rule": "rule", "params": "rule_params"}  # [aggregation] key -> NodeConfig field
NODE_SCALARS = tuple(name for name in field_names(NodeConfig)
                     if name not in NODE_RECORDS.values() and name not in AGGREGATION.values())
NODE_KEYS = (*NODE_SCALARS, *field_names(Service), "key_file")
TRAIN_KEYS = ("node_index", "num_nodes", "seed", "device")  # NodeSpec fields in [train]
DAEMON_MIN_NEIGHBOURS = 1  # a node file without [round] min_neighbours never trains alone
SECTIONS = ("node", "net", "train", "task", "aggregation", "round", "reputation", "harm_check",
            "limits", "attack", "privacy", "reference")


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeFile:
    """A node file: the node to build and how the daemon runs it."""

    spec: NodeSpec
    service: Service

    @property
    def node(self) -> NodeConfig:
        """The node's config (shorthand for ``spec.node``)."""
        return self.spec.node


def load_node_file(path: Path) -> NodeFile:
    """Parse and validate a node TOML file; ConfigError names the file, key and fix."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file; copy examples/configs/node.toml") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return read_node_file(data, base=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def read_node_file(data: Mapping[str, Any], *, base: Path) -> NodeFile:
    """Build a NodeFile from a parsed TOML document; relative paths are under ``base``."""
    check_keys(data, SECTIONS, "the top level")
    node = section(data, "node")
    check_keys(node, NODE_KEYS, "[node]")
    if "key_file" not in node:
        raise ConfigError("[node] key_file is required (p2pfl keygen writes one)")
    task, options = read_task(data)
    train = {k: v for k, v in section(data, "train").items() if k in TRAIN_KEYS}
    train = {k: typed(v, _SPEC_HINTS[k], f"[train] {k}") for k, v in train.items()}
    attack, params = read_attack(section(data, "attack"), flat=True)
    spec = NodeSpec(
        node=_daemon_defaults(read_node_config(data, base=base), section(data, "round")),
        net=record_from_table(NetConfig, section(data, "net"), "[net]"),
        task=task,
        task_options=options,
        attack=attack,
        attack_params=params,
        key_file=_path(typed(node["key_file"], Path, "[node] key_file"), base),
        data_dir=base,  # a task's relative data paths are relative to the node file
        **train,
    )
    spec.task_context()  # node_index in range, device known: fail before the network starts
    service = record_from_table(Service, {k: node[k] for k in field_names(Service) if k in node}, "[node]")
    return NodeFile(spec=replace(spec, privacy=read_privacy(data, rounds=service.rounds)), service=service)


def read_privacy(data: Mapping[str, Any], *, rounds: int | None) -> PrivacyConfig | None:
    """Return ``[privacy]`` (None when absent), planned for ``rounds`` unless it says otherwise."""
    if "privacy" not in data:
        return None
    privacy = record_from_table(PrivacyConfig, section(data, "privacy"), "[privacy]")
    return privacy if privacy.rounds is not None else replace(privacy, rounds=rounds)


def _daemon_defaults(config: NodeConfig, round_table: Mapping[str, Any]) -> NodeConfig:
    """A daemon waits for one neighbour unless ``[round] min_neighbours`` says otherwise.

    (RoundConfig's own default, 0, suits embedded and simulated nodes.)
    """
    if "min_neighbours" in round_table:
        return config
    rounds = dataclasses.replace(config.rounds, min_neighbours=DAEMON_MIN_NEIGHBOURS)
    return dataclasses.replace(config, rounds=rounds)


def read_node_config(data: Mapping[str, Any], *, base: Path | None = None) -> NodeConfig:
    """Build a NodeConfig from ``[node] [aggregation] [round] ...`` (aliases applied)."""
    node = {k: v for k, v in section(data, "node").items() if k in NODE_SCALARS}
    if base is not None and "data_dir" in node:
        node["data_dir"] = str(_path(typed(node["data_dir"], Path, "[node] data_dir"), base))
    rule, params = read_aggregation(section(data, "aggregation"))
    nested = {field: read_record(data, name) for name, field in NODE_RECORDS.items()}
    if base is not None and nested["reference"].path is not None:
        nested["reference"] = replace(nested["reference"], path=_path(nested["reference"].path, base))
    return record_from_table(NodeConfig, {**node, "rule": rule, "rule_params": params, **nested}, "[node]")


def read_record(data: Mapping[str, Any], name: str) -> Any:
    """Build the record of section ``name`` (``[round]``: ``[train] epochs`` applied)."""
    table = section(data, name)
    if name == "round":
        table = _with_epochs_alias(table, section(data, "train"))
    return record_from_table(RECORDS[name], table, f"[{name}]")


def _with_epochs_alias(round_table: dict[str, Any], train: Mapping[str, Any]) -> dict[str, Any]:
    if "epochs" not in train:
        return round_table
    if "local_epochs" in round_table and round_table["local_epochs"] != train["epochs"]:
        raise ConfigError("[train] epochs: is an alias of [round] local_epochs; give one of them")
    return {**round_table, "local_epochs": typed(train["epochs"], int, "[train] epochs")}


def read_aggregation(table: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """Return ``[aggregation]``'s rule and its parameters (``rule_params`` is an alias)."""
    check_keys(table, ("rule", "params", "rule_params"), "[aggregation]")
    if "params" in table and "rule_params" in table:
        raise ConfigError("[aggregation] rule_params: is an alias of params; give one of them")
    rule = typed(table.get("rule", DEFAULT_RULE), str, "[aggregation] rule")
    params = typed(table.get("params", table.get("rule_params", {})), Mapping[str, Any], "[aggregation] params")
    return rule, params


def read_task(data: Mapping[str, Any], *, train_keys: tuple[str, ...] = TRAIN_KEYS) -> tuple[str, dict[str, Any]]:
    """Return the task name and options from ``[task]`` (and the older ``[train]`` keys).

    Options are checked against the task's options record, naming the section they
    came from; ``train_keys`` are the ``[train]`` keys that are no task option.
    """
    task, train = section(data, "task"), section(data, "train")
    if "factory" in task:
        if "name" in task:
            raise ConfigError("[task] factory: give name (a bundled task) or factory, not both")
        task["name"] = typed(task.pop("factory"), str, "[task] factory")
        if ":" not in task["name"]:
            raise ConfigError(f'[task] factory: {task["name"]!r} is not "package.module:function"')
    if "task" in train and "name" in task and train["task"] != task["name"]:
        raise ConfigError("[train] task: is an alias of [task] name; give one of them")
    name = typed(task.pop("name", train.pop("task", DEFAULT_TASK)), str, "[task] name")
    train.pop("task", None)
    train.pop("epochs", None)  # [round] local_epochs
    options_record = task_named(name).options
    legacy = {k: v for k, v in train.items() if k not in train_keys}
    clash = sorted(legacy.keys() & task.keys())
    if clash:
        raise ConfigError(f"[train] {clash[0]}: also given in [task]; give it once, in [task]")
    if options_record is not None:
        check_keys(legacy, (*train_keys, "task", "epochs", *field_names(options_record)), "[train]")
        hints = get_type_hints(options_record)
        for key, value in legacy.items():
            typed(value, hints[key], f"[train] {key}")
        record_from_table(options_record, {**legacy, **task}, "[task]")  # required keys may sit in either
    return name, {**legacy, **task}


def read_attack(table: Mapping[str, Any], *, flat: bool) -> tuple[str | None, dict[str, Any]]:
    """Return ``[attack]``'s name and parameters; ``flat``: other keys are parameters too."""
    table = dict(table)
    name = table.pop("name", None)
    params = dict(typed(table.pop("params", {}), Mapping[str, Any], "[attack] params"))
    if flat:
        params.update(table)
    if name is None and params:
        raise ConfigError("[attack] name: required with attack parameters")
    return (None if name is None else typed(name, str, "[attack] name")), params


def section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Return the table ``[name]`` (empty when absent) as a fresh dict."""
    table = data.get(name, {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    return dict(table)


def documented_keys() -> dict[str, tuple[str, ...]]:
    """Return every key a node file takes, by section: what examples/configs/node.toml shows."""
    options = task_named(DEFAULT_TASK).options
    return {
        "node": NODE_KEYS,
        **{name: field_names(record) for name, record in RECORDS.items()},
        "aggregation": tuple(AGGREGATION),
        "task": ("name", "factory", *(field_names(options) if options else ())),
        "train": TRAIN_KEYS,
        "attack": ("name", "params"),
        "privacy": field_names(PrivacyConfig),
    }


_SPEC_HINTS = get_type_hints(NodeSpec)


def _path(value: Path, base: Path) -> Path:
    path = value.expanduser()
    return path if path.is_absolute() else base / path


__all__ = [
    "RECORDS",
    "NodeFile",
    "documented_keys",
    "load_node_file",
    "read_aggregation",
    "read_attack",
    "read_node_config",
    "read_node_file",
    "read_privacy",
    "read_record",
    "read_task",
    "section",
]
