"""The page in a real browser: Debian's chromium, headless, driven by Selenium (issue 17).

Against the real system under supervisord (the launcher starts anime-web too), with
the simulated ani-cli downloading slowly: the page shows the running download and its
percentage rises without a reload; after ``supervisorctl stop dispatcher`` the header
says the dispatcher is not answering, and once it is back the page is live again.
Against a scripted dispatcher (a ROUTER on the status endpoint answering a document we
write), the header states and the keys the document may carry from other parts
(database busy, storage unavailable, title mismatches, keys unknown to the page), and
that text from the database is shown as text, never run as markup.

Screenshots go to the test's tmp_path (printed; ``pytest -s`` shows the paths). Without
chromium and chromium-driver (``.ci/run`` installs them with apt-get) the tests skip,
saying so. Selenium is pointed at /usr/bin/chromedriver, so Selenium Manager never
downloads a driver or a browser.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zmq

from shared.config import load_config
from shared.protocol import ProtocolError, StatusReply, StatusRequest, decode, encode
from tests.system import System, wait_for

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-dev-shm-usage")
PHONE, DESKTOP = (360, 800), (1280, 900)
TITLE = "Slow Show"
MAL_ID = 4242


def web_url(system: System, proc: subprocess.Popen | None = None, timeout: float = 20) -> str:
    """The address anime-web logged (the tests let it pick a free port): in its log under
    supervisord, or in the output of ``proc`` started with ``system.spawn``."""
    def found() -> str | None:
        text = system.output(proc) if proc is not None else system.log("web")
        urls = re.findall(r" listening url=(http://\S+/)", text)
        return urls[-1] if urls else None
    return wait_for(found, timeout, "anime-web to log the address it listens on")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture
def browser(tmp_path, monkeypatch):
    chromium = _chromium()
    if chromium is None or not CHROMEDRIVER.exists():
        pytest.skip("no browser: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, should it run at all: no downloads
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument(f"--window-size={DESKTOP[0]},{DESKTOP[1]}")
    try:
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    except WebDriverException as exc:  # installed but cannot start here (a library missing...)
        pytest.skip(f"chromium does not start here: {exc.msg or exc}")
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def viewport(driver, width: int, height: int) -> None:
    """A phone's or a desktop's viewport (a headless window cannot be made 360 px wide)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def screenshot(driver, path: Path, width: int) -> Path:
    """The whole page at ``width`` px into ``path``; printed for a person to look at."""
    viewport(driver, width, 800)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    viewport(driver, width, max(800, min(int(height), 4000)))
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def header(driver) -> dict:
    return js(driver, "return {state: document.getElementById('head').dataset.state,"
                      " label: document.getElementById('state').textContent,"
                      " why: document.getElementById('why').textContent}")


def workers(driver) -> list[dict]:
    return js(driver, """return [...document.querySelectorAll('#worker-list li')].map(li => ({
        id: li.dataset.worker, state: li.dataset.state, percent: li.dataset.percent,
        text: li.textContent}))""")


def test_the_page_follows_a_running_download_and_a_dispatcher_that_stops(make_system, browser, tmp_path):
    system = make_system()
    system.write_catalog({"defaults": {"size": 3_000_000, "duration": 8.0}, "anime": [
        {"query": TITLE, "results": [{"title": TITLE, "episodes": 12}]}]})
    system.enqueue(MAL_ID, TITLE, [1], selected_index=1)
    system.start_supervisord(1)
    browser.get(web_url(system))
    js(browser, "window.__sameDocument = true")  # gone if the page ever reloads

    def downloading() -> float | None:
        busy = [w for w in workers(browser) if w["percent"] not in (None, "")]
        return float(busy[0]["percent"]) if busy and float(busy[0]["percent"]) < 80 else None
    first = wait_for(downloading, 20, "the page to show w01 downloading with a percentage")
    risen = wait_for(lambda: (p := downloading()) is not None and p > first and p, 10,
                     f"the percentage to rise above {first}")
    assert js(browser, "return window.__sameDocument === true"), "the page reloaded"
    (w01,) = workers(browser)
    assert w01["id"] == "w01" and w01["state"] == "downloading"
    assert f"{TITLE} ep 1" in w01["text"] and re.search(r"ETA \d\d:\d\d", w01["text"])
    assert re.search(r"\d+\.\d [KM]B/s", w01["text"]), w01["text"]
    assert header(browser)["state"] == "downloading"
    print(f"percent on the page: {first} then {risen}")
    disk = js(browser, "return document.getElementById('disk-figures').textContent")
    assert "of 10.0 GB hard limit" in disk, disk
    legend = js(browser, "return document.getElementById('disk-legend').textContent")
    assert "pause at 9.0 GB" in legend and "resume below 8.0 GB" in legend, legend
    phone = screenshot(browser, tmp_path / "web-360px.png", PHONE[0])
    desktop = screenshot(browser, tmp_path / "web-desktop.png", DESKTOP[0])
    assert phone.stat().st_size > 0 and desktop.stat().st_size > 0
    assert js(browser, "return document.documentElement.scrollWidth") <= DESKTOP[0]
    viewport(browser, *PHONE)
    assert js(browser, "return document.documentElement.scrollWidth") <= PHONE[0], \
        "the page is wider than a 360 px phone"

    assert system.supervisorctl("stop", "dispatcher").returncode == 0
    silent = wait_for(lambda: (h := header(browser))["state"] == "not_answering" and h, 15,
                      "the page to say the dispatcher is not answering")
    assert silent["label"] == "dispatcher not answering"
    assert "no answer from the dispatcher" in silent["why"] and "still trying" in silent["why"]
    screenshot(browser, tmp_path / "web-not-answering-360px.png", PHONE[0])

    assert system.supervisorctl("start", "dispatcher").returncode == 0
    wait_for(lambda: header(browser)["state"] != "not_answering", 20,
             "the page to come back by itself once the dispatcher answers")
    assert js(browser, "return window.__sameDocument === true"), "the page reloaded"


def click(driver, selector: str) -> str:
    """Click the button ``selector`` and wait for the answer it shows; that answer."""
    js(driver, "const r = document.getElementById('ctl-result'); r.textContent = '';"
               "delete r.dataset.ok; document.querySelector(arguments[0]).click()", selector)
    return wait_for(lambda: js(driver, "const r = document.getElementById('ctl-result');"
                                       "return r.dataset.ok && r.textContent"), 15,
                    f"the answer to the click on {selector}")


def test_the_buttons_pause_retry_cancel_and_resume(make_system, browser, tmp_path):
    system = make_system()
    broken = {"title": "Broken Show", "episodes": 12,
              "episode_behaviour": {"1": {"fail": "Episode is released, but no valid sources!"}}}
    catalog = {"defaults": {"size": 3_000_000, "duration": 0.2}, "anime": [
        {"query": "Broken Show", "results": [broken]},
        {"query": TITLE, "results": [{"title": TITLE, "episodes": 12, "behaviour": {"duration": 30.0}}]}]}
    system.write_catalog(catalog)
    system.enqueue(5151, "Broken Show", [1], selected_index=1, max_retries=0)  # job 1: fails
    system.enqueue(MAL_ID, TITLE, [1], selected_index=1)  # job 2: downloads slowly
    system.start_supervisord(1)
    browser.get(web_url(system))
    wait_for(lambda: js(browser, "return !!document.querySelector('#failure-list [data-retry-job=\"1\"]')"
                                 " && !!document.querySelector('#worker-list [data-cancel-job=\"2\"]')"),
             30, "the page to show the failure and the running download with their buttons")

    answer = click(browser, "[data-ctl=pause]")
    assert answer == "paused until resumed; 1 running download finish", answer
    status = wait_for(lambda: (s := system.status_json()) and s["pause"]["paused"] and s, 10,
                      "anime-status to show the operator's pause")
    assert status["pause"]["by"].startswith("anime-web")
    wait_for(lambda: header(browser)["state"] == "paused_operator", 10,
             "the header to say paused by the operator")

    # the queue by anime: the downloading series first, the failed one with its retry button
    wait_for(lambda: js(browser, "return !!document.querySelector("
                                 "'#by-anime [data-retry-anime=\"5151\"]')"), 20,
             "the queue by anime to show the failed series with its retry button")
    rows = js(browser, "return [...document.querySelectorAll('#by-anime tbody tr')]"
                       ".map((r) => r.dataset.anime)")
    assert rows == [str(MAL_ID), "5151"], rows
    answer = click(browser, f"#by-anime [data-priority-anime='{MAL_ID}'][data-priority-to='10']")
    assert answer.startswith(f"MAL ID {MAL_ID}: 1 job at priority high"), answer
    assert system.query("SELECT priority FROM jobs WHERE id = 2") == [(10,)]

    broken["episode_behaviour"] = {}  # the site has the episode now
    system.write_catalog(catalog)
    assert click(browser, "#failure-list [data-retry-job='1']") == "1 failed job back in the queue"
    assert system.query("SELECT stage, retry_count FROM jobs WHERE id = 1") == [("queued", 0)]
    answer = click(browser, "#worker-list [data-cancel-job='2']")
    assert answer.startswith("cancelled job 2 (Slow Show ep 1)"), answer
    assert system.query("SELECT stage FROM jobs WHERE id = 2") == [("cancelled",)]
    screenshot(browser, tmp_path / "web-controls-360px.png", PHONE[0])
    viewport(browser, *DESKTOP)

    assert click(browser, "[data-ctl=resume]") == "resumed (the disk budget still applies)"
    wait_for(lambda: system.stages() == {"downloaded": 1, "cancelled": 1}, 30,
             "the retried job to land once resumed")
    js(browser, "document.getElementById('bandwidth-mbps').value = '-2'")
    answer = click(browser, "[data-ctl=bandwidth]")
    assert answer.startswith("bandwidth: mbps: must be a number"), answer
    assert js(browser, "return document.getElementById('ctl-result').dataset.ok") == "false"


# --- a scripted dispatcher ------------------------------------------------------------

class ScriptedDispatcher(threading.Thread):
    """Binds the status endpoint and answers every status.request with ``self.status``."""

    def __init__(self, endpoint: str, status: dict) -> None:
        super().__init__(daemon=True)
        self.status = status
        self.requests = 0
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.bind(endpoint)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            if not self.sock.poll(50):
                continue
            envelope_and_body = self.sock.recv_multipart()
            try:
                request = decode(envelope_and_body[-2:])
            except ProtocolError:
                continue
            if isinstance(request, StatusRequest):
                self.requests += 1
                reply = StatusReply(status=copy.deepcopy(self.status))
                self.sock.send_multipart(envelope_and_body[:-2] + encode(reply))

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)
        self.sock.close(linger=0)
        self.context.term()


def document(now: float) -> dict:
    """A status document as the dispatcher sends it, plus keys of other parts."""
    return {
        "generated_at": now,
        "dispatcher": {"pid": 4321, "dry_run": False, "anime_id": None, "stopping": False},
        "queue": {"queued": 118, "downloading": 1, "downloaded": 4031, "failed": 7,
                  "waiting_for_selection": 3, "backing_off": 2, "next_retry_at": now + 300,
                  "other_stages": {"transcribed": 12}, "counted_at": now, "cancelled": 4,
                  "by_anime": [{"anime_id": 5114, "anime_title": "Fullmetal Alchemist: Brotherhood",
                                "queued": 52, "downloading": 1, "downloaded": 11, "failed": 0,
                                "priority": 10}]},
        "workers": [
            {"id": "w01", "host": "nas", "state": "downloading", "last_seen_seconds": 0.4,
             "job": {"id": 17, "anime_id": 5114, "anime_title": "Fullmetal Alchemist: Brotherhood",
                     "episode": 12, "attempt": 1, "phase": "downloading", "percent": 42.3,
                     "bytes": 507000000, "speed_bps": 3250000.0, "eta_seconds": 252.0,
                     "running_seconds": 3725.0}},
            {"id": "w02", "host": "nas", "state": "idle", "last_seen_seconds": 0.9, "job": None}],
        "disk": {"state": "running", "usage_bytes": 7_200_000_000,
                 "breakdown": {"videos": 6_100_000_000, "audio": 500_000_000, "transcripts": 10_000,
                               "in_progress": 600_000_000, "other": 4096},
                 "reserved_bytes": 1_000_000_000, "free_bytes": 120_000_000_000,
                 "pause_threshold_bytes": 9_000_000_000, "resume_threshold_bytes": 8_000_000_000,
                 "hard_limit_bytes": 10_000_000_000, "min_free_bytes": 1_000_000_000,
                 "measured_at": now, "age_seconds": 0.5, "admitting": True, "refusal": None},
        "recent_failures": [
            {"id": 3, "anime_id": 1, "anime_title": "<b id='bold'>Some Show</b>", "episode": 2,
             "error": "ani-cli returned non-zero exit code: 1\n<img src=x onerror=\"window.__xss=1\">",
             "at": now - 60}],
        "last_hour": {"downloaded": 12, "bytes": 5_760_000_000, "average_size_bytes": 480_000_000},
        "database": {"busy_since": None, "error": None, "pending_writes": 0},
        "title_mismatches": [
            {"id": 21, "anime_id": 10087, "anime_title": "Fate/Zero", "episode": 1,
             "selected_title": "Fate/Zero", "site_title": "Fate/Zero Season 2", "at": now - 30}],
        "cleanup": {"note": "a key this page has never heard of"},
    }


def test_the_page_renders_what_the_document_says_and_only_as_text(make_system, browser, tmp_path):
    system = make_system({"queue": {"heartbeat_seconds": 0.5}})
    endpoint = load_config(system.config_path).zmq.status
    (system.data / "run").mkdir(parents=True, mode=0o700)
    fake = ScriptedDispatcher(endpoint, document(time.time()))
    fake.start()
    try:
        web = system.spawn("anime-web", "-c", str(system.config_path))
        browser.get(web_url(system, web))
        js(browser, "window.__sameDocument = true")
        wait_for(lambda: header(browser)["state"] == "downloading", 15, "the first update")
        page = js(browser, "return document.body.innerText")
        assert "Fullmetal Alchemist: Brotherhood ep 12" in page and "42.3%" in page
        assert "ETA 04:12" in page and "3.3 MB/s" in page
        assert "videos 6.1 GB" in page and "in progress 600.0 MB" in page
        # Text from the database stays text: shown literally, never parsed as markup.
        assert "<img src=x onerror=" in page and "<b id='bold'>Some Show</b> ep 2" in page
        assert js(browser, "return window.__xss") is None
        assert js(browser, "return document.getElementById('bold')") is None
        # Keys the page knows from other parts, and one it does not know.
        assert "Fate/Zero Season 2" in page
        assert js(browser, "return document.getElementById('more').hidden") is False
        assert "a key this page has never heard of" in js(
            browser, "return document.getElementById('more-list').textContent")
        counts = js(browser, """return Object.fromEntries([...document.querySelectorAll(
            '#queue-counts [data-count]')].map(d => [d.dataset.count, d.querySelector('dd').textContent]))""")
        assert counts["queued"] == "118" and counts["cancelled"] == "4", counts
        assert js(browser, "return document.querySelectorAll('#by-anime tbody tr').length") == 1
        screenshot(browser, tmp_path / "web-document-360px.png", PHONE[0])
        screenshot(browser, tmp_path / "web-document-desktop.png", DESKTOP[0])

        states = [
            ("database", {"busy_since": time.time() - 5, "error": "database is locked",
                          "pending_writes": 3}, "database_busy", "database busy"),
            ("disk", {"state": "unavailable", "reason": "storage_dir is not mounted"},
             "storage_unavailable", "storage unavailable"),
            ("disk", {"state": "paused", "refusal": "disk paused: waiting for usage below "
                                                    "resume_threshold_gb"}, "paused_disk", "paused by the disk"),
        ]
        for key, change, state, label in states:
            status = document(time.time())
            status[key].update(change)
            fake.status = status
            seen = wait_for(lambda: (h := header(browser))["state"] == state and h, 10,
                            f"the header to say {label}")
            assert seen["label"] == label
            if key == "database":
                assert "database is locked" in seen["why"] and "3 writes waiting" in seen["why"]
            if state == "storage_unavailable":
                assert "storage_dir is not mounted" in seen["why"]
                screenshot(browser, tmp_path / "web-storage-unavailable-360px.png", PHONE[0])
        assert js(browser, "return window.__sameDocument === true"), "the page reloaded"

        # The page's own machinery for the buttons: its token passes the CSRF check, and
        # the control route says that nothing answers on the control endpoint (this
        # scripted dispatcher serves the status only).
        result = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "window.animeWeb.postControl('pause', {}).then(done, e => done(String(e)));")
        assert result["status"] == 503 and result["reply"]["result"] == {"error": "unavailable"}, result
        assert result["reply"]["message"].startswith("no answer from the dispatcher at ipc://")
    finally:
        fake.stop()
