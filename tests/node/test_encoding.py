"""The outbox's encode step: the configured codec names the header; topk deltas and their fallback."""

from __future__ import annotations

import statistics
from typing import cast

import pytest
import torch
import trio

from p2pfl.config import NetConfig
from p2pfl.core.codec import decode_state
from p2pfl.core.lossy import BASE
from p2pfl.errors import ConfigError
from p2pfl.net.transport import Transport
from p2pfl.node.encoding import TopKEncoder, make_encoder
from p2pfl.node.outbox import Outbox
from tests.node.conftest import identities, make_network, make_node
from tests.node.test_node_memory import run_all
from tests.node.test_parts import NET, Recorder, inline


def topk_outbox(recorder: Recorder) -> Outbox:
    (me,) = identities(1)
    encoder = TopKEncoder(fraction=0.25, full_every=3)
    return Outbox(transport=cast(Transport, recorder), identity=me, network_id=NET, max_lag=2,
                  compute=inline, encoder=encoder)


async def test_topk_deltas_go_against_the_newest_model_every_neighbour_holds() -> None:
    recorder = Recorder(neighbours=2)
    outbox = topk_outbox(recorder)
    model = {"w": torch.arange(8.0)}
    digests, kinds = [], []
    for number in range(5):
        model = {"w": model["w"] + number}
        update = await outbox.announce(number, model, samples=1)
        assert update.header.codec == "topk"
        digests.append(update.header.digest)
        kinds.append("delta" if BASE in decode_state(recorder.served[update.header.digest]) else "full")
        if number != 1:  # round 1's update is pulled by one neighbour only
            recorder.pulled[update.header.digest] = {"n0", "n1"}
        else:
            recorder.pulled[update.header.digest] = {"n0"}
    # 0: first, full; 1: delta; 2: n1 lacks round 1's payload but holds round 0's: a delta
    # against round 0; 3: full (full_every = 3 rounds after the full round 0); 4: delta.
    assert kinds == ["full", "delta", "delta", "full", "delta"]
    bases = [decode_state(recorder.served[d]).get(BASE) for d in digests]
    assert bytes(bases[2].numpy().tobytes()) == digests[0]  # type: ignore[union-attr]


async def test_topk_sends_the_full_model_to_a_neighbour_that_joined_mid_chain() -> None:
    recorder = Recorder(neighbours=1)
    outbox = topk_outbox(recorder)
    kinds = []
    for number in range(3):
        update = await outbox.announce(number, {"w": torch.arange(8.0) * number}, samples=1)
        kinds.append("delta" if BASE in decode_state(recorder.served[update.header.digest]) else "full")
        recorder.pulled[update.header.digest] = {"n0", "n1"} if number else {"n0"}
        if number == 1:
            recorder._neighbours = ("n0", "n1")  # n1 joins and pulls round 1's delta
    # n1 pulled round 1's delta but could not apply it (it never held round 0's model).
    assert kinds == ["full", "delta", "full"]


def test_an_unknown_codec_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="net.codec: must be one of bf16, fp16, int8, raw, topk"):
        make_encoder(NetConfig(codec="zstd"))
    with pytest.raises(ConfigError, match="codec_k"):
        NetConfig(codec="topk", codec_k=0)


@pytest.mark.parametrize("codec", ["int8", "topk"])
async def test_four_nodes_converge_with_a_lossy_codec(
    codec: str, autojump_clock: trio.testing.MockClock
) -> None:
    ids = identities(4)
    network = make_network(ids)
    net = NetConfig(codec=codec, codec_k=0.1, codec_full_every=4)
    nodes = [make_node(network, ident, i, 4, net=net) for i, ident in enumerate(ids)]

    await run_all(nodes, rounds=6)

    final = [n.statistics() for n in nodes]
    assert all(s.round == 6 for s in final)
    assert statistics.mean(s.accuracy or 0 for s in final) > 0.85
    # No update refused, no peer blamed: every round aggregated all three neighbours.
    assert all(record.used == 3 for s in final for record in s.history)
    assert all(row.weight > 0 for s in final for row in s.reputation)
    raw_bytes = sum(t.numel() * 4 for t in nodes[0].learner.get_state().values())
    assert all(s.payload_out < 6 * 3 * raw_bytes * 0.4 for s in final)
