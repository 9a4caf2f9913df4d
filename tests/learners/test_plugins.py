"""Tasks as plug-ins: the bundled table task, factories by import path, the device option."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format

from p2pfl.assembly import read_node_file
from p2pfl.errors import ConfigError
from p2pfl.learners import TorchLearner
from p2pfl.learners.device import resolve_device
from p2pfl.learners.tasks import TaskContext, make_learner

ROWS = 120


def write_csv(path: Path, *, label: str = "kind", bad_cell: str | None = None) -> Path:
    """Two well separated classes ("left", "right") of 3 numeric features."""
    rng = np.random.default_rng(0)
    lines = [f"a,b,{label},c"]
    for i in range(ROWS):
        side = i % 2
        a, b, c = rng.normal(loc=4.0 * side, size=3)
        lines.append(f"{a},{b},{'right' if side else 'left'},{c}")
    if bad_cell is not None:
        lines[7] = f"1.0,{bad_cell},left,2.0"
    path.write_text("\n".join(lines) + "\n")
    return path


def table_context(table: Path, **options: object) -> TaskContext:
    return TaskContext(node_index=0, num_nodes=2, data_dir=table.parent,
                       options={"path": table.name, "label": "kind", **options})


def test_a_csv_table_learns_with_no_code(tmp_path: Path) -> None:
    learner = make_learner("table", table_context(write_csv(tmp_path / "t.csv"), hidden=[8, 8]))
    learner.fit(5)

    assert learner.evaluate().accuracy > 0.9  # separable classes (random: 0.5)
    assert learner.num_train_samples == ROWS * 3 // 4 // 2  # its half of the training rows


def test_table_model_is_a_plain_sequential_of_the_hidden_sizes(tmp_path: Path) -> None:
    learner = make_learner("table", table_context(write_csv(tmp_path / "t.csv"), hidden=[5]))

    shapes = {name: tuple(t.shape) for name, t in learner.get_state().items()}
    assert shapes == {"0.weight": (5, 3), "0.bias": (5,), "2.weight": (2, 5), "2.bias": (2,)}


def test_nodes_of_a_table_task_start_from_the_same_model(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv")
    first = make_learner("table", table_context(path)).get_state()
    second = make_learner("table", TaskContext(node_index=1, num_nodes=2, data_dir=tmp_path,
                                               options={"path": "t.csv", "label": "kind"})).get_state()

    assert all(torch.equal(first[name], second[name]) for name in first)


def test_an_npz_table_is_read_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = np.arange(ROWS) % 3
    x = rng.normal(size=(ROWS, 4)) + y[:, None] * 3.0
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in (("x", x), ("y", y)):
            with archive.open(f"{name}.npy", "w") as member:
                npy_format.write_array(member, array)

    learner = make_learner("table", TaskContext(data_dir=tmp_path, options={"path": "t.npz", "label": "y"}))

    assert learner.evaluate().samples == ROWS // 4
    assert learner.get_state()["2.bias"].shape == (3,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"path": "nope.csv"}, r"^\[task\] path: no such file .*nope.csv; fix the path"),
        ({"label": "class"}, r"^\[task\] label: .* has no column 'class'; its columns: a, b, kind, c$"),
        ({"hidden": [0]}, r"^\[task\] hidden: every width must be >= 1"),
        ({"hidden": "64"}, r"^\[task\] hidden: expected a list of integers, got '64'"),
    ],
)
def test_table_errors_name_the_key_and_the_fix(tmp_path: Path, options: dict[str, object], message: str) -> None:
    context = table_context(write_csv(tmp_path / "t.csv"), **options)

    with pytest.raises(ConfigError, match=message):
        make_learner("table", context)


def test_a_non_numeric_feature_is_named_with_its_line_and_column(tmp_path: Path) -> None:
    context = table_context(write_csv(tmp_path / "t.csv", bad_cell="red"))

    with pytest.raises(ConfigError, match=r"line 8 column 'b' holds 'red', not a number; encode it"):
        make_learner("table", context)


def test_a_node_file_with_a_broken_table_fails_before_the_network_starts(tmp_path: Path) -> None:
    from p2pfl.assembly import build_node

    write_csv(tmp_path / "t.csv", bad_cell="x")
    spec = read_node_file({"node": {"key_file": "k.pem"},
                           "task": {"name": "table", "path": "t.csv", "label": "kind"}}, base=tmp_path).spec

    assert spec.data_dir == tmp_path  # relative data paths: relative to the node file
    with pytest.raises(ConfigError, match=r"^\[task\] path: .* column 'b' holds 'x'"):
        build_node(spec)


def test_a_factory_is_named_by_its_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_tasks_for_test.py").write_text(
        "from p2pfl.learners.tasks import make_learner\n"
        "def build(context):\n"
        "    assert context.options['width'] == 7\n"
        "    return make_learner('digits', context.__class__(node_index=context.node_index,\n"
        "                        num_nodes=context.num_nodes))\n"
        "def not_a_learner(context):\n"
        "    return 42\n"
    )
    monkeypatch.chdir(tmp_path)  # factories are imported from the current directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    spec = read_node_file({"node": {"key_file": "k.pem"},
                           "task": {"factory": "my_tasks_for_test:build", "width": 7}}, base=tmp_path).spec

    assert isinstance(make_learner(spec.task, spec.task_context()), TorchLearner)
    with pytest.raises(ConfigError, match=r"^\[task\] factory: my_tasks_for_test:not_a_learner returned a int"):
        make_learner("my_tasks_for_test:not_a_learner", TaskContext())


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_such_module_xyz:make", r"^\[task\] factory: cannot import 'no_such_module_xyz' .*PYTHONPATH"),
        ("p2pfl.learners.tasks:no_such_function", r"has no function 'no_such_function'; define def"),
        ("just_a_module", r'^\[task\] factory: .* is not "package.module:function"'),
    ],
)
def test_a_wrong_factory_path_is_one_clear_error(factory: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_node_file({"node": {"key_file": "k.pem"}, "task": {"factory": factory}}, base=Path("/cfg"))


def test_name_and_factory_together_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^\[task\] factory: give name .* or factory, not both"):
        read_node_file({"node": {"key_file": "k.pem"},
                        "task": {"name": "digits", "factory": "a:b"}}, base=Path("/cfg"))


def test_auto_device_is_the_cpu_where_torch_sees_no_gpu() -> None:
    assert not torch.cuda.is_available()  # the test environment's torch is CPU-only
    assert resolve_device("auto") in ("cpu", "mps")
    assert TaskContext(device="cpu").device == "cpu"


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_asking_for_a_gpu_where_there_is_none_is_one_line(device: str) -> None:
    with pytest.raises(ConfigError, match=rf"^\[train\] device: '{device}' but torch sees no CUDA GPU.*; use"):
        read_node_file({"node": {"key_file": "k.pem"}, "train": {"device": device}}, base=Path("/cfg"))


def test_an_unknown_device_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown device 'gpu'; choose one of auto \| cpu \| cuda"):
        TaskContext(device="gpu")


def test_learner_states_leave_on_the_cpu_whatever_the_device() -> None:
    learner = make_learner("digits", TaskContext(device="cpu"))
    learner.fit(1)

    assert isinstance(learner, TorchLearner)
    assert learner.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in learner.checkpoint_state().values())


def test_the_daemon_reports_a_broken_table_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfl.cli.main import main

    write_csv(tmp_path / "t.csv")
    config = tmp_path / "node.toml"
    config.write_text('[node]\nkey_file = "k.pem"\n[task]\nname = "table"\npath = "t.csv"\nlabel = "species"\n')

    assert main(["node", "run", "--config", str(config)]) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: [task] label: ")
    assert "has no column 'species'" in err
    assert err.count("\n") == 1
