"""anime-web stays cheap: no page open, no request to the dispatcher and no CPU; with
several pages open, one status request per heartbeat for all of them (issue 17)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import psutil

from shared.config import load_config
from tests.integration.test_web_browser import ScriptedDispatcher, document, web_url

HEARTBEAT = 0.5
PAGES = 6
UPDATES = 4


def read_updates(url: str, count: int, into: list, failures: list) -> None:
    """An EventSource's view of /api/events: the first ``count`` update events."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request("GET", "/api/events", headers={"Accept": "text/event-stream"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        event = None
        while len(into) < count:
            line = response.fp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event == "update":
                into.append(json.loads(line[len("data: "):]))
    except Exception as exc:  # reported by the test, not lost in a thread
        failures.append(exc)
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def test_one_request_per_heartbeat_however_many_pages_and_none_without_a_page(make_system):
    system = make_system({"queue": {"heartbeat_seconds": HEARTBEAT}})
    (system.data / "run").mkdir(parents=True, mode=0o700)
    fake = ScriptedDispatcher(load_config(system.config_path).zmq.status, document(time.time()))
    fake.start()
    try:
        web = system.spawn("anime-web", "-c", str(system.config_path))
        url = web_url(system, web)
        before = cpu_seconds(web.pid)
        time.sleep(4 * HEARTBEAT)  # sync-ok: a window in which nothing may happen
        idle_cpu = cpu_seconds(web.pid) - before
        assert fake.requests == 0, "asked the dispatcher with no page open"
        assert idle_cpu < 0.05, f"anime-web used {idle_cpu:.3f} s of CPU in {4 * HEARTBEAT:g} s idle"

        pages: list[list] = [[] for _ in range(PAGES)]
        failures: list = []
        threads = [threading.Thread(target=read_updates, args=(url, UPDATES, got, failures))
                   for got in pages]
        started, cpu_before = time.monotonic(), cpu_seconds(web.pid)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        elapsed, busy_cpu = time.monotonic() - started, cpu_seconds(web.pid) - cpu_before
        assert not failures, failures
        assert all(len(got) == UPDATES and all(u["ok"] for u in got) for got in pages)
        requests = fake.requests
        print(f"{PAGES} pages x {UPDATES} updates in {elapsed:.2f} s: {requests} status requests, "
              f"{busy_cpu:.3f} s of CPU; idle {idle_cpu:.3f} s of CPU in {4 * HEARTBEAT:g} s")
        assert requests <= UPDATES + 2, f"{requests} requests for {PAGES} pages: one poll each?"
        assert requests <= elapsed / HEARTBEAT + 2
        # The pages have hung up; anime-web notices at its next write (one heartbeat).
        time.sleep(2 * HEARTBEAT)  # sync-ok: lets that last round pass
        settled = fake.requests
        time.sleep(4 * HEARTBEAT)  # sync-ok: a window in which nothing may be asked
        assert fake.requests == settled, "still asking with every page closed"
    finally:
        fake.stop()
