"""Round decisions without a network: admission, quorum, selection."""

from __future__ import annotations

import pytest
import torch

from p2pfl.core.ledger import Observation
from p2pfl.core.reputation import Evidence
from p2pfl.core.rounds import Decision, Inbox, Received, admit, catch_up_target


def update(sender: str, round: int) -> Received:
    return Received(sender, round, bytes([round]) * 32, 10, {"w": torch.full((2,), float(round))})


@pytest.mark.parametrize(
    ("observation", "update_round", "decision", "evidence"),
    [
        (Observation.NEW, 5, Decision.FETCH, None),
        (Observation.DUPLICATE, 5, Decision.FETCH, None),  # fetched only if not held
        (Observation.EQUIVOCATION, 5, Decision.REJECT, Evidence.EQUIVOCATION),
        (Observation.REPLAY, 5, Decision.REJECT, Evidence.REPLAY),
        (Observation.STALE, 5, Decision.IGNORE, None),  # gossip replays old messages: neutral
        (Observation.NEW, 2, Decision.IGNORE, None),  # behind: slow, not malicious
        (Observation.NEW, 8, Decision.IGNORE, None),  # far ahead: we may catch up
        (Observation.NEW, 3, Decision.FETCH, None),  # within lag
        (Observation.NEW, 7, Decision.FETCH, None),  # within lead
    ],
)
def test_admit(
    observation: Observation, update_round: int, decision: Decision, evidence: Evidence | None
) -> None:
    admission = admit(observation, update_round, 5, max_lag=2, max_lead=2)
    assert admission.decision is decision
    assert admission.evidence is evidence


def test_quorum_counts_only_expected_fresh_updates() -> None:
    inbox = Inbox()
    inbox.deliver(update("a", 4))
    inbox.deliver(update("b", 5))
    assert not inbox.ready(["a", "b"], 5, 1.0)  # a is a round behind
    assert inbox.ready(["a", "b"], 5, 0.5)
    assert inbox.ready([], 5, 1.0)  # a lonely node never waits
    inbox.deliver(update("a", 5))
    assert inbox.ready(["a", "b"], 5, 1.0)


def test_a_peer_whose_update_could_not_be_pulled_is_not_waited_for_that_round() -> None:
    inbox = Inbox()
    inbox.deliver(update("a", 5))
    assert not inbox.ready(["a", "b"], 5, 1.0)
    inbox.give_up("b", 4)  # its late update of an older round: still waited for in round 5
    assert not inbox.ready(["a", "b"], 5, 1.0)
    inbox.give_up("b", 5)
    assert inbox.ready(["a", "b"], 5, 1.0)
    inbox.give_up("b", 3)  # an older failure does not undo the newer one
    assert inbox.ready(["a", "b"], 5, 1.0)
    assert not inbox.ready(["a", "b"], 6, 1.0)  # its next update is waited for again
    inbox.give_up("a", 6)
    assert inbox.ready(["a"], 6, 1.0)  # nobody left to wait for
    inbox.forget("b")
    assert not inbox.ready(["a", "b"], 5, 1.0)  # a banned peer forgotten, back: waited for again


def test_each_round_of_a_peer_is_used_once() -> None:
    inbox = Inbox()
    inbox.deliver(update("a", 5))
    assert [u.round for u in inbox.take(5, max_lag=2)] == [5]
    assert inbox.take(5, max_lag=2) == []
    assert not inbox.wants("a", 5)
    inbox.deliver(update("a", 5))  # a resend after use is not held again
    assert not inbox.ready(["a"], 5, 1.0)


def test_a_peer_ahead_is_used_round_by_round() -> None:
    inbox = Inbox()
    inbox.deliver(update("a", 5))
    inbox.deliver(update("a", 6))  # a is one round ahead of us
    assert [u.round for u in inbox.take(5, max_lag=2)] == [5]
    assert inbox.ready(["a"], 6, 1.0)  # its round 6 is still there for our round 6
    assert [u.round for u in inbox.take(6, max_lag=2)] == [6]


def test_an_update_two_rounds_ahead_counts_now_and_is_used_next_round() -> None:
    inbox = Inbox()
    inbox.deliver(update("a", 7))  # the first we hear of a: two rounds ahead of ours
    inbox.deliver(update("b", 5))
    assert inbox.ready(["a", "b"], 5, 1.0)  # a is ahead, not absent: do not wait for it
    assert {u.sender: u.round for u in inbox.take(5, max_lag=2)} == {"b": 5}
    assert inbox.delivered("a", 5)  # still held: no NO_SHOW for a
    # Used now, a's 7 would have us wait in round 6 for its 8, which a trains only once
    # it has our 7: every round to the deadline. Held, it is what round 6 uses.
    inbox.deliver(update("b", 6))
    assert inbox.ready(["a", "b"], 6, 1.0)
    assert {u.sender: u.round for u in inbox.take(6, max_lag=2)} == {"a": 7, "b": 6}
    assert not inbox.ready(["a", "b"], 7, 1.0)  # a's 7 is used: its 8 comes after our 7


def test_a_peer_ahead_does_not_close_the_round_without_the_others() -> None:
    inbox = Inbox()
    inbox.deliver(update("a", 7))
    inbox.deliver(update("a", 6))
    assert not inbox.ready(["a", "b"], 5, 1.0)
    assert not inbox.ready(["a", "b", "c"], 5, 0.6)
    assert inbox.ready(["a", "b"], 5, 0.5)
    assert [u.round for u in inbox.take(5, max_lag=2)] == [6]  # its next round's, then 7


def test_take_respects_the_window() -> None:
    inbox = Inbox()
    inbox.deliver(update("old", 1))
    inbox.deliver(update("ahead", 9))
    inbox.deliver(update("lagging", 4))
    taken = {u.sender: u.round for u in inbox.take(5, max_lag=2)}
    assert taken == {"lagging": 4}


def test_first_author_flags_copies() -> None:
    inbox = Inbox()
    assert inbox.first_author(b"d" * 32, "alice") == "alice"
    assert inbox.first_author(b"d" * 32, "mallory") == "alice"


def test_forget_drops_a_peer() -> None:
    inbox = Inbox()
    inbox.deliver(update("a", 5))
    inbox.forget("a")
    assert inbox.latest() == {}


def test_catch_up_jumps_to_the_median_of_those_ahead_from_the_furthest() -> None:
    freshest = {"a": 12, "b": 20, "c": 15, "d": 3}
    target = catch_up_target(freshest, ["a", "b", "c", "d"], 3, after=2, sources=2)
    assert target == (15, ["c", "b"])


def test_one_liar_far_ahead_does_not_move_us() -> None:
    freshest = {"liar": 10**9, "a": 4, "b": 5}
    assert catch_up_target(freshest, ["liar", "a", "b"], 4, after=2, sources=3) is None


def test_only_reputable_neighbours_count_for_catching_up() -> None:
    freshest = {"x": 50, "y": 50, "a": 9}
    assert catch_up_target(freshest, ["a"], 8, after=2, sources=3) is None
    assert catch_up_target(freshest, ["a", "x"], 8, after=2, sources=3) == (50, ["x"])
