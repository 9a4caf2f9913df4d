"""The dashboard's static files, read from the package once and served by exact name."""

from __future__ import annotations

import functools
from importlib import resources

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
STATIC_PREFIX = "/static/"


@functools.cache
def _files() -> dict[str, tuple[str, bytes]]:
    """Every shipped file by name: (content type, bytes)."""
    folder = resources.files(__package__) / "static"
    files = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = (CONTENT_TYPES[suffix], entry.read_bytes())
    return files


def asset(path: str, *, index: str) -> tuple[str, bytes] | None:
    """Return (content type, body) of the file at URL ``path``, or None.

    ``/`` is the page ``index``; ``/static/NAME`` and ``/favicon.ico`` are shipped files.
    Names are dictionary keys, never joined to a folder, so no path can leave ``static/``.
    """
    if path == "/":
        name = index
    elif path == "/favicon.ico":
        name = "favicon.svg"
    elif path.startswith(STATIC_PREFIX):
        name = path[len(STATIC_PREFIX) :]
    else:
        return None
    return _files().get(name)


__all__ = ["CONTENT_TYPES", "asset"]
