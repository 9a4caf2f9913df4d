"""Runs are deterministic for a seed; the speed-ups change nothing a node computes."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from p2pfl.core.envelope import (
    AnnouncementKind,
    ParsedAnnouncement,
    encode_announcement,
    parse_announcement,
    sign_update,
)
from p2pfl.errors import SignerMismatch
from p2pfl.net.memory import LinkProfile
from p2pfl.sim.network import VerificationCache
from p2pfl.sim.runner import RunResult, identity_for, run_scenario
from p2pfl.sim.scenario import Scenario
from p2pfl.sim.schedule import deterministic_scheduling
from p2pfl.sim.scorecard import scorecard

SMALL = Scenario(nodes=6, rounds=3, topology="ring", partition="dirichlet", alpha=1.0, round_timeout=2.0)


@pytest.fixture(scope="module")
def first() -> RunResult:
    return run_scenario(SMALL, 7)


def test_two_runs_of_one_seed_are_identical(first: RunResult) -> None:
    again = run_scenario(SMALL, 7)
    assert again.accuracy == first.accuracy
    assert again.consensus == first.consensus
    assert again.weights == first.weights
    assert again.bytes_in == first.bytes_in


def test_another_seed_gives_another_run(first: RunResult) -> None:
    assert run_scenario(SMALL, 8).accuracy != first.accuracy


def test_shared_verification_and_neighbour_delivery_change_no_result(first: RunResult) -> None:
    unshared = run_scenario(SMALL, 7, share_verification=False)
    mesh = run_scenario(replace(SMALL, delivery="mesh"), 7)
    assert unshared.accuracy == first.accuracy == mesh.accuracy
    assert first.cache_hits > 0
    assert unshared.cache_hits == 0
    # Every announcement is verified once (by its publisher), then shared.
    assert first.cache_misses == SMALL.nodes * SMALL.rounds


def test_a_run_records_every_round_of_every_node(first: RunResult) -> None:
    assert all(len(row) == SMALL.rounds and None not in row for row in first.accuracy)
    assert all(not math.isnan(d) for d in first.consensus)
    assert first.byzantine == ()
    assert first.honest == tuple(range(6))
    assert len(first.edges) == 6
    # Honest ring neighbours keep positive weights; each node knows its two neighbours.
    last = [rows[-1] for rows in first.weights]
    assert all(len(row) == 2 and all(w > 0 for w in row.values()) for row in last)
    card = scorecard(first)
    assert card["accuracy"]["honest_mean"][-1] > card["accuracy"]["honest_mean"][0]


def test_progress_prints_a_line_per_round() -> None:
    lines: list[str] = []
    run_scenario(Scenario(nodes=4, rounds=2, topology="complete", round_timeout=2.0), 0,
                 progress=lines.append)
    assert [line.split(":")[0].strip() for line in lines] == ["round 1/2", "round 2/2"]
    assert "honest accuracy mean" in lines[-1]


def _validator(origin: str, data: bytes) -> ParsedAnnouncement:
    return parse_announcement(origin, data, network_id="net")


def test_cache_shares_successes_and_still_refuses_relayed_updates() -> None:
    author, relay, other = identity_for(0, 0), identity_for(0, 1), identity_for(0, 2)
    update = sign_update(author, network_id="net", round=1, payload=b"p", samples=1, ts_ms=0)
    announced = encode_announcement(AnnouncementKind.UPDATE, update)
    cache = VerificationCache()
    validate = cache.wrap(_validator)

    assert validate(author.peer_id, announced).origin == author.peer_id
    assert validate(author.peer_id, announced).update == update
    assert (cache.hits, cache.misses) == (1, 1)
    with pytest.raises(SignerMismatch):  # the same bytes relayed by another peer
        validate(relay.peer_id, announced)

    holds = encode_announcement(AnnouncementKind.HOLDS, update)
    validate(relay.peer_id, holds)
    shared = validate(other.peer_id, holds)  # anyone may offer a payload: a hit
    assert shared.origin == other.peer_id
    assert shared.kind is AnnouncementKind.HOLDS
    assert cache.hits == 2


def test_cache_never_stores_a_failure() -> None:
    calls: list[str] = []

    def refuse(origin: str, data: bytes) -> object:
        calls.append(origin)
        raise ValueError("rejected")

    validate = VerificationCache().wrap(refuse)
    for _ in range(2):
        with pytest.raises(ValueError, match="rejected"):
            validate("a", b"x")
    assert calls == ["a", "a"]


def test_runs_under_attack_on_a_lossy_link_are_reproducible() -> None:
    scenario = Scenario(
        nodes=8, rounds=4, topology="regular", topology_params={"degree": 3},
        partition="dirichlet", attack="alie", byzantine=2, round_timeout=1.0,
        link=LinkProfile(latency=0.01, jitter=0.005, loss=0.05),
    )
    a, b = run_scenario(scenario, 1), run_scenario(scenario, 1)
    assert a.accuracy == b.accuracy
    assert a.weights == b.weights
    assert a.consensus == b.consensus


def _card_bytes(scenario: Scenario, seed: int) -> bytes:
    card = scorecard(run_scenario(scenario, seed))
    del card["timing"]["wall_seconds"]  # the only field that measures the machine
    return json.dumps(card, sort_keys=True, allow_nan=False).encode()


@pytest.mark.parametrize(
    ("attack", "link"),
    [("sybil", LinkProfile()), ("gaussian", LinkProfile(latency=0.01, jitter=0.005, loss=0.1))],
)
def test_one_seed_gives_byte_identical_scorecards(attack: str, link: LinkProfile) -> None:
    # Sybils and link loss make many tasks runnable at one simulated instant: trio's
    # order among them must come from the seed (p2pfl.sim.schedule), not from chance.
    scenario = Scenario(
        nodes=8, rounds=4, topology="regular", topology_params={"degree": 3},
        partition="dirichlet", attack=attack, byzantine=2, round_timeout=1.0, link=link,
    )
    assert _card_bytes(scenario, 0) == _card_bytes(scenario, 0)


def test_deterministic_scheduling_restores_trios_setting() -> None:
    from trio._core import _run as trio_run

    switch, before = trio_run._ALLOW_DETERMINISTIC_SCHEDULING, trio_run._r.getstate()
    with deterministic_scheduling(3):
        assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    # (Hypothesis's trio plugin may have turned the switch on for the whole test session.)
    assert switch == trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    assert trio_run._r.getstate() == before
