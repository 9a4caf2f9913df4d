"""The attack library: registry and parameters, crafted states, and attacks on live nodes.

Integration tests run 6 nodes (5 honest + 1 attacker, complete graph) over the memory
transport under a mock clock, as in tests/node.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping
from typing import Any, cast

import pytest
import torch
import trio
import trio.testing

from p2pfl.attacks import (
    ATTACKS,
    SybilGroup,
    alie_z,
    attack_label_map,
    make_attack,
    network_defaults,
    sybil_identities,
)
from p2pfl.core.codec import encode_state
from p2pfl.errors import ConfigError
from p2pfl.learners.datasets import make_digits_learner
from p2pfl.net.memory import MemoryNetwork
from p2pfl.node.behaviour import Behaviour
from p2pfl.node.config import NodeConfig, RoundConfig
from p2pfl.node.node import Node
from p2pfl.node.stats import NodeStatistics
from tests.attacks.fakes import FakeView
from tests.node.conftest import identities, make_network

Tensor = torch.Tensor


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core box: torch's thread pool costs 10x more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# ------------------------------------------------------------------ registry and params


def test_unknown_attack_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        make_attack("teleport")
    assert all(name in str(info.value) for name in ATTACKS)


@pytest.mark.parametrize(
    ("name", "params", "mentions"),
    [
        ("sign_flip", {"bogus": 1}, "scale"),  # unknown parameter: the valid ones are named
        ("sign_flip", {"scale": 0}, "scale"),
        ("gaussian", {"sigma": -1.0}, "sigma"),
        ("ipm", {"eps": "lots"}, "eps"),
        ("free_rider", {"mode": "lazy"}, "copy"),
        ("flood", {"rate": 0}, "rate"),
        ("alie", {"n": 4, "f": 3}, "n=4"),  # the paper's formula has no finite z here
        ("alie", {"signs": "plus"}, "minus, random"),
        ("sybil", {"group": "mates"}, "SybilGroup"),
    ],
)
def test_bad_parameters_are_config_errors(name: str, params: dict[str, Any], mentions: str) -> None:
    with pytest.raises(ConfigError, match=mentions):
        make_attack(name, **params)


def test_every_attack_builds_with_defaults_and_is_named() -> None:
    for name, spec in ATTACKS.items():
        behaviour = make_attack(name)
        assert isinstance(behaviour, Behaviour)
        assert behaviour.name == name == spec.name
        assert not spec.omniscient
        assert spec.paper


def test_string_parameters_are_parsed() -> None:
    assert cast(Any, make_attack("ipm", eps="3")).eps == 3.0
    assert cast(Any, make_attack("flood", rate="7")).rate == 7


def test_label_map_only_for_label_flip() -> None:
    flip = attack_label_map("label_flip")
    assert flip is not None
    assert flip(torch.tensor([0, 3, 9])).tolist() == [9, 6, 0]
    five = attack_label_map("label_flip", classes=5)
    assert five is not None
    assert five(torch.tensor([0, 4])).tolist() == [4, 0]
    assert attack_label_map("alie") is None
    trained = own()
    assert make_attack("label_flip").craft(FakeView(HELD), 0, trained) is trained


# ------------------------------------------------------------------ crafted states




def own() -> dict[str, Tensor]:
    return {"w": torch.tensor([5.0, 5.0]), "steps": torch.tensor([7])}


HELD = {
    "a": {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([1])},
    "b": {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor([2])},
}  # mean m = [2, 4]; unbiased std = [1.4142, 2.8284]


def craft(name: str, held: Mapping[str, Mapping[str, Tensor]] = HELD, round: int = 0,
          **params: Any) -> dict[str, Tensor]:
    return make_attack(name, **params).craft(FakeView(held), round, own())


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("sign_flip", {"scale": 2}, [-4.0, 2.0]),  # m - 2 (own - m)
        ("ipm", {"eps": 3}, [-6.0, -12.0]),  # -3 m
        ("gaussian", {"sigma": 0}, [2.0, 4.0]),  # m + 0 noise
        ("alie", {"z": 1}, [2 - 2**0.5, 4 - 8**0.5]),  # mean - 1 * std
        ("dissensus", {"eps": 1.5}, [-2.0, -4.0]),  # victim a: a - 1.5 * 1 * (b - a)
    ],
)
def test_crafted_state_matches_the_definition(name: str, params: dict[str, Any], expected: list[float]) -> None:
    result = craft(name, **params)
    assert torch.allclose(result["w"], torch.tensor(expected))
    assert torch.equal(result["steps"], torch.tensor([7]))  # integer buffers stay ours


def test_with_nothing_observed() -> None:
    assert torch.equal(craft("sign_flip", {}, scale=3)["w"], torch.tensor([-15.0, -15.0]))
    assert torch.equal(craft("ipm", {}, eps=2)["w"], torch.tensor([-10.0, -10.0]))
    assert torch.equal(craft("alie", {})["w"], own()["w"])


def test_gaussian_noise_is_seeded_and_has_the_given_sigma() -> None:
    big = {"a": {"w": torch.zeros(20_000)}}
    first = make_attack("gaussian", sigma=0.5, seed=3).craft(FakeView(big), 0, {"w": torch.ones(20_000)})
    again = make_attack("gaussian", sigma=0.5, seed=3).craft(FakeView(big), 0, {"w": torch.ones(20_000)})
    assert torch.equal(first["w"], again["w"])
    assert abs(float(first["w"].mean())) < 0.02  # centred on the observed mean, not on own
    assert float(first["w"].std()) == pytest.approx(0.5, rel=0.03)


def test_alie_random_signs_shift_each_coordinate_by_z_std_the_same_way_every_round() -> None:
    held = {"a": {"w": torch.zeros(4000)}, "b": {"w": torch.full((4000,), 2.0)}}  # mean 1, std 2**0.5
    attack = make_attack("alie", z=2, signs="random", direction=5)
    first = attack.craft(FakeView(held), 0, {"w": torch.zeros(4000)})["w"]
    shift = first - 1
    assert torch.allclose(shift.abs(), torch.full((4000,), 2 * 2**0.5))  # z * std, every coordinate
    assert 0.45 < float((shift > 0).float().mean()) < 0.55  # up or down at random, not always down
    later = attack.craft(FakeView(held), 7, {"w": torch.zeros(4000)})["w"]
    mate = make_attack("alie", z=2, signs="random", direction=5).craft(FakeView(held), 3, {"w": torch.ones(4000)})["w"]
    other = make_attack("alie", z=2, signs="random", direction=6).craft(FakeView(held), 0, {"w": torch.zeros(4000)})["w"]
    assert torch.equal(first, later)  # one direction: every round ...
    assert torch.equal(first, mate)  # ... and every colluder
    assert not torch.equal(first, other)


def test_alie_z_matches_the_papers_formula() -> None:
    # s = floor(n/2 + 1) - f; z = Phi^-1((n - s) / n)
    assert alie_z(50, 24) == pytest.approx(1.7507, abs=1e-4)  # s = 2: Phi^-1(0.96)
    assert alie_z(25, 5) == pytest.approx(0.4677, abs=1e-4)  # s = 8: Phi^-1(0.68)
    assert alie_z(6, 1) == pytest.approx(0.0)  # s = 3: Phi^-1(0.5); small n, no shift
    # Default n = observed + 1 = 3, f = 1: s = 1, z = Phi^-1(2/3).
    z = alie_z(3, 1)
    assert torch.allclose(craft("alie")["w"], torch.tensor([2 - z * 2**0.5, 4 - z * 8**0.5]))


def test_free_rider_copy_reproduces_the_authors_bytes() -> None:
    copied = craft("free_rider", round=1)  # round-robin: peer "b"
    assert encode_state(copied) == encode_state(HELD["b"])
    stale = make_attack("free_rider", mode="stale", jitter=0)
    first = stale.craft(FakeView(HELD), 0, own())
    later = stale.craft(FakeView(HELD), 5, {"w": torch.zeros(2), "steps": torch.tensor([0])})
    assert encode_state(first) == encode_state(later) == encode_state(own())


def test_sybils_share_observations_and_exclude_each_other() -> None:
    group = SybilGroup()
    one, two = (make_attack("sybil", group=group, z=1) for _ in range(2))
    honest = {"h": {"w": torch.tensor([0.0, 0.0])}}
    first = one.craft(FakeView(honest, "s1"), 0, {"w": torch.tensor([9.0, 9.0])})
    # s2 holds s1's model and a second honest one: the union minus members is {h, k}.
    held = {"s1": first, "k": {"w": torch.tensor([2.0, 4.0])}}
    second = two.craft(FakeView(held, "s2"), 0, {"w": torch.tensor([9.0, 9.0])})
    assert group.members == {"s1", "s2"}
    assert torch.allclose(second["w"], torch.tensor([1 - 2**0.5, 2 - 8**0.5]), atol=1e-4)
    assert encode_state(second) != encode_state(two.craft(FakeView(held, "s3"), 0, second))


def test_sybil_identities_are_deterministic_and_distinct() -> None:
    ids = [i.peer_id for i in sybil_identities(4, seed=1)]
    assert ids == [i.peer_id for i in sybil_identities(4, seed=1)]
    assert len(set(ids)) == 4
    assert not set(ids) & {i.peer_id for i in sybil_identities(4, seed=2)}


# ------------------------------------------------------------------ live networks

N, ROUNDS = 6, 5


def build(network: MemoryNetwork, index: int, rule: str, behaviour: Behaviour | None) -> Node:
    identity = identities(N)[index]
    config = NodeConfig(
        network_id="test-net",
        rule=rule,
        rounds=RoundConfig(round_timeout=2.0, fetch_timeout=1.0, quorum=1.0),
    )
    return Node(
        config,
        make_digits_learner(node_index=index, num_nodes=N, seed=0),
        identity=identity,
        transport=lambda validator: network.open_transport(identity.peer_id, validator),
        offload=False,
        behaviour=behaviour,
    )


async def run_network(rule: str, attack: Behaviour | None, rounds: int = ROUNDS) -> list[NodeStatistics]:
    """Run N nodes, the last one with ``attack``; return the honest nodes' statistics."""
    network = make_network(identities(N))
    nodes = [build(network, i, rule, attack if i == N - 1 else None) for i in range(N)]

    async def one(node: Node) -> None:
        async with node:
            await node.run(rounds=rounds)

    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(one, node)
    return [node.statistics() for node in nodes[:-1]]


ATTACKER = identities(N)[-1].peer_id


def attacker_weights(honest: list[NodeStatistics]) -> list[float]:
    return [{row.peer: row.weight for row in s.reputation}[ATTACKER] for s in honest]


def honest_weights(honest: list[NodeStatistics]) -> list[float]:
    return [row.weight for s in honest for row in s.reputation if row.peer != ATTACKER]


def run_accuracy(honest: list[NodeStatistics]) -> float:
    """Mean honest accuracy over all rounds: digits recovers fast, so the final round is noisy."""
    return statistics.mean(r.accuracy for s in honest for r in s.history)


async def test_sign_flip_breaks_mean_but_not_clipped_gossip(autojump_clock: trio.testing.MockClock) -> None:
    mean_clean = await run_network("mean", None)
    mean_attacked = await run_network("mean", make_attack("sign_flip"))
    clipped_clean = await run_network("clipped_gossip", None)
    clipped_attacked = await run_network("clipped_gossip", make_attack("sign_flip"))

    assert run_accuracy(mean_attacked) < run_accuracy(mean_clean) - 0.25
    final = statistics.mean(s.accuracy or 0 for s in clipped_attacked)
    assert final > statistics.mean(s.accuracy or 0 for s in clipped_clean) - 0.03
    # Clipped every round: the attacker ends below every honest peer at every honest node
    # (usually at 0); under mean, never clipped, it keeps an honest peer's weight.
    assert max(attacker_weights(clipped_attacked)) < min(honest_weights(clipped_attacked))
    assert min(attacker_weights(mean_attacked)) >= min(honest_weights(mean_attacked))


@pytest.mark.parametrize(
    ("attack", "evidence"),
    [("forge", "invalid_signature"), ("replay", "replay"), ("equivocate", "equivocation")],
)
async def test_protocol_attacker_loses_all_weight(
    autojump_clock: trio.testing.MockClock, attack: str, evidence: str
) -> None:
    honest = await run_network("clipped_gossip", make_attack(attack), rounds=3)

    assert attacker_weights(honest) == [0.0] * (N - 1)
    # Forge is banned by whichever forgery a node meets first (bad signer, tampered or
    # malformed payload); the others then never reach it.
    kinds = ("invalid_signature", "invalid_format") if attack == "forge" else (evidence,)
    assert all(sum(s.rejected.get(k, 0) for k in kinds) >= 1 for s in honest)
    assert all(s.round == 3 for s in honest)


async def test_free_rider_copy_is_flagged_as_duplicate(autojump_clock: trio.testing.MockClock) -> None:
    honest = await run_network("clipped_gossip", make_attack("free_rider", mode="copy"), rounds=3)

    assert all(s.rejected.get("duplicate_of_other", 0) >= 1 for s in honest)


async def test_flood_does_not_stop_honest_rounds(autojump_clock: trio.testing.MockClock) -> None:
    honest = await run_network("clipped_gossip", make_attack("flood", rate=50), rounds=3)

    assert all(s.round == 3 and s.state == "done" for s in honest)
    assert attacker_weights(honest) == [0.0] * (N - 1)
    assert all(s.rejected.get("equivocation", 0) >= 1 for s in honest)
    # The honest nodes never waited out a round deadline for the flooder.
    assert all(sum(r.duration for r in s.history) < 2.0 for s in honest)
    assert statistics.mean(s.accuracy or 0 for s in honest) > 0.8


def test_network_defaults_give_alie_the_papers_n_and_f() -> None:
    assert network_defaults("alie", 16, 4) == {"n": 16, "f": 4}
    assert alie_z(16, 4) == pytest.approx(0.489, abs=1e-3)  # vs 0.25 from 4 observed + 1
    assert network_defaults("alie", 4, 3) == {}  # most attack: the formula has no answer
    assert network_defaults("sign_flip", 16, 4) == {}
