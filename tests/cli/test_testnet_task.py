"""`p2pfl testnet --task`: a bundled task or a factory, checked before any process starts."""

from __future__ import annotations

import tomllib

import pytest

from p2pfl.cli.main import build_parser
from p2pfl.cli.testnet_plan import TestnetPlan as Plan
from p2pfl.cli.testnet_plan import dumps_toml, node_config, plan_from_args
from p2pfl.errors import ConfigError
from p2pfl.sim.scenario import parse_scenario


def plan(*extra: str) -> Plan:
    args = build_parser("testnet").parse_args(["testnet", "--nodes", "2", "--rounds", "1", *extra])
    return plan_from_args(args)


def test_a_factory_is_written_as_the_nodes_task_factory() -> None:
    chosen = plan("--task", "p2pfl.learners.tasks:make_learner", "--partition", "dirichlet")
    document = tomllib.loads(dumps_toml(node_config(chosen, 1, ["a", "b"], [1, 2, 3, 4])))

    assert document["task"] == {"factory": "p2pfl.learners.tasks:make_learner", "partition": "dirichlet",
                                "alpha": 0.5, "batch_size": 32}


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("nonexistent_module_q:make", r"^--task: \[task\] factory: cannot import 'nonexistent_module_q'"),
        ("imagenet", r"^--task: \[task\] name: unknown task 'imagenet'; choose one of digits, table"),
        ("table", r"^--task: \[task\] path: required"),
    ],
)
def test_a_bad_task_stops_the_launcher_before_any_node(task: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan("--task", task)


def test_the_default_is_digits() -> None:
    assert plan().task == "digits"


def test_a_scenario_names_a_factory_in_its_task_table() -> None:
    scenario = parse_scenario({"task": {"factory": "p2pfl.learners.tasks:make_learner", "width": 3}})

    assert scenario.task == "p2pfl.learners.tasks:make_learner"
    assert scenario.task_options == {"width": 3}


def test_the_report_records_the_local_epochs_the_nodes_use() -> None:
    from p2pfl.assembly import read_node_file
    from p2pfl.cli.testnet_plan import plan_meta

    chosen = plan("--epochs", "3")
    document = tomllib.loads(dumps_toml(node_config(chosen, 0, ["a", "b"], [1, 2, 3, 4])))
    used = read_node_file(document, base=chosen.out).node.rounds.local_epochs

    assert plan_meta(chosen)["epochs"] == used == 3
