"""``eager_locks``: the per-stream and per-connection locks of the data path take no turn when free.

In trio, ``async with lock`` is a checkpoint even when the lock is free: the task goes
back to the scheduler (a pass of its run loop, with an epoll poll) before it may enter.
py-libp2p 0.8.1 takes such locks several times for every frame: a stream's state lock
on each ``NetStream`` read and write, Yamux's stream write lock and window lock on each
write and read, the connection's write lock on each frame, the TCP stream's read and
write locks. Session 9 counted 48 lock acquisitions and 36 task reschedules per small
pull over one long-lived stream (``benchmarks/bench_small_pull.py``, both ends).

Patched: those locks are :class:`EagerLock` / :class:`EagerSemaphore`, which enter at
once when free and wait, as trio's do, when held. Mutual exclusion is unchanged (a held
lock still queues its waiters in FIFO order); what goes is the scheduler turn on the
uncontended path, which trio documents as a checkpoint. Every operation these locks
guard still reaches a real checkpoint: each socket send and each wait for data yields.
Same bytes on the wire.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import trio


class EagerLock:
    """A :class:`trio.Lock` whose ``acquire`` does not yield when the lock is free."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        """Take the lock: at once if free, else wait for it as :meth:`trio.Lock.acquire`."""
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def statistics(self) -> Any:
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()


class EagerSemaphore:
    """A :class:`trio.Semaphore` whose ``acquire`` does not yield when a token is free."""

    __slots__ = ("_semaphore",)

    def __init__(self, value: int) -> None:
        self._semaphore = trio.Semaphore(value)

    @property
    def value(self) -> int:
        return self._semaphore.value

    async def acquire(self) -> None:
        try:
            self._semaphore.acquire_nowait()
        except trio.WouldBlock:
            await self._semaphore.acquire()

    def acquire_nowait(self) -> None:
        self._semaphore.acquire_nowait()

    def release(self) -> None:
        self._semaphore.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._semaphore.release()


def _after_init(cls: Any, swap: Any) -> None:
    stock = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        stock(self, *args, **kwargs)
        swap(self)

    cls.__init__ = init


def eager_locks() -> None:
    """Give new NetStreams, Yamux streams and connections, and TCP streams eager locks."""
    from libp2p.io.trio import TrioTCPStream
    from libp2p.network.stream.net_stream import NetStream
    from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

    def net_stream(self: Any) -> None:
        self._state_lock = EagerLock()

    def yamux_stream(self: Any) -> None:
        self.window_lock = EagerLock()
        self.rw_lock._writer_lock = EagerSemaphore(1)

    def yamux(self: Any) -> None:
        self._write_lock = EagerLock()
        self.streams_lock = EagerLock()

    def tcp(self: Any) -> None:
        self.read_lock, self.write_lock = EagerLock(), EagerLock()

    for cls, swap in ((NetStream, net_stream), (YamuxStream, yamux_stream), (Yamux, yamux), (TrioTCPStream, tcp)):
        _after_init(cls, swap)


__all__ = ["EagerLock", "EagerSemaphore", "eager_locks"]
