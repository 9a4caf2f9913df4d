"""The testnet launcher without real nodes: configs, validation, ports, process cleanup,
and the whole launch/watch/stop/report cycle against tiny fake node processes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from p2pfl.cli import testnet
from p2pfl.cli.main import build_parser
from p2pfl.cli.processes import NodeProcesses, Terminated, node_argv
from p2pfl.cli.testnet_plan import TestnetPlan as Plan
from p2pfl.cli.testnet_plan import (
    dumps_toml,
    node_config,
    pick_ports,
    plan_from_args,
    prepare_directory,
    write_configs,
)
from p2pfl.errors import ConfigError

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def parse(*argv: str) -> argparse.Namespace:
    return build_parser("testnet").parse_args(["testnet", *argv])


# --------------------------------------------------------------------------- configs


def test_the_reference_file_is_read_once_for_every_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pfl.learners import reference
    from p2pfl.learners.datasets import digits_reference

    held = digits_reference(2)
    path = tmp_path / "reference.cbor"
    path.write_bytes(reference.ReferenceSet(held.features, held.labels).encode())
    reads: list[Path] = []
    read = reference.read_reference
    monkeypatch.setattr(reference, "read_reference", lambda p: reads.append(p) or read(p))
    plan = Plan(nodes=4, rounds=1, out=tmp_path / "run", reference=path)
    prepare_directory(plan)
    _, _, paths = write_configs(plan)
    documents = [tomllib.loads(p.read_text()) for p in paths]
    assert reads == [path]  # was: two reads and two hashes per node
    assert {d["reference"]["sha256"] for d in documents} == {reference.sha256_of(path.read_bytes())}
    assert {d["task"]["holdout"] for d in documents} == {2}  # the digits holdout: left out of training


def test_node_configs_round_trip_through_tomllib(tmp_path: Path) -> None:
    plan = Plan(nodes=4, rounds=5, byzantine=1, attack="alie", partition="dirichlet", alpha=0.3, out=tmp_path)
    peers = [f"16Uiu2HAmPeer{i}" for i in range(4)]
    ports = [4000, 4001, 4002, 4003, 9100, 9101, 9102, 9103]
    first = tomllib.loads(dumps_toml(node_config(plan, 0, peers, ports)))
    last = tomllib.loads(dumps_toml(node_config(plan, 3, peers, ports)))
    assert first["node"] == {
        "network_id": "p2pfl-testnet", "key_file": str(tmp_path / "keys" / "node0.pem"),
        "data_dir": str(tmp_path / "nodes" / "node0"), "rounds": 5, "http_port": 9100, "exit_when_done": False,
    }
    assert first["net"] == {"listen_host": "127.0.0.1", "port": 4000, "bootstrap": [], "target_neighbours": 3}
    assert first["task"] == {"name": "digits", "partition": "dirichlet", "alpha": 0.3, "batch_size": 32}
    assert first["train"] == {"node_index": 0, "num_nodes": 4, "seed": 0}
    assert first["aggregation"] == {"rule": "clipped_gossip"}
    assert "attack" not in first
    assert last["net"]["bootstrap"] == [  # (3 - 1) // 2 and 3 - 1: nobody is everyone's bootstrap
        "/ip4/127.0.0.1/tcp/4001/p2p/16Uiu2HAmPeer1",
        "/ip4/127.0.0.1/tcp/4002/p2p/16Uiu2HAmPeer2",
    ]
    assert last["round"] == {"local_epochs": 1, "min_neighbours": 3, "start_timeout": 60.0}
    assert last["node"]["http_port"] == 9103
    assert last["attack"] == {"name": "alie", "n": 4, "f": 1}  # the paper's z from the network


def test_attack_params_and_epochs_reach_the_node_configs(tmp_path: Path) -> None:
    argv = ["--nodes", "4", "--rounds", "2", "--byzantine", "1", "--attack", "label_flip",
            "--attack-param", "classes=5", "--epochs", "3", "--out", str(tmp_path)]
    plan = plan_from_args(parse(*argv))
    peers = [f"16Uiu2HAmPeer{i}" for i in range(4)]
    attacker = tomllib.loads(dumps_toml(node_config(plan, 3, peers, list(range(4000, 4008)))))
    assert attacker["attack"] == {"name": "label_flip", "classes": 5}
    assert attacker["round"]["local_epochs"] == 3
    assert "harm_check" not in attacker


def test_span_check_reaches_every_node_config_and_the_node_reads_it(tmp_path: Path) -> None:
    from p2pfl.assembly import load_node_file

    plan = plan_from_args(parse("--nodes", "3", "--rounds", "2", "--span-check", "--out", str(tmp_path)))
    peers = [f"16Uiu2HAmPeer{i}" for i in range(3)]
    for index in range(3):
        path = tmp_path / f"node{index}.toml"
        path.write_text(dumps_toml(node_config(plan, index, peers, list(range(4000, 4006)))))
        assert tomllib.loads(path.read_text())["harm_check"] == {"span_low": 3.0}
    # node 0 bootstraps from nobody, so its file loads without real peer ids
    assert load_node_file(tmp_path / "node0.toml").node.harm_check.span_low == 3.0


def test_set_reaches_every_node_config_and_the_node_reads_it(tmp_path: Path) -> None:
    from p2pfl.assembly import load_node_file

    plan = plan_from_args(parse("--nodes", "3", "--rounds", "2", "--span-check", "--out", str(tmp_path),
                                "--set", "reputation.threshold=0.2", "--set", "reputation.full_weight_at=0.5",
                                "--set", "harm_check.joint=false"))
    peers = [f"16Uiu2HAmPeer{i}" for i in range(3)]
    for index in range(3):
        document = node_config(plan, index, peers, list(range(4000, 4006)))
        assert document["reputation"] == {"threshold": 0.2, "full_weight_at": 0.5}
        assert document["harm_check"] == {"span_low": 3.0, "joint": False}  # merged with --span-check
    (tmp_path / "node0.toml").write_text(dumps_toml(node_config(plan, 0, peers, list(range(4000, 4006)))))
    node = load_node_file(tmp_path / "node0.toml").node
    assert (node.reputation.threshold, node.reputation.full_weight_at, node.harm_check.joint) == (0.2, 0.5, False)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("reputaton.threshold=0.2", "--set: section 'reputaton'"),
        ("reputation.thresh=0.2", "--set: unknown key 'thresh'.*threshold"),
        ("reputation.threshold=high", "--set: .*threshold.*number"),
        ("reputation.full_weight_at=1.5", "--set: .*full_weight_at"),
        ("threshold=0.2", "--set: expected SECTION.KEY=VALUE"),
        ("reputation.threshold", "--set: expected SECTION.KEY=VALUE"),
    ],
)
def test_bad_settings_name_the_option_and_the_key(setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_from_args(parse("--nodes", "4", "--rounds", "2", "--set", setting))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attack-param", "classes=5"], "--attack-param: needs --attack"),
        (["--byzantine", "1", "--attack", "label_flip", "--attack-param", "classes=1"], "--attack-param: .*classes"),
        (["--byzantine", "1", "--attack", "label_flip", "--attack-param", "clases=5"], "--attack-param: .*clases"),
        (["--byzantine", "1", "--attack", "label_flip", "--attack-param", "classes"], "KEY=VALUE"),
    ],
)
def test_bad_attack_params_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_from_args(parse("--nodes", "4", "--rounds", "2", *argv))


@pytest.mark.parametrize("text", ['plain', 'q"uote', "back\\slash", "tab\tnew\nline", "ctl\x01\x7f", "ünï €😀", ""])
def test_toml_strings_survive_a_round_trip(text: str) -> None:
    document = {"t": {"s": text, "l": [text, "x"], "i": -3, "f": 0.1, "b": True, "e": []}}
    assert tomllib.loads(dumps_toml(document)) == document


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--nodes", "1", "--rounds", "3"], "--nodes"),
        (["--nodes", "500", "--rounds", "3"], "--nodes"),
        (["--nodes", "4", "--rounds", "0"], "--rounds"),
        (["--nodes", "4", "--rounds", "3", "--byzantine", "4", "--attack", "alie"], "--byzantine"),
        (["--nodes", "4", "--rounds", "3", "--byzantine", "1"], "--attack"),
        (["--nodes", "4", "--rounds", "3", "--attack", "alie"], "--attack"),
        (["--nodes", "4", "--rounds", "3", "--alpha", "0"], "--alpha"),
        (["--nodes", "4", "--rounds", "3", "--timeout", "-1"], "--timeout"),
        (["--nodes", "4", "--rounds", "3", "--base-port", "80"], "--base-port"),
        (["--nodes", "4", "--rounds", "3", "--epochs", "0"], "--epochs"),
        (["--nodes", "4", "--rounds", "3", "--batch-size", "0"], "--batch-size"),
        (["--nodes", "4", "--rounds", "3", "--rule", "nope"], "--rule"),
        (["--nodes", "4", "--rounds", "3", "--byzantine", "1", "--attack", "nope"], "--attack"),
    ],
)
def test_invalid_arguments_name_the_option(argv: list[str], option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=option):
        plan_from_args(parse(*argv))
    assert testnet.testnet_command(parse(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl testnet: error: ")
    assert option in err


def test_pick_ports_returns_distinct_bindable_ports() -> None:
    ports = pick_ports(16)
    assert len(set(ports)) == 16
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_base_port_in_use_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port}"):
            pick_ports(2, base=port - 1 if port > 1024 else port)


@pytest.mark.parametrize(
    ("status", "completed"),
    [
        (None, 0),
        ({"state": "training", "round": 2, "history": [{}, {}]}, 2),
        ({"state": "training", "round": 4, "history": [{}]}, 4),  # caught up: skipped rounds count
        ({"state": "done", "round": 3, "history": []}, 5),
        ({"state": "collecting", "round": 9}, 5),
    ],
)
def test_progress_counts_the_round_reached(status: dict[str, Any] | None, completed: int) -> None:
    view = testnet.NodeView(index=0, peer_id="p", role="honest", http_port=1, log=Path("x"), status=status)
    assert view.completed(5) == completed
    assert view.finished(5) is (completed == 5)


# --------------------------------------------------------------------------- processes


def live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def gone(pgid: int, timeout: float = 5.0) -> bool:
    """Whether group ``pgid`` is empty, allowing the kernel a moment to finish SIGKILLs."""
    deadline = time.monotonic() + timeout
    while live_members(pgid):  # bounded by the deadline
        if time.monotonic() > deadline:
            return False
        os.sched_yield()
    return True


def test_cleanup_kills_the_whole_group_on_error(tmp_path: Path) -> None:
    spawned = []

    def failing_launch() -> None:
        with NodeProcesses(grace=5) as procs:
            spawned.append(procs.spawn(["sh", "-c", "sleep 60 & sleep 60"], tmp_path / "a.log"))
            raise RuntimeError("launcher failed")

    with pytest.raises(RuntimeError, match="launcher failed"):
        failing_launch()
    (proc,) = spawned
    assert proc.returncode == -signal.SIGTERM
    assert gone(proc.pid)  # the background sleep is gone too


def test_cleanup_escalates_to_sigkill(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    with NodeProcesses(grace=0.3) as procs:
        # Ignored signals are inherited across exec: neither sh nor sleep obeys SIGTERM.
        proc = procs.spawn(["sh", "-c", f"trap '' TERM; touch {ready}; sleep 60"], tmp_path / "b.log")
        while not ready.exists() and proc.poll() is None:  # bounded by sh startup
            os.sched_yield()
    assert proc.returncode == -signal.SIGKILL
    assert gone(proc.pid)


def test_exited_reports_without_reaping(tmp_path: Path) -> None:
    with NodeProcesses(grace=1) as procs:
        proc = procs.spawn(["sh", "-c", "exit 3"], tmp_path / "c.log")
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # blocks until it exits
        assert procs.exited(proc) == 3
        assert proc.returncode is None  # still unreaped: its pid cannot be reused yet
    assert proc.returncode == 3


# --------------------------------------------------------------------------- whole cycle

FAKE_NODE = textwrap.dedent(
    '''
    import json, signal, sys, time, tomllib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from p2pfl.core.crypto import Identity

    config = tomllib.load(open(sys.argv[1], "rb"))
    MODE, INDEX, ROUNDS = sys.argv[2], config["train"]["node_index"], config["node"]["rounds"]
    PEER = Identity.load(config["node"]["key_file"]).peer_id
    print("fake node", INDEX, "starting", flush=True)
    if MODE == "crash" and INDEX == 1:
        print("boom: the learner failed", flush=True)
        sys.exit(3)
    START = time.monotonic()

    def document():
        done = 0 if MODE == "stuck" else min(ROUNDS, int((time.monotonic() - START) / 0.05))
        history = [dict(round=r + 1, accuracy=0.5 + 0.1 * r, loss=1.0, used=1, duration=0.05,
                        bytes_in=1000 * (r + 1), bytes_out=500 * (r + 1)) for r in range(done)]
        return dict(peer_id=PEER, network_id=config["node"]["network_id"],
                    state="done" if done == ROUNDS else "training", round=done + 1, rounds_target=ROUNDS,
                    accuracy=history[-1]["accuracy"] if history else None, loss=None, neighbours=[],
                    bytes_in=1000 * done, bytes_out=500 * done, accepted=done, rejected={}, reputation=[],
                    history=history, byzantine=config.get("attack", {}).get("name"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(document()).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", config["node"]["http_port"]), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()
    '''
)


@dataclass
class FakeNet:
    mode: str = "ok"  # "ok": 3 rounds in ~0.15 s; "crash": node 1 exits 3; "stuck": no progress
    spawned: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def all_gone(self) -> bool:
        return len(self.spawned) == 3 and all(gone(p.pid) for p in self.spawned)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNet:
    net = FakeNet()
    script = tmp_path / "fake_node.py"
    script.write_text(FAKE_NODE)
    monkeypatch.setattr(testnet, "node_argv", lambda config, verbose=0: [sys.executable, str(script), str(config), net.mode])
    monkeypatch.setattr(testnet, "POLL_INTERVAL", 0.1)
    original = NodeProcesses.spawn

    def spawn(self: NodeProcesses, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = original(self, *args, **kwargs)
        net.spawned.append(proc)
        return proc

    monkeypatch.setattr(NodeProcesses, "spawn", spawn)
    return net


def run(tmp_path: Path, *extra: str) -> int:
    return testnet.testnet_command(parse("--nodes", "3", "--rounds", "3", "--out", str(tmp_path / "run"), *extra))


def test_full_cycle_writes_the_report_and_leaves_no_process(
    tmp_path: Path, fake: FakeNet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, "--byzantine", "1", "--attack", "alie") == 0
    out = capsys.readouterr().out
    assert "attackers flagged 0/1" in out
    assert "byzantine (alie)" in out
    for name in ("report.json", "accuracy.png", "reputation.png", "statuses.json", "configs/node2.toml", "logs/node0.log"):
        assert (tmp_path / "run" / name).exists(), name
    assert all(p.returncode == 0 for p in fake.spawned)  # stopped by SIGTERM, exited cleanly
    assert fake.all_gone()


def json_only(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Stand in for write_report where the pictures are not the point (saves ~0.5 s)."""
    path = out_dir / "report.json"
    path.write_text(json.dumps(report))
    return [path]


def test_early_exit_is_reported_with_the_log_tail(
    tmp_path: Path, fake: FakeNet, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testnet, "write_report", json_only)
    fake.mode = "crash"
    assert run(tmp_path) == 1
    out = capsys.readouterr().out
    assert "node n1" in out
    assert "exited early with code 3" in out
    assert "boom: the learner failed" in out
    assert fake.all_gone()


def test_timeout_stops_everything_and_exits_1(
    tmp_path: Path, fake: FakeNet, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testnet, "write_report", json_only)
    fake.mode = "stuck"
    # Long enough for the fake nodes to answer /status once on a loaded machine.
    assert run(tmp_path, "--timeout", "4") == 1
    out = capsys.readouterr().out
    assert "timeout" in out
    assert (tmp_path / "run" / "report.json").exists()
    assert all(p.returncode == 0 for p in fake.spawned)
    assert fake.all_gone()


@pytest.mark.parametrize(("interrupt", "code"), [(KeyboardInterrupt(), 130), (Terminated(signal.SIGTERM), 143)])
def test_interrupt_stops_every_node(
    tmp_path: Path, fake: FakeNet, monkeypatch: pytest.MonkeyPatch, interrupt: KeyboardInterrupt, code: int
) -> None:
    def interrupted(*args: Any) -> str:
        raise interrupt

    monkeypatch.setattr(testnet, "_watch", interrupted)
    assert run(tmp_path) == code
    assert all(p.returncode is not None for p in fake.spawned)
    assert fake.all_gone()


def test_sybils_share_one_process_and_other_attackers_do_not() -> None:
    sybil = Plan(nodes=5, rounds=1, byzantine=2, attack="sybil", out=Path("x"))
    assert testnet._process_groups(sybil) == [[0], [1], [2], [3, 4]]
    alie = Plan(nodes=5, rounds=1, byzantine=2, attack="alie", out=Path("x"))
    assert testnet._process_groups(alie) == [[0], [1], [2], [3], [4]]
    assert node_argv(Path("a.toml"), Path("b.toml"))[-4:] == ["--config", "a.toml", "--config", "b.toml"]
    assert "-v" not in node_argv(Path("a.toml"))
    assert node_argv(Path("a.toml"), verbose=2)[-6:] == ["-v", "-v", "node", "run", "--config", "a.toml"]
