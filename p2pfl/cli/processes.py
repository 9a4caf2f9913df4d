"""Child processes of a test network: started in their own process groups, never outliving us.

Also the command line and environment of a node daemon process, and reading a log's tail.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO


class NodeProcesses:
    """Child processes, each in its own process group, that never outlive this object.

    Use as a context manager: leaving it (normally, by exception, Ctrl-C) stops every
    group with SIGTERM, then SIGKILL after ``grace`` seconds. An ``atexit`` hook covers
    paths that skip ``__exit__``.
    """

    def __init__(self, grace: float = 10.0) -> None:
        """Stop children with SIGTERM, then SIGKILL after ``grace`` seconds."""
        self.grace = grace
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed = 0  # processes that needed SIGKILL when the context closed
        self._logs: list[IO[bytes]] = []

    def __enter__(self) -> NodeProcesses:
        atexit.register(self.stop_all)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.killed = self.stop_all()
        atexit.unregister(self.stop_all)

    def spawn(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new process group, stdout and stderr to ``log_path``."""
        log = log_path.open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # own group: Ctrl-C on the terminal reaches only us
        )
        self.procs.append(proc)
        return proc

    def exited(self, proc: subprocess.Popen[bytes]) -> int | None:
        """Return the exit code of ``proc`` if it has exited, without reaping it.

        Not reaping keeps its pid (= its process group id) reserved, so a later
        ``killpg`` can never hit an unrelated group that reused the number.
        """
        if proc.returncode is not None:
            return proc.returncode
        if not hasattr(os, "waitid"):  # macOS: fall back to reaping
            return proc.poll()
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return proc.poll()
        if info is None:
            return None
        return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status

    def stop_all(self) -> int:
        """SIGTERM every group, wait up to ``grace`` s, SIGKILL what is left, reap all.

        Returns:
            how many processes had to be killed with SIGKILL.
        """
        live = [p for p in self.procs if p.returncode is None]
        self._signal_groups(live, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(self.exited(p) is None for p in live):
            time.sleep(0.05)
        stubborn = sum(self.exited(p) is None for p in live)
        # Also kills grandchildren left in a group whose leader already exited.
        self._signal_groups(live, signal.SIGKILL)
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for log in self._logs:
            log.close()
        self._logs.clear()
        return stubborn

    @staticmethod
    def _signal_groups(procs: Sequence[subprocess.Popen[bytes]], signum: signal.Signals) -> None:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: stop like Ctrl-C, exit with 128 + signal number."""

    def __init__(self, signum: int) -> None:
        """Record which signal asked us to stop."""
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` so cleanup runs (Python skips it by default)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed on the main thread
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def node_argv(*config_paths: Path, verbose: int = 0) -> list[str]:
    """Return the command line that runs a node daemon (several nodes: one process),
    logging at ``verbose`` (the count of ``-v``)."""
    configs = [arg for path in config_paths for arg in ("--config", str(path))]
    return [sys.executable, "-m", "p2pfl.cli.main", *["-v"] * verbose, "node", "run", *configs]


def node_env() -> dict[str, str]:
    """Return the environment of node processes: one compute thread each."""
    env = dict(os.environ)
    # N processes on one machine: one BLAS thread each avoids N x cores oversubscription.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def log_tail(path: Path, lines: int = 15) -> str:
    """Return the last ``lines`` lines of a log file ('' if unreadable)."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 8192))
            text = file.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
