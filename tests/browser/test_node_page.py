"""The daemon's page against a stub node: figures, standings, hostile text, phone size."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from p2pfl.cli.dashboard.network import serve_in_thread
from p2pfl.cli.http import status_route
from p2pfl.node.stats import NodeStatistics, PeerReputation, RoundRecord
from tests.browser.conftest import PHONE, console_errors, screenshot

By = pytest.importorskip("selenium.webdriver.common.by").By
WebDriverWait = pytest.importorskip("selenium.webdriver.support.wait").WebDriverWait

pytestmark = pytest.mark.browser

SELF = "16Uiu2HAmSe1fSe1fSe1fSe1fSe1fSe1fSe1fSe1fNodeA1"
GOOD = "16Uiu2HAmGoodGoodGoodGoodGoodGoodGoodGoodPeerB2"
HOSTILE = '16Uiu2HAm<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
HOSTILE_REASON = '<b id="injected">bold</b><img src=x onerror="window.__xss=3"> forged signature'
HOSTILE_NETWORK = "<svg onload=window.__xss=4>net"


def stub() -> NodeStatistics:
    history = tuple(
        RoundRecord(round=r, accuracy=0.30 + 0.12 * r, loss=2.0 / (r + 1), used=1 + r % 2, duration=0.4 + 0.05 * r,
                    bytes_in=40_000 * (r + 1), bytes_out=38_000 * (r + 1))
        for r in range(6)
    )
    return NodeStatistics(
        peer_id=SELF, network_id=HOSTILE_NETWORK, state="training", round=6, rounds_target=10,
        accuracy=0.9, loss=0.2857, neighbours=(GOOD, HOSTILE), bytes_in=240_000, bytes_out=228_000,
        accepted=9, rejected={"invalid_signature": 3, HOSTILE_REASON: 1},
        reputation=(
            PeerReputation(peer=GOOD, score=0.82, weight=0.82, banned=False, last_reason="used in full"),
            PeerReputation(peer=HOSTILE, score=0.0, weight=0.0, banned=True, last_reason=HOSTILE_REASON),
        ),
        history=history,
    )


@pytest.fixture
def node_url() -> Iterator[str]:
    with serve_in_thread(0, status_route(stub)) as port:
        yield f"http://127.0.0.1:{port}/"


def rendered(browser: Any, url: str) -> None:
    browser.get(url)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "live").text == "live")


def test_node_page_shows_the_status_figures(browser: Any, node_url: str) -> None:
    rendered(browser, node_url)

    assert browser.find_element(By.ID, "accuracy").text == "90.0%"
    assert browser.find_element(By.ID, "accuracy").get_attribute("data-value") == "0.9"
    assert browser.find_element(By.ID, "round").text == "6/10"
    assert browser.find_element(By.ID, "loss").text == "0.2857"
    rows = browser.find_elements(By.CSS_SELECTOR, "#rounds tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows] == [
        f"{100 * (0.30 + 0.12 * r):.1f}%" for r in reversed(range(6))
    ]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#accuracy-chart svg circle")) == 6
    assert "epsilon" not in [t.get_attribute("id") for t in browser.find_elements(By.CSS_SELECTOR, ".tile .value")]
    assert console_errors(browser) == []
    screenshot(browser, "node")
    screenshot(browser, "node", size=PHONE, file="dashboard-phone.png")


def test_a_banned_peer_is_shown_with_its_reason(browser: Any, node_url: str) -> None:
    rendered(browser, node_url)

    row = browser.find_element(By.CSS_SELECTOR, "#peers tr.peer.banned")
    assert row.get_attribute("data-peer") == HOSTILE
    assert row.find_element(By.CSS_SELECTOR, ".badge").text == "banned"
    assert row.find_element(By.CSS_SELECTOR, "td.reason").text == HOSTILE_REASON
    gone = browser.find_element(By.ID, "gone").text
    assert HOSTILE_REASON in gone
    trusted = browser.find_element(By.CSS_SELECTOR, "#peers tr.peer.trusted")
    assert trusted.get_attribute("data-peer") == GOOD


def test_hostile_peer_ids_and_reasons_are_text_not_markup(browser: Any, node_url: str) -> None:
    rendered(browser, node_url)

    body = browser.find_element(By.TAG_NAME, "body")
    assert HOSTILE_REASON in body.text  # shown literally, tags and all
    assert HOSTILE_NETWORK in browser.find_element(By.ID, "subtitle").text
    assert browser.execute_script("return window.__xss === undefined")
    assert browser.find_elements(By.ID, "injected") == []
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script, header svg, header img") == []
    scripts = [s.get_attribute("src") for s in browser.find_elements(By.TAG_NAME, "script")]
    assert scripts == [node_url + "static/node.js"]
    assert console_errors(browser) == []  # not even a CSP violation: nothing tried to run


def test_epsilon_is_shown_when_the_node_reports_it(browser: Any) -> None:
    def with_epsilon() -> Any:
        class Stats:
            def to_json(self) -> dict[str, Any]:
                return stub().to_json() | {"epsilon_spent": 1.234}

        return Stats()

    with serve_in_thread(0, status_route(with_epsilon)) as port:
        rendered(browser, f"http://127.0.0.1:{port}/")
        assert browser.find_element(By.ID, "epsilon").text == "1.23"


def test_the_page_fits_a_phone(browser: Any, node_url: str) -> None:
    rendered(browser, node_url)
    browser.set_window_size(*PHONE)
    try:
        width = browser.execute_script("return document.documentElement.clientWidth")
        WebDriverWait(browser, 5).until(
            lambda d: int(d.find_element(By.CSS_SELECTOR, "#accuracy-chart svg").get_attribute("width")) < width
        )
        overflow = browser.execute_script("return document.documentElement.scrollWidth")
        assert overflow <= width  # no sideways scrolling of the page (tables scroll inside their card)
    finally:
        browser.set_window_size(1280, 900)


def test_a_malformed_status_renders_without_a_script_error(browser: Any) -> None:
    class Odd:
        def to_json(self) -> dict[str, Any]:
            return {"peer_id": "<i>odd</i>", "history": "nope", "reputation": 5, "neighbours": None,
                    "rejected": [], "accuracy": "0.9", "round": {"x": 1}}

    with serve_in_thread(0, status_route(lambda: Odd())) as port:  # type: ignore[arg-type, return-value]
        rendered(browser, f"http://127.0.0.1:{port}/")
        assert browser.find_element(By.ID, "accuracy").text == "–"
        assert "<i>odd</i>" in browser.find_element(By.ID, "subtitle").text
        assert console_errors(browser) == []
