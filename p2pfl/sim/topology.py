"""Communication graphs for simulations: pure, seeded functions of node indices.

Every builder returns a :class:`Graph` over nodes ``0 .. n-1``: undirected edges as
sorted ``(i, j)`` pairs with ``i < j``, no self-loops, no duplicates. Randomised
builders draw only from ``random.Random(seed)``, so a seed fixes the graph.

- ``ring``: i ~ i+1 (mod n).
- ``torus``: a ``rows x cols`` grid wrapping both ways (``rows`` defaults to the
  largest divisor of n not above sqrt(n)).
- ``regular``: a random d-regular graph (Steger-Wormald pairing, resampled until
  connected).
- ``erdos_renyi``: each pair with probability ``p``, resampled until connected.
- ``dumbbell``: two cliques of n/2 joined by one bridge edge, the classic bottleneck.
- ``exponential``: i ~ i + 2^k (mod n) for every 2^k < n (Ying et al. 2021).
- ``complete``: every pair.

:func:`place_byzantine` chooses which nodes attack: at random, on the bottleneck (the
dumbbell bridge endpoints first, then the highest-degree nodes), on the highest-degree
nodes, or the last indices.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from p2pfl.errors import ConfigError

Edge = tuple[int, int]
_RESAMPLE_ATTEMPTS = 200


@dataclass(frozen=True, slots=True)
class Graph:
    """An undirected simple graph over nodes ``0 .. n-1``."""

    n: int
    edges: tuple[Edge, ...]
    kind: str = ""
    bridge: Edge | None = None  # the single edge joining two communities, if any

    def neighbours(self) -> list[list[int]]:
        """Return each node's sorted neighbour list."""
        adjacency: list[list[int]] = [[] for _ in range(self.n)]
        for a, b in self.edges:
            adjacency[a].append(b)
            adjacency[b].append(a)
        return [sorted(row) for row in adjacency]

    def degrees(self) -> list[int]:
        """Return each node's degree."""
        return [len(row) for row in self.neighbours()]

    def is_connected(self) -> bool:
        """Tell whether every node reaches every other."""
        return _connected(self.n, self.edges)


def _normalise(n: int, pairs: Iterable[tuple[int, int]]) -> tuple[Edge, ...]:
    return tuple(sorted({(min(a, b), max(a, b)) for a, b in pairs if a != b}))


def _connected(n: int, edges: Iterable[Edge]) -> bool:
    if n <= 1:
        return True
    adjacency: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adjacency[a].append(b)
        adjacency[b].append(a)
    seen, frontier = {0}, deque([0])
    while frontier:
        for other in adjacency[frontier.popleft()]:
            if other not in seen:
                seen.add(other)
                frontier.append(other)
    return len(seen) == n


def _need(n: int, minimum: int, kind: str) -> None:
    if n < minimum:
        raise ConfigError(f"nodes: topology {kind!r} needs at least {minimum} nodes, got {n}")


def ring(n: int) -> Graph:
    """Connect each node to the next, closing the cycle."""
    _need(n, 3, "ring")
    return Graph(n, _normalise(n, ((i, (i + 1) % n) for i in range(n))), "ring")


def torus(n: int, rows: int | None = None) -> Graph:
    """Lay nodes on a ``rows x (n // rows)`` grid that wraps in both directions."""
    _need(n, 4, "torus")
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    if rows < 2 or n % rows or n // rows < 2:
        raise ConfigError(
            f"topology.rows: need a divisor of nodes={n} leaving at least 2 rows and 2 "
            f"columns, got {rows} (a prime node count has none)"
        )
    cols = n // rows
    pairs = []
    for r in range(rows):
        for c in range(cols):
            here = r * cols + c
            pairs.append((here, r * cols + (c + 1) % cols))
            pairs.append((here, ((r + 1) % rows) * cols + c))
    return Graph(n, _normalise(n, pairs), "torus")


def random_regular(n: int, degree: int, seed: int) -> Graph:
    """Draw a connected random ``degree``-regular graph (pairing model with restarts)."""
    if not 1 <= degree < n or (n * degree) % 2:
        raise ConfigError(
            f"topology.degree: need 1 <= degree < nodes and nodes*degree even, got "
            f"degree={degree}, nodes={n}"
        )
    rng = random.Random(f"regular/{n}/{degree}/{seed}")
    for _ in range(_RESAMPLE_ATTEMPTS):
        edges = _pairing(n, degree, rng)
        if edges is not None and _connected(n, edges):
            return Graph(n, edges, "regular")
    raise ConfigError(f"topology.degree: no connected {degree}-regular graph on {n} nodes found")


def _pairing(n: int, degree: int, rng: random.Random) -> tuple[Edge, ...] | None:
    """One attempt of Steger-Wormald pairing: join random free stubs that make a new edge.

    Unlike the plain configuration model (reject any loop or double edge, which almost
    always happens once degree is large), it only restarts when no admissible pair is
    left. None if stuck.
    """
    stubs = [node for node in range(n) for _ in range(degree)]
    edges: set[Edge] = set()
    while stubs:
        for _ in range(64):
            i, j = rng.sample(range(len(stubs)), 2)
            a, b = stubs[i], stubs[j]
            edge = (min(a, b), max(a, b))
            if a != b and edge not in edges:
                break
        else:
            return None
        edges.add(edge)
        for k in sorted((i, j), reverse=True):  # swap-remove, larger index first
            stubs[k] = stubs[-1]
            stubs.pop()
    return tuple(sorted(edges))


def erdos_renyi(n: int, p: float, seed: int) -> Graph:
    """Draw G(n, p), resampling (at most 200 times) until it is connected."""
    _need(n, 2, "erdos_renyi")
    if not 0 < p <= 1:
        raise ConfigError(f"topology.p: must be in (0, 1], got {p}")
    rng = random.Random(f"erdos_renyi/{n}/{p}/{seed}")
    for _ in range(_RESAMPLE_ATTEMPTS):
        edges = tuple((a, b) for a in range(n) for b in range(a + 1, n) if rng.random() < p)
        if _connected(n, edges):
            return Graph(n, edges, "erdos_renyi")
    raise ConfigError(
        f"topology.p: G({n}, {p}) was disconnected in {_RESAMPLE_ATTEMPTS} draws; raise p "
        f"(connectivity needs p > ln(n)/n = {math.log(n) / n:.3f})"
    )


def dumbbell(n: int) -> Graph:
    """Join two cliques (nodes ``0..n/2-1`` and the rest) by one edge between their ends."""
    _need(n, 4, "dumbbell")
    half = n // 2
    left = [(a, b) for a in range(half) for b in range(a + 1, half)]
    right = [(a, b) for a in range(half, n) for b in range(a + 1, n)]
    bridge = (half - 1, half)
    return Graph(n, _normalise(n, [*left, *right, bridge]), "dumbbell", bridge=bridge)


def exponential(n: int) -> Graph:
    """Connect i to i + 2^k (mod n) for every power of two below n."""
    _need(n, 2, "exponential")
    hops = [1 << k for k in range(max(1, (n - 1).bit_length())) if (1 << k) < n]
    return Graph(n, _normalise(n, ((i, (i + h) % n) for i in range(n) for h in hops)), "exponential")


def complete(n: int) -> Graph:
    """Connect every pair."""
    _need(n, 2, "complete")
    return Graph(n, tuple((a, b) for a in range(n) for b in range(a + 1, n)), "complete")


TOPOLOGIES: dict[str, Callable[..., Graph]] = {
    "ring": lambda n, seed: ring(n),
    "torus": lambda n, seed, rows=None: torus(n, rows),
    "regular": lambda n, seed, degree=4: random_regular(n, degree, seed),
    "erdos_renyi": lambda n, seed, p=0.3: erdos_renyi(n, p, seed),
    "dumbbell": lambda n, seed: dumbbell(n),
    "exponential": lambda n, seed: exponential(n),
    "complete": lambda n, seed: complete(n),
}
"""Builders by name, called as ``f(n, seed, **params)``."""

TOPOLOGY_PARAMS: dict[str, frozenset[str]] = {
    "ring": frozenset(),
    "torus": frozenset({"rows"}),
    "regular": frozenset({"degree"}),
    "erdos_renyi": frozenset({"p"}),
    "dumbbell": frozenset(),
    "exponential": frozenset(),
    "complete": frozenset(),
}


def make_topology(kind: str, n: int, seed: int, **params: Any) -> Graph:
    """Build the topology ``kind`` on ``n`` nodes; ConfigError names a wrong parameter."""
    if kind not in TOPOLOGIES:
        raise ConfigError(f"topology.kind: {kind!r} is not one of {', '.join(sorted(TOPOLOGIES))}")
    unknown = sorted(set(params) - TOPOLOGY_PARAMS[kind])
    if unknown:
        raise ConfigError(f"topology.{unknown[0]}: not a parameter of topology {kind!r}")
    return TOPOLOGIES[kind](n, seed, **params)


PLACEMENTS = ("random", "bottleneck", "degree", "last")


def place_byzantine(graph: Graph, count: int, placement: str, seed: int) -> tuple[int, ...]:
    """Choose ``count`` Byzantine nodes, sorted.

    ``random``: uniformly at random (seeded). ``bottleneck``: the bridge endpoints
    first (dumbbell), then the highest-degree nodes. ``degree``: the highest-degree
    nodes (ties broken at random). ``last``: the last ``count`` indices (like testnet).
    """
    if not 0 <= count < graph.n:
        raise ConfigError(f"attack.byzantine: need 0 <= count < nodes={graph.n}, got {count}")
    if placement not in PLACEMENTS:
        raise ConfigError(f"attack.placement: {placement!r} is not one of {', '.join(PLACEMENTS)}")
    rng = random.Random(f"placement/{placement}/{graph.n}/{count}/{seed}")
    if placement == "random":
        return tuple(sorted(rng.sample(range(graph.n), count)))
    if placement == "last":
        return tuple(range(graph.n - count, graph.n))
    degrees = graph.degrees()
    tiebreak = [rng.random() for _ in range(graph.n)]
    order = sorted(range(graph.n), key=lambda i: (-degrees[i], tiebreak[i]))
    if placement == "bottleneck" and graph.bridge is not None:
        order = [*graph.bridge, *(i for i in order if i not in graph.bridge)]
    return tuple(sorted(order[:count]))


__all__ = [
    "PLACEMENTS",
    "TOPOLOGIES",
    "Graph",
    "complete",
    "dumbbell",
    "erdos_renyi",
    "exponential",
    "make_topology",
    "place_byzantine",
    "random_regular",
    "ring",
    "torus",
]
