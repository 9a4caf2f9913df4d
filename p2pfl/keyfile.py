"""The node key file: read only if private, written atomically with mode 0600.

Bytes in, bytes out (the PEM text); :class:`p2pfl.core.crypto.Identity` parses and
produces it, so ``core`` does no file I/O. Config layer: imports only ``errors``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from p2pfl.errors import KeyFileError

# A PEM secp256k1 key is ~230 bytes; cap reads so a wrong path cannot make us slurp a disk.
_MAX_KEY_FILE_BYTES = 64 * 1024


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Return the ASCII contents of a key file only its owner can read.

    Raises:
        KeyFileError: missing, unreadable, not a regular file, too large, binary, or
            readable by group/others (the message names the ``chmod`` that fixes it).
    """
    return _read_private_file(Path(path))


def write_key_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace the key file at ``path`` with ``data`` (mode 0600, atomic, durable).

    Raises:
        KeyFileError: the directory or the file cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomically(path, data)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot write key file ({exc.strerror or exc})") from None
    _fsync_directory(path.parent)


def _read_private_file(path: Path) -> bytes:
    """Read a small file that only its owner may read; raise KeyFileError otherwise."""
    try:
        # O_NONBLOCK: a FIFO planted at the key path must not hang the node at start-up.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot open key file ({exc.strerror})") from None
    try:
        # fstat on the open descriptor: the mode we check is that of the file we read.
        _check_private(path, os.fstat(fd))
        data = _read_at_most(fd, _MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: too large to be a key file")
    if not data.isascii():
        raise KeyFileError(f"{path}: not a PEM private key (binary data)")
    return data


def _read_at_most(fd: int, limit: int) -> bytes:
    """Read up to ``limit`` bytes from ``fd``, stopping early at end of file."""
    chunks: list[bytes] = []
    while limit > 0 and (chunk := os.read(fd, limit)):
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def _check_private(path: Path, info: os.stat_result) -> None:
    """Raise KeyFileError unless ``info`` is a regular file only its owner can access."""
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: key file is not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: key file is accessible by group/others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); fix it with `chmod 600 {path}`"
        )


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` via a 0600 temp file, fsync and rename."""
    # mkstemp opens with O_CREAT | O_EXCL and mode 0o600: the secret is never readable by
    # others, not even for an instant, and a crash leaves the old file or the new one.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["read_key_file", "write_key_file"]
