"""One strict reader for the canonical CBOR subset that peers send us.

Used by the codec manifest (:mod:`.codec`) and by signed headers and announcements
(:mod:`.envelope`). It reads heads and scalars from untrusted bytes and refuses, with a
:class:`~p2pfl.errors.DecodeError` naming what it found, everything outside canonical
CBOR: indefinite lengths, reserved or overlong (non-shortest) heads, truncation, and any
major type the caller did not ask for (tags, floats, simple values, nesting). Each caller
decides which items it expects; ``cbor2`` never sees bytes this reader did not accept.
"""

from __future__ import annotations

from p2pfl.errors import DecodeError

UINT, NEGINT, BYTES, TEXT, ARRAY, MAP, TAG, SIMPLE = range(8)

_MAJOR_NAMES = {
    UINT: "unsigned integer",
    NEGINT: "negative integer",
    BYTES: "byte string",
    TEXT: "text string",
    ARRAY: "array",
    MAP: "map",
    TAG: "CBOR tag",
}
_SIMPLE_NAMES = {20: "bool", 21: "bool", 22: "null", 23: "undefined", 25: "float",
                 26: "float", 27: "float", 31: "break"}  # fmt: skip

Scalar = int | str | bytes


class StrictReader:
    """Read canonical CBOR items from ``data``; errors are prefixed with ``where``."""

    __slots__ = ("data", "pos", "where")

    def __init__(self, data: bytes, where: str) -> None:
        self.data = data
        self.pos = 0
        self.where = where

    def fail(self, problem: str) -> DecodeError:
        return DecodeError(f"{self.where}: {problem}")

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def head(self, what: str, major: int | None = None) -> tuple[int, int]:
        """Read one head (of type ``major`` if given); return its type and argument."""
        if self.pos >= len(self.data):
            raise self.fail(f"truncated, expected {what}")
        initial = self.data[self.pos]
        found, info = initial >> 5, initial & 31
        if info == 31 and BYTES <= found <= MAP:
            raise self.fail(f"indefinite-length {_MAJOR_NAMES[found]} in {what}")
        if major is not None and found != major:
            raise self.fail(f"expected {what} ({_MAJOR_NAMES[major]}), found {kind(found, info)}")
        self.pos += 1
        if info < 24:
            return found, info
        if info > 27:
            raise self.fail(f"malformed head (additional info {info}) in {what}")
        size = 1 << (info - 24)
        value = int.from_bytes(self.take(size, what), "big")
        if value < (24 if size == 1 else 1 << (4 * size)):
            raise self.fail(f"non-canonical (overlong) head in {what}")
        return found, value

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(f"truncated {what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, what: str) -> int:
        return self.head(what, UINT)[1]

    def array(self, what: str, max_items: int, items: str) -> int:
        count = self.head(what, ARRAY)[1]
        if count > max_items:
            raise self.fail(f"too many {items} in {what}: {count} > {max_items}")
        return count

    def text(self, what: str, max_bytes: int) -> str:
        length = self.head(what, TEXT)[1]
        if length > max_bytes:
            raise self.fail(f"{what} too long: {length} > {max_bytes} bytes")
        return self._utf8(self.take(length, what), what)

    def scalar(self, what: str) -> Scalar:
        """Read an unsigned or negative integer, a byte string or a text string."""
        # Hot path (every announcement's fields): short heads are read inline.
        data, pos = self.data, self.pos
        if pos < len(data) and (initial := data[pos]) >> 5 > TEXT:
            raise self.fail(f"{kind(initial >> 5, initial & 31)} not allowed in {what}")
        if pos < len(data) and data[pos] & 31 < 24:
            major, arg = data[pos] >> 5, data[pos] & 31
            self.pos = pos + 1
        else:
            major, arg = self.head(what)
        if major == UINT:
            return arg
        if major == NEGINT:
            return -1 - arg
        if major == BYTES:
            return self.take(arg, what)
        return self._utf8(self.take(arg, what), what)

    def _utf8(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def finish(self) -> None:
        """Refuse bytes after the last item read."""
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} trailing bytes after it")


def kind(major: int, info: int) -> str:
    """Name a CBOR item by its major type (and, for simple values, its additional info)."""
    return _MAJOR_NAMES.get(major) or _SIMPLE_NAMES.get(info, "simple value")


__all__ = ["ARRAY", "BYTES", "MAP", "TEXT", "UINT", "Scalar", "StrictReader", "kind"]
