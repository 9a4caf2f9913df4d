"""Topologies are seeded pure functions with the promised shapes; placement hits its targets."""

from __future__ import annotations

import pytest

from p2pfl.errors import ConfigError
from p2pfl.sim.topology import (
    TOPOLOGIES,
    Graph,
    complete,
    dumbbell,
    erdos_renyi,
    exponential,
    make_topology,
    place_byzantine,
    random_regular,
    ring,
    torus,
)


def simple(graph: Graph) -> bool:
    return all(0 <= a < b < graph.n for a, b in graph.edges) and len(set(graph.edges)) == len(graph.edges)


@pytest.mark.parametrize("n", [3, 7, 16])
def test_ring_is_a_connected_cycle(n: int) -> None:
    graph = ring(n)
    assert graph.degrees() == [2] * n
    assert len(graph.edges) == n
    assert graph.is_connected()
    assert simple(graph)


def test_torus_has_degree_four_and_wraps() -> None:
    graph = torus(16)
    assert graph.degrees() == [4] * 16
    assert (0, 3) in graph.edges
    assert (0, 12) in graph.edges
    assert graph.is_connected()
    assert simple(graph)


def test_torus_rejects_rows_that_do_not_divide() -> None:
    with pytest.raises(ConfigError, match="rows"):
        torus(16, rows=3)
    with pytest.raises(ConfigError, match="prime"):
        torus(13)


@pytest.mark.parametrize(("n", "d", "seed"), [(16, 4, 0), (16, 3, 1), (64, 4, 2), (10, 9, 0)])
def test_random_regular_is_regular_simple_connected(n: int, d: int, seed: int) -> None:
    graph = random_regular(n, d, seed)
    assert graph.degrees() == [d] * n
    assert graph.is_connected()
    assert simple(graph)


def test_random_graphs_are_fixed_by_their_seed() -> None:
    assert random_regular(32, 4, 5) == random_regular(32, 4, 5)
    assert random_regular(32, 4, 5) != random_regular(32, 4, 6)
    assert erdos_renyi(20, 0.3, 1) == erdos_renyi(20, 0.3, 1)
    assert erdos_renyi(20, 0.3, 1) != erdos_renyi(20, 0.3, 2)


def test_random_regular_rejects_odd_stub_count() -> None:
    with pytest.raises(ConfigError, match="degree"):
        random_regular(7, 3, 0)


def test_erdos_renyi_is_connected_and_sparse_p_is_refused() -> None:
    graph = erdos_renyi(30, 0.2, 3)
    assert graph.is_connected()
    assert simple(graph)
    with pytest.raises(ConfigError, match="raise p"):
        erdos_renyi(60, 0.001, 0)


def test_dumbbell_is_two_cliques_and_one_bridge() -> None:
    graph = dumbbell(10)
    assert graph.bridge == (4, 5)
    crossing = [(a, b) for a, b in graph.edges if (a < 5) != (b < 5)]
    assert crossing == [(4, 5)]
    assert len(graph.edges) == 2 * 10 + 1  # two K5 (10 edges each) + the bridge
    assert graph.degrees() == [4, 4, 4, 4, 5, 5, 4, 4, 4, 4]
    assert graph.is_connected()


def test_exponential_links_powers_of_two() -> None:
    graph = exponential(16)
    neighbours = graph.neighbours()
    assert neighbours[0] == [1, 2, 4, 8, 12, 14, 15]
    assert graph.degrees() == [7] * 16  # +-1, +-2, +-4 and 8 (its own inverse)
    assert graph.is_connected()


def test_complete_has_every_pair() -> None:
    assert len(complete(9).edges) == 36


def test_make_topology_names_bad_kind_and_param() -> None:
    with pytest.raises(ConfigError, match="topology.kind"):
        make_topology("star", 8, 0)
    with pytest.raises(ConfigError, match="topology.p"):
        make_topology("ring", 8, 0, p=0.5)
    assert set(TOPOLOGIES) >= {"ring", "torus", "regular", "erdos_renyi", "dumbbell", "exponential", "complete"}


def test_bottleneck_placement_takes_the_bridge_first() -> None:
    graph = dumbbell(12)
    assert place_byzantine(graph, 2, "bottleneck", 0) == (5, 6)
    three = place_byzantine(graph, 3, "bottleneck", 0)
    assert {5, 6} < set(three)


def test_degree_placement_takes_the_hubs() -> None:
    # A ring plus chords from node 0 to everyone: node 0 is the hub.
    edges = tuple(sorted({(i, i + 1) for i in range(7)} | {(0, 7)} | {(0, i) for i in range(2, 7)}))
    graph = Graph(8, edges)
    assert place_byzantine(graph, 1, "degree", 0) == (0,)


def test_random_placement_is_seeded_and_sized() -> None:
    graph = ring(20)
    chosen = place_byzantine(graph, 5, "random", 1)
    assert len(set(chosen)) == 5
    assert chosen == tuple(sorted(chosen))
    assert chosen == place_byzantine(graph, 5, "random", 1)
    assert any(place_byzantine(graph, 5, "random", s) != chosen for s in range(2, 6))
    assert place_byzantine(graph, 2, "last", 0) == (18, 19)
    with pytest.raises(ConfigError, match="byzantine"):
        place_byzantine(graph, 20, "random", 0)
