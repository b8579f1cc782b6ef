"""Who may use anime-web (issue 17, security): real processes, real HTTP requests.

- An address other hosts can reach needs ``[web] password`` or ``api_key``: without one
  anime-web (and the launcher) exit 2 with one line naming the key.
- A request from another host without the password is refused: two network namespaces
  joined by a veth pair stand for two machines (as in test_remote_workers), so the
  client's address is really not the loopback. Needs root; skipped with the reason
  otherwise (tests/unit/test_web_access.py judges the same requests in-process).
- A POST without the CSRF token is refused, and so is one from another origin; with the
  token it reaches the control route, which answers that controls are not there yet.
- Nothing under /api/ (or anywhere) can name a file: the raw paths of the usual
  traversal tricks get 404 and never a byte of the files they aim at.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

# machines: the fixture of a second machine (a network namespace), shared with the CURVE tests
from tests.integration.test_remote_workers import (REMOTE_IP, SERVER_IP, machines,  # noqa: F401
                                                  output, spawn_in)
from tests.system import System, wait_for

PASSWORD = "correct horse battery staple"
API_KEY = "k" * 24
MARKER = "marker-3f9c1d"  # in config.toml and a file beside it: must never be served


def start_web(system: System) -> tuple[subprocess.Popen, str]:
    proc = system.spawn("anime-web", "-c", str(system.config_path))

    def url() -> str | None:
        found = re.findall(r" listening url=(http://\S+/)", system.output(proc))
        return found[-1] if found else None
    return proc, wait_for(url, 20, "anime-web to listen")


def call(url: str, method: str, path: str, headers: dict | None = None,
         body: bytes | None = None) -> tuple[int, dict, bytes]:
    """One request with ``path`` sent exactly as written (http.client normalizes nothing)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def basic(password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"me:{password}".encode()).decode()}


def token_of(url: str, headers: dict | None = None) -> str:
    status, _, body = call(url, "GET", "/api/session", headers)
    assert status == 200, body
    return json.loads(body)["csrf_token"]


@pytest.mark.parametrize("listen", ["0.0.0.0:8766", "[::]:0", "10.213.0.1:8766"])
def test_an_address_other_hosts_reach_needs_a_password(make_system, listen):
    system = make_system({"web": {"listen": listen}})
    for program in ("anime-web", "anime-downloader"):
        result = system.run(program, "-c", str(system.config_path), timeout=30)
        assert result.returncode == 2, (program, result.stderr)
        assert result.stderr == (
            f"{program}: {system.config_path}: [web] listen: {listen} is reachable from other "
            "hosts; set [web] password or api_key, or listen on 127.0.0.1:8766\n")
    assert not (system.data / "run" / "supervisord.conf").exists()


# On the other machine: each request, and what came back (status, challenge).
CLIENT = r"""
import base64, http.client, json, sys
host, port, password, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def call(headers):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/api/session", headers=headers)
    r = conn.getresponse()
    return [r.status, r.getheader("WWW-Authenticate"), r.read().decode()]
auth = lambda p: {"Authorization": "Basic " + base64.b64encode(f"me:{p}".encode()).decode()}
print(json.dumps({"none": call({}), "wrong": call(auth("guess")), "password": call(auth(password)),
                  "wrong_key": call({"X-Api-Key": "x" * 24}), "key": call({"X-Api-Key": key})}))
"""


def test_another_host_without_the_password_is_refused(make_system, machines):
    system = make_system({"web": {"listen": f"{SERVER_IP}:8766", "password": PASSWORD,
                                  "api_key": API_KEY}})
    spawn_in(system, machines.server, "web", "anime-web", "-c", str(system.config_path))
    wait_for(lambda: " listening url=" in output(system, "web"), 20, "anime-web to listen")
    result = subprocess.run([*machines.remote, sys.executable, "-c", CLIENT, SERVER_IP, "8766",
                             PASSWORD, API_KEY], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    for refused in ("none", "wrong", "wrong_key"):
        status, challenge, body = answers[refused]
        assert status == 401, (refused, answers[refused])
        assert challenge.startswith('Basic realm="anime-downloader"')
        assert "csrf_token" not in body
    for allowed in ("password", "key"):
        status, _, body = answers[allowed]
        assert status == 200 and json.loads(body)["csrf_token"], (allowed, answers[allowed])
    wait_for(lambda: f"refused request peer={REMOTE_IP}" in output(system, "web"), 10,
             "the refusal to be logged with the other host's address")


def test_a_change_needs_the_csrf_token_and_this_origin(make_system):
    system = make_system()
    web, url = start_web(system)
    token = token_of(url)
    origin = url.rstrip("/")
    json_type = {"Content-Type": "application/json"}
    pause = b'{"for": "2h"}'

    def post(headers: dict, body: bytes | None = pause, path: str = "/api/ctl/pause"):
        status, _, answer = call(url, "POST", path, {**json_type, **headers}, body)
        return status, json.loads(answer)

    for headers in ({}, {"X-CSRF-Token": "0" * 64}, {"X-CSRF-Token": token[:-1]}):
        status, answer = post(headers)
        assert status == 403 and "CSRF token" in answer["error"], (headers, answer)
    status, answer = post({"X-CSRF-Token": token, "Origin": "http://evil.example"})
    assert status == 403 and "another origin" in answer["error"]
    status, answer = post({"X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"})
    assert status == 403
    status, answer = post({"X-CSRF-Token": token, "Origin": origin})  # no dispatcher runs
    assert (status, answer["ok"], answer["result"]) == (503, False, {"error": "unavailable"})
    assert answer["message"].startswith("no answer from the dispatcher at ipc://"), answer
    status, answer = post({"X-CSRF-Token": token}, b'{"for": "soon"}')
    assert status == 400 and answer["message"].startswith("for: must be a duration")
    status, _, _ = call(url, "POST", "/api/ctl/pause", {"X-CSRF-Token": token,
                                                         "Content-Type": "text/plain"}, pause)
    assert status == 415  # what an HTML form on another site could send
    status, headers, _ = call(url, "GET", "/api/ctl/pause")
    assert status == 405 and headers["allow"] == "POST"
    # A name of another site resolved to 127.0.0.1 (DNS rebinding) reads nothing.
    status, _, body = call(url, "GET", "/api/session", {"Host": "evil.example:8766"})
    assert status == 403 and b"csrf_token" not in body
    assert "refused request peer=127.0.0.1 method=POST path=/api/ctl/pause status=403" in \
        system.output(web)


def test_with_a_password_every_request_needs_it_and_a_browser_post_the_token_too(make_system):
    system = make_system({"web": {"listen": "127.0.0.1:0", "password": PASSWORD, "api_key": API_KEY}})
    _, url = start_web(system)
    status, headers, _ = call(url, "GET", "/")  # even from this machine: a proxy looks local
    assert status == 401 and headers["www-authenticate"].startswith("Basic ")
    assert call(url, "GET", "/", basic(PASSWORD))[0] == 200
    token = token_of(url, basic(PASSWORD))
    json_type = {"Content-Type": "application/json"}
    status, _, body = call(url, "POST", "/api/ctl/resume", {**basic(PASSWORD), **json_type}, b"{}")
    assert status == 403 and b"CSRF token" in body
    status, _, body = call(url, "POST", "/api/ctl/resume",
                           {**basic(PASSWORD), **json_type, "X-CSRF-Token": token}, b"{}")
    assert status == 503 and json.loads(body)["message"].startswith("no answer from the dispatcher")
    # A script with the API key: no browser can be made to send that header, so no token.
    status, _, body = call(url, "POST", "/api/ctl/resume", {"X-Api-Key": API_KEY, **json_type}, b"{}")
    assert status == 503 and json.loads(body)["message"].startswith("no answer from the dispatcher")
    assert call(url, "POST", "/api/ctl/resume", {"X-Api-Key": "x" * 24, **json_type}, b"{}")[0] == 401


TRAVERSALS = [
    "/api/../config.toml", "/api/%2e%2e/config.toml", "/api/..%2fconfig.toml",
    "/api/status/../../config.toml", "/api/status/..%2f..%2fconfig.toml",
    "/static/../config.toml", "/static/..%2f..%2f..%2fconfig.toml", "/static/%2e%2e/%2e%2e/config.toml",
    "/static/app.js/../../config.toml", "/static/secret.txt", "/secret.txt", "/config.toml",
    "/data/jobs.db", "/api/events/..%2f..%2f..%2f..%2fetc%2fpasswd", "//etc/passwd",
    "/static//etc/passwd", "/api/%2Fetc%2Fpasswd", "/static/..\\..\\config.toml",
    "/api/ctl/../../../etc/passwd", "/static/%252e%252e/config.toml",
]


def test_nothing_under_api_names_a_path_on_disk(make_system):
    system = make_system()
    with open(system.config_path, "a") as fh:
        fh.write(f"# {MARKER}\n")
    (system.root / "secret.txt").write_text(MARKER)
    _, url = start_web(system)
    for path in TRAVERSALS:
        status, _, body = call(url, "GET", path)
        assert status in (400, 404), (path, status)
        assert MARKER.encode() not in body and b"root:x:0:0" not in body, path
    # Query strings are ignored by every route: the answer is the usual one.
    for path in ("/api/status?path=/etc/passwd", "/api/session?file=../config.toml",
                 "/?static=config.toml"):
        status, _, body = call(url, "GET", path)
        assert MARKER.encode() not in body and b"root:x:0:0" not in body, path
    assert call(url, "GET", "/static/app.js")[0] == 200
