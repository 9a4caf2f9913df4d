"""The node's parts on their own: the outbox's outbound pipeline and the mixer's weights."""

from __future__ import annotations

import ast
import hashlib
import logging
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import trio

from p2pfl.config import NetConfig
from p2pfl.core.codec import decode_state, encode_state
from p2pfl.core.crypto import short_id
from p2pfl.core.envelope import AnnouncementKind, parse_announcement
from p2pfl.core.reputation import Evidence, ReputationConfig
from p2pfl.core.rounds import Received
from p2pfl.learners.base import Learner
from p2pfl.net.transport import Announcement, Transport
from p2pfl.node.config import NodeConfig
from p2pfl.node.mixer import Mixer
from p2pfl.node.outbox import Outbox, State
from p2pfl.node.standing import Standing
from tests.node.conftest import identities, make_network, make_node

NET = "test-net"


class Step:
    """A transform that records its calls and applies ``fn`` to every tensor."""

    def __init__(self, name: str, calls: list[tuple[str, int]], fn: Any) -> None:
        self.name, self.calls, self.fn = name, calls, fn

    def apply(self, round: int, state: State) -> State:
        self.calls.append((self.name, round))
        return {key: self.fn(tensor) for key, tensor in state.items()}


async def inline(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


async def test_outbox_signs_what_the_transforms_made_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    me, peer = identities(2)
    network = make_network([me, peer])
    calls: list[tuple[str, int]] = []
    transforms = [Step("add", calls, lambda t: t + 1), Step("double", calls, lambda t: t * 2)]
    own = {"w": torch.tensor([1.0, 2.0])}
    async with (
        network.open_transport(me.peer_id, lambda origin, data: data) as mine,
        network.open_transport(peer.peer_id, lambda origin, data: data) as theirs,
    ):
        outbox = Outbox(transport=mine, identity=me, network_id=NET, max_lag=2,
                        compute=inline, transforms=transforms)
        update = await outbox.announce(3, own, samples=10)
        header = update.header
        fetched = await theirs.fetch(me.peer_id, header.digest, max_size=header.size, timeout=1.0)
        payload = fetched.data
        with trio.fail_after(1):
            announcement: Announcement = await theirs.announcements().receive()
    assert calls == [("add", 3), ("double", 3)]
    assert torch.equal(decode_state(payload)["w"], torch.tensor([4.0, 6.0]))  # (w + 1) * 2
    assert torch.equal(own["w"], torch.tensor([1.0, 2.0]))  # the input is untouched
    assert header.digest == hashlib.sha256(payload).digest()
    assert (header.round, header.samples, header.sender) == (3, 10, me.peer_id)
    parsed = parse_announcement(me.peer_id, announcement.data, network_id=NET)
    assert parsed.kind is AnnouncementKind.UPDATE
    assert parsed.update.header.digest == header.digest


async def test_outbox_without_transforms_sends_the_raw_encoding(
    autojump_clock: trio.testing.MockClock,
) -> None:
    (me,) = identities(1)
    network = make_network([me], edges=[])
    state = {"w": torch.tensor([0.5, -1.0])}
    async with network.open_transport(me.peer_id, lambda origin, data: data) as mine:
        outbox = Outbox(transport=mine, identity=me, network_id=NET, max_lag=2, compute=inline)
        update = await outbox.announce(0, state, samples=1)
    assert update.header.digest == hashlib.sha256(encode_state(state)).digest()


class Recorder:
    """The part of a transport the outbox uses, recording what it is asked to do."""

    def __init__(self, neighbours: int = 0) -> None:
        self.published: list[bytes] = []
        self.served: dict[bytes, bytes] = {}
        self.pulled: dict[bytes, set[str]] = {}
        self._neighbours = tuple(f"n{i}" for i in range(neighbours))

    async def publish(self, data: bytes) -> None:
        self.published.append(data)

    def serve(self, digest: bytes, payload: bytes) -> None:
        self.served[digest] = payload

    def unserve(self, digest: bytes) -> None:
        del self.served[digest]

    def neighbours(self) -> tuple[str, ...]:
        return self._neighbours

    def pulled_by(self, digest: bytes) -> frozenset[str]:
        return frozenset(self.pulled.get(digest, ()))


def recording_outbox(recorder: Recorder, max_lag: int = 1) -> Outbox:
    (me,) = identities(1)
    return Outbox(transport=cast(Transport, recorder), identity=me, network_id=NET,
                  max_lag=max_lag, compute=inline)


def rounds_of(published: list[bytes]) -> list[int]:
    (me,) = identities(1)
    return [parse_announcement(me.peer_id, d, network_id=NET).update.header.round for d in published]


async def test_outbox_reannounces_only_the_rounds_it_remembers() -> None:
    recorder = Recorder(neighbours=1)
    outbox = recording_outbox(recorder, max_lag=1)
    for number in range(3):
        await outbox.announce(number, {"w": torch.tensor([float(number)])}, samples=1)
    await outbox.reannounce(0)  # older than round 2 - max_lag: forgotten
    await outbox.reannounce(2)
    assert rounds_of(recorder.published) == [0, 1, 2, 2]
    assert recorder.published[3] == recorder.published[2]


async def test_outbox_reannounces_only_while_a_neighbour_has_not_pulled() -> None:
    recorder = Recorder(neighbours=2)
    outbox = recording_outbox(recorder)
    digest = (await outbox.announce(0, {"w": torch.tensor([1.0])}, samples=1)).header.digest
    recorder.pulled[digest] = {"n0"}
    await outbox.reannounce(0)  # n1 still misses it
    recorder.pulled[digest] = {"n0", "n1"}
    await outbox.reannounce(0)  # everyone has it: silence
    recorder._neighbours = ("n0", "n1", "n2")
    await outbox.reannounce(0)  # a new neighbour misses it
    assert rounds_of(recorder.published) == [0, 0, 0]


async def test_outbox_serves_a_window_that_grows_with_the_neighbours() -> None:
    recorder = Recorder(neighbours=1)  # keeps 4 * (1 + 1) = 8 payloads
    outbox = recording_outbox(recorder)
    digests = [(await outbox.announce(n, {"w": torch.tensor([float(n)])}, samples=1)).header.digest
               for n in range(10)]
    assert list(recorder.served) == digests[2:]
    extra = outbox.window(keep=1)  # a behaviour's own window leaves the node's alone
    extra.serve(b"x" * 32, b"one")
    extra.serve(b"y" * 32, b"two")
    assert list(recorder.served) == [*digests[2:], b"y" * 32]


async def test_a_node_sends_its_updates_through_its_transforms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ids = identities(2)
    network = make_network(ids)
    sent: list[State] = []

    class Keep:
        def apply(self, round: int, state: State) -> State:
            sent.append({key: tensor * 0.5 for key, tensor in state.items()})
            return sent[-1]

    sender = make_node(network, ids[0], 0, 2, transforms=[Keep()])
    receiver = make_node(network, ids[1], 1, 2)
    async with sender, receiver, trio.open_nursery() as nursery:
        nursery.start_soon(sender.run, 1)
        await receiver.run(rounds=1)
        held = receiver.neighbour_states()[sender.peer_id]
    assert len(sent) == 1
    assert encode_state(held) == encode_state(sent[0])



@pytest.mark.parametrize(("fetch_sources", "serves"), [(1, False), (2, True)])
async def test_a_node_serves_what_it_pulled_only_where_holders_are_pulled_from(
    autojump_clock: trio.testing.MockClock, fetch_sources: int, serves: bool
) -> None:
    ids = identities(2)
    network = make_network(ids)
    sender = make_node(network, ids[0], 0, 2)
    receiver = make_node(network, ids[1], 1, 2, net=NetConfig(fetch_sources=fetch_sources))
    async with sender, receiver, trio.open_nursery() as nursery:
        nursery.start_soon(sender.run, 1)
        await receiver.run(rounds=1)
        sent = set(sender.transport._served)  # the sender's update of round 0
        served = set(receiver.transport._served)  # the receiver's own, and what it holds
    assert len(sent) == 1
    assert bool(sent & served) == serves


async def test_an_outbox_that_does_not_hold_serves_and_says_nothing() -> None:
    recorder = Recorder()
    (me,) = identities(1)
    outbox = Outbox(transport=cast(Transport, recorder), identity=me, network_id=NET,
                    max_lag=1, compute=inline, holds=False)
    payload = encode_state({"w": torch.zeros((1 << 20) // 4 + 1)})  # over one piece: would be announced
    update = outbox.sign(0, payload, samples=1)
    await outbox.hold(update, payload)
    assert recorder.served == {}
    assert recorder.published == []


# ---------------------------------------------------------------- mixer


def mixer(rule: str) -> tuple[Mixer, Standing]:
    config = NodeConfig(network_id=NET, rule=rule)
    standing = Standing(ReputationConfig())
    return Mixer(config, cast(Learner, object()), standing, inline), standing


def received(sender: str, value: float, samples: int) -> Received:
    return Received(sender, 0, hashlib.sha256(sender.encode()).digest(), samples,
                    {"w": torch.tensor([value])})


def test_mean_weighs_by_samples_capped_at_four_times_ours() -> None:
    mix, standing = mixer("mean")
    updates = [received("a", 1.0, 5), received("b", 1.0, 1000)]
    weights, own = mix.weights(updates, samples=10)
    score = standing.weight("a")
    assert weights == pytest.approx([score * 5, score * 40])  # 1000 claimed, 4 x 10 used
    assert own == 10.0


def test_other_rules_weigh_by_reputation_alone() -> None:
    mix, standing = mixer("clipped_gossip")
    weights, own = mix.weights([received("a", 1.0, 5)], samples=10)
    assert weights == [standing.weight("a")]
    assert own == 1.0


def test_a_flagged_neighbour_hands_its_share_to_the_trusted_ones_not_to_our_model() -> None:
    mix, standing = mixer("clipped_gossip")
    for number in range(30):  # "b" and "c" are clipped to nothing, round after round
        for peer in ("b", "c"):
            standing.record_trust(peer, 0.0, number)
        standing.end_round(number)
    assert standing.weight("b") == standing.weight("c") == 0.0 < standing.weight("a")
    updates = [received(peer, 1.0, 5) for peer in ("a", "b", "c")]
    weights, own = mix.weights(updates, samples=10)
    assert own == pytest.approx(1 / 3)  # one trusted neighbour of three
    assert mix.weights(updates[:1], samples=10)[1] == 1.0


async def test_mix_aggregates_and_records_the_trust_as_evidence() -> None:
    mix, standing = mixer("mean")
    own = {"w": torch.tensor([0.0])}
    updates = [received("a", 3.0, 10), received("b", 6.0, 10)]
    w = standing.weight("a") * 10  # a's and b's weight: reputation x samples
    result = await mix.mix(0, own, own, updates, samples=10)
    # Our weight is our 10 samples: (10 * 0 + w * 3 + w * 6) / (10 + 2w).
    assert float(result["w"]) == pytest.approx(9 * w / (10 + 2 * w))
    assert standing.accepted == 2
    assert [e.evidence for e in standing.book.history("a")] == [Evidence.ACCEPTED]


async def test_mix_says_at_debug_how_it_weighed_each_neighbour(caplog: pytest.LogCaptureFixture) -> None:
    config = NodeConfig(network_id=NET, rule="clipped_gossip")
    standing = Standing(ReputationConfig())
    mix = Mixer(config, cast(Learner, object()), standing, inline, owner="me")
    own = {"w": torch.tensor([0.0])}
    updates = [received("peer-near", 1.0, 10), received("peer-far", 100.0, 10)]
    with caplog.at_level(logging.INFO, logger="p2pfl.node.mixer"):
        await mix.mix(0, own, own, updates, samples=10)
    assert not caplog.records  # quiet unless asked (-v)
    (near_w, far_w), own_w = mix.weights(updates, samples=10)
    with caplog.at_level(logging.DEBUG, logger="p2pfl.node.mixer"):
        await mix.mix(1, own, own, updates, samples=10)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"[me] round 1 mix: own w {own_w:.2f} radius ")
    near, far = line.split("; ")[1:]
    assert near == f"{short_id('peer-near')} d 1 w {near_w:.3g} used 1 evidence 1"
    assert far.startswith(f"{short_id('peer-far')} d 100 w {far_w:.3g} used 0.0")  # clipped to a sliver
    assert far.endswith(" evidence 0.01")


# ---------------------------------------------------------------- seams


PARTS = ["node/behaviour", "node/outbox", "node/ingress", "node/mixer", "node/standing",
         "attacks/_common", "attacks/model", "attacks/protocol"]


@pytest.mark.parametrize("module", PARTS)
def test_the_parts_and_the_attacks_do_not_import_the_node(module: str) -> None:
    path = Path(__file__).parents[2] / "p2pfl" / f"{module}.py"
    imported = {
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "p2pfl.node.node" not in imported
