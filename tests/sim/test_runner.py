"""Runs are deterministic for a seed; the speed-ups change nothing a node computes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from p2pfl.sim.runner import RunResult, VerificationCache, run_scenario
from p2pfl.sim.scenario import Scenario
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


def test_cache_refuses_a_relayed_update_it_has_seen() -> None:
    calls: list[str] = []

    class Fake:
        kind = None

    def validator(origin: str, data: bytes) -> object:
        calls.append(origin)
        raise ValueError("rejected")

    cache = VerificationCache()
    wrapped = cache.wrap(validator)
    with pytest.raises(ValueError):
        wrapped("a", b"x")
    with pytest.raises(ValueError):
        wrapped("a", b"x")
    assert calls == ["a", "a"]  # failures are never cached
    assert cache.hits == 0
