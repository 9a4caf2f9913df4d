"""Scenario and grid files: the examples load; every mistake is a ConfigError naming the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from p2pfl.errors import ConfigError
from p2pfl.sim.scenario import NO_ATTACK, load_grid, load_scenario, parse_grid, parse_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"

BASE = """
name = "t"
nodes = 8
rounds = 3
seeds = 2
[topology]
kind = "regular"
degree = 3
[data]
partition = "dirichlet"
alpha = 0.5
[rule]
name = "trimmed_mean"
params = { trim = 1 }
[attack]
name = "sign_flip"
byzantine = 2
[link]
latency = 0.01
loss = 0.1
"""


def doc(text: str = BASE, **changes: Any) -> dict[str, Any]:
    parsed = tomllib.loads(text)
    parsed.update(changes)
    return parsed


def test_full_scenario_parses() -> None:
    scenario = parse_scenario(doc())
    assert (scenario.nodes, scenario.rounds, scenario.seeds) == (8, 3, (0, 1))
    assert scenario.topology == "regular"
    assert dict(scenario.topology_params) == {"degree": 3}
    assert scenario.rule == "trimmed_mean"
    assert dict(scenario.rule_params) == {"trim": 1}
    assert scenario.attack == "sign_flip"
    assert scenario.byzantine == 2
    assert scenario.link.loss == 0.1
    assert scenario.link.latency == 0.01
    assert scenario.delivery == "neighbours"


def test_an_empty_file_is_the_default_scenario() -> None:
    scenario = parse_scenario({})
    assert (scenario.nodes, scenario.rounds, scenario.seeds) == (16, 10, (0,))
    assert scenario.attack == NO_ATTACK
    assert scenario.byzantine == 0
    assert scenario.rule == "clipped_gossip"


def test_fraction_gives_a_count() -> None:
    d = doc()
    d["attack"] = {"name": "gaussian", "fraction": 0.25}
    assert parse_scenario(d).byzantine == 2


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["topology"].update(dgree=3), "topology.dgree"),
        (lambda d: d["data"].update(alfa=1), "data.alfa"),
        (lambda d: d["attack"].update(placment="random"), "attack.placment"),
        (lambda d: d["link"].update(latncy=1), r"unknown key 'latncy' in \[link\]"),
        (lambda d: d.update(reputation={"treshold": 0.2}), r"unknown key 'treshold' in \[reputation\]"),
        (lambda d: d["rule"].update(name="avg"), "rule.name"),
        (lambda d: d["rule"].update(params={"trimm": 1}), "rule.params"),
        (lambda d: d["attack"].update(name="nuke"), "attack.name"),
        (lambda d: d["attack"].update(params={"scal": 2}), "attack.params"),
        (lambda d: d["attack"].update(byzantine=8), "attack.byzantine"),
        (lambda d: d["attack"].update(fraction=0.1), "attack.fraction"),
        (lambda d: d["attack"].update(placement="centre"), "attack.placement"),
        (lambda d: d["topology"].update(kind="star"), "topology.kind"),
        (lambda d: d["topology"].update(p=0.2), "topology.p"),
        (lambda d: d["data"].update(partition="zipf"), r"\[task\] partition"),
        (lambda d: d.update(seeds=[]), "seeds"),
        (lambda d: d.update(delivery="flood"), "delivery"),
        (lambda d: d.update(round_timeout=0), r"\[round\] round_timeout"),
        (lambda d: d["link"].update(loss=2.0), r"\[link\] loss"),
        (lambda d: d.update(round={"quorum": 0}), r"\[round\] quorum"),
        (lambda d: d.update(round={"max_lag": 1.5}), r"\[round\] max_lag: expected an integer"),
        (lambda d: d.update(limits={"max_tensors": "9"}), r"\[limits\] max_tensors: expected an integer"),
    ],
)
def test_mistakes_name_the_key(mutate: Any, key: str) -> None:
    d = doc()
    mutate(d)
    with pytest.raises(ConfigError) as info:
        parse_scenario(d)
    assert re.match(key, str(info.value)), str(info.value)


def test_attack_without_attackers_is_refused() -> None:
    d = doc()
    d["attack"] = {"name": "sign_flip"}
    with pytest.raises(ConfigError, match="attack.byzantine"):
        parse_scenario(d)


GRID = BASE + """
[grid]
rules = ["mean", "trimmed_mean"]
attacks = ["sign_flip", "gaussian"]
[grid.rule_params.trimmed_mean]
trim = 2
[grid.attack_params.gaussian]
sigma = 3.0
"""


def test_grid_adds_the_baseline_and_spans_cells() -> None:
    grid = parse_grid(tomllib.loads(GRID))
    assert grid.attacks == (NO_ATTACK, "sign_flip", "gaussian")
    cells = grid.scenarios()
    assert [(c.rule, c.attack) for c in cells] == [
        (r, a) for r in ("mean", "trimmed_mean") for a in (NO_ATTACK, "sign_flip", "gaussian")
    ]
    baseline = grid.cell("mean", NO_ATTACK)
    assert baseline.byzantine == 0
    assert dict(baseline.attack_params) == {}
    assert dict(grid.cell("trimmed_mean", "sign_flip").rule_params) == {"trim": 2}
    assert dict(grid.cell("mean", "gaussian").attack_params) == {"sigma": 3.0}
    assert grid.cell("mean", "gaussian").byzantine == 2


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('"mean", "trimmed_mean"]', '"mean", "avg"]', "grid.rules"),
        ("[grid.attack_params.gaussian]", "[grid.attack_params.ipm]", "grid.attack_params.ipm"),
        ("[grid]", "[grid]\nbaselin = true", "grid.baselin"),
        ("sigma = 3.0", "sigmaa = 3.0", "attack.params"),
    ],
)
def test_grid_mistakes_name_the_key(old: str, new: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_grid(tomllib.loads(GRID.replace(old, new)))
    assert str(info.value).startswith(key)


def test_scenario_loader_refuses_a_grid_file(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    with pytest.raises(ConfigError, match="--grid"):
        load_scenario(path)
    assert load_grid(path).rules == ("mean", "trimmed_mean")


def test_bad_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("nodes = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_examples_load(name: str) -> None:
    path = EXAMPLES / name
    if "grid" in tomllib.loads(path.read_text()):
        assert load_grid(path).scenarios()
    else:
        assert load_scenario(path).rounds >= 1


def test_attack_grid_example_is_the_specified_one() -> None:
    grid = load_grid(EXAMPLES / "attack_grid.toml")
    assert (grid.base.nodes, grid.base.rounds, grid.base.seeds) == (16, 30, (0, 1, 2))
    assert grid.base.topology == "regular"
    assert grid.base.topology_params["degree"] == 4
    assert grid.base.partition == "dirichlet"
    assert grid.base.alpha == 0.5
    assert grid.base.byzantine == 4
    assert {"mean", "median", "trimmed_mean", "clipped_gossip"} <= set(grid.rules)
    assert set(grid.attacks) >= {
        NO_ATTACK, "sign_flip", "gaussian", "label_flip", "alie", "ipm", "dissensus",
        "free_rider", "replay", "forge", "equivocate",
    }
