"""Soak one daemon under churn: peers join, leave and misbehave; is everything bounded?

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--workers 2] [--lanes 6] [--every 60]
        [--out runs/soak]

Starts three daemons on loopback: A, the one measured; B, its honest partner; C, an
honest peer that leaves (SIGTERM) and comes back every ``--restart-every`` seconds.
``--workers`` churn processes (benchmarks/soak_churn.py) hammer A with peers that join
and leave, misbehave (garbage, malformed frames from LIBP2P_NOTES, abandoned streams) or
stay silent, for ``--minutes``. Every ``--every`` seconds a row: A's RSS, open fds,
threads and live trio tasks (A runs under a trio instrument that counts them), its round
and rounds per second (from its log), the churn counters and the load average.

At the end: churn stops, A settles for ``SETTLE_S``, a fresh peer must connect to A
and complete a peer exchange, and each series gets a verdict from its second half:
"bounded" if its least-squares trend over the second half grows it by less than its
tolerance (``TOLERANCE``), with A still finishing rounds in every interval.
Why churn runs in several processes with several lanes each: see soak_churn.py
(py-libp2p's disconnect waits ~0.2 s; one lane is latency-bound at ~4 cycles/s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROUND = re.compile(rb"round (\d+): accuracy ([\d.]+)")
PORTS = {"a": 17451, "b": 17452, "c": 17453}
SETTLE_S = 30.0
# A series is bounded if its second-half trend adds less than max(absolute, relative x median).
TOLERANCE = {"rss_mb": (16.0, 0.05), "fds": (10, 0.10), "threads": (2, 0.10), "tasks": (50, 0.10)}
SERIES = tuple(TOLERANCE)
MEMORY_EVERY_S = 120


def node_file(work: Path, name: str, bootstrap: list[str]) -> Path:
    path = work / f"{name}.toml"
    boot = ", ".join(f'"{address}"' for address in bootstrap)
    path.write_text(f"""
[node]
network_id = "soak"
key_file = "{name}.pem"
data_dir = "state-{name}"
http_port = 0
[net]
port = {PORTS[name]}
bootstrap = [{boot}]
[train]
node_index = {list(PORTS).index(name)}
num_nodes = {len(PORTS)}
[round]
round_timeout = 3.0
min_neighbours = 0
""")
    return path


# ---------------------------------------------------------------- the measured daemon


def counted_daemon(config: str, tasks_file: str, trace_memory: bool) -> int:
    """Run ``p2pfl node run --config config`` with its live trio tasks written to ``tasks_file``.

    With ``trace_memory``: tracemalloc on, and every ``MEMORY_EVERY_S`` the allocations that
    grew most since the first dump (by 4-frame traceback) written beside ``tasks_file``.
    """
    import trio

    from p2pfl.cli.main import main

    live = [0]

    class CountTasks(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            live[0] += 1

        def task_exited(self, task: trio.lowlevel.Task) -> None:
            live[0] -= 1

    run = trio.run

    def instrumented(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), CountTasks()]
        return run(*args, **kwargs)

    def write_forever() -> None:
        baseline, ticks = None, 0
        while True:
            Path(tasks_file).write_text(str(live[0]))
            time.sleep(1)
            ticks += 1
            if trace_memory and ticks % MEMORY_EVERY_S == 0:
                baseline = dump_growth(baseline, Path(tasks_file).with_suffix(".memory.txt"))

    if trace_memory:
        tracemalloc.start(4)

    trio.run = instrumented  # type: ignore[assignment]  # the daemon calls trio.run once
    threading.Thread(target=write_forever, daemon=True).start()
    return main(["node", "run", "--config", config])


def dump_growth(baseline: tracemalloc.Snapshot | None, path: Path) -> tracemalloc.Snapshot:
    """Append the 12 allocation sites that grew most since ``baseline``; return the baseline."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    if baseline is None:
        return snapshot
    with path.open("a") as out:
        out.write(f"--- {time.strftime('%H:%M:%S')} traced {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MB\n")
        for stat in snapshot.compare_to(baseline, "traceback")[:12]:
            out.write(f"{stat.size_diff / 2**10:+9.0f} KB {stat.count_diff:+7d} blocks  "
                      + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback) + "\n")
    return baseline


# ---------------------------------------------------------------- sampling


class Probe:
    """Reads A's /proc entries, its task count and its log (incrementally)."""

    def __init__(self, pid: int, log: Path, tasks: Path) -> None:
        self.pid, self.log, self.tasks = pid, log, tasks
        self.read = 0
        self.round, self.accuracy = 0, 0.0

    def sample(self) -> dict[str, float]:
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]
        threads = int(re.search(r"Threads:\s+(\d+)", status)[1])  # type: ignore[index]
        with self.log.open("rb") as handle:
            handle.seek(self.read)
            data = handle.read()
        self.read += data.rfind(b"\n") + 1
        if found := ROUND.findall(data[: data.rfind(b"\n") + 1]):
            self.round, self.accuracy = int(found[-1][0]) + 1, float(found[-1][1])
        tasks = int(self.tasks.read_text() or 0) if self.tasks.exists() else 0
        return {"rss_mb": round(rss, 1), "fds": len(os.listdir(f"/proc/{self.pid}/fd")),
                "threads": threads, "tasks": tasks, "round": self.round, "accuracy": self.accuracy}


def churn_totals(files: list[Path]) -> dict[str, Any]:
    totals: dict[str, Any] = {"connections": 0, "attempts": 0, "tcp": 0, "failures": {}}
    for path in files:
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key in ("connections", "attempts", "tcp"):
            totals[key] += stats.get(key, 0)
        for kind, count in stats.get("failures", {}).items():
            totals["failures"][kind] = totals["failures"].get(kind, 0) + count
        totals["last_error"] = stats.get("last_error") or totals.get("last_error", "")
    return totals


HEADER = (f"{'t_s':>6} {'conns':>7} {'conn/s':>6} {'attempts':>8} {'tcp':>6} {'rss_mb':>7} {'fds':>4} "
          f"{'thr':>4} {'tasks':>6} {'round':>7} {'rnd/s':>6} {'acc':>6} {'load1':>5}")


def row_text(row: dict[str, Any], previous: dict[str, Any] | None) -> str:
    span = row["t_s"] - previous["t_s"] if previous else 0
    rate = (row["connections"] - previous["connections"]) / span if previous and span else 0.0
    rounds = (row["round"] - previous["round"]) / span if previous and span else 0.0
    return (f"{row['t_s']:>6} {row['connections']:>7} {rate:>6.1f} {row['attempts']:>8} {row['tcp']:>6} "
            f"{row['rss_mb']:>7.1f} {row['fds']:>4} {row['threads']:>4} {row['tasks']:>6} {row['round']:>7} "
            f"{rounds:>6.1f} {row['accuracy']:>6.3f} {row['load1']:>5.1f}")


# ---------------------------------------------------------------- verdict


def trend(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) points (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0


def verdicts(rows: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """One line per series and for round progress; True if everything is bounded."""
    half = [row for row in rows if row["t_s"] >= rows[-1]["t_s"] / 2]
    span = half[-1]["t_s"] - half[0]["t_s"]
    lines, ok = [], True
    for key in SERIES:
        points = [(row["t_s"], float(row[key])) for row in half]
        growth = trend(points) * span
        absolute, relative = TOLERANCE[key]
        allowed = max(absolute, relative * statistics.median(v for _, v in points))
        bounded = growth < allowed
        ok &= bounded
        lines.append(f"{key:>8}: first {rows[0][key]}, max {max(r[key] for r in rows)}, last {rows[-1][key]}; "
                     f"second-half trend {growth:+.1f} over {span:.0f} s (allowed {allowed:.1f}): "
                     f"{'bounded' if bounded else 'GROWING'}")
    stalls = [row["t_s"] for row, before in zip(rows[1:], rows, strict=False) if row["round"] <= before["round"]]
    ok &= not stalls
    lines.append(f"  rounds: {rows[0]['round']} -> {rows[-1]['round']}; "
                 + (f"no progress in the intervals ending at {stalls}" if stalls else "progress in every interval"))
    return lines, ok


async def fresh_peer(address: str) -> str:
    """Connect a fresh identity to ``address`` and run a peer exchange; return what came back."""
    import trio
    from libp2p.peer.id import ID

    from p2pfl.net.discovery import MAX_REPLY_BYTES, PROTOCOL_ID, encode_request, read_bounded
    from p2pfl.net.host import connect, open_host

    with trio.fail_after(20):
        async with open_host(os.urandom(32)) as host:
            peer = await connect(host, address, timeout=10)
            stream = await host.new_stream(ID.from_base58(peer), [PROTOCOL_ID])
            await stream.write(encode_request("soak", []))
            await stream.close_write()  # type: ignore[attr-defined]
            reply = await read_bounded(stream, MAX_REPLY_BYTES)
            return reply.decode(errors="replace").split("\n", 1)[0]


# ---------------------------------------------------------------- the run


class Daemons:
    """A (counted), B and C as processes; C can be restarted."""

    def __init__(self, work: Path, *, trace_memory: bool) -> None:
        from p2pfl.core.crypto import Identity

        self.work, self.trace_memory = work, trace_memory
        for name in PORTS:
            if not (work / f"{name}.pem").exists():
                Identity.generate().save(work / f"{name}.pem")
        peer_a = Identity.load(work / "a.pem").peer_id
        self.address_a = f"/ip4/127.0.0.1/tcp/{PORTS['a']}/p2p/{peer_a}"
        self.configs = {name: node_file(work, name, [] if name == "a" else [self.address_a]) for name in PORTS}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = 0

    def start(self, name: str) -> None:
        if name == "a":
            command = [sys.executable, __file__, "--daemon", str(self.configs["a"]), "--tasks-file",
                       str(self.work / "a.tasks"), *(["--trace-memory"] if self.trace_memory else [])]
        else:
            command = [sys.executable, "-m", "p2pfl.cli.main", "node", "run", "--config", str(self.configs[name])]
        log = (self.work / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(command, stderr=log, stdout=log, cwd=self.work)

    def restart_c(self) -> None:
        self.procs["c"].send_signal(signal.SIGTERM)
        self.procs["c"].wait(timeout=30)
        self.start("c")
        self.restarts += 1

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def soak(args: argparse.Namespace) -> int:
    import trio

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    daemons = Daemons(work, trace_memory=args.trace_memory)
    for name in PORTS:
        daemons.start(name)
    probe = Probe(daemons.procs["a"].pid, work / "a.log", work / "a.tasks")
    deadline = time.monotonic() + 180
    while probe.sample()["round"] < 3:  # imports and the first rounds (slow on a loaded machine)
        if time.monotonic() > deadline or daemons.procs["a"].poll() is not None:
            daemons.stop()
            raise SystemExit(f"A did not finish 3 rounds in 180 s: see {work / 'a.log'}")
        time.sleep(1)  # polling another process's log
    stats = [work / f"churn{i}.json" for i in range(args.workers)]
    churn_log = (work / "churn.log").open("ab")
    churners = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("soak_churn.py")), daemons.address_a,
                                  "--seconds", str(args.minutes * 60), "--lanes", str(args.lanes),
                                  "--stats", str(path)], stderr=churn_log, stdout=churn_log)
                for path in stats]
    print(f"soak: {args.workers} churn processes x {args.lanes} lanes for {args.minutes} min against "
          f"{daemons.address_a}; load {os.getloadavg()}", flush=True)
    print(HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    start = time.monotonic()
    next_restart = start + args.restart_every
    try:
        while any(proc.poll() is None for proc in churners):
            if daemons.procs["a"].poll() is not None:
                print(f"A exited with status {daemons.procs['a'].returncode}: see {work / 'a.log'}", flush=True)
                break
            rows.append({"t_s": round(time.monotonic() - start), **churn_totals(stats), **probe.sample(),
                         "load1": os.getloadavg()[0]})
            print(row_text(rows[-1], rows[-2] if len(rows) > 1 else None), flush=True)
            if time.monotonic() >= next_restart:
                daemons.restart_c()
                next_restart += args.restart_every
            time.sleep(args.every)
        time.sleep(SETTLE_S)
        if daemons.procs["a"].poll() is not None:
            return summarize(rows, "not tried: A is gone", False, daemons.restarts, work)
        rows.append({"t_s": round(time.monotonic() - start), **churn_totals(stats), **probe.sample(),
                     "load1": os.getloadavg()[0]})
        print(row_text(rows[-1], rows[-2]) + f"   <- {SETTLE_S:.0f} s after churn stopped", flush=True)
        try:
            fresh = f"connected, peer exchange answered {trio.run(fresh_peer, daemons.address_a)!r}"
        except Exception as error:
            fresh = f"FAILED: {type(error).__name__}: {error}"
        alive = daemons.procs["a"].poll() is None
    finally:
        for proc in churners:
            if proc.poll() is None:
                proc.kill()
        daemons.stop()
    return summarize(rows, fresh, alive, daemons.restarts, work)


def summarize(rows: list[dict[str, Any]], fresh: str, alive: bool, restarts: int, work: Path) -> int:
    (work / "samples.json").write_text(json.dumps(rows, indent=1))
    last = rows[-1]
    minutes = last["t_s"] / 60
    print(f"\nchurn: {last['connections']} libp2p connections completed of {last['attempts']} dials "
          f"({last['connections'] / max(last['t_s'], 1):.1f}/s over {minutes:.1f} min), {last['tcp']} raw TCP "
          f"sessions; failures by kind {last['failures']}; last error {last.get('last_error', '')!r}")
    print(f"honest peer C left and rejoined {restarts} times; A's process alive at the end: {alive}")
    lines, bounded = verdicts(rows)
    print("\n".join(lines))
    print(f"fresh peer after the soak: {fresh}")
    ok = bounded and alive and fresh.startswith("connected")
    print(f"verdict: {'bounded' if ok else 'NOT bounded'} (load {os.getloadavg()})")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2, help="churn processes")
    parser.add_argument("--lanes", type=int, default=6, help="concurrent churn cycles per process")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between rows")
    parser.add_argument("--restart-every", type=float, default=300.0, help="seconds between C's restarts")
    parser.add_argument("--out", default="runs/soak")
    parser.add_argument("--daemon", help=argparse.SUPPRESS)  # internal: run A under the task counter
    parser.add_argument("--tasks-file", help=argparse.SUPPRESS)
    parser.add_argument("--trace-memory", action="store_true",
                        help=f"run A under tracemalloc; its growth every {MEMORY_EVERY_S} s in OUT/a.memory.txt")
    args = parser.parse_args()
    if args.daemon:
        return counted_daemon(args.daemon, args.tasks_file, args.trace_memory)
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
