"""Benchmark the data plane: payload pulls over ``/p2pfl/update/1.0.0`` between OS processes.

Run from the project root::

    .venv/bin/python benchmarks/bench_transfer.py                 # tuned vs stock, full run
    .venv/bin/python benchmarks/bench_transfer.py --tuning all    # one mode only
    .venv/bin/python benchmarks/bench_transfer.py --knob-sweep    # each knob's share

Measures, on loopback, in this process (the client) against a holder process:

1. single-stream pull throughput for each size (median of ``--repeats``; sha256
   verified by ``fetch_payload``), beside raw TCP over trio sockets (same sizes, same
   holder process, no hashing) and their ratio;
2. aggregate throughput when ``--pullers`` processes pull one ``--agg-size`` MB update
   (a) all from one holder, (b) spread round-robin over ``--holders`` holders.

Tuning modes: ``all`` (every data-plane knob of ``p2pfl.net.patches``, as the daemon runs),
``none`` (stock data plane; the hostile-input patches stay on), or a comma list of knob
names. Every process of a run uses the same mode. MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transfer_node import set_tuning

from p2pfl.net.host import connect, open_host
from p2pfl.net.transfer import fetch_payload

NODE = str(Path(__file__).resolve().parent / "bench_transfer_node.py")
MB = 10**6


# ---------------------------------------------------------------------------- processes


class Proc:
    """A benchmark node process spoken to by JSON lines."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, NODE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # Each node applies its own knobs; do not leak ours through the environment.
            env={k: v for k, v in os.environ.items() if not k.startswith("PY_YAMUX_")},
        )

    def read(self) -> dict[str, Any]:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark node exited with {self.popen.wait()}")
        return dict(json.loads(line))

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@contextlib.contextmanager
def holders(
    count: int, sizes: list[int], tuning: str, slots: int
) -> Iterator[list[dict[str, Any]]]:
    procs = [
        Proc(
            "holder",
            "--tuning",
            tuning,
            "--sizes",
            ",".join(map(str, sizes)),
            "--slots",
            str(slots),
        )
        for _ in range(count)
    ]
    try:
        yield [{**p.read(), "pid": p.popen.pid} for p in procs]
    finally:
        for p in procs:
            p.stop()


# ---------------------------------------------------------------------------- single stream


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def pull_libp2p(
    info: dict[str, Any], sizes: list[int], repeats: int
) -> dict[int, tuple[float, float, float]]:
    """Return {size: (median seconds, client CPU ms/MB, holder CPU ms/MB)}."""
    out = {}
    async with open_host(bytes(range(1, 33))) as host:
        peer = await connect(host, info["addr"], timeout=30)
        for size in sizes:
            digest = bytes.fromhex(info["digests"][str(size)])
            times = []
            cpu0, holder0 = time.process_time(), cpu_seconds(info["pid"])
            for _ in range(repeats):
                start = time.perf_counter()
                await fetch_payload(host, peer, digest, max_size=size, timeout=600)
                times.append(time.perf_counter() - start)
            mb = repeats * size / MB / 1000
            cpu = (time.process_time() - cpu0) / mb
            holder = (cpu_seconds(info["pid"]) - holder0) / mb
            out[size] = (statistics.median(times), cpu, holder)
    return out


async def pull_tcp_once(port: int, size: int) -> float:
    start = time.perf_counter()
    sock = trio.socket.socket()
    with sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(struct.pack(">Q", size))
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = await sock.recv_into(view[got:], min(size - got, 16 << 20))
            if n == 0:
                raise RuntimeError("raw TCP server closed early")
            got += n
    return time.perf_counter() - start


async def pull_tcp(port: int, sizes: list[int], repeats: int) -> dict[int, float]:
    return {
        size: statistics.median([await pull_tcp_once(port, size) for _ in range(repeats)])
        for size in sizes
    }


# ---------------------------------------------------------------------------- aggregate


def aggregate(infos: list[dict[str, Any]], size: int, pullers: int, tuning: str) -> float:
    """Return total MB/s when ``pullers`` processes pull ``size`` bytes at once."""
    procs = []
    for i in range(pullers):
        info = infos[i % len(infos)]
        procs.append(
            Proc(
                "puller",
                "--tuning", tuning,
                "--addr", info["addr"],
                "--digest", info["digests"][str(size)],
                "--size", str(size),
            )
        )  # fmt: skip
    try:
        for p in procs:
            assert p.read()["ready"]
        start = time.perf_counter()
        for p in procs:
            p.send("go")
        results = [p.read() for p in procs]
        wall = time.perf_counter() - start
    finally:
        for p in procs:
            p.stop()
    assert all(r["bytes"] == size for r in results)
    return pullers * size / MB / wall


# ---------------------------------------------------------------------------- one mode


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [s * MB for s in args.sizes]
    agg = args.agg_size * MB
    set_tuning(args.tuning)
    out: dict[str, Any] = {"tuning": args.tuning, "single": {}, "aggregate": {}}
    with holders(1, sorted({*sizes, agg}), args.tuning, args.slots) as infos:
        out["applied"] = infos[0]["tuning"]
        p2p = trio.run(pull_libp2p, infos[0], sizes, args.repeats)
        tcp = trio.run(pull_tcp, infos[0]["tcp_port"], sizes, args.repeats)
        for size in sizes:
            seconds, cpu, holder_cpu = p2p[size]
            out["single"][size // MB] = {
                "p2p": size / MB / seconds,
                "tcp": size / MB / tcp[size],
                "cpu_client": cpu,
                "cpu_holder": holder_cpu,
            }
        if args.pullers:
            out["aggregate"]["one holder"] = aggregate(infos, agg, args.pullers, args.tuning)
    if args.pullers and args.holders > 1:
        with holders(args.holders, [agg], args.tuning, args.slots) as infos:
            name = f"{args.holders} holders"
            out["aggregate"][name] = aggregate(infos, agg, args.pullers, args.tuning)
    return out


def child(args: argparse.Namespace, tuning: str, pullers: int, sizes: list[int]) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--json", "--tuning", tuning,
        "--sizes", ",".join(map(str, sizes)), "--repeats", str(args.repeats),
        "--pullers", str(pullers), "--holders", str(args.holders),
        "--agg-size", str(args.agg_size), "--slots", str(args.slots),
    ]  # fmt: skip
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark run {tuning!r} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------- report


def label(tuning: str) -> str:
    """Name a mode by its last knob (sweeps add knobs one at a time)."""
    knobs = tuning.split(",")
    if len(knobs) == 1 or tuning.startswith("all but"):
        return tuning
    return f"+{knobs[-1]} ({len(knobs)} knobs)"


def print_single(results: list[dict[str, Any]]) -> None:
    print("\nSingle stream, one holder process -> this process (median of repeats, MB/s)")
    print("(CPU: milliseconds of process CPU per MB moved, client side and holder side)")
    header = f"{'tuning':<28}{'size MB':>8}{'p2pfl':>9}{'raw TCP':>9}{'p2pfl/TCP':>10}"
    print(header + f"{'CPU cli':>9}{'CPU hold':>9}")
    for r in results:
        for size, row in r["single"].items():
            print(
                f"{label(r['tuning']):<28}{size:>8}{row['p2p']:>9.1f}{row['tcp']:>9.1f}"
                f"{row['p2p'] / row['tcp']:>10.1%}{row['cpu_client']:>9.2f}{row['cpu_holder']:>9.2f}"
            )


def print_aggregate(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    rows = [(r["tuning"], k, v) for r in results for k, v in r["aggregate"].items()]
    if not rows:
        return
    print(f"\nAggregate: {args.pullers} puller processes each pull one {args.agg_size} MB update")
    print(f"{'tuning':<28}{'holders':<14}{'total MB/s':>11}")
    for tuning, name, value in rows:
        print(f"{tuning:<28}{name:<14}{value:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tuning", default="both", help="both | all | none | knob,knob")
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pullers", type=int, default=7)
    parser.add_argument("--holders", type=int, default=4)
    parser.add_argument("--agg-size", type=int, default=100)
    parser.add_argument("--slots", type=int, default=4, help="concurrent serves per holder")
    parser.add_argument(
        "--knob-sweep", action="store_true", help="100 MB single stream per knob set"
    )
    parser.add_argument(
        "--ablation", action="store_true", help="100 MB: all knobs, then all but one"
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:
        print(json.dumps(run_mode(args)))
        return
    from bench_transfer_node import KNOBS

    names = list(KNOBS)
    if args.knob_sweep:
        modes = ["none"] + [",".join(names[: i + 1]) for i in range(len(names))]
        results = [child(args, m, 0, [100]) for m in modes]
    elif args.ablation:
        modes = ["all"] + [",".join(n for n in names if n != left) for left in names]
        results = [child(args, m, 0, [100]) for m in modes]
        for r, left in zip(results[1:], names, strict=True):
            r["tuning"] = f"all but {left}"
    else:
        modes = ["none", "all"] if args.tuning == "both" else [args.tuning]
        results = [child(args, m, args.pullers, args.sizes) for m in modes]
    for r in results:
        print(f"tuning={r['tuning']}: applied {r['applied'] or 'nothing'}")
    print_single(results)
    print_aggregate(results, args)


if __name__ == "__main__":
    main()
