"""Every start-up mistake is one `error:` line and exit 2 (issue 14), never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfl.cli.main import main, split_errors
from p2pfl.core.crypto import Identity
from p2pfl.errors import ConfigError, KeyFileError, NoNeighbours


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def node_file(tmp_path: Path, *, port: int = 0, http_port: int = 0, key: str = "node.pem",
              bootstrap: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
key_file = "{key}"
rounds = 1
http_port = {http_port}
exit_when_done = true
[net]
port = {port}
bootstrap = [{bootstrap}]
[round]
start_timeout = 0.5
""")
    return path


def run(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["node", "run", "--config", str(path)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_libp2p_port_in_use(tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(node_file(tmp_path, port=taken_port), capsys)
    assert (code, err) == (2, [f"error: [net] port: cannot listen on 127.0.0.1:{taken_port}: Address already "
                               "in use; another program (or p2pfl node) has it; choose another [net] port"])


def test_http_port_in_use(tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(node_file(tmp_path, http_port=taken_port), capsys)
    assert code == 2
    assert err == [f"error: [node] http_port: cannot listen on 127.0.0.1:{taken_port}: Address already in use; "
                   "another program (or p2pfl node) has it; choose another [node] http_port"]


def test_key_file_readable_by_others(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "node.pem"
    Identity.generate().save(key)
    key.chmod(0o644)
    code, err = run(node_file(tmp_path), capsys)  # raised inside the daemon's nursery
    assert code == 2
    assert err == [f"error: {key}: key file is accessible by group/others (mode 0644); "
                   f"fix it with `chmod 600 {key}`"]


def test_corrupt_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "node.pem"
    key.write_text("-----BEGIN EC PRIVATE KEY-----\nnot base64\n")
    key.chmod(0o600)
    code, err = run(node_file(tmp_path), capsys)
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"error: {key}: ")


def test_bootstrap_without_a_decodable_peer_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = node_file(tmp_path, bootstrap='"/ip4/10.0.0.7/tcp/7351/p2p/16Uiu2HAmBogus"')
    code, err = run(path, capsys)
    assert code == 2
    assert err == [f"error: {path}: [net] bootstrap[0]: '/ip4/10.0.0.7/tcp/7351/p2p/16Uiu2HAmBogus' is not a "
                   "multiaddr with a decodable PeerId; expected /ip4/192.0.2.7/tcp/7351/p2p/16Uiu2HAm…"]


def test_split_errors_unwraps_nested_groups_and_keeps_the_rest() -> None:
    inner = KeyFileError("bad key")
    bug = ValueError("a real bug")
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [bug, inner])])
    error, rest = split_errors(group)
    assert error is inner
    assert isinstance(rest, BaseExceptionGroup)  # the bug beside ours is not dropped
    assert rest.exceptions[0].exceptions == (bug,)  # type: ignore[union-attr]
    alone = NoNeighbours("alone")
    assert split_errors(alone) == (alone, None)
    plain = ExceptionGroup("bug", [bug])
    assert split_errors(plain) == (None, plain)  # not ours: the traceback is shown


def test_a_bug_beside_our_error_is_raised(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    def fail(args: object) -> int:
        raise ExceptionGroup("nursery", [KeyFileError("bad key"), ZeroDivisionError("a bug")])

    monkeypatch.setattr("p2pfl.cli.daemon.run_command", fail)
    with pytest.raises(ExceptionGroup) as raised:
        main(["node", "run", "--config", "x.toml"])
    assert [type(e) for e in raised.value.exceptions] == [ZeroDivisionError]
    assert capsys.readouterr().err.strip() == "error: bad key"  # ours is still said


def test_no_neighbours_exits_3(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(args: object) -> int:
        raise ExceptionGroup("nursery", [NoNeighbours("0 of 1 neighbour(s) after start_timeout = 1 s")])

    monkeypatch.setattr("p2pfl.cli.daemon.run_command", fail)
    assert main(["node", "run", "--config", "x.toml"]) == 3
    assert capsys.readouterr().err.strip() == "error: 0 of 1 neighbour(s) after start_timeout = 1 s"


@pytest.mark.parametrize("address", ["/ip4/1.2.3.4/tcp/1/p2p/bogus", "/ip4/1.2.3.4/p2p/16Uiu2HAmSwegjeRnVnuDob4gWh5DkD4BUJFvQzsXTpWB7CdbMaun",
                                     "/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/1/p2p/16Uiu2HAmSwegjeRnVnuDob4gWh5DkD4BUJFvQzsXTpWB7CdbMau"])
def test_net_config_refuses_bootstrap_entries_peers_cannot_use(address: str) -> None:
    from p2pfl.config import NetConfig

    with pytest.raises(ConfigError, match=r"net.bootstrap\[0\]"):
        NetConfig(bootstrap=(address,))


def test_net_config_takes_dns_bootstrap_and_announce_addrs() -> None:
    from p2pfl.config import NetConfig

    peer = "16Uiu2HAmSwegjeRnVnuDob4gWh5DkD4BUJFvQzsXTpWB7CdbMaun"
    config = NetConfig(bootstrap=(f"/dns4/boot.example.org/tcp/7351/p2p/{peer}",),
                       announce_addrs=("/ip4/203.0.113.5/tcp/17351",))
    assert config.announce_addrs == ("/ip4/203.0.113.5/tcp/17351",)
    with pytest.raises(ConfigError, match="no /p2p/ part"):
        NetConfig(announce_addrs=(f"/ip4/203.0.113.5/tcp/1/p2p/{peer}",))


def test_a_daemon_process_exits_without_finalising_and_keeps_its_code_and_output(
    tmp_path: Path, taken_port: int
) -> None:
    # As the process's entry (argv None), `node run` ends the process as soon as its
    # command returns: the exit code and the error line survive, interpreter finalisation
    # (here: an atexit hook; with torch loaded ~0.7 CPU-s) is skipped.
    path = node_file(tmp_path, port=taken_port)
    script = ("import atexit, sys; atexit.register(print, 'finalised', flush=True); "
              "from p2pfl.cli.main import main; "
              f"sys.argv = ['p2pfl', 'node', 'run', '--config', {str(path)!r}]; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{taken_port}" in done.stderr
    assert "finalised" not in done.stdout
    # Called with an argv (embedding, tests), main returns: the caller's process goes on.
    kept = subprocess.run([sys.executable, "-c", script.replace("sys.argv = ", "argv = ").replace(
        "main()", "main(argv[1:])")], capture_output=True, text=True, timeout=120)
    assert kept.returncode == 2
    assert "finalised" in kept.stdout
