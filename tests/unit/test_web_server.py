"""anime-web's routes and its place among the services."""

from __future__ import annotations

import subprocess
import sys

from aiohttp import web

from services.web import controls as ctl
from services.web.access import Access
from services.web.feed import StatusFeed
from services.web.server import WebApp, load_static
from shared.config import load_config
from tests.system import REPO
from tests.unit.test_config import write


async def _never() -> dict:
    raise AssertionError("not asked in these tests")


def build(tmp_path) -> web.Application:
    config = load_config(write(tmp_path))
    return WebApp(config, StatusFeed(_never, 1.0), Access(config.web, b"s" * 32),
                  ctl.NoControlEndpoint()).build()


def test_every_route_is_a_fixed_path_so_no_url_can_name_a_file(tmp_path):
    routes = {}
    for resource in build(tmp_path).router.resources():
        assert isinstance(resource, web.PlainResource), resource  # no {variable}, no static dir
        routes[resource.canonical] = sorted(r.method for r in resource)
    assert routes == {
        "/": ["GET", "HEAD"], "/static/app.js": ["GET", "HEAD"], "/static/style.css": ["GET", "HEAD"],
        "/api/status": ["GET", "HEAD"], "/api/session": ["GET", "HEAD"], "/api/events": ["GET"],
        **{f"/api/ctl/{name}": ["POST"] for name in ctl.COMMANDS}}


def test_the_page_comes_from_the_package_and_uses_no_inline_script():
    static = load_static()
    page = static["/"][0].decode()
    assert '<script src="/static/app.js" defer></script>' in page
    assert "<script>" not in page and " on" + "click=" not in page  # CSP: script-src 'self'
    assert static["/static/app.js"][1].startswith("text/javascript")
    script = static["/static/app.js"][0].decode()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script


def test_only_anime_web_imports_the_http_library():
    code = ("import sys\n"
            "import services.worker.__main__, services.worker.agent, services.worker.attempt\n"
            "import services.dispatcher.__main__, services.dispatcher.server\n"
            "import services.disk_watcher.server, services.status, services.launcher\n"
            "import services.web.__main__\n"  # the console script's module: imports it late
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'selenium')))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
