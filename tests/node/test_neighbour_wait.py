"""A node never trains alone unless told to: it waits, says why, and gives up loudly."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from p2pfl.errors import NoNeighbours
from tests.node.conftest import identities, make_network, make_node


async def test_a_lone_node_waits_logs_and_raises_at_start_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    (me,) = identities(1)
    network = make_network([me], edges=[])
    node = make_node(network, me, 0, 1, min_neighbours=1, start_timeout=35.0)
    caplog.set_level(logging.INFO, logger="p2pfl.node.waiting")
    async with node:
        started = trio.current_time()
        with pytest.raises(NoNeighbours, match=r"0 of 1 neighbour\(s\) after start_timeout = 35 s; "
                           r"no \[net\] bootstrap peers configured"):
            await node.run(rounds=1)
        assert trio.current_time() - started == pytest.approx(35.0, abs=0.2)
    waits = [r.getMessage() for r in caplog.records if "waiting for 1 neighbour(s)" in r.getMessage()]
    assert len(waits) == 3  # at 10, 20 and 30 s
    assert node.round == 0  # nothing trained


async def test_min_neighbours_0_trains_alone(autojump_clock: trio.testing.MockClock) -> None:
    (me,) = identities(1)
    node = make_node(make_network([me], edges=[]), me, 0, 1, min_neighbours=0)
    async with node:
        await node.run(rounds=1)
    assert node.round == 1


async def test_a_node_that_loses_every_neighbour_waits_instead_of_training_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ids = identities(2)
    network = make_network(ids)
    nodes = [make_node(network, ids[i], i, 2, min_neighbours=1) for i in range(2)]
    async with nodes[0], nodes[1], trio.open_nursery() as nursery:
        nursery.start_soon(nodes[0].run, 3)
        nursery.start_soon(nodes[1].run, 1)
        await nodes[0].wait_for_round(0)  # round 1 starts with its neighbour still there
        network.disconnect(ids[0].peer_id, ids[1].peer_id)
        await trio.sleep(120)
        assert nodes[0].round == 2  # round 2 never started alone: still waiting after 120 s
        assert nodes[0].statistics().state == "waiting"
        nursery.cancel_scope.cancel()
