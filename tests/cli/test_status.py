"""``p2pfl node status``: rendering and the command's error handling."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import trio

from p2pfl.cli.http import serve_status
from p2pfl.cli.status import DEFAULT_HTTP_PORT, add_arguments, render_status, status_command
from p2pfl.node.stats import NodeStatistics, PeerReputation, RoundRecord

GOOD = "16Uiu2HAmGoodGoodGoodGoodGoodGoodGoodGood0001"
BAD = "16Uiu2HAmBadBadBadBadBadBadBadBadBadBadBad0002"


def sample() -> NodeStatistics:
    return NodeStatistics(
        peer_id="16Uiu2HAmSelfSelfSelfSelfSelfSelfSelfSelf0000",
        network_id="p2pfl-testnet",
        state="collecting",
        round=4,
        rounds_target=5,
        accuracy=0.9123,
        loss=0.3141,
        neighbours=(GOOD, BAD),
        bytes_in=2_500_000,
        bytes_out=1_200_000,
        accepted=9,
        rejected={"outlier": 3},
        reputation=(
            PeerReputation(peer=BAD, score=0.08, weight=0.0, banned=True, last_reason="equivocation"),
            PeerReputation(peer=GOOD, score=0.93, weight=0.93, banned=False, last_reason="accepted"),
        ),
        history=(RoundRecord(round=3, accuracy=0.9123, loss=0.3141, used=2, duration=2.5, bytes_in=2_500_000, bytes_out=1_200_000),),
    )


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_render_status_shows_the_key_figures() -> None:
    text = render_status(sample().to_json())
    for figure in ("Self0000", "p2pfl-testnet", "collecting", "4/5", "91.2%", "0.3141", "2.5 MB", "1.2 MB",
                   "accepted 9", "outlier 3", "Good0001", "equivocation", "BANNED"):
        assert figure in text, figure
    # the reputation table lists the best peer first
    assert text.index("Good0001  0.930") < text.index("Bad0002  0.080")


def test_render_status_tolerates_a_sparse_document() -> None:
    text = render_status({"peer_id": "16Uiu2HAmX", "state": "starting"})
    assert "starting" in text
    assert "no peers scored yet" in text


async def test_status_command_prints_a_live_node(nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]) -> None:
    port = await nursery.start(serve_status, 0, sample)
    code = await trio.to_thread.run_sync(status_command, parse("--port", str(port)))
    assert code == 0
    assert "91.2%" in capsys.readouterr().out
    code = await trio.to_thread.run_sync(status_command, parse("--port", str(port), "--json"))
    assert code == 0
    assert '"accuracy": 0.9123' in capsys.readouterr().out


async def test_status_command_reads_the_port_from_the_config(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = await nursery.start(serve_status, 0, sample)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nnetwork_id = "x"\nhttp_port = {port}\n')
    assert await trio.to_thread.run_sync(status_command, parse("--config", str(config))) == 0
    assert "Good0001" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), ("[node\n", "not valid TOML"), ('[node]\nhttp_port = "x"\n', "http_port must be an integer")],
)
def test_status_command_config_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    config = tmp_path / "node.toml"
    if content is not None:
        config.write_text(content)
    assert status_command(parse("--config", str(config))) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_status_command_unreachable_node_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        assert status_command(parse("--port", str(bound.getsockname()[1]))) == 2
    assert "no node listening" in capsys.readouterr().err


def test_default_port() -> None:
    assert parse().port is None
    assert DEFAULT_HTTP_PORT == 7352
