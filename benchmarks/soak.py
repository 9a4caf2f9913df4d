"""Soak one daemon under churn: peers join, leave and misbehave; is everything bounded?

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--out runs/soak]

Starts two daemons on loopback (A, measured; B, its honest partner so rounds progress)
and a churn driver in this process that, as fast as it can: connects to A with a fresh
identity every 20 cycles, runs one peer exchange (or sends garbage on it, or opens and
abandons a stream), and disconnects. Every 30 s it samples A's RSS, open fds and threads
(/proc), and its round (the log). All should stay bounded while rounds keep coming.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio
from libp2p.peer.id import ID

from p2pfl.core.crypto import Identity
from p2pfl.net.discovery import PROTOCOL_ID as PEX
from p2pfl.net.discovery import encode_request
from p2pfl.net.host import connect, open_host

ROUND = re.compile(r"round (\d+): accuracy ([\d.]+)")


def node_file(work: Path, name: str, port: int, bootstrap: str) -> Path:
    path = work / f"{name}.toml"
    path.write_text(f"""
[node]
network_id = "soak"
key_file = "{name}.pem"
data_dir = "state-{name}"
http_port = 0
[net]
port = {port}
bootstrap = [{bootstrap}]
[round]
round_timeout = 3.0
""")
    return path


def sample(pid: int, log: Path) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) * 1024  # type: ignore[index]
    threads = int(re.search(r"Threads:\s+(\d+)", status)[1])  # type: ignore[index]
    rounds = ROUND.findall(log.read_text(errors="replace"))
    return {"rss_mb": rss / 2**20, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads,
            "round": int(rounds[-1][0]) + 1 if rounds else 0,
            "accuracy": float(rounds[-1][1]) if rounds else 0.0}


async def churn(address: str, stop_at: float, counter: list[int]) -> None:
    cycle = 0
    while time.monotonic() < stop_at:
        async with open_host(os.urandom(32)) as host:
            for _ in range(20):
                cycle += 1
                counter[1] += 1  # attempted; counter[0] counts the ones that got through
                with contextlib.suppress(Exception), trio.fail_after(10):
                    peer = await connect(host, address, timeout=5)
                    stream = await host.new_stream(ID.from_base58(peer), [PEX])
                    if cycle % 3 == 0:
                        await stream.write(b"\xff garbage \x00" * 100)
                    elif cycle % 3 == 1:
                        await stream.write(encode_request("soak", []))
                        await stream.close_write()  # type: ignore[attr-defined]
                        await stream.read(1 << 16)
                    # else: an abandoned, half-open stream
                    await host.disconnect(ID.from_base58(peer))
                    counter[0] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", default="runs/soak")
    args = parser.parse_args()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        if not (work / f"{name}.pem").exists():
            Identity.generate().save(work / f"{name}.pem")
    ids = {name: Identity.load(work / f"{name}.pem") for name in ("a", "b")}
    address_a = f"/ip4/127.0.0.1/tcp/17451/p2p/{ids['a'].peer_id}"
    files = {"a": node_file(work, "a", 17451, ""), "b": node_file(work, "b", 17452, f'"{address_a}"')}
    code = "import sys; from p2pfl.cli.main import main; sys.exit(main())"
    procs = {name: subprocess.Popen([sys.executable, "-c", code, "node", "run", "--config", str(path)],
                                    stderr=(work / f"{name}.log").open("w"), cwd=work)
             for name, path in files.items()}
    samples: list[dict[str, float]] = []
    counter = [0, 0]  # connections made, attempted
    try:
        time.sleep(10)
        stop_at = time.monotonic() + args.minutes * 60

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(churn, address_a, stop_at, counter)
                start = time.monotonic()
                while time.monotonic() < stop_at:
                    row = {"t_s": round(time.monotonic() - start), "connections": counter[0], "attempts": counter[1],
                           **sample(procs["a"].pid, work / "a.log")}
                    samples.append(row)
                    print(json.dumps(row), flush=True)
                    await trio.sleep(30)

        trio.run(run)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=30)
    (work / "samples.json").write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
