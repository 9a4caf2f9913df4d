"""Scenario and grid files (TOML) -> frozen, validated records.

A scenario file (see ``examples/scenarios/``)::

    name = "attack_grid"       # used in titles and file names
    nodes = 16
    rounds = 30
    seeds = [0, 1, 2]          # or a count: seeds = 3 means 0, 1, 2
    round_timeout = 5.0        # simulated seconds a node waits for its neighbours
    local_epochs = 1
    delivery = "neighbours"    # or "mesh": announcements reach every reachable peer

    [topology]                 # kind + that kind's parameters
    kind = "regular"
    degree = 4

    [data]
    partition = "dirichlet"    # iid | dirichlet | shards | halves
    alpha = 0.5

    [rule]
    name = "clipped_gossip"
    params = {}

    [attack]
    name = "sign_flip"         # "none" for an honest run
    params = {}
    byzantine = 4              # a count, or: fraction = 0.25
    placement = "random"       # random | bottleneck | degree | last

    [link]                     # p2pfl.net.memory.LinkProfile
    latency = 0.005
    loss = 0.0

    [round]                    # p2pfl.node.config.RoundConfig overrides (quorum, max_lag...)
    [reputation]               # p2pfl.core.reputation.ReputationConfig overrides
    [harm_check]               # p2pfl.node.config.HarmCheck overrides (enabled = false...)
    [limits]                   # p2pfl.config.Limits overrides
    [privacy]                  # p2pfl.config.PrivacyConfig: honest nodes train with DP-SGD

The sections shared with node files (``[round] [reputation] [harm_check] [limits]
[aggregation] [task] [train] [privacy]``) are read by :mod:`p2pfl.assembly.toml` and mean the same
there: ``[aggregation] rule/params`` may replace ``[rule] name/params``, ``[task]`` may
replace ``[data]``, ``[round] round_timeout/local_epochs`` the top-level keys.

A grid file is a scenario file with a ``[grid]`` table; every rule is run against
every attack and every seed, and the no-attack baseline is added unless
``baseline = false``::

    [grid]
    rules = ["mean", "median", "clipped_gossip"]
    attacks = ["sign_flip", "gaussian"]
    [grid.rule_params.trimmed_mean]
    trim = 2
    [grid.attack_params.gaussian]
    sigma = 1.0

Any key not listed here raises :class:`~p2pfl.errors.ConfigError` naming it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from p2pfl.assembly.toml import read_aggregation, read_privacy, read_record, read_task, section
from p2pfl.config import DEFAULT_RULE, Limits, PrivacyConfig, record_from_table
from p2pfl.core.aggregation import RULES, aggregate
from p2pfl.core.reputation import ReputationConfig
from p2pfl.errors import AggregationError, ConfigError
from p2pfl.learners.datasets import PARTITIONS
from p2pfl.learners.tasks import DEFAULT_TASK
from p2pfl.net.memory import LinkProfile
from p2pfl.node.config import HarmCheck, ReferenceConfig, RoundConfig
from p2pfl.sim.topology import PLACEMENTS, TOPOLOGIES, TOPOLOGY_PARAMS

NO_ATTACK = "none"
DELIVERIES = ("neighbours", "mesh")
Params = Mapping[str, Any]


def _frozen(params: Mapping[str, Any]) -> Params:
    return MappingProxyType(dict(params))


@dataclass(frozen=True, kw_only=True, slots=True)
class Scenario:
    """One simulated network: who, how connected, what data, which rule and attack."""

    name: str = "scenario"
    nodes: int = 16
    rounds: int = 10
    seeds: tuple[int, ...] = (0,)
    topology: str = "regular"
    topology_params: Params = field(default_factory=dict)
    partition: str = "iid"
    alpha: float = 0.5
    rule: str = DEFAULT_RULE
    rule_params: Params = field(default_factory=dict)
    task: str = DEFAULT_TASK
    task_options: Params = field(default_factory=dict)  # besides partition and alpha
    attack: str = NO_ATTACK
    attack_params: Params = field(default_factory=dict)
    byzantine: int = 0  # attacker count; 0 with attack "none"
    placement: str = "random"
    link: LinkProfile = field(default_factory=LinkProfile)
    round_timeout: float = 5.0
    local_epochs: int = 1
    # "neighbours" is what nodes use (they pull only from direct neighbours) and is
    # ~N/d times cheaper to simulate than GossipSub-like multi-hop delivery ("mesh").
    delivery: str = "neighbours"
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    harm_check: HarmCheck = field(default_factory=HarmCheck)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    # RoundConfig fields besides round_timeout and local_epochs (quorum, max_lag...).
    round_params: Params = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    # Honest nodes train with DP-SGD (attackers do not bother); noise seeded per node
    # from the run seed unless noise_seed is given, so that runs stay reproducible.
    privacy: PrivacyConfig | None = None

    def __post_init__(self) -> None:
        for name in ("topology_params", "rule_params", "attack_params", "task_options", "round_params"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        _require(isinstance(self.nodes, int) and self.nodes >= 2, "nodes", "must be an integer >= 2")
        _require(isinstance(self.rounds, int) and self.rounds >= 1, "rounds", "must be an integer >= 1")
        _require(bool(self.seeds), "seeds", "need at least one seed")
        _require(self.topology in TOPOLOGIES, "topology.kind", f"choose one of {_names(TOPOLOGIES)}")
        for key in self.topology_params:
            _require(key in TOPOLOGY_PARAMS[self.topology], f"topology.{key}",
                     f"not a parameter of topology {self.topology!r}")
        _require(self.partition in PARTITIONS, "data.partition", f"choose one of {_names(PARTITIONS)}")
        _require(self.alpha > 0, "data.alpha", "must be > 0")
        _require(self.rule in RULES, "rule.name", f"choose one of {_names(RULES)}")
        check_rule_params(self.rule, self.rule_params)
        check_attack(self.attack, self.attack_params)
        _require(0 <= self.byzantine < self.nodes, "attack.byzantine", f"must be in [0, {self.nodes})")
        _require(self.attack == NO_ATTACK or self.byzantine > 0, "attack.byzantine",
                 f"attack {self.attack!r} needs at least one Byzantine node")
        _require(self.placement in PLACEMENTS, "attack.placement", f"choose one of {', '.join(PLACEMENTS)}")
        _require(self.round_timeout > 0, "round_timeout", "must be > 0 seconds")
        _require(self.local_epochs >= 1, "local_epochs", "must be >= 1")
        _require(self.delivery in DELIVERIES, "delivery", f"choose one of {', '.join(DELIVERIES)}")
        self.round_config()  # the [round] overrides are valid together

    def round_config(self) -> RoundConfig:
        """Return the nodes' RoundConfig: a fetch never outlasts the round unless told to."""
        values = {"fetch_timeout": min(10.0, self.round_timeout), **self.round_params}
        try:
            return RoundConfig(round_timeout=self.round_timeout, local_epochs=self.local_epochs, **values)
        except TypeError as exc:
            raise ConfigError(f"round: {exc}") from None

    @property
    def label(self) -> str:
        """A short description: rule, attack and attacker count."""
        attack = self.attack if self.attack == NO_ATTACK else f"{self.attack} x{self.byzantine}"
        return f"{self.rule} / {attack}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Grid:
    """Rules x attacks x seeds over one base scenario."""

    base: Scenario
    rules: tuple[str, ...]
    attacks: tuple[str, ...]  # includes NO_ATTACK when the baseline is on
    rule_params: Mapping[str, Params] = field(default_factory=dict)
    attack_params: Mapping[str, Params] = field(default_factory=dict)

    def scenarios(self) -> list[Scenario]:
        """Return one scenario per (rule, attack) cell, rules outermost."""
        return [self.cell(rule, attack) for rule in self.rules for attack in self.attacks]

    def cell(self, rule: str, attack: str) -> Scenario:
        """Return the scenario of one grid cell."""
        honest = attack == NO_ATTACK
        return replace(
            self.base,
            rule=rule,
            rule_params=self.rule_params.get(rule, self.base.rule_params if rule == self.base.rule else {}),
            attack=attack,
            attack_params=self.attack_params.get(attack, {}),
            byzantine=0 if honest else self.base.byzantine,
        )


def _names(registry: Mapping[str, Any]) -> str:
    return ", ".join(sorted(registry))


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_rule_params(rule: str, params: Params) -> None:
    """Dry-run ``rule`` on a toy model so a bad parameter fails at load, not mid-run."""
    own = {"w": torch.zeros(3)}
    try:
        aggregate(rule, own, [{"w": torch.ones(3)}] * 4, [1.0] * 4, **dict(params))
    except AggregationError as exc:
        raise ConfigError(f"rule.params: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"rule.params: {rule}: {exc}") from None


def check_attack(name: str, params: Params | None = None) -> None:
    """Raise ConfigError unless ``name`` is "none" or an attack of ``p2pfl.attacks``.

    ``params`` are checked by building the attack once.
    """
    if name == NO_ATTACK:
        _require(not params, "attack.params", "attack 'none' takes no parameters")
        return
    try:
        from p2pfl.attacks import ATTACKS, make_attack
    except ImportError:
        raise ConfigError(f"attack.name: {name!r} needs p2pfl.attacks, which is not installed") from None
    _require(name in ATTACKS, "attack.name", f"{name!r} is not one of none, {_names(ATTACKS)}")
    if params:
        try:
            make_attack(name, **dict(params))
        except ConfigError as exc:
            raise ConfigError(f"attack.params: {exc}") from None


# -- TOML ------------------------------------------------------------------------------

_TOP = {"name", "nodes", "rounds", "seeds", "round_timeout", "local_epochs", "delivery",
        "topology", "data", "rule", "attack", "link", "reputation", "harm_check", "grid",
        "round", "limits", "aggregation", "task", "train", "privacy", "reference"}
_TABLES = {
    "topology": {"kind"} | set().union(*TOPOLOGY_PARAMS.values()),
    "data": {"task", "partition", "alpha"},
    "rule": {"name", "params"},
    "attack": {"name", "params", "byzantine", "fraction", "placement"},
    "grid": {"rules", "attacks", "baseline", "rule_params", "attack_params"},
}
_ROUND_TOP = ("round_timeout", "local_epochs")  # top-level aliases of [round] keys


def _table(doc: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    _require(isinstance(value, dict), key, "must be a table")
    unknown = sorted(set(value) - _TABLES[key])
    _require(not unknown, f"{key}.{unknown[0] if unknown else ''}", "unknown key")
    return dict(value)


def _rule(doc: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """``[rule] name/params`` or the node files' ``[aggregation] rule/params``."""
    rule = _table(doc, "rule")
    if "aggregation" not in doc:
        return rule.get("name", DEFAULT_RULE), rule.get("params", {})
    _require(not rule, "aggregation", "give [aggregation] or [rule], not both")
    return read_aggregation(section(doc, "aggregation"))


def _task(doc: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``[task]`` (or ``[data]``, where ``task`` is the name) and the task options of ``[train]``."""
    data = _table(doc, "data")
    if "task" in data:
        data["name"] = data.pop("task")
    _require(not (data and "task" in doc), "data", "give [task] or [data], not both")
    train = section(doc, "train")
    _require("epochs" not in train or "local_epochs" not in doc, "train.epochs",
             "is an alias of local_epochs; give one of them")
    return read_task({"task": {**data, **section(doc, "task")}, "train": train}, train_keys=())


def _round(doc: Mapping[str, Any]) -> tuple[float, int, dict[str, Any]]:
    """Return round_timeout, local_epochs and the other [round] keys given."""
    table = section(doc, "round")
    for key in _ROUND_TOP:
        if key in doc:
            _require(key not in table, key, f"is an alias of [round] {key}; give one of them")
            table[key] = doc[key]
    train = section(doc, "train")
    record = read_record({"round": table, "train": train}, "round")
    given = set(table) - set(_ROUND_TOP)
    return record.round_timeout, record.local_epochs, {k: getattr(record, k) for k in given}


def _seeds(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        _require(value >= 1, "seeds", "a count must be >= 1")
        return tuple(range(value))
    ok = isinstance(value, list) and value and all(isinstance(s, int) for s in value)
    _require(bool(ok), "seeds", "must be a count or a non-empty list of integers")
    return tuple(value)


def _byzantine(attack: Mapping[str, Any], nodes: int) -> int:
    _require(not ("byzantine" in attack and "fraction" in attack), "attack.fraction",
             "give either byzantine (a count) or fraction, not both")
    if "fraction" in attack:
        fraction = attack["fraction"]
        _require(isinstance(fraction, int | float) and 0 <= fraction < 1, "attack.fraction",
                 "must be in [0, 1)")
        return math.floor(fraction * nodes + 1e-9)
    count = attack.get("byzantine", 0)
    _require(isinstance(count, int) and not isinstance(count, bool), "attack.byzantine", "must be an integer")
    return int(count)


def parse_scenario(doc: Mapping[str, Any]) -> Scenario:
    """Build a Scenario from a parsed TOML document (the ``[grid]`` table is ignored)."""
    unknown = sorted(set(doc) - _TOP)
    _require(not unknown, unknown[0] if unknown else "", "unknown key")
    topology, attack = _table(doc, "topology"), _table(doc, "attack")
    rule, rule_params = _rule(doc)
    task, options = _task(doc)
    round_timeout, local_epochs, round_params = _round(doc)
    nodes = doc.get("nodes", 16)
    try:
        return Scenario(
            name=str(doc.get("name", "scenario")),
            nodes=nodes,
            rounds=doc.get("rounds", 10),
            seeds=_seeds(doc.get("seeds", 1)),
            topology=topology.pop("kind", "regular"),
            topology_params=topology,
            partition=options.pop("partition", "iid"),
            alpha=float(options.pop("alpha", 0.5)),
            rule=rule,
            rule_params=rule_params,
            task=task,
            task_options=options,
            attack=attack.get("name", NO_ATTACK),
            attack_params=attack.get("params", {}),
            byzantine=_byzantine(attack, nodes if isinstance(nodes, int) else 0),
            placement=attack.get("placement", "random"),
            link=record_from_table(LinkProfile, section(doc, "link"), "[link]"),
            round_timeout=round_timeout,
            local_epochs=local_epochs,
            delivery=doc.get("delivery", "neighbours"),
            reputation=read_record(doc, "reputation"),
            harm_check=read_record(doc, "harm_check"),
            reference=read_record(doc, "reference"),
            round_params=round_params,
            limits=read_record(doc, "limits"),
            privacy=read_privacy(doc, rounds=doc.get("rounds", 10)),
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"scenario: {exc}") from None


def parse_grid(doc: Mapping[str, Any]) -> Grid:
    """Build a Grid from a parsed TOML document that has a ``[grid]`` table."""
    _require("grid" in doc, "grid", "a grid file needs a [grid] table with rules and attacks")
    table = _table(doc, "grid")
    base = parse_scenario(doc)
    rules = tuple(table.get("rules", [base.rule]))
    attacks = [a for a in table.get("attacks", [base.attack]) if a != NO_ATTACK]
    if table.get("baseline", True) or not attacks:
        attacks.insert(0, NO_ATTACK)
    _require(bool(rules), "grid.rules", "need at least one rule")
    rule_params = {k: _frozen(v) for k, v in table.get("rule_params", {}).items()}
    attack_params = {k: _frozen(v) for k, v in table.get("attack_params", {}).items()}
    for name in rules:
        _require(name in RULES, "grid.rules", f"{name!r} is not one of {_names(RULES)}")
        check_rule_params(name, rule_params.get(name, {}))
    for name in attacks:
        check_attack(name, attack_params.get(name))
    for key in rule_params.keys() - set(rules):
        raise ConfigError(f"grid.rule_params.{key}: {key!r} is not in grid.rules")
    for key in attack_params.keys() - set(attacks):
        raise ConfigError(f"grid.attack_params.{key}: {key!r} is not in grid.attacks")
    _require(base.byzantine > 0 or attacks == [NO_ATTACK], "attack.byzantine",
             "a grid with attacks needs byzantine > 0 (or fraction) in [attack]")
    return Grid(base=base, rules=rules, attacks=tuple(attacks),
                rule_params=rule_params, attack_params=attack_params)


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return _relative_to(tomllib.load(f), path.parent)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _relative_to(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve ``[reference] path`` against the scenario file's folder (as node files do)."""
    reference = doc.get("reference")
    if isinstance(reference, dict) and isinstance(reference.get("path"), str):
        doc["reference"] = {**reference, "path": str(base / Path(reference["path"]).expanduser())}
    return doc


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario file; a file with a ``[grid]`` table must be run as a grid."""
    doc = _read(Path(path))
    _require("grid" not in doc, "grid", f"{path} is a grid file: run it with --grid")
    return parse_scenario(doc)


def load_grid(path: str | Path) -> Grid:
    """Read a grid file."""
    return parse_grid(_read(Path(path)))


__all__ = [
    "DELIVERIES",
    "NO_ATTACK",
    "Grid",
    "Scenario",
    "check_attack",
    "check_rule_params",
    "load_grid",
    "load_scenario",
    "parse_grid",
    "parse_scenario",
]
