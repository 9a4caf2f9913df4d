"""A private network of Linux namespaces for daemons: a hub namespace with bridges, one
namespace per node, veth links rate-limited with ``tc tbf``. Everything is created by
:class:`Lab` and removed by :meth:`Lab.close`; nothing is bound in the root namespace.

A node listed in ``behind_nat`` sits behind its own NAT router: a namespace whose public
side is on the hub's bridge (``10.77.0.(101+i)``) and whose private side is the node's
network ``192.168.(i+1).0/24``, with an nftables masquerade rule and a forward filter
that lets in only replies to connections made from inside (a home router, or a
hospital's firewall); unsolicited connections to the router itself are dropped
silently, as most routers do. The masquerade keeps a connection's source port when it
is free (hole punching can work), or with ``random_ports`` picks a random one for each
connection (a symmetric NAT, as carrier-grade NATs are: hole punching cannot work).
Needs ``nft`` (``.ci/nat-deps``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ROUND_LINE = re.compile(r"round (\d+): accuracy ([\d.]+) loss [\d.na]+, (\d+) neighbour updates, ([\d.]+) s")
SUBNET = "10.77.0"
PORT = 7351


def six_node_file(work: Path, i: int, peers: list[str], *, loopback_port: int | None = None) -> Path:
    """Write the six-daemon test's node file for node ``i`` (bootstrap via nodes 0 and 3).

    In the lab's namespaces (every node on :data:`PORT` at :meth:`Lab.address`), or on
    loopback with ``loopback_port`` (node ``j`` at ``127.0.0.1:loopback_port + j``).
    """
    def where(j: int) -> tuple[str, int]:
        return (Lab.address(j), PORT) if loopback_port is None else ("127.0.0.1", loopback_port + j)

    boot = [f'"/ip4/{where(j)[0]}/tcp/{where(j)[1]}/p2p/{peers[j]}"' for j in (0, 3) if j != i]
    path = work / f"node{i}.toml"
    path.write_text(f"""
[node]
network_id = "netns"
key_file = "node{i}.pem"
data_dir = "state{i}"
http_port = 0
[net]
listen_host = "{"0.0.0.0" if loopback_port is None else "127.0.0.1"}"
port = {where(i)[1]}
bootstrap = [{", ".join(boot)}]
maintenance_interval = 1.0
max_backoff = 4.0
[train]
node_index = {i}
num_nodes = {len(peers)}
[round]
round_timeout = 3.0
min_neighbours = 1
start_timeout = 120.0
""")
    return path


def why_not(*, nat: bool = False) -> str | None:
    """Return why namespaces (with ``nat``: and NAT routers) cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, tc); CI runs as root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    if nat and shutil.which("nft") is None:
        return "needs nft for the NAT routers (run .ci/nat-deps, or apt-get install nftables)"
    probe = f"p2pflprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create a network namespace here (container without CAP_SYS_ADMIN?)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def wait_until(condition: Callable[[], bool], timeout: float, what: str, state: Callable[[], str]) -> None:
    """Poll ``condition`` (other processes' logs: nothing to wait on) until ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; {state()}")
        time.sleep(0.5)


def status(ns: str, port: int) -> dict[str, Any]:
    """GET /status of the daemon in namespace ``ns`` (its HTTP endpoint is on that loopback)."""
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/status', timeout=5).read().decode())"
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                         check=True, timeout=30).stdout
    return dict(json.loads(out))


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclass
class Daemon:
    index: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    # (seen at, round, accuracy, neighbour updates used, round duration in s)
    rounds: list[tuple[float, int, float, int, float]] = field(default_factory=list)
    _read: int = 0

    def poll(self) -> None:
        """Read new round lines from the log."""
        if not self.log.exists():
            return
        with self.log.open("rb") as handle:
            handle.seek(self._read)
            data = handle.read()
        cut = data.rfind(b"\n") + 1
        self._read += cut
        for line in data[:cut].decode(errors="replace").splitlines():
            if (match := ROUND_LINE.search(line)) is not None:
                self.rounds.append((time.monotonic(), int(match[1]), float(match[2]), int(match[3]),
                                    float(match[4])))

    @property
    def round(self) -> int:
        """Rounds finished (as logged)."""
        self.poll()
        return self.rounds[-1][1] + 1 if self.rounds else 0


class Lab:
    """``n`` nodes, node ``i`` at 10.77.0.(i+1) in its own namespace, on bridge br0 of a hub."""

    def __init__(self, n: int, work: Path, *, rate: str = "20mbit", behind_nat: tuple[int, ...] = (),
                 random_ports: bool = False) -> None:
        self.prefix = f"p2pfl{os.getpid() % 100000}"
        self.hub = f"{self.prefix}h"
        self.nodes = [f"{self.prefix}n{i}" for i in range(n)]
        self.routers = {i: f"{self.prefix}r{i}" for i in behind_nat}
        self.work = work
        self.masquerade = "masquerade random" if random_ports else "masquerade"
        self.daemons: list[Daemon] = []
        try:
            self._build(rate)
        except BaseException:
            self.close()  # a half-built lab leaves nothing behind either
            raise

    def _build(self, rate: str) -> None:
        sh("ip", "netns", "add", self.hub)
        for bridge in ("br0", "br1"):  # br1: the far side of a partition
            sh("ip", "-n", self.hub, "link", "add", bridge, "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", bridge, "up")
        for i, ns in enumerate(self.nodes):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            if i in self.routers:
                self._router(i)
                self._veth(self.routers[i], "lan", ns, "eth0", rate)
                sh("ip", "-n", self.routers[i], "addr", "add", f"{self.gateway(i)}/24", "dev", "lan")
                sh("ip", "-n", ns, "addr", "add", f"{self.private(i)}/24", "dev", "eth0")
                sh("ip", "-n", ns, "route", "add", "default", "via", self.gateway(i))
            else:
                self._veth(self.hub, f"v{i}", ns, "eth0", rate)
                sh("ip", "-n", self.hub, "link", "set", f"v{i}", "master", "br0")
                sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")

    @staticmethod
    def _veth(a: str, a_dev: str, b: str, b_dev: str, rate: str) -> None:
        """A veth pair between namespaces ``a`` and ``b``, up, rate-limited both ways."""
        sh("ip", "-n", a, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b)
        for where, dev in ((a, a_dev), (b, b_dev)):
            sh("ip", "-n", where, "link", "set", dev, "up")
            sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", rate, "burst", "64kb", "latency", "100ms")

    def _router(self, i: int) -> None:
        """Node ``i``'s NAT router: public side on br0 (10.77.0.(101+i)), masquerade out."""
        router = self.routers[i]
        sh("ip", "netns", "add", router)
        sh("ip", "-n", router, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "wan", "netns", router)
        sh("ip", "-n", self.hub, "link", "set", f"v{i}", "master", "br0", "up")
        sh("ip", "-n", router, "link", "set", "wan", "up")
        sh("ip", "-n", router, "addr", "add", f"{SUBNET}.{101 + i}/24", "dev", "wan")
        sh("ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        rules = """
table ip nat {
  chain post { type nat hook postrouting priority 100; oifname "wan" MASQUERADE; }
}
table ip filter {
  chain inbound { type filter hook forward priority 0; policy drop;
    ct state established,related accept; iifname "lan" accept; }
  chain stealth { type filter hook input priority 0; policy accept;
    iifname "wan" ct state new drop; }
}
"""
        rules = rules.replace("MASQUERADE", self.masquerade)
        subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules.encode(),
                       check=True, capture_output=True, timeout=30)

    @staticmethod
    def address(i: int) -> str:
        """Node ``i``'s address on the public bridge (a node behind NAT has none)."""
        return f"{SUBNET}.{i + 1}"

    @staticmethod
    def private(i: int) -> str:
        """Node ``i``'s address behind its NAT router."""
        return f"192.168.{i + 1}.2"

    @staticmethod
    def gateway(i: int) -> str:
        """The private side of node ``i``'s NAT router."""
        return f"192.168.{i + 1}.1"

    def start(self, i: int, config: Path, *, entry: str = "p2pfl.cli.main") -> Daemon:
        """Start (or restart) node ``i``'s daemon inside its namespace.

        ``entry``: the module whose ``main()`` runs the CLI (a test-only variant of the
        daemon, e.g. ``tests.netns.hostile_relay``).
        """
        daemon = next((d for d in self.daemons if d.index == i), None)
        if daemon is None:
            daemon = Daemon(i, config, self.work / f"node{i}.log")
            self.daemons.append(daemon)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        code = f"import sys; from {entry} import main; sys.exit(main())"
        daemon.process = subprocess.Popen(
            ["ip", "netns", "exec", self.nodes[i], sys.executable, "-c", code,
             *(["-vv"] if os.environ.get("P2PFL_NETNS_DEBUG") else []), "node", "run",
             "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=daemon.log.open("ab"), env=env, cwd=self.work)
        return daemon

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        process = self.daemons[i].process
        assert process is not None
        process.send_signal(sig)
        process.wait(timeout=30)

    def link(self, i: int, up: bool) -> None:
        sh("ip", "-n", self.hub, "link", "set", f"v{i}", "up" if up else "down")

    def bridge(self, i: int, name: str) -> None:
        sh("ip", "-n", self.hub, "link", "set", f"v{i}", "master", name)

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            if daemon.process is not None:
                try:
                    daemon.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    daemon.process.kill()
                    daemon.process.wait()
        for ns in (*self.nodes, *self.routers.values(), self.hub):  # veths, bridges, rules go too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        keep = Path(os.environ.get("P2PFL_NETNS_LOGS", "/tmp/p2pfl-netns-logs"))
        keep.mkdir(parents=True, exist_ok=True)  # pytest rotates tmp dirs; logs outlive them
        for daemon in self.daemons:
            if daemon.log.exists():
                shutil.copy(daemon.log, keep / daemon.log.name)
