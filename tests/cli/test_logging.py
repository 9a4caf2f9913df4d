"""`-v` turns on p2pfl's debug lines only; `-vv` everybody's (libp2p's, and the root logger's)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
from p2pfl.cli.main import configure_logging
configure_logging(int(sys.argv[1]))
logging.getLogger("p2pfl.node.mixer").debug("ours")
logging.debug("root's")  # py-libp2p logs some lines on the root logger
logging.getLogger("libp2p.network.swarm").debug("libp2p's")
logging.getLogger("p2pfl.node.node").info("round line")
"""


@pytest.mark.parametrize(("verbosity", "shown"), [
    (0, ["round line"]),
    (1, ["ours", "round line"]),
    (2, ["ours", "root's", "libp2p's", "round line"]),
])
def test_each_verbosity_shows_its_loggers(verbosity: int, shown: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(verbosity)], capture_output=True, text=True,
                         check=True, timeout=60)
    assert [line.split(": ", 1)[1] for line in out.stderr.splitlines()] == shown
