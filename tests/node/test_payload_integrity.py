"""Decoded models are views of the payloads a node pulled: nothing may write into them."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch
import trio

from p2pfl.attacks import make_attack
from p2pfl.core.envelope import CheckedPayload
from p2pfl.net.memory import MemoryTransport
from tests.node.conftest import identities, make_network, make_node
from tests.node.test_node_memory import run_all


def _aliases(tensor: torch.Tensor, payload: bytes) -> bool:
    start = torch.frombuffer(payload, dtype=torch.uint8).data_ptr()
    return start <= tensor.data_ptr() < start + len(payload)


@pytest.mark.parametrize(("rule", "attack"), [
    ("clipped_gossip", "min_max"),  # the default rule, its harm check, an attack reading neighbours
    ("mean", None),
    ("median", None),
])
async def test_served_payloads_keep_their_sha256_through_rounds(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, rule: str, attack: str | None
) -> None:
    served: list[tuple[bytes, bytes]] = []  # every payload served or pulled
    serve, fetch = MemoryTransport.serve, MemoryTransport.fetch

    def recording(self: MemoryTransport, digest: bytes, payload: bytes) -> None:
        served.append((digest, payload))
        serve(self, digest, payload)

    async def pulling(self: MemoryTransport, peer: str, digest: bytes, **kwargs: Any) -> CheckedPayload:
        got = await fetch(self, peer, digest, **kwargs)
        served.append((digest, got.data))
        return got

    monkeypatch.setattr(MemoryTransport, "serve", recording)
    monkeypatch.setattr(MemoryTransport, "fetch", pulling)
    ids = identities(4)
    network = make_network(ids)
    nodes = [make_node(network, ident, i, 4, rule=rule) for i, ident in enumerate(ids[:3])]
    nodes.append(make_node(network, ids[3], 3, 4, rule=rule,
                           behaviour=make_attack(attack) if attack else None))
    seen: list[bool] = []

    async def watch() -> None:  # the models a node holds mid-run are views of served bytes
        await nodes[0].wait_for_round(1)
        held = nodes[0].neighbour_states().values()
        seen.extend(_aliases(t, p) for s in held for t in s.values() for _, p in served)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await run_all(nodes, rounds=4)

    assert any(seen), "no decoded model aliased a payload: this test checks nothing"
    assert len(served) > 4 * 4
    assert all(hashlib.sha256(payload).digest() == digest for digest, payload in served)
    assert all(n.statistics().round == 4 for n in nodes)
