"""One bounded, optionally expiring map for every cache that peers can fill.

Anything a peer can make us remember (announcements seen, senders, digests, payloads
served) lives in a :class:`BoundedMap`: at most ``capacity`` entries and, if given,
at most ``max_weight`` in total weight (payload bytes, say), least recently used
evicted first. An entry may carry an expiry time; the map is pure, so time comes in as
the ``now`` argument and an expired entry is simply absent (after hivemind's
``utils/timed_storage.py``, minus the clock).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class BoundedMap(Generic[K, V]):
    """A map of at most ``capacity`` entries (and ``max_weight``), LRU evicted first.

    ``get``, ``setdefault`` and ``put`` make an entry the most recently used; ``peek``
    and iteration do not. With ``weigh``, an entry heavier than ``max_weight`` on its
    own is not stored. Entries put with ``expires_at`` are absent once ``now`` reaches
    it (``now`` defaults to -inf: no expiry check); :meth:`expire` drops them eagerly.
    ``in``, ``len`` and iteration see entries not yet dropped, expired or not.
    """

    __slots__ = ("_items", "_total", "capacity", "max_weight", "weigh")

    def __init__(
        self,
        capacity: int,
        *,
        weigh: Callable[[V], int] | None = None,
        max_weight: int | None = None,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if (weigh is None) != (max_weight is None):
            raise ValueError("weigh and max_weight go together")
        if max_weight is not None and max_weight <= 0:
            raise ValueError(f"max_weight must be positive, got {max_weight}")
        self.capacity = capacity
        self.weigh = weigh
        self.max_weight = max_weight
        self._items: OrderedDict[K, tuple[V, float]] = OrderedDict()  # key -> (value, expires_at)
        self._total = 0

    @overload
    def get(self, key: K, *, now: float = ...) -> V | None: ...
    @overload
    def get(self, key: K, default: D, *, now: float = ...) -> V | D: ...
    def get(self, key: K, default: object = None, *, now: float = -math.inf) -> object:
        """Return the live value for ``key`` (now most recently used) or ``default``."""
        found = self._live(key, now)
        if found is None:
            return default
        self._items.move_to_end(key)
        return found[0]

    def peek(self, key: K, *, now: float = -math.inf) -> V | None:
        """Return the live value for ``key`` without refreshing it, or None."""
        found = self._live(key, now)
        return None if found is None else found[0]

    def put(self, key: K, value: V, *, expires_at: float = math.inf) -> bool:
        """Store ``value`` as the most recent entry, evicting to fit; False if too heavy."""
        self.pop(key)
        weight = self.weigh(value) if self.weigh is not None else 0
        if self.max_weight is not None and weight > self.max_weight:
            return False
        self._items[key] = (value, expires_at)
        self._total += weight
        while len(self._items) > self.capacity or (
            self.max_weight is not None and self._total > self.max_weight
        ):
            self._drop(next(iter(self._items)))
        return True

    def setdefault(self, key: K, value: V, *, now: float = -math.inf) -> V:
        """Return the live value for ``key``, storing ``value`` first if there is none."""
        found = self.get(key, now=now)
        if found is not None or key in self._items:
            return found  # type: ignore[return-value]  # a stored None is a value too
        self.put(key, value)
        return value

    def pop(self, key: K, default: V | None = None) -> V | None:
        """Remove ``key`` and return its value (expired or not), or ``default``."""
        if key not in self._items:
            return default
        return self._drop(key)

    def expire(self, now: float) -> int:
        """Drop every entry expired at ``now``; return how many went."""
        dead = [key for key, (_, expires_at) in self._items.items() if expires_at <= now]
        for key in dead:
            self._drop(key)
        return len(dead)

    @property
    def total_weight(self) -> int:
        return self._total

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def values(self) -> Iterator[V]:
        return (value for value, _ in self._items.values())

    def _live(self, key: K, now: float) -> tuple[V, float] | None:
        found = self._items.get(key)
        if found is not None and found[1] <= now:
            self._drop(key)
            return None
        return found

    def _drop(self, key: K) -> V:
        value, _ = self._items.pop(key)
        if self.weigh is not None:
            self._total -= self.weigh(value)
        return value


__all__ = ["BoundedMap"]
