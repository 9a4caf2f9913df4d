"""Real node daemons on loopback: a test network end to end, and a SIGKILL + restart.

These spawn `p2pfl` processes exactly as users do. Waiting on another process can only
be done by asking it: the loops below poll its /status, bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pfl.cli.http import fetch_status
from p2pfl.cli.processes import NodeProcesses, node_argv, node_env
from p2pfl.cli.testnet_plan import TestnetPlan as Plan
from p2pfl.cli.testnet_plan import prepare_directory, write_configs
from p2pfl.errors import NetworkError

pytestmark = pytest.mark.real


def test_testnet_of_four_nodes_completes(tmp_path: Path) -> None:
    out = tmp_path / "net"
    argv = [
        sys.executable,
        "-m",
        "p2pfl.cli.main",
        "testnet",
        "--nodes",
        "4",
        "--rounds",
        "3",
        "--out",
        str(out),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert len(report["nodes"]) == 4
    assert all(node["round_reached"] == 3 for node in report["nodes"])
    assert report["verdict"]["honest_mean_accuracy"] > 0.6  # from 0.1 at random init
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert "verdict" in done.stdout


def test_sybils_of_a_testnet_run_as_one_process(tmp_path: Path) -> None:
    # One attacker with two identities: both nodes in one process, sharing one group.
    out = tmp_path / "net"
    argv = [sys.executable, "-m", "p2pfl.cli.main", "testnet", "--nodes", "4", "--rounds", "2",
            "--byzantine", "2", "--attack", "sybil", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    sybils = [node for node in report["nodes"] if node["role"] == "byzantine"]
    assert len(sybils) == 2
    assert all(node["round_reached"] == 2 for node in report["nodes"])
    log = (out / "logs" / "node2.log").read_text()
    assert all(f"node {node['peer_id']} starting" in log for node in sybils)
    assert not (out / "logs" / "node3.log").exists()


def status_or_none(port: int) -> dict[str, Any] | None:
    try:
        return fetch_status(port, timeout=1.0)
    except NetworkError:
        return None


def wait_for(
    port: int, condition: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """Poll a daemon's /status until ``condition`` holds (bounded: ~4 polls a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = status_or_none(port)
        if status is not None and condition(status):
            return status
        time.sleep(0.25)
    raise AssertionError(
        f"node on port {port} did not get there in {timeout} s: {status_or_none(port)}"
    )


def test_killed_daemon_resumes_from_its_checkpoint_and_rejoins(tmp_path: Path) -> None:
    # Far more rounds than the test waits for: the survivors must still be running
    # (about 0.05 s a round on loopback) when the killed node comes back.
    plan = Plan(nodes=3, rounds=5000, out=tmp_path)
    prepare_directory(plan)
    _, ports, configs = write_configs(plan)
    http = ports[plan.nodes :]
    with NodeProcesses(grace=5) as procs:
        logs = tmp_path / "logs"
        victim = procs.spawn(node_argv(configs[2]), logs / "n2.log", node_env())
        for i in (0, 1):
            procs.spawn(node_argv(configs[i]), logs / f"n{i}.log", node_env())
        before = wait_for(http[2], lambda s: s["round"] >= 3, timeout=90)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        checkpointed = len(before["history"])

        procs.spawn(node_argv(configs[2]), logs / "n2-restarted.log", node_env())
        resumed = wait_for(http[2], lambda s: s["state"] != "starting", timeout=60)
        # It resumed from disk: the rounds it had finished are still in its history...
        assert resumed["round"] >= checkpointed
        assert [r["round"] for r in resumed["history"][:checkpointed]] == [
            r["round"] for r in before["history"]
        ]
        # ...and rejoined: it trains on with its neighbours' updates again.
        rejoined = wait_for(
            http[2],
            lambda s: sum(r["used"] > 0 for r in s["history"][checkpointed:]) >= 3,
            timeout=90,
        )
    assert rejoined["accuracy"] > 0.6  # learning (random: 0.1); the exact figure depends on timing
