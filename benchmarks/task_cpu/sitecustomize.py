"""CPU of a test network's node processes by event-loop task (``benchmarks/task_cpu_report.py``).

On ``PYTHONPATH`` with ``P2PFL_TASK_CPU_DIR`` set, every ``p2pfl node run`` process adds a
trio instrument that charges the thread CPU of each task step to a label found in the
task's await chain (a pull, a serve, pubsub, the /status endpoint, ...), snapshots the
totals whenever the node finishes a round, and writes them to ``DIR/node<i>.json`` at
exit. The instrument costs CPU itself (walking await chains): compare labels, not totals.
Off (nothing imported) without the variable.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import time
from typing import Any

LABELS = (  # (label, substring of a qualname in the task's await chain); first match wins
    ("http /status", "_serve_one"), ("http /status", "_run_handler"),
    ("serve a pull", "_Server.handle"), ("pubsub in", "continuously_read_stream"),
    ("pubsub push_msg", "push_msg"), ("pubsub send loop", "handle_sending_messages"),
    ("pubsub heartbeat", "heartbeat"), ("pubsub new peer", "_handle_new_peer"),
    ("peer exchange in", "handle_exchange"), ("peer exchange out", "_probe"),
    ("dial-back", "Reachability"), ("pull: decode", "Fetcher._decode"),
    ("pull", "Fetcher._"), ("node round loop", "Node._run_round"), ("node", "Node.run"),
    ("gossip deliver", "deliver"), ("ingress", "Ingress.run"),
    ("inbound stream: negotiation", "negotiate"), ("inbound stream", "_handle_muxed_stream"),
    ("yamux read loop", "handle_incoming"), ("identify", "identify"),
    ("swarm notify", "_notify"),
)


def _chain(coro: Any) -> list[str]:
    names = []
    for _ in range(64):
        if coro is None:
            break
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            names.append(frame.f_code.co_qualname)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return names


def _label(names: list[str], task_name: str) -> str:
    for label, key in LABELS:
        if any(key in name for name in names):
            return label
    return "other: " + task_name.rsplit(".", 1)[-1]


def _install(out: str, index: str) -> None:
    import trio

    from p2pfl.node import node as node_module

    totals: dict[str, list[float]] = {}  # label -> [steps, thread CPU seconds]
    marks: dict[int, dict[str, Any]] = {}  # round finished -> snapshot

    class TaskCPU(trio.abc.Instrument):
        def before_task_step(self, task: Any) -> None:
            self.before = _chain(task.coro)
            self.started = time.thread_time()

        def after_task_step(self, task: Any) -> None:
            spent = time.thread_time() - self.started
            cell = totals.setdefault(_label(self.before + _chain(task.coro), task.name or "?"), [0, 0.0])
            cell[0] += 1
            cell[1] += spent

    stock_run, stock_advance = trio.run, node_module.Node._advance

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), TaskCPU()]
        return stock_run(*args, **kwargs)

    def advance(self: Any, next_round: int) -> None:
        stock_advance(self, next_round)
        marks[next_round] = {"process": time.process_time(), "main": time.thread_time(),
                             "tasks": {k: list(v) for k, v in totals.items()}}

    def dump() -> None:
        with open(os.path.join(out, f"node{index}.json"), "w") as file:
            json.dump({"marks": marks}, file)

    trio.run = run
    node_module.Node._advance = advance  # type: ignore[method-assign]
    atexit.register(dump)


_out = os.environ.get("P2PFL_TASK_CPU_DIR")
_node = re.search(r"node(\d+)\.toml", " ".join(sys.argv))
if _out and _node and "node" in sys.argv:
    _install(_out, _node.group(1))
