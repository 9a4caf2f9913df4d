"""`p2pfl --help`, `keygen` and `node status` start fast: neither torch nor libp2p is imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
from p2pfl.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(name for name in ("torch", "libp2p", "numpy", "sklearn") if name in sys.modules)
print(json.dumps({"heavy": heavy, "code": code}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--help"], 0),
        (["node", "status", "--port", "1"], 2),  # nobody listens there: one error line
        (["keygen", "--out", "{tmp}/k.pem"], 0),
        (["export", "--help"], 0),
    ],
)
def test_light_commands_import_neither_torch_nor_libp2p(argv: list[str], code: int, tmp_path: Path) -> None:
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                          check=False)

    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"heavy": [], "code": code}
    if argv[0] == "keygen":
        assert (tmp_path / "k.pem").stat().st_size > 0
