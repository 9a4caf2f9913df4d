"""A real 3-node test network with one forging attacker, watched through both dashboards.

One network serves the module: first an honest node's own page (while the network runs),
then the launcher's page until the verdict. Waits are bounded polls of the rendered DOM.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2pfl.cli.http import fetch_status
from p2pfl.cli.testnet_plan import pick_ports
from p2pfl.errors import NetworkError
from tests.browser.conftest import PHONE, console_errors, screenshot

By = pytest.importorskip("selenium.webdriver.common.by").By
WebDriverWait = pytest.importorskip("selenium.webdriver.support.wait").WebDriverWait

pytestmark = pytest.mark.browser

NODES, ROUNDS = 3, 6
RUN_DEADLINE = 240.0


@dataclass
class Network:
    proc: subprocess.Popen[str]
    url: str
    out: Path

    def document(self) -> dict[str, Any]:
        host, port = self.url.removeprefix("http://").rstrip("/").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            connection.request("GET", "/network")
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def node_url(self, index: int) -> str:
        """The page of node ``index``, once its endpoint answers (bounded: 60 s, 4 polls a second)."""
        config = tomllib.loads((self.out / "configs" / f"node{index}.toml").read_text())
        port = int(config["node"]["http_port"])
        deadline = time.monotonic() + 60
        while True:
            try:
                fetch_status(port, timeout=1.0)
                return f"http://127.0.0.1:{port}/"
            except NetworkError:
                assert time.monotonic() < deadline, f"node {index} never answered on /status"
                time.sleep(0.25)


@pytest.fixture(scope="module")
def network(chromium: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    out = tmp_path_factory.mktemp("dashboard") / "net"
    port = pick_ports(1)[0]
    argv = [sys.executable, "-m", "p2pfl.cli.main", "testnet", "--nodes", str(NODES), "--rounds", str(ROUNDS),
            "--byzantine", "1", "--attack", "forge", "--dashboard", str(port), "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    net = Network(proc, f"http://127.0.0.1:{port}/", out)
    try:
        deadline = time.monotonic() + 30
        while not (out / "configs" / f"node{NODES - 1}.toml").exists():  # bounded: 30 s, 10 polls a second
            assert proc.poll() is None, "testnet exited before it started its nodes"
            assert time.monotonic() < deadline, "testnet did not write its configs in 30 s"
            time.sleep(0.1)
        yield net
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=60)


def attacker(net: Network) -> str:
    return str(net.document()["processes"][NODES - 1]["peer_id"])


def test_an_honest_node_page_shows_the_attacker_ignored_with_its_reason(browser: Any, network: Network) -> None:
    forger = attacker(network)
    browser.get(network.node_url(0))

    def banned_and_trusted(driver: Any) -> Any:
        banned = driver.find_elements(By.CSS_SELECTOR, f'#peers tr.peer.banned[data-peer="{forger}"]')
        trusted = driver.find_elements(By.CSS_SELECTOR, "#peers tr.peer.trusted")
        return banned and trusted and banned[0]

    row = WebDriverWait(browser, RUN_DEADLINE / 2, poll_frequency=0.25).until(banned_and_trusted)
    assert row.find_element(By.CSS_SELECTOR, ".badge").text == "banned"
    assert "announced by a peer other than its signer" in row.find_element(By.CSS_SELECTOR, "td.reason").text
    assert console_errors(browser) == []
    screenshot(browser, "testnet-node0")


def test_the_network_page_shows_every_node_the_status_figures_and_the_verdict(browser: Any, network: Network) -> None:
    forger = attacker(network)
    browser.get(network.url)

    WebDriverWait(browser, RUN_DEADLINE, poll_frequency=0.5).until(lambda d: d.find_elements(By.ID, "outcome"))
    shown = {
        row.get_attribute("data-peer"): row.find_element(By.CSS_SELECTOR, "td.accuracy")
        for row in browser.find_elements(By.CSS_SELECTOR, "#nodes tbody tr.node")
    }
    shown_text = {peer: cell.text for peer, cell in shown.items()}
    shown_value = {peer: cell.get_attribute("data-value") for peer, cell in shown.items()}
    outcome = browser.find_element(By.ID, "outcome").text
    flagged = browser.find_element(By.ID, "verdict-flagged").text
    ignored = browser.find_element(By.CSS_SELECTOR, f'#ignored li.ignored-peer.byzantine[data-peer="{forger}"]').text
    attacker_columns = browser.find_elements(By.CSS_SELECTOR, "#matrix thead th.byz-col")
    assert console_errors(browser) == []
    screenshot(browser, "testnet")
    screenshot(browser, "testnet", size=PHONE, file="dashboard-phone.png")
    assert network.proc.wait(timeout=60) == 0, network.proc.stdout.read() if network.proc.stdout else ""

    statuses = json.loads((network.out / "statuses.json").read_text())  # the last /status of every node
    assert len(statuses) == NODES
    assert shown_text == {s["peer_id"]: f"{100 * s['accuracy']:.1f}%" for s in statuses}
    assert shown_value == {s["peer_id"]: repr(s["accuracy"]) for s in statuses}
    assert outcome == "done"
    assert flagged == "1/1"
    assert "announced by a peer other than its signer" in ignored
    assert len(attacker_columns) == 1
