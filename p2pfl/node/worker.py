"""Where a node's blocking work runs: a worker thread (daemon) or inline (mock clock)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class Worker:
    """Run learning, encoding and checkpoints off the event loop, one at a time.

    Simulations under a mock clock run them inline (``offload=False``): a thread would
    let the clock jump. Also counts the CPU spent per round: learning (what :meth:`timed`
    runs: training and the node's own evaluation) and everything else it runs (decoding,
    the defence's probe passes, aggregation, encoding, checkpoints).
    """

    def __init__(self, *, offload: bool) -> None:
        """Offload to one worker thread, or run inline."""
        self._offload = offload
        self._limiter = trio.CapacityLimiter(1)
        self._learning_cpu = 0.0  # CPU seconds of training and evaluation this round
        self._worker_cpu = 0.0  # CPU seconds of everything run here this round, learning included

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Return ``fn(*args, **kwargs)``, computed off the event loop when offloading."""
        if not self._offload:
            return self._counted(fn, *args, **kwargs)
        return await trio.to_thread.run_sync(lambda: self._counted(fn, *args, **kwargs), limiter=self._limiter)

    def _counted(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self._worker_cpu += time.thread_time() - started

    def timed(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` (learning) and add its CPU time (of this thread) to the round's."""
        started = time.thread_time()
        try:
            return fn(*args)
        finally:
            self._learning_cpu += time.thread_time() - started

    def take_cpu(self) -> tuple[float, float]:
        """Return (learning, other work) CPU seconds counted since the last call; restart from 0."""
        learning, other = self._learning_cpu, max(0.0, self._worker_cpu - self._learning_cpu)
        self._learning_cpu = self._worker_cpu = 0.0
        return learning, other
