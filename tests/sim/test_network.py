"""MemoryNetwork's neighbour-only delivery (used by simulations): one hop, nothing further."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from p2pfl.net.memory import MemoryNetwork


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def deliveries(neighbours_only: bool) -> dict[str, list[bytes]]:
    """Line a - b - c; a publishes once; return what each peer's validator saw."""
    network = MemoryNetwork(neighbours_only=neighbours_only)
    network.connect("a", "b")
    network.connect("b", "c")
    seen: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}

    def validator(peer: str) -> Callable[[str, bytes], None]:
        return lambda origin, data: seen[peer].append(data)

    async with network.open_transport("a", validator("a")) as a, network.open_transport(
        "b", validator("b")
    ), network.open_transport("c", validator("c")):
        await a.publish(b"hello")
        await trio.sleep(1.0)
    return seen


async def test_neighbours_only_stops_at_one_hop(autojump_clock: trio.testing.MockClock) -> None:
    seen = await deliveries(neighbours_only=True)
    assert seen["b"] == [b"hello"]
    assert seen["c"] == []


async def test_mesh_delivery_reaches_two_hops(autojump_clock: trio.testing.MockClock) -> None:
    seen = await deliveries(neighbours_only=False)
    assert seen["b"] == [b"hello"]
    assert seen["c"] == [b"hello"]
