"""Reputation: misbehaviour excludes quickly, honest peers are not false positives."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.core.reputation import (
    SEVERE,
    Evidence,
    ReputationBook,
    ReputationConfig,
    ReputationEvent,
)
from p2pfl.errors import ConfigError, DecodeError

CONFIG = ReputationConfig()


def established(book: ReputationBook, peer: str, rounds: int = 10) -> int:
    """Give ``peer`` ``rounds`` accepted rounds; return the next round number."""
    for r in range(rounds):
        book.record(peer, Evidence.ACCEPTED, round=r, reason="ok")
        book.end_round(r)
    return rounds


@pytest.mark.parametrize("evidence", sorted(SEVERE, key=lambda e: e.value))
def test_one_severe_event_excludes_and_bans_even_an_established_peer(evidence: Evidence) -> None:
    book = ReputationBook()
    r = established(book, "p")
    assert book.weight("p") > 0.8
    score = book.record("p", evidence, round=r, reason="garbage")
    assert score < CONFIG.threshold
    assert book.weight("p") == 0.0
    assert book.banned("p", round=r)
    assert book.banned("p", round=r + CONFIG.ban_rounds - 1)
    assert not book.banned("p", round=r + CONFIG.ban_rounds)


def test_banned_peer_gets_weight_zero_until_the_ban_ends_even_if_it_behaves() -> None:
    config = ReputationConfig(ban_rounds=3, severe_penalty=0.5)  # mild penalty: only the ban
    book = ReputationBook(config)
    r = established(book, "p")
    book.record("p", Evidence.INVALID_SIGNATURE, round=r)
    weights = []
    for rr in range(r, r + 8):
        book.record("p", Evidence.ACCEPTED, round=rr)
        weights.append(book.weight("p"))
        book.end_round(rr)
    assert weights[:3] == [0.0, 0.0, 0.0]
    assert all(w > 0 for w in weights[3:])


@pytest.mark.parametrize("amount", [0.5, 0.6, 0.75, 0.9])
def test_consistently_clipped_peer_falls_below_threshold_within_five_rounds(amount: float) -> None:
    book = ReputationBook()
    below_at = None
    for r in range(5):
        book.record("p", Evidence.CLIPPED, round=r, amount=amount, reason="clipped")
        if below_at is None and book.weight("p") == 0.0:
            below_at = r
        book.end_round(r)
    assert below_at is not None
    for r in range(5, 30):  # and stays there
        book.record("p", Evidence.CLIPPED, round=r, amount=amount)
        assert book.weight("p") == 0.0
        book.end_round(r)


@pytest.mark.parametrize("start", [3, 10])
def test_honest_peer_recovers_from_one_outlier_round(start: int) -> None:
    book = ReputationBook()
    r = established(book, "p", rounds=start)
    book.record("p", Evidence.OUTLIER, round=r, amount=1.0, reason="far from the others")
    book.end_round(r)
    for rr in range(r + 1, r + 4):
        book.record("p", Evidence.ACCEPTED, round=rr)
        book.end_round(rr)
    assert book.weight("p") > CONFIG.threshold
    assert book.score("p") > 0.5


def test_honest_peer_with_occasional_mild_clipping_is_never_excluded() -> None:
    book = ReputationBook()
    for r in range(200):
        if r % 3 == 0:
            book.record("p", Evidence.CLIPPED, round=r, amount=0.3)
        else:
            book.record("p", Evidence.ACCEPTED, round=r)
        if r % 17 == 0:
            book.record("p", Evidence.NO_SHOW, round=r)  # a missed deadline now and then
        assert book.weight("p") >= CONFIG.threshold, r
        book.end_round(r)


def test_far_but_honest_neighbour_clipped_a_little_every_round_stays_in() -> None:
    book = ReputationBook()
    for r in range(100):
        book.record("p", Evidence.CLIPPED, round=r, amount=0.3)
        book.end_round(r)
    assert book.weight("p") > 0.0


def test_scores_decay_toward_the_prior_without_evidence() -> None:
    book = ReputationBook()
    r = established(book, "good")
    book.record("bad", Evidence.OUTLIER, round=r, amount=1.0)
    high, low = book.score("good"), book.score("bad")
    for rr in range(r, r + 60):
        book.end_round(rr)
    assert high > book.score("good") > CONFIG.prior - 1e-9
    assert low < book.score("bad") < CONFIG.prior + 1e-9
    assert book.score("good") == pytest.approx(CONFIG.prior, abs=0.01)
    assert book.score("bad") == pytest.approx(CONFIG.prior, abs=0.01)


def test_end_round_applies_forgetting_once_per_round_and_per_skipped_round() -> None:
    once, twice, skipping = ReputationBook(), ReputationBook(), ReputationBook()
    for book in (once, twice, skipping):
        book.record("p", Evidence.OUTLIER, round=0)
        book.end_round(0)
    once.end_round(1)
    twice.end_round(1)
    twice.end_round(1)
    assert once.score("p") == twice.score("p")
    skipping.end_round(3)
    once.end_round(2)
    once.end_round(3)
    assert skipping.score("p") == pytest.approx(once.score("p"))


def test_newcomer_is_capped_until_enough_good_rounds() -> None:
    book = ReputationBook()
    assert book.score("stranger") == CONFIG.prior
    for r in range(CONFIG.newcomer_rounds - 1):
        for _ in range(5):  # many events in one round count as one good round
            book.record("p", Evidence.ACCEPTED, round=r)
        assert book.score("p") == CONFIG.newcomer_cap
        book.end_round(r)
    book.record("p", Evidence.ACCEPTED, round=CONFIG.newcomer_rounds - 1)
    assert book.score("p") > CONFIG.newcomer_cap


def test_unknown_peer_prior_is_capped_as_newcomer() -> None:
    book = ReputationBook(ReputationConfig(prior=0.8, newcomer_cap=0.6))
    assert book.score("nobody") == 0.6
    assert book.weight("nobody") == 0.6


def test_history_keeps_every_reason_and_is_bounded() -> None:
    book = ReputationBook(ReputationConfig(history_length=4))
    for r in range(6):
        book.record("p", Evidence.ACCEPTED, round=r, reason=f"round {r} fine")
    book.record("p", Evidence.REPLAY, round=6, reason="replayed round 2")
    events = book.history("p")
    assert [e.reason for e in events] == [
        "round 3 fine",
        "round 4 fine",
        "round 5 fine",
        "replayed round 2",
    ]
    assert events[-1] == ReputationEvent(
        6, "p", Evidence.REPLAY, 1.0, book.score("p"), events[-1].reason
    )
    assert book.history("nobody") == ()
    assert book.peers() == ("p",)


def test_evidence_is_ordered_by_severity() -> None:
    scores = {}
    for evidence in Evidence:
        book = ReputationBook()
        established(book, "p", rounds=5)
        scores[evidence] = book.record("p", evidence, round=5)
    assert scores[Evidence.ACCEPTED] > scores[Evidence.NO_SHOW] > scores[Evidence.STALE]
    assert scores[Evidence.DUPLICATE_OF_OTHER] > scores[Evidence.REPLAY]
    assert scores[Evidence.STALE] > scores[Evidence.REPLAY] > scores[Evidence.INVALID_FORMAT]
    half = ReputationBook()
    established(half, "p", rounds=5)
    assert half.record("p", Evidence.OUTLIER, round=5, amount=0.5) > scores[Evidence.OUTLIER]


def test_amount_is_clamped_and_nan_counts_as_nothing() -> None:
    book, same = ReputationBook(), ReputationBook()
    assert book.record("p", Evidence.OUTLIER, round=0, amount=7.0) == same.record(
        "p", Evidence.OUTLIER, round=0, amount=1.0
    )
    before = book.score("p")
    assert book.record("p", Evidence.OUTLIER, round=0, amount=math.nan) == before


def test_record_round_trip_through_json_preserves_everything() -> None:
    book = ReputationBook()
    r = established(book, "honest", rounds=4)
    book.record("liar", Evidence.EQUIVOCATION, round=r, reason="two digests in round 4")
    book.record("slow", Evidence.STALE, round=r, reason="round 1 in round 4")
    book.end_round(r)
    record = json.loads(json.dumps(book.to_record()))
    again = ReputationBook.from_record(record, CONFIG)
    assert again.peers() == book.peers()
    for peer in book.peers():
        assert again.score(peer) == book.score(peer)
        assert again.weight(peer) == book.weight(peer)
        assert again.history(peer) == book.history(peer)
    assert again.banned("liar", round=r + 1)
    again.end_round(r)  # already applied: no second decay
    assert again.score("honest") == book.score("honest")


def distrusted(
    book: ReputationBook, peer: str, start: int, rounds: int, evidence: Evidence = Evidence.OUTLIER
) -> list[str]:
    """Record ``rounds`` rounds of ``evidence`` for ``peer``; return every peer dropped."""
    dropped = []
    for r in range(start, start + rounds):
        book.record(peer, evidence, round=r, reason="bad")
        dropped += book.end_round(r)
    return dropped


def test_a_neighbour_at_weight_zero_for_drop_after_rounds_is_dropped_once_score_kept() -> None:
    book, twin = ReputationBook(ReputationConfig(drop_after=4)), ReputationBook()
    r = established(book, "p", rounds=3)
    established(twin, "p", rounds=3)
    at_zero, dropped_in = 0, None
    for rr in range(r, r + 20):
        book.record("p", Evidence.OUTLIER, round=rr, reason="far")
        twin.record("p", Evidence.OUTLIER, round=rr, reason="far")
        twin.end_round(rr)
        if dropped := book.end_round(rr):
            assert dropped == ["p"]
            dropped_in = rr
            break
        at_zero += book.weight("p") == 0
    assert at_zero == 3
    assert dropped_in is not None
    assert book.score("p") == twin.score("p")  # the drop leaves the score alone
    assert book.banned("p", round=dropped_in + 1)
    assert not book.banned("p", round=dropped_in + CONFIG.ban_rounds)
    assert distrusted(book, "p", dropped_in + 1, 10) == []  # banned: not dropped again


@pytest.mark.parametrize("late", [Evidence.NO_SHOW, Evidence.STALE])
def test_late_or_silent_peers_are_not_dropped(late: Evidence) -> None:
    # A crashed or catching-up honest node is late, not hostile: it keeps its place.
    book = ReputationBook(ReputationConfig(drop_after=3))
    distrusted(book, "p", 0, 2)
    assert book.weight("p") == 0
    assert distrusted(book, "p", 2, 20, evidence=late) == []
    assert not book.banned("p", round=22)


def test_silent_rounds_between_discarded_ones_do_not_reset_the_count() -> None:
    # An overloaded observer does not fetch every update in time: gaps are no recovery.
    book = ReputationBook(ReputationConfig(drop_after=4))
    dropped = []
    for r in range(0, 40, 2):
        book.record("p", Evidence.OUTLIER, round=r, reason="far")
        dropped += book.end_round(r)
        dropped += book.end_round(r + 1)  # nothing from it in the odd rounds
        if dropped:
            break
    assert dropped == ["p"]


def test_recovery_resets_the_count() -> None:
    book = ReputationBook(ReputationConfig(drop_after=10))
    assert distrusted(book, "p", 0, 4) == []
    assert book.weight("p") == 0
    for r in range(4, 20):  # good behaviour lifts it back over the threshold
        book.record("p", Evidence.ACCEPTED, round=r)
        assert book.end_round(r) == [], f"dropped in round {r} while recovering"
        if book.weight("p") > 0:
            break
    assert book.weight("p") > 0
    assert book.to_record()["peers"]["p"]["idle_rounds"] == 0


def test_drop_after_zero_never_drops() -> None:
    book = ReputationBook(ReputationConfig(drop_after=0))
    assert distrusted(book, "p", 0, 30) == []
    assert book.weight("p") == 0
    assert not book.banned("p", round=30)


def test_checkpoint_keeps_the_idle_count_and_loads_records_without_it() -> None:
    book = ReputationBook(ReputationConfig(drop_after=20))
    assert distrusted(book, "p", 0, 6) == []
    record = json.loads(json.dumps(book.to_record()))
    idle = record["peers"]["p"]["idle_rounds"]
    assert idle >= 1
    again = ReputationBook.from_record(record, book.config)
    assert distrusted(again, "p", 6, 20 - idle - 1) == []
    assert distrusted(again, "p", 25 - idle, 1) == ["p"]
    for key in ("idle_rounds", "active_round"):  # a checkpoint written before they existed
        del record["peers"]["p"][key]
    assert ReputationBook.from_record(record, book.config).to_record()["peers"]["p"]["idle_rounds"] == 0


def hover(book: ReputationBook, peer: str, start: int, rounds: int, amount: float) -> list[float]:
    """Record ``rounds`` rounds clipped by ``amount``; return the weight after each."""
    weights = []
    for r in range(start, start + rounds):
        book.record(peer, Evidence.CLIPPED, round=r, amount=amount)
        book.end_round(r)
        weights.append(book.weight(peer))
    return weights


def test_a_flagged_peer_comes_back_only_at_the_readmit_score() -> None:
    config = ReputationConfig(readmit=0.4, drop_after=0)
    book, never_out = ReputationBook(config), ReputationBook(config)
    distrusted(book, "p", 0, 3)
    assert book.weight("p") == 0
    # Clipped by 0.35 each round, a score settles between the threshold and 0.4.
    hovering = hover(book, "p", 3, 40, amount=0.35)
    settled = book.score("p")
    assert config.threshold < settled < config.readmit
    assert hovering == [0.0] * 40, "a flagged peer hovering over the threshold stays out"
    assert hover(never_out, "p", 0, 40, amount=0.35)[-1] == pytest.approx(never_out.score("p"))
    assert never_out.weight("p") > 0, "a peer that never fell below the threshold keeps its weight"
    for r in range(43, 60):  # earns its way back
        book.record("p", Evidence.ACCEPTED, round=r)
        book.end_round(r)
        if book.weight("p") > 0:
            break
    assert book.weight("p") >= config.readmit


@pytest.mark.parametrize("setting", [{"readmit": 0.3}, {"full_weight_at": 0.3}, {"full_weight_at": 0.1}])
def test_readmit_or_full_weight_at_or_below_the_threshold_changes_nothing(setting: dict) -> None:
    plain = ReputationBook(ReputationConfig(drop_after=0))
    low = ReputationBook(ReputationConfig(**setting, drop_after=0))
    for book in (plain, low):
        distrusted(book, "p", 0, 3)
    assert hover(plain, "p", 3, 40, amount=0.35) == hover(low, "p", 3, 40, amount=0.35)
    assert plain.weight("p") > 0


def test_weight_rises_from_zero_at_the_threshold_to_the_score_at_full_weight_at() -> None:
    config = ReputationConfig(threshold=0.2, full_weight_at=0.5, drop_after=0)
    book, step = ReputationBook(config), ReputationBook(ReputationConfig(threshold=0.2, drop_after=0))
    seen = []
    for r in range(40):  # clipped by 0.5 each round: the score falls from 0.5 toward 0.2
        for b in (book, step):
            b.record("p", Evidence.CLIPPED, round=r, amount=0.5)
            b.end_round(r)
        score = book.score("p")
        assert step.weight("p") == (score if score >= 0.2 else 0.0)
        expected = 0.0 if score < 0.2 else score * min(1.0, (score - 0.2) / 0.3)
        assert book.weight("p") == pytest.approx(expected)
        seen.append(score)
    assert 0.2 < min(seen) < 0.25, "the scores sat on the ramp..."
    assert max(seen) > 0.3, "...from its upper part down"
    assert 0 < book.weight("p") < step.weight("p") / 4, "just above the threshold: little weight"
    for b in (book, step):  # above full_weight_at: the score itself, as without the ramp
        for r in range(40, 60):
            b.record("p", Evidence.ACCEPTED, round=r)
            b.end_round(r)
    assert book.weight("p") == step.weight("p") == book.score("p") > 0.5


def test_checkpoint_keeps_a_flagged_peer_out() -> None:
    book = ReputationBook(ReputationConfig(readmit=0.4, drop_after=0))
    distrusted(book, "p", 0, 3)
    hover(book, "p", 3, 40, amount=0.35)
    record = json.loads(json.dumps(book.to_record()))
    assert record["peers"]["p"]["out"] is True
    assert ReputationBook.from_record(record, book.config).weight("p") == 0
    del record["peers"]["p"]["out"]  # a checkpoint written before it existed
    assert ReputationBook.from_record(record, book.config).weight("p") > 0


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda rec: rec.update(v=99),
        lambda rec: rec.pop("peers"),
        lambda rec: rec.update(peers=[]),
        lambda rec: rec.update(now="soon"),
        lambda rec: rec["peers"]["p"].update(good=-1.0),
        lambda rec: rec["peers"]["p"].update(bad=math.inf),
        lambda rec: rec["peers"]["p"].update(good_rounds=True),
        lambda rec: rec["peers"]["p"].update(banned_until=1.5),
        lambda rec: rec["peers"]["p"].update(idle_rounds=-1),
        lambda rec: rec["peers"]["p"].update(active_round="now"),
        lambda rec: rec["peers"]["p"].update(history="none"),
        lambda rec: rec["peers"]["p"]["history"].append([1, "hacked", 1.0, 0.5, ""]),
        lambda rec: rec["peers"]["p"]["history"].append([1, "accepted", 2.0, 0.5, ""]),
        lambda rec: rec["peers"]["p"]["history"].append([1, "accepted", 1.0]),
        lambda rec: rec["peers"]["p"]["history"].append([1, "accepted", "1.0", 0.5, ""]),
        lambda rec: rec["peers"]["p"]["history"].append([1, "accepted", 1.0, 0.5, None]),
        lambda rec: rec["peers"].update({7: {}}),
    ],
)
def test_from_record_rejects_malformed_records(corrupt) -> None:
    book = ReputationBook()
    book.record("p", Evidence.ACCEPTED, round=0, reason="ok")
    record = book.to_record()
    corrupt(record)
    with pytest.raises(DecodeError):
        ReputationBook.from_record(record, CONFIG)


def test_from_record_rejects_non_mappings() -> None:
    with pytest.raises(DecodeError):
        ReputationBook.from_record([], CONFIG)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prior": 0.0}, "reputation.prior"),
        ({"prior": 1.5}, "reputation.prior"),
        ({"forgetting": 1.1}, "reputation.forgetting"),
        ({"forgetting": -0.1}, "reputation.forgetting"),
        ({"threshold": 1.0}, "reputation.threshold"),
        ({"readmit": 1.0}, "reputation.readmit"),
        ({"full_weight_at": 1.0}, "reputation.full_weight_at"),
        ({"full_weight_at": -0.1}, "reputation.full_weight_at"),
        ({"newcomer_cap": 2.0}, "reputation.newcomer_cap"),
        ({"newcomer_rounds": -1}, "reputation.newcomer_rounds"),
        ({"ban_rounds": 2.5}, "reputation.ban_rounds"),
        ({"clipped_strength": math.nan}, "reputation.clipped_strength"),
        ({"outlier_strength": "high"}, "reputation.outlier_strength"),
        ({"prior_strength": 0.0}, "reputation.prior_strength"),
        ({"history_length": 0}, "reputation.history_length"),
    ],
)
def test_bad_config_raises_config_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ReputationConfig(**kwargs)


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(list(Evidence)),
        st.floats(0.0, 1.0),
        st.booleans(),  # end the round after this event
    ),
    max_size=60,
)


@given(events=EVENTS)
@settings(max_examples=60, deadline=None)
def test_scores_and_weights_stay_well_formed_and_survive_a_checkpoint(events) -> None:
    book, r = ReputationBook(), 0
    for peer, evidence, amount, close in events:
        score = book.record(peer, evidence, round=r, amount=amount)
        assert 0.0 <= score <= 1.0
        assert score == book.score(peer)
        weight = book.weight(peer)
        assert weight == 0.0 or CONFIG.threshold <= weight == score
        if evidence in SEVERE and amount > 0:
            assert weight == 0.0
        if close:
            book.end_round(r)
            r += 1
    again = ReputationBook.from_record(json.loads(json.dumps(book.to_record())), CONFIG)
    for peer in book.peers():
        assert again.score(peer) == book.score(peer)
        assert again.weight(peer) == book.weight(peer)
