"""Deterministic task scheduling for a simulation run.

trio runs the tasks that became runnable together (e.g. nodes whose timers fire at one
simulated instant) in an order drawn from a private, unseeded random generator, and
breaks ties between equal deadlines by object address. Under a mock clock many things
happen at one instant, so that order decides who aggregates what first, and a seed
gave several outcomes. trio has a switch for this, used by its Hypothesis plugin:
each batch is sorted by task creation order, then shuffled by its generator, which we
seed from the run's seed. Every task switch is then a function of the seed alone.

The switch is private to trio (``trio._core._run``, checked with trio 0.2x); if it is
missing, :func:`deterministic_scheduling` raises rather than silently running
non-deterministically.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

from trio._core import _run as trio_run

_SWITCH = "_ALLOW_DETERMINISTIC_SCHEDULING"


@contextlib.contextmanager
def deterministic_scheduling(seed: int) -> Iterator[None]:
    """Within the block, trio schedules a batch of runnable tasks as a function of ``seed``.

    Not reentrant across threads: one ``trio.run`` per process at a time (as the
    simulator runs). The previous setting and generator state are restored on exit.

    Raises:
        RuntimeError: this trio version has no deterministic-scheduling switch.
    """
    if not hasattr(trio_run, _SWITCH) or not hasattr(trio_run, "_r"):
        raise RuntimeError("this trio has no deterministic scheduling switch; pin trio")
    before, state = getattr(trio_run, _SWITCH), trio_run._r.getstate()
    digest = hashlib.sha256(f"p2pfl-sim-schedule/{seed}".encode()).digest()
    setattr(trio_run, _SWITCH, True)
    trio_run._r.seed(int.from_bytes(digest[:8], "little"))
    try:
        yield
    finally:
        setattr(trio_run, _SWITCH, before)
        trio_run._r.setstate(state)


__all__ = ["deterministic_scheduling"]
