"""One bounded poll for loopback tests whose other tasks' state has no event to wait on."""

from __future__ import annotations

from collections.abc import Callable

import trio

STEP = 0.01


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, bounded in time and count."""
    for _ in range(int(timeout / STEP)):
        if condition():
            return
        await trio.sleep(STEP)
    raise AssertionError("condition not reached in time")
