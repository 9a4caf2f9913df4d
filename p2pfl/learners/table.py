"""The ``table`` task: classify the rows of a CSV or NumPy ``.npz`` file, no code needed.

``[task] name = "table"``, ``path = "data/mine.csv"``, ``label = "column"``. A CSV has a
header row; the label column may hold numbers or names, every other column must be
numeric. An ``.npz`` holds the label array (named by ``label``) and one 2-D feature
array, read without pickle. Features are standardised with the training split's mean
and deviation; the model is a small MLP (``hidden = [64]``). Like digits, every node
reads the whole file, takes a fixed stratified test split, and trains on its part of
the rest (``partition``); the file must therefore be the same on every node.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy_format

from p2pfl.config import require
from p2pfl.errors import ConfigError
from p2pfl.learners.batches import TensorBatches
from p2pfl.learners.datasets import PARTITIONS, Dataset, LabelMap, mapped_labels, stratified_sample
from p2pfl.learners.models import mlp
from p2pfl.learners.torch_learner import TorchLearner


@dataclass(frozen=True, kw_only=True, slots=True)
class TableOptions:
    """Options of the ``table`` task (every field is a ``[task]`` key)."""

    path: str = ""  # the CSV or .npz file; relative paths: relative to the node file
    label: str = "label"  # the CSV column (or .npz array) holding the class of each row
    hidden: tuple[int, ...] = (64,)  # hidden layer widths of the MLP; [] = logistic regression
    test_fraction: float = 0.25  # held out (stratified, same on every node) for evaluation
    partition: str = "iid"  # iid | dirichlet | shards | halves: how the training rows are shared
    alpha: float = 0.5  # Dirichlet concentration (smaller = more label skew)
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9

    def __post_init__(self) -> None:
        require(bool(self.path), "path", 'required: the table to learn, e.g. path = "data/mine.csv"')
        require(bool(self.label), "label", "must name the column that holds the class")
        require(all(width >= 1 for width in self.hidden), "hidden", "every width must be >= 1")
        require(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        require(self.partition in PARTITIONS, "partition", f"choose one of {', '.join(sorted(PARTITIONS))}")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", "must be > 0")
        require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")


@dataclass(frozen=True, eq=False)  # hashed by identity: the split cache keys on it
class Table:
    """A table read from disk: features ``(N, F)`` float32, class indices ``(N,)``, class names."""

    features: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def resolve_path(path: str, data_dir: Path | None) -> Path:
    """Return ``path`` under ``data_dir`` (the node file's directory) unless absolute."""
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and data_dir is not None:
        resolved = data_dir / resolved
    if not resolved.is_file():
        raise ConfigError(f"[task] path: no such file {resolved}; fix the path "
                          "(relative paths are relative to the node file)")
    return resolved


def read_table(path: Path, label: str) -> Table:
    """Read a CSV or ``.npz`` table; ConfigError names the key and the fix."""
    stat = path.stat()
    return _read_cached(str(path), label, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, label: str, mtime_ns: int, size: int) -> Table:
    # Keyed by mtime and size: nodes of one process share a read, an edited file is reread.
    features, raw_labels = (_read_npz if path.endswith(".npz") else _read_csv)(Path(path), label)
    if len(raw_labels) < 2:
        raise ConfigError(f"[task] path: {path} has {len(raw_labels)} rows; a task needs at least 2")
    classes, labels = _classes(raw_labels)
    return Table(features.astype(np.float32), labels, classes)


def _read_csv(path: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as file:
        rows = [row for row in csv.reader(file) if row]
    if not rows:
        raise ConfigError(f"[task] path: {path} is empty; a CSV needs a header row")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    if label not in header:
        shown = ", ".join(header[:8]) + (f", ... ({len(header)} in all)" if len(header) > 8 else "")
        raise ConfigError(f"[task] label: {path} has no column {label!r}; its columns: {shown}")
    target = header.index(label)
    features = np.empty((len(body), len(header) - 1), dtype=np.float64)
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ConfigError(f"[task] path: {path} line {line} has {len(row)} fields, the header {len(header)}")
        cells = row[:target] + row[target + 1:]
        try:
            features[line - 2] = [float(cell) for cell in cells]
        except ValueError:
            column, cell = _first_non_number(header, target, row)
            raise ConfigError(f"[task] path: {path} line {line} column {column!r} holds {cell!r}, not a "
                              "number; encode it as numbers or drop the column") from None
    return features, np.array([row[target].strip() for row in body])


def _first_non_number(header: list[str], target: int, row: list[str]) -> tuple[str, str]:
    for index, cell in enumerate(row):
        if index != target:
            try:
                float(cell)
            except ValueError:
                return header[index], cell
    raise AssertionError("a cell failed to parse but none fails alone")


def _read_npz(path: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {name.removesuffix(".npy"): _read_array(archive, name)
                      for name in archive.namelist() if name.endswith(".npy")}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ConfigError(f"[task] path: {path} is no readable .npz without pickle ({exc})") from None
    if label not in arrays:
        raise ConfigError(f"[task] label: {path} has no array {label!r}; its arrays: {', '.join(arrays)}")
    others = [name for name in arrays if name != label]
    if len(others) != 1:
        raise ConfigError(f"[task] path: {path} must hold {label!r} and one feature array, has {others}")
    features = arrays[others[0]]
    if features.ndim != 2 or not (np.issubdtype(features.dtype, np.number) or features.dtype == bool):
        raise ConfigError(f"[task] path: array {others[0]!r} of {path} must be 2-D numbers, "
                          f"is {features.dtype} {features.shape}")
    if arrays[label].shape != (features.shape[0],):
        raise ConfigError(f"[task] label: array {label!r} must have one entry per row ({features.shape[0]})")
    return features.astype(np.float64), arrays[label].astype(str)


def _read_array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(name) as member:
        return np.asarray(npy_format.read_array(member, allow_pickle=False))


def _classes(raw: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Map label values to class indices: numerically when all are integers, else by name."""
    names = np.unique(raw)
    with contextlib.suppress(ValueError):
        names = np.array(sorted(names, key=int))
    index = {name: i for i, name in enumerate(names)}
    return tuple(str(n) for n in names), np.array([index[value] for value in raw], dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _split(table: Table, options: TableOptions, num_nodes: int, seed: int) -> tuple[Dataset, Dataset, tuple[torch.Tensor, ...]]:
    is_test = np.zeros(len(table.labels), dtype=bool)
    is_test[stratified_sample(table.labels, options.test_fraction, np.random.default_rng(seed))] = True
    train_x, test_x = table.features[~is_test], table.features[is_test]
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std[std == 0] = 1.0  # a constant column stays 0 instead of dividing by zero
    whole = len(table.classes)
    train = Dataset(torch.from_numpy((train_x - mean) / std), torch.from_numpy(table.labels[~is_test]), whole)
    test = Dataset(torch.from_numpy((test_x - mean) / std), torch.from_numpy(table.labels[is_test]), whole)
    parts = PARTITIONS[options.partition](train.labels, num_nodes, seed=seed, alpha=options.alpha)
    return train, test, tuple(parts)


def make_table_learner(
    options: TableOptions, *, node_index: int, num_nodes: int, seed: int = 0, data_dir: Path | None = None,
    device: str = "cpu", label_map: LabelMap | None = None,
) -> TorchLearner:
    """Build node ``node_index``'s learner for the table ``options.path``."""
    table = read_table(resolve_path(options.path, data_dir), options.label)
    train, test, parts = _split(table, options, num_nodes, seed)
    local = train.subset(parts[node_index])
    labels = mapped_labels(local, label_map) if label_map else local.labels
    model = mlp(table.features.shape[1], options.hidden, len(table.classes), seed=seed)
    return TorchLearner(
        model,
        train_loader=TensorBatches(local.features, labels, batch_size=options.batch_size),
        test_loader=TensorBatches(test.features, test.labels, batch_size=len(test), shuffle=False),
        lr=options.lr, momentum=options.momentum, seed=seed * 1_000_003 + node_index, device=device,
    )


__all__ = ["Table", "TableOptions", "make_table_learner", "read_table", "resolve_path"]
