"""Drive ``netpeer.py`` processes from a trio test: spawn, command, collect, kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

PEER = Path(__file__).with_name("netpeer.py")
START_TIMEOUT = 30.0  # python + libp2p import is ~1.5 s; 8 at once on 2 cores is slower


class Peer:
    """One netpeer process."""

    def __init__(self, process: trio.Process, options: dict[str, Any], log: Path) -> None:
        self.process = process
        self.options = options
        self.log = log
        self.peer_id = ""
        self.addrs: list[str] = []
        self.announcements: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._ready = trio.Event()
        self._changed = trio.Event()
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_id = 0

    @classmethod
    async def start(cls, nursery: trio.Nursery, log: Path, **options: Any) -> Peer:
        """Spawn a peer and wait (bounded) until it listens."""
        options.setdefault("secret", os.urandom(32).hex())
        process = await trio.lowlevel.open_process(
            [sys.executable, str(PEER), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
        )
        peer = cls(process, options, log)
        nursery.start_soon(peer._read)
        with trio.fail_after(START_TIMEOUT):
            await peer._ready.wait()
        return peer

    async def _read(self) -> None:
        buffer = b""
        assert self.process.stdout is not None
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._dispatch(json.loads(line))
        self._changed.set()

    def _dispatch(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            self.peer_id, self.addrs = message["peer_id"], message["addrs"]
            self._ready.set()
        elif event == "announcement":
            self.announcements.append(message)
        elif event is not None:
            self.events.append(message)
        else:
            self._replies[message["id"]] = message
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> None:
        """Wait until ``condition()`` holds after some message from this peer."""
        with trio.fail_after(timeout):
            while not condition():
                await self._changed.wait()

    async def call(self, cmd: str, *, wait: float = 10.0, **args: Any) -> dict[str, Any]:
        """Send a command and wait at most ``wait`` seconds for its reply."""
        self._next_id += 1
        request_id = self._next_id
        await self.send({"id": request_id, "cmd": cmd, **args})
        await self.wait_for(lambda: request_id in self._replies, wait)
        return self._replies.pop(request_id)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(message).encode() + b"\n")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to this peer's process."""
        if self.process.returncode is None:
            self.process.send_signal(signum)

    async def stop(self) -> None:
        """Ask the peer to quit; kill it if it does not within 5 s."""
        if self.process.returncode is not None:
            return
        self.signal(signal.SIGCONT)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send({"cmd": "quit"})
        with trio.move_on_after(5):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def kill(self) -> None:
        """SIGKILL the peer and reap it."""
        self.process.kill()
        with trio.fail_after(5):
            await self.process.wait()
