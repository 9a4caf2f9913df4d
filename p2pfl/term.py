"""Terminal helpers: value formatting, plain-text tables, and a block redrawn in place.

A leaf (no p2pfl imports) so that both `sim` and `cli` render with it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TextIO


def fmt_pct(value: float | None) -> str:
    """Format a fraction in [0, 1] as a percentage; '-' when unknown."""
    return "-" if value is None else f"{100 * value:.1f}%"


def fmt_float(value: float | None, digits: int = 3) -> str:
    """Format a float with ``digits`` decimals; '-' when unknown."""
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_bytes(count: float | None) -> str:
    """Format a byte count with a binary-free, human unit (kB, MB, GB)."""
    if count is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def fmt_duration(seconds: float) -> str:
    """Format seconds as m:ss (or h:mm:ss)."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, align: str = "") -> str:
    """Lay out ``rows`` under ``headers`` in columns separated by two spaces.

    Args:
        headers: column titles.
        rows: cell texts, one sequence per row, as long as ``headers``.
        align: one letter per column, ``l`` or ``r`` (default: left).
    """
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    align = align.ljust(len(headers), "l")

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if a == "r" else cell.ljust(width)
            for cell, width, a in zip(cells, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


class LiveBlock:
    """A block of lines redrawn in place on a terminal (ANSI cursor movement)."""

    def __init__(self, stream: TextIO) -> None:
        """Draw on ``stream``, which must be a terminal."""
        self._stream = stream
        self._height = 0

    def update(self, text: str) -> None:
        """Replace the previously drawn block with ``text``."""
        width = max(20, shutil.get_terminal_size().columns - 1)
        # Lines longer than the terminal would wrap and break the line count we move back.
        lines = [line[:width] for line in text.splitlines()]
        if self._height:
            # Cursor to the start of the block's first line, then clear to end of screen.
            self._stream.write(f"\x1b[{self._height}F\x1b[J")
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()
        self._height = len(lines)

    def clear(self) -> None:
        """Erase the drawn block so other output can take its place."""
        if self._height:
            self._stream.write(f"\x1b[{self._height}F\x1b[J")
            self._stream.flush()
        self._height = 0

    def release(self) -> None:
        """Keep what is drawn; later output goes below it."""
        self._height = 0


__all__ = ["LiveBlock", "fmt_bytes", "fmt_duration", "fmt_float", "fmt_pct", "table"]

