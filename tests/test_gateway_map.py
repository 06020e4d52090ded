"""The swarm map a gateway serves, live, from its own replica of the swarm state: the page at `/`
in headless Chromium (every node with its span; a stopped node leaves within its lease, its
blocks shown as a gap), `/api/swarm`, and the 503 that names the missing blocks.

The page test needs Debian's `chromium` and `chromium-driver` (scripts/install.sh --test) and
`selenium`; nothing is fetched at test time. Screenshots go to $LAMINA_TEST_ARTIFACTS (default:
the test's tmp_path).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from _gateway import FAST_LEASE, SMOLLM, needs_smollm, running_gateway
from _wait import eventually_sync
from pipeline.launch import LocalSwarm

pytestmark = [pytest.mark.slow, needs_smollm]

LEASE = 3.0          # FAST_LEASE's --lease
SLACK = 6.0          # the page's 1 s poll, the gateway's replica gc (1 s), a loaded 2-core machine
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ROWS_JS = """return Array.from(document.querySelectorAll('#nodes-body tr.node'))
                 .map(tr => [tr.dataset.peer, tr.querySelector('td.span').textContent]);"""
GAPS_JS = "return document.querySelectorAll('#coverage td.gap').length;"


def _artifacts(tmp_path: Path) -> Path:
    path = Path(os.environ.get("LAMINA_TEST_ARTIFACTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,720"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_shows_every_node_and_drops_a_stopped_one_within_its_lease(browser, tmp_path):
    artifacts = _artifacts(tmp_path)
    with LocalSwarm(SMOLLM, [(0, 10), (10, 20), (20, 30)], extra_args=FAST_LEASE,
                    log_dir=tmp_path / "swarm") as swarm, running_gateway(swarm.initial_peers, tmp_path) as gateway:
        spans = {n.peer_id: f"{n.start}:{n.end}" for n in swarm.nodes}

        def rows() -> dict[str, str]:
            return dict(browser.execute_script(ROWS_JS))

        browser.get(gateway.url + "/")
        eventually_sync(lambda: rows() == spans, what=lambda: (rows(), spans))
        assert browser.execute_script(GAPS_JS) == 0
        assert "full chain" in browser.find_element("id", "summary").text
        browser.save_screenshot(str(artifacts / "swarm-map.png"))

        victim = swarm.nodes[1]                      # blocks 10:20
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        eventually_sync(lambda: victim.peer_id not in rows(), timeout=LEASE + SLACK, interval=0.1,
                        what=lambda: f"{rows()} after {time.monotonic() - killed:.1f} s")
        assert rows() == {p: s for p, s in spans.items() if p != victim.peer_id}
        eventually_sync(lambda: browser.execute_script(GAPS_JS) == 10)
        assert "missing blocks 10:20" in browser.find_element("id", "summary").text
        browser.save_screenshot(str(artifacts / "swarm-map-gap.png"))


def test_api_swarm_and_the_503_when_no_full_chain(tmp_path):
    with LocalSwarm(SMOLLM, [(0, 15), (15, 30)], extra_args=FAST_LEASE, log_dir=tmp_path / "swarm") as swarm, \
            running_gateway(swarm.initial_peers, tmp_path) as gateway:
        data = httpx.get(gateway.url + "/api/swarm").json()
        assert data["model"] == {"name": "smollm2", "hash": data["model"]["hash"], "blocks": 30}
        assert data["complete"] and data["missing"] == [] and data["coverage"] == [1] * 30
        nodes = {n["peer_id"]: n for n in data["nodes"]}
        assert {p: (n["start"], n["end"]) for p, n in nodes.items()} == \
            {n.peer_id: (n.start, n.end) for n in swarm.nodes}
        for n in nodes.values():
            assert n["state"] == "online" and n["reachability"] == "direct" and n["version"]
            assert 0 <= n["last_seen_s"] < LEASE + SLACK and n["free_cache_tokens"] > 0

        swarm.nodes[1].signal(signal.SIGKILL)
        eventually_sync(lambda: not httpx.get(gateway.url + "/api/swarm").json()["complete"], timeout=LEASE + SLACK)
        assert httpx.get(gateway.url + "/api/swarm").json()["missing"] == [[15, 30]]
        r = httpx.post(gateway.url + "/v1/chat/completions", timeout=60,
                       json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "swarm_unavailable" and "[15, 30)" in error["message"], error
        assert httpx.get(gateway.url + "/health").status_code == 503
