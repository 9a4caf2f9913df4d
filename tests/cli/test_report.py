"""The test-network report: numbers, files, terminal summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from p2pfl.cli.report import build_report, render_summary, write_report

A = "16Uiu2HAmHonestAAAAAAAAAAAAAAAAAAAAAAAAAAAA01"
B = "16Uiu2HAmHonestBBBBBBBBBBBBBBBBBBBBBBBBBBBB02"
Z = "16Uiu2HAmByzantineZZZZZZZZZZZZZZZZZZZZZZZZ03"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rec(rnd: int, acc: float, duration: float, cumulative_in: int) -> dict[str, Any]:
    return {"round": rnd, "accuracy": acc, "loss": 1 - acc, "used": 2, "duration": duration,
            "bytes_in": cumulative_in, "bytes_out": cumulative_in // 2}


def rep(peer: str, score: float, weight: float) -> dict[str, Any]:
    return {"peer": peer, "score": score, "weight": weight, "banned": weight == 0, "last_reason": "r"}


def status(peer: str, history: list[dict[str, Any]], reputation: list[dict[str, Any]], byz: str | None = None) -> dict[str, Any]:
    return {"peer_id": peer, "network_id": "n", "state": "done", "round": 3, "rounds_target": 2,
            "accuracy": history[-1]["accuracy"], "loss": history[-1]["loss"], "neighbours": [],
            "bytes_in": history[-1]["bytes_in"], "bytes_out": history[-1]["bytes_out"], "accepted": 1,
            "rejected": {}, "reputation": reputation, "history": history, "byzantine": byz}


@pytest.fixture
def statuses() -> list[dict[str, Any]]:
    return [
        status(A, [rec(1, 0.5, 1.0, 100), rec(2, 0.8, 3.0, 300)], [rep(B, 0.9, 0.9), rep(Z, 0.1, 0.0)]),
        # B wrongly zeroes A and still trusts the attacker a little.
        status(B, [rec(1, 0.6, 2.0, 100), rec(2, 0.9, 4.0, 250)], [rep(A, 0.2, 0.0), rep(Z, 0.4, 0.4)]),
        status(Z, [rec(1, 0.1, 9.0, 50), rec(2, 0.1, 9.0, 60)], [rep(A, 1.0, 1.0)], byz="alie"),
    ]


def test_honest_mean_min_and_round_times(statuses: list[dict[str, Any]]) -> None:
    report = build_report(statuses, byzantine=[Z], meta={"rounds": 2})
    r1, r2 = report["per_round"]
    assert r1["honest_mean_accuracy"] == pytest.approx(0.55)
    assert r1["honest_min_accuracy"] == pytest.approx(0.5)
    assert r2["honest_mean_accuracy"] == pytest.approx(0.85)
    assert r2["honest_min_accuracy"] == pytest.approx(0.8)
    assert r1["median_round_seconds"] == pytest.approx(2.0)  # median of 1, 2, 9
    assert report["verdict"]["honest_mean_accuracy"] == pytest.approx(0.85)
    assert report["verdict"]["honest_min_accuracy"] == pytest.approx(0.8)
    assert [n["role"] for n in report["nodes"]] == ["honest", "honest", "byzantine"]
    assert report["nodes"][0]["bytes_in_per_round"] == [100, 200]
    assert report["nodes"][0]["final_accuracy"] == 0.8
    assert report["nodes"][0]["round_reached"] == 3
    assert report["nodes"][0]["rounds_trained"] == 2


def test_detection_counts_honest_observers_with_zero_weight(statuses: list[dict[str, Any]]) -> None:
    report = build_report(statuses, byzantine=[Z], meta={})
    seen = report["detection"]["attackers"][Z]
    assert seen["observers"] == 2
    assert seen["zero_weight"] == 1
    assert seen["fraction"] == pytest.approx(0.5)
    assert seen["flagged"] is True
    assert report["detection"]["honest_zeroed"] == [[B, A]]
    assert report["verdict"]["attackers_flagged"] == 1
    # the reputation matrix has one row per honest observer and None where no score is held
    assert report["reputation"]["observers"] == [A, B]
    assert report["reputation"]["score"][0] == [None, 0.9, 0.1]


def test_attacker_known_from_its_own_status(statuses: list[dict[str, Any]]) -> None:
    report = build_report(statuses, byzantine=[], meta={})
    assert report["nodes"][2]["role"] == "byzantine"


def test_an_attacker_nobody_scored_is_not_flagged(statuses: list[dict[str, Any]]) -> None:
    for s in statuses:
        s["reputation"] = [p for p in s["reputation"] if p["peer"] != Z]
    report = build_report(statuses, byzantine=[Z], meta={})
    assert report["detection"]["attackers"][Z] == {"observers": 0, "zero_weight": 0, "fraction": 0.0, "flagged": False}


def test_write_report_creates_json_and_pngs(statuses: list[dict[str, Any]], tmp_path: Path) -> None:
    report = build_report(statuses, byzantine=[Z], meta={"rule": "clipped_gossip", "attack": "alie", "byzantine": 1})
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "accuracy.png", "reputation.png"]
    assert json.loads(paths[0].read_text())["verdict"]["attackers"] == 1
    for png in paths[1:]:
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 5000


@pytest.mark.parametrize(("meta", "hinted"), [
    ({"partition": "dirichlet", "attack": "alie"}, True),
    ({"partition": "iid", "attack": "alie"}, False),  # every node holds the same classes
    ({"partition": "dirichlet", "attack": "forge"}, False),  # that is the baseline itself
])
def test_non_iid_attack_runs_point_at_the_absence_baseline(
    statuses: list[dict[str, Any]], meta: dict[str, Any], hinted: bool
) -> None:
    last = render_summary(build_report(statuses, byzantine=[Z], meta=meta)).splitlines()[-1]
    assert last.startswith("note: with non-IID data") == hinted
    assert ("--attack forge" in last) == hinted


def test_render_summary_has_table_matrix_and_verdict(statuses: list[dict[str, Any]]) -> None:
    text = render_summary(build_report(statuses, byzantine=[Z], meta={}))
    assert "byzantine (alie)" in text
    assert "80.0%" in text
    assert "90.0%" in text
    assert "n2*" in text  # the attacker's column is marked
    assert "0.10!" in text  # zero weight is marked
    assert text.splitlines()[-1] == (
        "verdict: honest accuracy mean 85.0%, min 80.0%; attackers flagged 1/1 (zero weight at >= 50% of their honest observers); honest peers wrongly zeroed 1x"
    )
