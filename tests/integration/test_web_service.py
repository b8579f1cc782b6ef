"""anime-web as a service: started and stopped with the rest by anime-downloader, a
clean and prompt stop on SIGTERM while pages are open, one line when it cannot listen."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from urllib.parse import urlsplit

import psutil

from tests.integration.test_web_browser import web_url
from tests.system import wait_for


def get(url: str, path: str) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def refuses_connections(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_launcher_starts_it_and_stops_it_with_everything_else(make_system):
    system = make_system()
    launcher = system.start_supervisord(1)
    url = web_url(system)
    info = wait_for(lambda: (i := system.process_info("web"))["statename"] == "RUNNING" and i, 20,
                    "supervisord to report the web program running")
    # /api/status is the anime-status --json document.
    status, body = wait_for(lambda: (r := get(url, "/api/status"))[0] == 200 and r, 20,
                            "the dispatcher's document through anime-web")
    document = json.loads(body)
    mirror = json.loads(system.run("anime-status", "-c", str(system.config_path), "--json").stdout)
    assert set(document) == set(mirror) and document["dispatcher"] == mirror["dispatcher"]
    os_pid = info["pid"]
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 0
    assert not psutil.pid_exists(os_pid) or psutil.Process(os_pid).status() == psutil.STATUS_ZOMBIE
    assert refuses_connections(url)
    assert "stopped" in system.log("web")


def test_sigterm_stops_it_at_once_with_pages_open(make_system):
    system = make_system()
    web = system.spawn("anime-web", "-c", str(system.config_path))
    url = web_url(system, web)
    parts = urlsplit(url)
    pages = []
    for _ in range(3):  # open event streams, the dispatcher silent: every poll waits 2 s
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", "/api/events")
        assert conn.getresponse().status == 200
        pages.append(conn)
    wait_for(lambda: "dispatcher not answering" in system.output(web), 10, "a silent round")
    started = time.monotonic()
    web.send_signal(signal.SIGTERM)
    assert web.wait(timeout=10) == 0
    elapsed = time.monotonic() - started
    for conn in pages:
        conn.close()
    print(f"anime-web stopped {elapsed:.2f} s after SIGTERM with 3 pages open")
    assert elapsed < 1.5, f"anime-web took {elapsed:.2f} s to stop"
    assert system.output(web).rstrip().endswith("INFO web stopped")


def test_a_port_in_use_is_one_line_and_exit_3(make_system):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        system = make_system({"web": {"listen": f"127.0.0.1:{port}"}})
        result = system.run("anime-web", "-c", str(system.config_path), timeout=30)
    finally:
        holder.close()
    assert result.returncode == 3, result.stderr
    assert result.stderr == (f"anime-web: cannot listen on 127.0.0.1:{port}: Address already in use "
                             "(another anime-web, or another program on that port); stop it or "
                             "change [web] listen\n")


def test_an_address_this_machine_lacks_is_one_line_and_exit_2(make_system):
    system = make_system({"web": {"listen": "192.0.2.1:8766", "password": "pw"}})  # TEST-NET-1
    result = system.run("anime-web", "-c", str(system.config_path), timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"anime-web: {system.config_path}: [web] listen: cannot listen on "
                             "192.0.2.1:8766: Cannot assign requested address\n")
