"""A user's own task, as a new user runs it: the examples/ files, real processes, small sizes.

- examples/table: three daemons learn a CSV from their config files only;
- examples/digits_cnn.py: a custom factory run by `p2pfl testnet --task module:function`;
- a daemon running that plug-in is killed, resumes from its checkpoint, and its
  `p2pfl export` loads into the task's model with the accuracy /status reported.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2pfl.cli.main import main
from p2pfl.cli.processes import NodeProcesses, node_argv, node_env
from p2pfl.cli.testnet_plan import pick_ports
from p2pfl.config import Limits
from p2pfl.learners import TorchLearner
from p2pfl.learners.tasks import TaskContext
from p2pfl.node.checkpoint import load_checkpoint
from tests.real.test_daemon import wait_for

pytestmark = pytest.mark.real

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example_copy(tmp_path: Path, rounds: int) -> list[Path]:
    """The table example as a user gets it, on free ports and fewer rounds."""
    shutil.copytree(EXAMPLES / "table", tmp_path, dirs_exist_ok=True)
    ports = pick_ports(6)
    configs = []
    for i in (1, 2, 3):
        path = tmp_path / f"node{i}.toml"
        text = path.read_text().replace("rounds = 10", f"rounds = {rounds}")
        for old, new in zip((4011, 4012, 4013, 9111, 9112, 9113), ports, strict=True):
            text = text.replace(f"= {old}", f"= {new}").replace(f"/tcp/{old}/", f"/tcp/{new}/")
        path.write_text(text)
        configs.append(path)
    return configs


def test_csv_example_runs_from_its_config_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = example_copy(tmp_path, rounds=3)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "make_csv.py"))  # the user's one step: write cancer.csv
    for i in (1, 2, 3):
        assert main(["keygen", "--out", f"keys/node{i}.pem", "--insecure-demo-seed", str(10 + i)]) == 0

    done = subprocess.run(node_argv(*configs), capture_output=True, text=True, timeout=120, check=False,
                          env=node_env())

    assert done.returncode == 0, done.stderr[-3000:]
    for i in (1, 2, 3):
        checkpoint = load_checkpoint(tmp_path / "state" / f"node{i}", limits=Limits())
        assert checkpoint is not None
        assert [r.round for r in checkpoint.history] == [0, 1, 2]
        assert sum(r.used for r in checkpoint.history) > 0  # they learned together
        assert checkpoint.history[-1].accuracy > 0.85  # breast cancer, 2 classes (majority: 0.63)


def test_custom_factory_runs_in_a_testnet(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "p2pfl.cli.main", "testnet", "--nodes", "2", "--rounds", "2",
            "--task", "digits_cnn:make_learner", "--out", str(tmp_path)]

    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=EXAMPLES)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["task"] == "digits_cnn:make_learner"
    assert all(node["round_reached"] == 2 for node in report["nodes"])
    assert 'factory = "digits_cnn:make_learner"' in (tmp_path / "configs" / "node0.toml").read_text()


def plugin_node_file(tmp_path: Path, port: int, http_port: int, rounds: int) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
network_id = "plugin-resume"
key_file = "node.pem"
data_dir = "state"
rounds = {rounds}
http_port = {http_port}

[net]
port = {port}

[task]
factory = "digits_cnn:make_learner"

[round]
round_timeout = 0.5
min_neighbours = 0  # a lone daemon, on purpose: this test is about resuming and exporting
""")
    return path


def test_killed_plugin_daemon_resumes_and_its_export_has_the_status_accuracy(tmp_path: Path) -> None:
    load_file = pytest.importorskip("safetensors.torch").load_file
    port, http = pick_ports(2)
    config = plugin_node_file(tmp_path, port, http, rounds=6)
    env = {**node_env(), "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    with NodeProcesses(grace=5) as procs:
        victim = procs.spawn(node_argv(config), tmp_path / "first.log", env)
        before = wait_for(http, lambda s: s["round"] >= 2, timeout=60)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)

        procs.spawn(node_argv(config), tmp_path / "second.log", env)
        done = wait_for(http, lambda s: s["state"] == "done", timeout=60)
        # Resumed from disk: the rounds finished before the kill are its history, record for
        # record (a fresh start would have new timestamps and accuracies).
        assert done["history"][: len(before["history"])] == before["history"]
        assert "resumed from checkpoint at round" in (tmp_path / "second.log").read_text()
        assert [r["round"] for r in done["history"]] == list(range(6))
        assert main(["export", "--data-dir", str(tmp_path / "state"), "--out", str(tmp_path / "m.safetensors")]) == 0

    sys.path.insert(0, str(EXAMPLES))
    try:
        digits_cnn = importlib.import_module("digits_cnn")
    finally:
        sys.path.remove(str(EXAMPLES))
    model = digits_cnn.model(0)
    model.load_state_dict(load_file(tmp_path / "m.safetensors"))
    learner = digits_cnn.make_learner(TaskContext())
    assert isinstance(learner, TorchLearner)
    x, y = next(iter(learner.test_loader))
    with torch.inference_mode():
        assert int((model(x).argmax(1) == y).sum()) / len(y) == done["accuracy"]
