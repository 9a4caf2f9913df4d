"""Run a scenario: many Nodes in one trio run over the memory transport, on a mock clock.

The nodes are the daemon's :class:`~p2pfl.node.node.Node` (``offload=False``: training
runs inline, so simulated time only moves when every node waits). Everything random is
derived from the run's seed: identities, topology, Byzantine placement, data partition,
model initialisation, link loss and jitter. Two runs of one (scenario, seed) give the
same accuracy histories.

The speed-ups (neighbour-only delivery, shared verification) live in
:mod:`p2pfl.sim.network`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import trio
import trio.testing

from p2pfl.assembly import NodeSpec, build_node
from p2pfl.assembly.build import attack_label_map_of
from p2pfl.config import PrivacyConfig
from p2pfl.core.aggregation import flatten
from p2pfl.core.crypto import Identity
from p2pfl.learners.base import Learner, Metrics, State
from p2pfl.learners.privacy import privacy_spent
from p2pfl.learners.reference import ClassScores, ReferenceSet
from p2pfl.learners.tasks import make_learner
from p2pfl.net.memory import MemoryNetwork
from p2pfl.net.transport import Validator
from p2pfl.node.config import NodeConfig
from p2pfl.node.harm import Prober
from p2pfl.node.node import Node
from p2pfl.node.reference import ClassScorer
from p2pfl.node.span import GradientProber
from p2pfl.sim.network import VerificationCache
from p2pfl.sim.scenario import NO_ATTACK, Scenario
from p2pfl.sim.schedule import deterministic_scheduling
from p2pfl.sim.topology import Edge, make_topology, place_byzantine

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


# -- observation -----------------------------------------------------------------------


@dataclass
class _RoundModels:
    """The honest models of one round, kept until the round is complete.

    Why not running sums: nodes finish a round in trio's scheduling order, and float
    sums in a different order differ in the last bits; reducing in index order keeps
    a run bit-for-bit reproducible.
    """

    models: dict[int, torch.Tensor] = field(default_factory=dict)
    accuracies: dict[int, float] = field(default_factory=dict)
    distance: float = math.nan

    def add(self, index: int, vector: torch.Tensor, accuracy: float) -> None:
        self.models[index] = vector
        self.accuracies[index] = accuracy

    def close(self) -> None:
        """Compute the consensus distance and drop the models."""
        if self.models:
            self.distance = consensus_distance([self.models[i] for i in sorted(self.models)])
        self.models = {}


def consensus_distance(vectors: Sequence[torch.Tensor]) -> float:
    """Return the mean squared Euclidean distance of ``vectors`` to their average."""
    stack = torch.stack([v.double() for v in vectors])  # (nodes, params)
    return float(((stack - stack.mean(dim=0)) ** 2).sum(dim=1).mean())


class Recorder:
    """Collects, per round, what the scorecard needs and what progress lines show."""

    def __init__(self, scenario: Scenario, honest: int, progress: Progress | None) -> None:
        self.scenario = scenario
        self.honest = honest
        self.progress = progress
        self.started = time.perf_counter()
        self.rounds: dict[int, _RoundModels] = {}
        self.weights: dict[int, dict[int, dict[str, float]]] = {}  # observer -> round -> peer -> w
        self.per_class: dict[int, dict[int, tuple[float, ...] | None]] = {}  # node -> round -> accs

    def observe(self, index: int, node: Node, honest: bool, metrics: Metrics, state: State) -> None:
        """Record node ``index`` after its evaluation of the round in progress."""
        number = node.round
        self.weights.setdefault(index, {})[number] = {
            row.peer: row.weight for row in node.statistics().reputation
        }
        self.per_class.setdefault(index, {})[number] = metrics.per_class
        if not honest:
            return
        models = self.rounds.setdefault(number, _RoundModels())
        models.add(index, flatten(state)[0], metrics.accuracy)
        if len(models.accuracies) < self.honest:
            return
        models.close()
        if self.progress is not None:
            accs = list(models.accuracies.values())
            self.progress(
                f"  round {number + 1}/{self.scenario.rounds}: honest accuracy mean "
                f"{sum(accs) / len(accs):.3f} min {min(accs):.3f}  "
                f"({time.perf_counter() - self.started:.1f} s)"
            )

    def consensus(self, rounds: int) -> tuple[float, ...]:
        """Return the consensus distance of each round (rounds some node skipped too)."""
        for models in self.rounds.values():
            models.close()
        return tuple(self.rounds[r].distance if r in self.rounds else math.nan for r in range(rounds))


class ProbedLearner:
    """A learner that reports to a :class:`Recorder` after each evaluation."""

    def __init__(self, inner: Learner, report: Callable[[Metrics, State], None]) -> None:
        self.inner = inner
        self._report = report

    def get_state(self) -> State:
        """Delegate to the wrapped learner."""
        return self.inner.get_state()

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Delegate to the wrapped learner."""
        self.inner.set_state(state)

    def fit(self, epochs: int) -> int:
        """Delegate to the wrapped learner."""
        return self.inner.fit(epochs)

    def evaluate(self) -> Metrics:
        """Evaluate, then report the metrics and the evaluated model."""
        metrics = self.inner.evaluate()
        self._report(metrics, self.inner.get_state())
        return metrics

    @property
    def num_train_samples(self) -> int:
        """Delegate to the wrapped learner."""
        return self.inner.num_train_samples

    def probe_losses(self, states: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
        """Delegate to the wrapped learner (a TorchLearner)."""
        if not isinstance(self.inner, Prober):
            raise TypeError(f"{type(self.inner).__name__} cannot probe losses")
        return self.inner.probe_losses(states)

    def probe_gradients(self, state: Mapping[str, torch.Tensor], samples: int) -> torch.Tensor:
        """Delegate to the wrapped learner (a TorchLearner)."""
        if not isinstance(self.inner, GradientProber):
            raise TypeError(f"{type(self.inner).__name__} cannot take probe gradients")
        return self.inner.probe_gradients(state, samples)

    def privacy_spent(self) -> Any:
        """Delegate to the wrapped learner (None: not private)."""
        return privacy_spent(self.inner)

    def score_classes(self, states: Iterable[Mapping[str, torch.Tensor]], reference: ReferenceSet) -> list[ClassScores]:
        """Delegate to the wrapped learner (a TorchLearner)."""
        if not isinstance(self.inner, ClassScorer):
            raise TypeError(f"{type(self.inner).__name__} cannot score classes")
        return self.inner.score_classes(states, reference)

    def checkpoint_state(self) -> State:
        """Delegate to the wrapped learner."""
        return self.inner.checkpoint_state()

    def restore_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Delegate to the wrapped learner."""
        self.inner.restore_checkpoint_state(state)


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What one run produced, as plain data (node indices, not PeerIds)."""

    scenario: Scenario
    seed: int
    byzantine: tuple[int, ...]
    edges: tuple[Edge, ...]
    accuracy: tuple[tuple[float | None, ...], ...]  # [node][round]; None: round skipped
    weights: tuple[tuple[Mapping[int, float], ...], ...]  # [observer][round] -> peer -> weight
    consensus: tuple[float, ...]  # [round]: honest models' mean squared distance to their mean
    bytes_in: tuple[int, ...]  # [node], whole run
    bytes_out: tuple[int, ...]
    rejected: tuple[Mapping[str, int], ...]  # [node]: evidence counts by reason
    per_class: tuple[tuple[tuple[float, ...] | None, ...], ...] = ()  # [node][round] -> by class
    wall_seconds: float = 0.0
    sim_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def honest(self) -> tuple[int, ...]:
        """Indices of the honest nodes."""
        bad = set(self.byzantine)
        return tuple(i for i in range(self.scenario.nodes) if i not in bad)


def identity_for(seed: int, index: int) -> Identity:
    """Return node ``index``'s key in the run of ``seed`` (deterministic)."""
    secret = hashlib.sha256(f"p2pfl-sim/{seed}/{index}".encode()).digest()
    return Identity.from_secret(secret)


def attack_params(scenario: Scenario, seed: int, index: int, shared: dict[str, Any]) -> dict[str, Any]:
    """Return node ``index``'s attack parameters: the scenario's, plus run-derived defaults.

    An attack with a ``seed`` parameter gets one derived from the run seed and the node
    (distinct attackers, reproducible runs); sybils of one run share one group.
    """
    from p2pfl.attacks import ATTACKS, network_defaults, with_accomplices

    params = {
        **network_defaults(scenario.attack, scenario.nodes, scenario.byzantine),
        **with_accomplices(scenario.attack, scenario.attack_params, shared),
    }
    if "seed" in ATTACKS[scenario.attack].params and "seed" not in params:
        params["seed"] = seed * 100_003 + index
    return params


def node_spec(scenario: Scenario, seed: int, index: int, attacking: bool, config: NodeConfig,
              shared: dict[str, Any]) -> NodeSpec:
    """Return node ``index``'s spec in the run of ``seed``: what the daemon would be given."""
    return NodeSpec(
        node=config,
        task=scenario.task,
        task_options={"partition": scenario.partition, "alpha": scenario.alpha, **scenario.task_options},
        node_index=index,
        num_nodes=scenario.nodes,
        seed=seed,
        attack=scenario.attack if attacking else None,
        attack_params=attack_params(scenario, seed, index, shared) if attacking else {},
        privacy=None if attacking else _privacy(scenario, seed, index),
    )


def _privacy(scenario: Scenario, seed: int, index: int) -> PrivacyConfig | None:
    """The scenario's privacy, with a noise seed of its own per run and node."""
    privacy = scenario.privacy
    if privacy is None or privacy.noise_seed is not None:
        return privacy
    return replace(privacy, noise_seed=seed * 100_003 + index)


def node_learner(scenario: Scenario, seed: int, index: int, attacking: bool) -> Learner:
    """Return node ``index``'s learner; an attacker's labels pass the attack's map."""
    spec = node_spec(scenario, seed, index, attacking, _config(scenario), {})
    return make_learner(spec.task, spec.task_context(attack_label_map_of(spec)))


def _config(scenario: Scenario) -> NodeConfig:
    return NodeConfig(
        network_id=f"sim-{scenario.name}"[:64],
        rule=scenario.rule,
        rule_params=scenario.rule_params,
        rounds=scenario.round_config(),
        limits=scenario.limits,
        reputation=scenario.reputation,
        harm_check=scenario.harm_check,
        reference=scenario.reference,
    )


def run_scenario(
    scenario: Scenario, seed: int, *, progress: Progress | None = None, share_verification: bool = True
) -> RunResult:
    """Run ``scenario`` with ``seed`` to the end under a mock clock; return its results.

    ``share_verification=False`` makes every receiver verify every announcement itself
    (as real nodes do); results are the same, only slower.
    """
    clock = trio.testing.MockClock(autojump_threshold=0)
    started = time.perf_counter()
    cache = VerificationCache(capacity=1 << 16 if share_verification else 0)
    with deterministic_scheduling(seed):
        result: RunResult = trio.run(
            functools.partial(_run, scenario, seed, progress, cache), clock=clock
        )
    return replace(result, wall_seconds=time.perf_counter() - started)


async def _run(
    scenario: Scenario, seed: int, progress: Progress | None, cache: VerificationCache
) -> RunResult:
    graph = make_topology(scenario.topology, scenario.nodes, seed, **dict(scenario.topology_params))
    byzantine = place_byzantine(graph, scenario.byzantine, scenario.placement, seed)
    ids = [identity_for(seed, i) for i in range(scenario.nodes)]
    index_of = {ident.peer_id: i for i, ident in enumerate(ids)}
    network = MemoryNetwork(neighbours_only=scenario.delivery == "neighbours", link=scenario.link, seed=seed)
    for a, b in graph.edges:
        network.connect(ids[a].peer_id, ids[b].peer_id)
    recorder = Recorder(scenario, scenario.nodes - len(byzantine), progress)
    config = _config(scenario)
    shared: dict[str, Any] = {}  # what colluding attackers share (a SybilGroup)
    nodes = [
        _make_node(scenario, seed, i, i in byzantine, ids[i], network, cache, recorder, config, shared)
        for i in range(scenario.nodes)
    ]
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(_drive, node, scenario.rounds)
    return _collect(scenario, seed, graph.edges, byzantine, nodes, recorder, index_of, cache,
                    trio.current_time() - start)


def _make_node(
    scenario: Scenario,
    seed: int,
    index: int,
    byzantine: bool,
    identity: Identity,
    network: MemoryNetwork,
    cache: VerificationCache,
    recorder: Recorder,
    config: NodeConfig,
    shared: dict[str, Any],
) -> Node:
    attacking = byzantine and scenario.attack != NO_ATTACK
    holder: list[Node] = []

    def probed(learner: Learner) -> Learner:
        return ProbedLearner(
            learner, lambda metrics, state: recorder.observe(index, holder[0], not byzantine, metrics, state)
        )

    def transport(validator: Validator) -> Any:
        return network.open_transport(identity.peer_id, cache.wrap(validator))

    spec = node_spec(scenario, seed, index, attacking, config, shared)
    node = build_node(spec, identity=identity, transport=transport, offload=False, shared=shared,
                      wrap_learner=probed)
    holder.append(node)
    return node


async def _drive(node: Node, rounds: int) -> None:
    async with node:
        await node.run(rounds=rounds)


def _collect(
    scenario: Scenario,
    seed: int,
    edges: tuple[Edge, ...],
    byzantine: tuple[int, ...],
    nodes: list[Node],
    recorder: Recorder,
    index_of: Mapping[str, int],
    cache: VerificationCache,
    sim_seconds: float,
) -> RunResult:
    stats = [node.statistics() for node in nodes]
    accuracy = []
    for s in stats:
        by_round = {r.round: r.accuracy for r in s.history}
        accuracy.append(tuple(by_round.get(r) for r in range(scenario.rounds)))
    weights = []
    for i in range(scenario.nodes):
        seen = recorder.weights.get(i, {})
        weights.append(tuple(
            {index_of[p]: w for p, w in seen.get(r, {}).items() if p in index_of}
            for r in range(scenario.rounds)
        ))
    consensus = recorder.consensus(scenario.rounds)
    return RunResult(
        scenario=scenario,
        seed=seed,
        byzantine=byzantine,
        edges=edges,
        accuracy=tuple(accuracy),
        weights=tuple(weights),
        consensus=consensus,
        bytes_in=tuple(s.bytes_in for s in stats),
        bytes_out=tuple(s.bytes_out for s in stats),
        rejected=tuple(dict(s.rejected) for s in stats),
        per_class=tuple(
            tuple(recorder.per_class.get(i, {}).get(r) for r in range(scenario.rounds))
            for i in range(scenario.nodes)
        ),
        sim_seconds=sim_seconds,
        cache_hits=cache.hits,
        cache_misses=cache.misses,
    )


__all__ = [
    "ProbedLearner",
    "Recorder",
    "RunResult",
    "attack_params",
    "consensus_distance",
    "identity_for",
    "node_learner",
    "run_scenario",
]
