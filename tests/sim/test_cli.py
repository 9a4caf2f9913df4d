"""`p2pfl sim` end to end on tiny files: outputs written, table printed, errors reported."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from p2pfl.sim.cli import add_arguments, main, scorecards, sim_command
from p2pfl.sim.scenario import load_grid

SCENARIO = """
name = "tiny"
nodes = 4
rounds = 2
seeds = [3]
round_timeout = 2.0
[topology]
kind = "complete"
"""

GRID = SCENARIO + """
[attack]
byzantine = 1
[grid]
rules = ["mean", "median"]
attacks = ["sign_flip"]
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_scenario_writes_scorecard_and_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO)
    assert sim_command(parse("--scenario", str(path), "--out", str(tmp_path / "out"))) == 0
    card = json.loads((tmp_path / "out" / "tiny-seed3.json").read_text())
    assert card["seed"] == 3
    assert len(card["accuracy"]["honest_mean"]) == 2
    assert (tmp_path / "out" / "tiny-seed3-accuracy.png").stat().st_size > 0
    assert (tmp_path / "out" / "tiny-seed3-reputation.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "round 2/2" in out
    assert "honest accuracy" in out


def test_grid_writes_runs_summary_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    assert sim_command(parse("--grid", str(path), "--out", str(tmp_path / "out"))) == 0
    summary = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert summary["rules"] == ["mean", "median"]
    assert summary["attacks"] == ["none", "sign_flip"]
    assert len(list((tmp_path / "out" / "runs").glob("*.json"))) == 4
    assert (tmp_path / "out" / "grid.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "run 4/4: median, sign_flip, seed 3" in out
    assert "rule \\ attack" in out
    assert "±" in out


def test_seeds_option_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO.replace("rounds = 2", "rounds = 1"))
    assert sim_command(parse("--scenario", str(path), "--out", str(tmp_path), "--seeds", "2")) == 0
    assert sorted(p.name for p in tmp_path.glob("tiny-seed*.json")) == ["tiny-seed0.json", "tiny-seed1.json"]


def test_a_bad_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.toml"
    path.write_text("colour = 1\n" + SCENARIO)
    assert main(["--scenario", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "error: colour: unknown key"


def test_runs_in_worker_processes_score_as_in_this_one(tmp_path: Path) -> None:
    # Scenarios travel to the workers pickled, their frozen tables included; a run is
    # deterministic for its seed. Workers run torch on one thread: sums of floats then
    # round differently in the 7th digit (the consensus distance), nothing else.
    path = tmp_path / "g.toml"
    path.write_text(GRID.replace('attacks = ["sign_flip"]', 'attacks = ["ipm"]\n[grid.attack_params.ipm]\neps = 0.3'))
    grid = load_grid(path)
    runs = [(s, 3) for s in grid.scenarios() if s.attack == "ipm"]
    assert [s.attack_params for s, _ in runs] == [{"eps": 0.3}] * 2
    here, there = list(scorecards(runs, jobs=1)), list(scorecards(runs, jobs=2))
    assert [card["scenario"]["rule"] for card in there] == ["mean", "median"]
    for a, b in zip(here, there, strict=True):
        assert b.pop("consensus") == pytest.approx(a.pop("consensus"), rel=1e-5)
        assert b["final"].pop("consensus") == pytest.approx(a["final"].pop("consensus"), rel=1e-5)
        del a["timing"], b["timing"]
        assert json.dumps(b, sort_keys=True) == json.dumps(a, sort_keys=True)
