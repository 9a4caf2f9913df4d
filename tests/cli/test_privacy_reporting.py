"""The spent privacy budget is shown by `node status`, /metrics and the test-network report."""

from __future__ import annotations

from dataclasses import replace

from p2pfl.cli.http import render_metrics
from p2pfl.cli.report import build_report, render_summary
from p2pfl.cli.status import render_status
from tests.cli.test_status import sample


def test_status_metrics_and_report_show_the_spent_epsilon() -> None:
    stats = replace(sample(), epsilon_spent=3.25, epsilon_target=8.0)
    assert "epsilon 3.25 of 8 spent" in render_status(stats.to_json())
    metrics = render_metrics(stats)
    assert "p2pfl_epsilon_spent 3.25\n" in metrics
    assert "p2pfl_epsilon_target 8.0\n" in metrics
    report = build_report([stats.to_json()], byzantine=[], meta={})
    assert report["nodes"][0]["epsilon_spent"] == 3.25
    assert report["verdict"]["epsilon_target"] == 8.0
    assert report["verdict"]["epsilon_spent_max"] == 3.25
    assert "privacy spent epsilon <= 3.25 of 8" in render_summary(report)


def test_a_node_without_privacy_shows_none() -> None:
    stats = sample()
    assert "privacy" not in render_status(stats.to_json())
    assert "epsilon" not in render_metrics(stats)
    report = build_report([stats.to_json()], byzantine=[], meta={})
    assert report["verdict"]["epsilon_target"] is None
    assert "privacy" not in render_summary(report)
