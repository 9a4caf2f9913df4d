"""The one TOML reader: every config field is a documented key; every value is type-checked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from p2pfl.assembly.toml import (
    AGGREGATION,
    NODE_RECORDS,
    NODE_SCALARS,
    documented_keys,
    read_node_file,
)
from p2pfl.config import field_names
from p2pfl.errors import ConfigError
from p2pfl.node.config import NodeConfig
from p2pfl.sim.runner import _config
from p2pfl.sim.scenario import parse_scenario

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "configs" / "node.toml"


def keys_in(text: str) -> dict[str, set[str]]:
    """Keys shown in a TOML file by section, commented-out ones included."""
    found: dict[str, set[str]] = {}
    current = ""
    for line in text.splitlines():
        if header := re.match(r"^#?\s*\[([a-z_]+)\]", line):
            current = header.group(1)
        elif key := re.match(r"^#?\s*([a-z0-9_]+)\s*=", line):
            found.setdefault(current, set()).add(key.group(1))
    return found


def test_node_toml_documents_every_field_of_every_config_record() -> None:
    documented = keys_in(EXAMPLE.read_text())
    expected = {section: set(keys) for section, keys in documented_keys().items()}
    assert documented == expected


def test_every_node_config_field_has_a_place_in_the_file() -> None:
    placed = set(NODE_SCALARS) | set(NODE_RECORDS.values()) | set(AGGREGATION.values())
    assert placed == set(field_names(NodeConfig))


def read(doc: dict[str, Any]) -> Any:
    return read_node_file({"node": {"key_file": "k.pem"}, **doc}, base=Path("/cfg"))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"node": {"key_file": "k.pem", "exit_when_done": "false"}},
         r"\[node\] exit_when_done: expected true or false, got 'false'"),
        ({"train": {"lr": "0.1"}}, r"\[train\] lr: expected a number, got '0.1'"),
        ({"task": {"lr": "0.1"}}, r"\[task\] lr: expected a number, got '0.1'"),
        ({"train": {"epochs": 1.5}}, r"\[train\] epochs: expected an integer, got 1.5"),
        ({"round": {"local_epochs": 1.5}}, r"\[round\] local_epochs: expected an integer"),
        ({"round": {"quorum": 2}}, r"\[round\] quorum: must be a fraction"),
        ({"net": {"bootstrap": "/ip4/x"}}, r"\[net\] bootstrap: expected a list of strings"),
        ({"node": {"key_file": "k.pem", "http_port": "9100"}}, r"\[node\] http_port: expected an integer"),
        ({"round": {"quorom": 0.5}}, r"unknown key 'quorom' in \[round\]; did you mean 'quorum'"),
        ({"limits": {"zzz": 1}}, r"unknown key 'zzz' in \[limits\]; valid keys: max_payload_bytes, "),
        ({"train": {"nodes": 3}}, r"unknown key 'nodes' in \[train\].*num_nodes"),
        ({"task": {"name": "mnist"}}, r"unknown task 'mnist'; choose one of digits"),
        ({"train": {"node_index": 4, "num_nodes": 4}}, r"train.node_index: must be in \[0, 4\)"),
        ({"train": {"epochs": 2}, "round": {"local_epochs": 3}}, r"\[train\] epochs: is an alias"),
        ({"aggregation": {"rule": "avg"}}, r"unknown rule 'avg'"),
        ({"attack": {"classes": 5}}, r"\[attack\] name: required"),
    ],
)
def test_a_wrong_value_names_its_key(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read(doc)


def test_epochs_is_an_alias_of_local_epochs_and_really_reaches_the_node() -> None:
    assert read({"train": {"epochs": 3}}).node.rounds.local_epochs == 3
    assert read({"round": {"local_epochs": 3}}).node.rounds.local_epochs == 3
    assert read({}).node.rounds.local_epochs == 1


def test_old_train_keys_are_task_options_and_paths_are_relative_to_the_file() -> None:
    old = read({"node": {"key_file": "k.pem", "data_dir": "state"},
                "train": {"task": "digits", "partition": "dirichlet", "lr": 0.1, "node_index": 1, "num_nodes": 2}})
    new = read({"node": {"key_file": "k.pem", "data_dir": "state"},
                "task": {"name": "digits", "partition": "dirichlet", "lr": 0.1},
                "train": {"node_index": 1, "num_nodes": 2}})
    assert old.spec == new.spec
    assert old.spec.key_file == Path("/cfg/k.pem")
    assert old.node.data_dir == Path("/cfg/state")


def test_rule_params_is_an_alias_of_params() -> None:
    spec = read({"aggregation": {"rule": "trimmed_mean", "rule_params": {"trim": 1}}}).spec
    assert spec.node.rule_params == {"trim": 1}


SHARED = """
[round]
quorum = 0.8
max_lag = 1
round_timeout = 3.0
[reputation]
threshold = 0.2
[harm_check]
enabled = false
[limits]
max_tensors = 64
[aggregation]
rule = "trimmed_mean"
params = {trim = 1}
"""


def test_shared_sections_mean_the_same_in_a_node_file_and_a_scenario() -> None:
    doc = tomllib.loads(SHARED)
    node = read(doc).node
    simulated = _config(parse_scenario({"nodes": 4, **doc}))
    assert simulated.rounds.quorum == node.rounds.quorum == 0.8  # simulations can set quorum...
    assert simulated.rounds.max_lag == node.rounds.max_lag == 1  # ...and max_lag now
    assert simulated.rounds.round_timeout == node.rounds.round_timeout == 3.0
    for name in ("rule", "rule_params", "reputation", "harm_check", "limits"):
        assert getattr(simulated, name) == getattr(node, name), name


def test_a_scenario_keeps_its_fetch_default_and_its_old_keys() -> None:
    old = parse_scenario({"nodes": 4, "round_timeout": 2.0, "local_epochs": 2, "rule": {"name": "median"}})
    new = parse_scenario(tomllib.loads('nodes = 4\n[round]\nround_timeout = 2.0\nlocal_epochs = 2\n'
                                       '[aggregation]\nrule = "median"\n'))
    assert old == new
    assert _config(old).rounds.fetch_timeout == 2.0
    with pytest.raises(ConfigError, match="round_timeout: is an alias"):
        parse_scenario({"nodes": 4, "round_timeout": 2.0, "round": {"round_timeout": 3.0}})
