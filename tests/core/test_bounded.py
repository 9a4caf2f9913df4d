"""The one bounded, expiring map: capacity, weight, recency and expiry, all without a clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.core.bounded import BoundedMap


def test_least_recently_used_goes_first_and_peek_does_not_refresh() -> None:
    cache: BoundedMap[str, int] = BoundedMap(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # refreshes a
    assert cache.peek("b") == 2  # does not refresh b
    cache.put("c", 3)
    assert list(cache) == ["a", "c"]
    assert cache.get("b", -1) == -1


def test_setdefault_keeps_the_first_value_and_refreshes_it() -> None:
    cache: BoundedMap[bytes, str] = BoundedMap(2)
    assert cache.setdefault(b"d", "alice") == "alice"
    cache.put(b"e", "x")
    assert cache.setdefault(b"d", "mallory") == "alice"
    cache.put(b"f", "y")
    assert b"d" in cache
    assert b"e" not in cache


def test_weight_budget_evicts_the_oldest_and_refuses_what_cannot_fit() -> None:
    store: BoundedMap[str, bytes] = BoundedMap(100, weigh=len, max_weight=10)
    assert store.put("a", b"1234")
    assert store.put("b", b"5678")
    assert store.put("c", b"90ab")  # 12 > 10: a goes
    assert list(store) == ["b", "c"]
    assert store.total_weight == 8
    assert not store.put("big", b"x" * 11)  # heavier than the budget: refused, nothing evicted
    assert list(store) == ["b", "c"]
    assert store.pop("b") == b"5678"
    assert store.total_weight == 4


def test_an_expired_entry_is_absent_at_now() -> None:
    cache: BoundedMap[str, int] = BoundedMap(8)
    cache.put("short", 1, expires_at=10.0)
    cache.put("long", 2, expires_at=20.0)
    cache.put("forever", 3)
    assert cache.get("short", now=9.9) == 1
    assert cache.get("short", now=10.0) is None  # and dropped
    assert "short" not in cache
    assert cache.setdefault("long", 5, now=25.0) == 5  # expired: replaced
    cache.put("soon", 4, expires_at=30.0)
    assert cache.expire(now=30.0) == 1
    assert sorted(cache) == ["forever", "long"]


@pytest.mark.parametrize(
    ("args", "kwargs"), [((0,), {}), ((2,), {"max_weight": 5}), ((2,), {"weigh": len, "max_weight": 0})]
)
def test_bad_settings_are_refused(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="capacity|weigh|max_weight"):
        BoundedMap(*args, **kwargs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("pgd"), st.integers(0, 20), st.binary(max_size=9))))
def test_bounds_hold_after_any_sequence(ops: list[tuple[str, int, bytes]]) -> None:
    cache: BoundedMap[int, bytes] = BoundedMap(5, weigh=len, max_weight=16)
    for op, key, value in ops:
        if op == "p":
            cache.put(key, value)
        elif op == "g":
            cache.get(key)
        else:
            cache.pop(key)
        assert len(cache) <= 5
        assert cache.total_weight == sum(len(v) for v in cache.values()) <= 16
