"""`p2pfl export`: a node's model as .safetensors, loadable without p2pfl; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.cli.main import main
from p2pfl.learners import TorchLearner
from p2pfl.learners.models import DigitsMLP
from p2pfl.learners.tasks import TaskContext, make_learner
from p2pfl.node.checkpoint import Checkpoint, save_checkpoint
from p2pfl.node.stats import RoundRecord

safetensors_torch = pytest.importorskip("safetensors.torch")


def checkpointed_learner(directory: Path) -> tuple[TorchLearner, float]:
    learner = make_learner("digits", TaskContext())
    assert isinstance(learner, TorchLearner)
    learner.fit(1)
    accuracy = learner.evaluate().accuracy
    record = RoundRecord(round=4, accuracy=accuracy, loss=0.5, used=2, duration=0.1, bytes_in=0, bytes_out=0)
    save_checkpoint(directory, Checkpoint(round=5, learner_state=learner.checkpoint_state(), reputation={},
                                          peers=(), history=(record,)))
    return learner, accuracy


def test_the_export_loads_into_a_plain_model_and_keeps_its_accuracy(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    learner, accuracy = checkpointed_learner(tmp_path / "state")
    out = tmp_path / "model.safetensors"

    assert main(["export", "--data-dir", str(tmp_path / "state"), "--out", str(out)]) == 0

    model = DigitsMLP()
    model.load_state_dict(safetensors_torch.load_file(out))  # strict: exactly the model's tensors
    x, y = next(iter(learner.test_loader))
    assert int((model(x).argmax(1) == y).sum()) / len(y) == accuracy
    from safetensors import safe_open

    with safe_open(str(out), "pt") as file:
        assert file.metadata() == {"round": "4", "accuracy": repr(accuracy), "tensors": "4"}
    assert f"round 4, accuracy {accuracy!r}" in capsys.readouterr().out


def test_exporting_without_a_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--data-dir", str(tmp_path), "--out", str(tmp_path / "m.safetensors")]) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: --data-dir: no checkpoint.cbor in ")
    assert err.count("\n") == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_exporting_a_corrupt_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "checkpoint.cbor").write_bytes(b"\xa1\x61v\x01 truncated")

    assert main(["export", "--data-dir", str(tmp_path), "--out", str(tmp_path / "m.safetensors")]) == 2

    err = capsys.readouterr().err
    assert "is corrupt" in err
    assert err.count("\n") == 1
