"""The reference check: config, refusing to start, the evidence rule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import torch

from p2pfl.assembly import NodeSpec, build_node
from p2pfl.assembly.toml import read_node_file
from p2pfl.core.crypto import Identity
from p2pfl.errors import ConfigError
from p2pfl.learners.datasets import digits_reference
from p2pfl.learners.reference import ClassScores, ReferenceSet, sha256_of
from p2pfl.node.config import NodeConfig, ReferenceConfig
from p2pfl.node.reference import ReferenceGate, balanced_loss, cap_of, gain_of
from p2pfl.sim.scenario import parse_scenario


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    held = digits_reference(20)
    data = ReferenceSet(held.features, held.labels).encode()
    path = tmp_path_factory.mktemp("ref") / "ref.cbor"
    path.write_bytes(data)
    return path, sha256_of(data)


def scores(accuracy: Iterable[float]) -> ClassScores:
    values = tuple(accuracy)
    return ClassScores(loss=tuple(1 - a for a in values), accuracy=values)


# -- config -----------------------------------------------------------------------------


def test_node_files_read_reference_relative_to_the_file(digits_file: tuple[Path, str]) -> None:
    _, digest = digits_file
    doc = {"node": {"key_file": "k.pem"}, "reference": {"path": "ref.cbor", "sha256": digest}}

    node = read_node_file(doc, base=Path("/cfg")).node

    assert node.reference.path == Path("/cfg/ref.cbor")
    assert node.reference.sha256 == digest


def test_scenarios_read_the_same_reference_table(digits_file: tuple[Path, str]) -> None:
    path, digest = digits_file

    scenario = parse_scenario({"reference": {"path": str(path), "sha256": digest, "tolerance": 0.2}})

    assert scenario.reference == ReferenceConfig(path=path, sha256=digest, tolerance=0.2)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"path": "ref.cbor"}, r"\[reference\] sha256: must be the file's sha256"),
        ({"path": "ref.cbor", "sha256": "abc"}, r"\[reference\] sha256: must be the file's sha256"),
        ({"path": "ref.cbor", "sha256": "0" * 64, "tolerance": 0}, r"\[reference\] tolerance: must be in"),
        ({"path": "ref.cbor", "sha256": "0" * 64, "evidence": "yes"}, r"\[reference\] evidence"),
        ({"pth": "ref.cbor"}, r"pth"),
    ],
)
def test_bad_reference_tables_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_node_file({"node": {"key_file": "k.pem"}, "reference": table}, base=Path("/cfg"))


def spec(reference: ReferenceConfig) -> NodeSpec:
    return NodeSpec(node=NodeConfig(reference=reference), task_options={"holdout": 20})


def test_a_node_with_a_good_reference_file_builds(digits_file: tuple[Path, str]) -> None:
    path, digest = digits_file

    node = build_node(spec(ReferenceConfig(path=path, sha256=digest)), identity=Identity.generate(), offload=False)

    assert node is not None


def test_a_node_refuses_to_start_when_the_hash_differs(digits_file: tuple[Path, str]) -> None:
    path, digest = digits_file
    wrong = "f" * 64

    with pytest.raises(ConfigError, match=rf"^\[reference\] sha256: .* hashes to {digest}, expected {wrong}$"):
        build_node(spec(ReferenceConfig(path=path, sha256=wrong)), identity=Identity.generate(), offload=False)


def test_a_node_refuses_to_start_without_its_reference_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\[reference\] path: cannot read"):
        build_node(spec(ReferenceConfig(path=tmp_path / "gone.cbor", sha256="0" * 64)),
                   identity=Identity.generate(), offload=False)


def test_a_reference_set_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    data = ReferenceSet(torch.rand(4, 3), torch.tensor([0, 1, 2, 3])).encode()
    path = tmp_path / "other.cbor"
    path.write_bytes(data)

    with pytest.raises(ConfigError, match=r"\[reference\] path: .* does not fit the model"):
        build_node(spec(ReferenceConfig(path=path, sha256=sha256_of(data))),
                   identity=Identity.generate(), offload=False)


# -- the rule ---------------------------------------------------------------------------


def test_the_balanced_loss_weighs_every_class_alike_and_skips_empty_ones() -> None:
    assert balanced_loss(ClassScores(loss=(0.2, math.nan, 0.4), accuracy=(1, math.nan, 1))) == pytest.approx(0.3)
    assert balanced_loss(ClassScores(loss=(0.2, math.inf), accuracy=(1, 0))) == math.inf


def test_the_gain_is_how_much_lower_the_loss_is_without_the_neighbour() -> None:
    with_it, without = scores([0.5, 0.5]), scores([0.9, 0.9])

    assert gain_of(with_it, without) == pytest.approx(0.4)
    assert gain_of(without, with_it) == pytest.approx(-0.4)
    assert gain_of(ClassScores(loss=(math.inf,), accuracy=(0,)), scores([0.9])) == math.inf


def test_the_cap_falls_from_the_floor_to_zero_over_one_tolerance() -> None:
    assert cap_of(0.1, 0.1, 0.25) == 1.0
    assert cap_of(0.15, 0.1, 0.25) == pytest.approx(0.125)
    assert cap_of(0.2, 0.1, 0.25) == 0.0
    assert cap_of(math.inf, 0.1, 0.25) == 0.0


class FixedScorer:
    """Scores a state by its one tensor ``acc``: the per-class accuracy of that 'model'."""

    def score_classes(
        self, states: Iterable[Mapping[str, torch.Tensor]], reference: ReferenceSet
    ) -> list[ClassScores]:
        return [scores(state["acc"].tolist()) for state in states]


def test_the_gate_refuses_the_neighbour_without_which_the_mix_is_better(
    digits_file: tuple[Path, str],
) -> None:
    path, digest = digits_file
    gate = ReferenceGate.__new__(ReferenceGate)
    gate.config, gate.scorer, gate.reference = ReferenceConfig(path=path, sha256=digest), FixedScorer(), None  # type: ignore[assignment]
    own = {"acc": torch.tensor([0.9, 0.3])}
    # Shares 1/3 each: the mix is [0.6, 0.5] (balanced loss 0.45); without the flipper
    # [0.9, 0.5] (0.3: gain 0.15); without the honest one [0.6, 0.3] (0.55: gain -0.1).
    flipped, honest = {"acc": torch.tensor([0.0, 0.3])}, {"acc": torch.tensor([0.9, 0.9])}

    verdict = gate.judge(own, [flipped, honest], [1.0, 1.0], 1.0, 0.25)

    assert verdict.gain == pytest.approx([0.15, -0.1])
    assert verdict.refused == [True, False]
    assert verdict.caps == [1.0, 1.0]  # by default a refusal is no evidence: out of this round only

    gate.config = ReferenceConfig(path=path, sha256=digest, evidence=True)
    verdict = gate.judge(own, [flipped, honest], [1.0, 1.0], 1.0, 0.25)

    assert verdict.refused == [True, False]
    assert verdict.caps[0] == pytest.approx(0.125)  # 0.05 over the tolerance 0.1
