"""examples/embed_two_processes.py: p2pfl.run_node in each of two processes, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embed_two_processes.py"


def test_two_processes_each_embedding_a_node_learn_together() -> None:
    argv = [sys.executable, str(EXAMPLE), "--rounds", "2", "--linger", "1"]

    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"node 0 listens on /ip4/127\.0\.0\.1/tcp/\d+/p2p/16Uiu2", done.stdout)
    finished = re.findall(r"node (\d): accuracy (\d\.\d+) after 2 rounds", done.stdout)
    assert sorted(index for index, _ in finished) == ["0", "1"]
    assert all(float(accuracy) > 0.5 for _, accuracy in finished)  # ten classes: learning, not chance
