"""Process-wide tweaks for the data plane: opt-in, they change the whole process.

Not libp2p patches (no version pin): glibc malloc thresholds and an environment variable
py-libp2p's Yamux reads. An embedder calls :func:`apply_process_tweaks` if it wants them;
the daemon and the test network's node processes do. Figures as in
``p2pfl.net.patches.dataplane`` (ms of CPU per MB, client / holder, all knobs but this one):

``yamux_release_on_read`` (without: 3.1 / 1.6)
    ``PY_YAMUX_RELEASE_ON_READ=0`` (only if unset): credit goes back in batched window
    updates instead of on every partial read.
``malloc`` (without: 3.8 / 1.6)
    glibc ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` and ``mallopt(M_TRIM_THRESHOLD,
    256 MiB)``: with big frames, buffers just above the dynamic mmap threshold are
    otherwise mapped and unmapped on every frame (minor page faults). Skipped silently
    where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 256 << 20

_applied: list[str] = []


def _release_on_read() -> bool:
    # Read by yamux at call time; an explicit setting by the operator wins.
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
    return True


def _malloc() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok


TWEAKS: dict[str, Callable[[], bool]] = {
    "yamux_release_on_read": _release_on_read,
    "malloc": _malloc,
}
"""Every process tweak by name."""


def apply_process_tweaks(names: Iterable[str] | None = None) -> tuple[str, ...]:
    """Apply the named tweaks (default: all), each at most once; return those in effect."""
    wanted = list(TWEAKS) if names is None else list(names)
    unknown = set(wanted) - set(TWEAKS)
    if unknown:
        raise ValueError(f"unknown process tweaks {sorted(unknown)}; known: {sorted(TWEAKS)}")
    for name in wanted:
        if name not in _applied and TWEAKS[name]():
            _applied.append(name)
    logger.debug("process tweaks in effect: %s", _applied)
    return tuple(_applied)


__all__ = ["TWEAKS", "apply_process_tweaks"]
