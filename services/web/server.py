"""anime-web's HTTP side (aiohttp): the page, ``/api/*``, and the update stream.

aiohttp because it is asyncio all through (one thread serves every open page and
its server-sent events: ``web.StreamResponse`` writes each event as it comes, with
back-pressure) and it is well kept. The status request is anime-status's (a DEALER
from ``Sockets.connect``, one ``status.request``), awaited on the same loop: no thread,
and a stop never waits for a silent dispatcher.

Routes (every one fixed: no part of a URL is ever used as a name of a file):

    GET  /                 the page (static/index.html)
    GET  /static/app.js    its script;  /static/style.css  its style
    GET  /api/status       the ``anime-status --json`` document (503 while nothing answers)
    GET  /api/session      the CSRF token and what the page needs to know
    GET  /api/events       server-sent events: ``hello`` once, then ``update`` per heartbeat
    POST /api/ctl/<cmd>    operator controls (controls.COMMANDS), CSRF token or API key
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import socket
import time
from importlib import resources
from typing import Awaitable, Callable

import zmq
from aiohttp import web

from services.status import NoAnswer
from services.web import controls as ctl
from services.web.access import REALM, Access, Ask, RefusalLog
from services.web.feed import StatusFeed
from shared.config import Config, ConfigError
from shared.lifecycle import StopRequest
from shared.logfmt import kv
from shared.protocol import ProtocolError, StatusReply, StatusRequest, decode, encode
from shared.singleton import AlreadyRunning
from shared.sockets import Sockets, waiting

log = logging.getLogger(__name__)
STATUS_TIMEOUT = 2.0  # as anime-status: how long to wait for the dispatcher's answer
SHUTDOWN_SECONDS = 2.0  # streams end at once on a stop; nothing else takes long
MAX_BODY_BYTES = 64 * 1024
STATIC = {  # served name -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Server": "anime-web",
}


def load_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("services.web") / "static"
    return {route: ((folder / name).read_bytes(), kind) for route, (name, kind) in STATIC.items()}


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str),
                             headers={"Cache-Control": "no-store"})


def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


class WebApp:
    """The routes and their handlers, around a feed, the access rules and the controls."""

    def __init__(self, config: Config, feed: StatusFeed, access: Access,
                 controls: ctl.ControlClient, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.feed = feed
        self.access = access
        self.controls = controls
        self.clock = clock
        self.refusals = RefusalLog()
        self.static = load_static()
        self.interval = config.queue.heartbeat_seconds

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._headers, self._guard], client_max_size=MAX_BODY_BYTES)
        for route in self.static:
            app.router.add_get(route, self._static)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/session", self._session)
        app.router.add_get("/api/events", self._events, allow_head=False)  # a stream has no head
        for command in ctl.COMMANDS:
            app.router.add_post(f"/api/ctl/{command}", self._control_handler(command))
        app.on_shutdown.append(self._on_shutdown)
        return app

    # --- middlewares ----------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # 404, 405...: JSON under /api/, with our headers
            response = (_json({"error": exc.reason}, exc.status)
                        if request.path.startswith("/api/") else exc)
            for name, value in exc.headers.items():
                if name.lower() in ("allow", "www-authenticate"):
                    response.headers[name] = value
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        h = request.headers
        ask = Ask(method=request.method, peer=request.remote, host=h.get("Host"),
                  authorization=h.get("Authorization"), api_key=h.get("X-Api-Key"),
                  csrf_token=h.get("X-CSRF-Token"), origin=h.get("Origin"),
                  fetch_site=h.get("Sec-Fetch-Site"))
        verdict = self.access.check(ask)
        if verdict.allowed:
            request["via"] = verdict.via
            return await handler(request)
        count = self.refusals.count(request.remote, verdict.reason, self.clock())
        if count is not None:
            log.warning(kv("refused request", peer=request.remote, method=request.method,
                           path=request.path[:200], status=verdict.status, reason=verdict.reason,
                           count=count if count > 1 else None))
        response = _json({"error": verdict.reason}, verdict.status)
        if verdict.challenge:
            response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
        return response

    # --- handlers -------------------------------------------------------------

    async def _static(self, request: web.Request) -> web.Response:
        body, kind = self.static[request.path]
        return web.Response(body=body, headers={"Content-Type": kind, "Cache-Control": "no-cache"})

    async def _status(self, request: web.Request) -> web.Response:
        update = await self.feed.latest(max_age=self.interval / 2)
        if not update.ok:
            return _json({"error": update.error, "since": update.since}, 503)
        return _json(update.status)

    def _session_info(self, request: web.Request) -> dict:
        return {"csrf_token": self.access.csrf_token, "heartbeat_seconds": self.interval,
                "controls": not isinstance(self.controls, ctl.NoControlEndpoint),
                "commands": sorted(ctl.COMMANDS), "via": request.get("via")}

    async def _session(self, request: web.Request) -> web.Response:
        return _json(self._session_info(request))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no", **SECURITY_HEADERS})
        await response.prepare(request)
        sub = self.feed.subscribe()
        try:
            # retry: how soon the browser reconnects when this stream breaks (a restart)
            await response.write(f"retry: {int(self.interval * 1000)}\n\n".encode()
                                 + _sse("hello", self._session_info(request)))
            while (update := await sub.next()) is not None:
                await response.write(_sse("update", update.event()))
        except ConnectionError:
            pass  # the page went away: found at the next write, a heartbeat later at most
        finally:
            sub.close()
        return response

    def _control_handler(self, command: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await self._control(request, command)
        return handle

    async def _control(self, request: web.Request, command: str) -> web.Response:
        body = None
        if request.can_read_body:
            if request.content_type != "application/json":
                return _reply(False, "send the body as application/json", "bad_argument", 415)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return _reply(False, f"the body is not JSON: {exc}", "bad_argument", 400)
        try:
            fields = ctl.parse(command, body)
        except ctl.BadArgument as exc:
            return _reply(False, str(exc), "bad_argument", 400)
        fields["source"] = f"anime-web {request.remote or ''}".strip()
        try:
            reply = await self.controls.send(command, fields)
        except ctl.ControlsUnavailable as exc:
            return _reply(False, str(exc), "unavailable", 503)
        log.info(kv("control request", command=command, source=fields["source"],
                    ok=reply.get("ok"), answer=reply.get("message")))
        error = (reply.get("result") or {}).get("error")
        status = 200 if reply.get("ok") else {"bad_argument": 400, "not_found": 404,
                                                "unavailable": 503}.get(error, 409)
        return _json(reply, status)

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.feed.close()  # every page's stream ends now, not after a timeout


def _reply(ok: bool, message: str, error: str, status: int) -> web.Response:
    return _json({"ok": ok, "message": message, "result": {"error": error}}, status)


class WebServer:
    """The service under supervisord: serve until SIGTERM/SIGINT/SIGHUP, then stop."""

    def __init__(self, config: Config, controls: ctl.ControlClient | None = None) -> None:
        self.config = config
        self.endpoint = config.zmq.status
        self.listener = listen(config)  # here, so a refusal is the one-line exit of run_service
        self.sockets = Sockets(config)
        try:  # a remote status or control endpoint without CURVE keys: exit 2 now
            for endpoint in (self.endpoint, config.zmq.control):
                self.sockets.connect(zmq.DEALER, endpoint).close(linger=0)
        except ConfigError:
            self.close()
            raise
        self.controls = controls or ctl.ZmqControlClient(self.sockets, config.zmq.control)

    def close(self) -> None:
        self.sockets.close()
        self.listener.close()

    async def _fetch(self) -> dict:
        return await fetch_status(self.sockets, self.endpoint, STATUS_TIMEOUT)

    def run(self) -> int:
        stop = StopRequest()
        try:
            return asyncio.run(self._serve(stop))
        finally:
            self.close()

    async def _serve(self, stop: StopRequest) -> int:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def on_signal() -> None:
            stop.drain()
            if stop.requested:
                stopping.set()

        loop.add_reader(stop.wakeup_fd, on_signal)
        feed = StatusFeed(self._fetch, self.config.queue.heartbeat_seconds)
        access = Access(self.config.web, secrets.token_bytes(32), listen_url(self.listener))
        app = WebApp(self.config, feed, access, self.controls).build()
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
        runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_SECONDS,
                               access_log=logging.getLogger("aiohttp.access") if debug else None)
        await runner.setup()
        try:
            await web.SockSite(runner, self.listener).start()
            url = listen_url(self.listener)
            log.info(kv("listening", url=url, auth=self._auth_kind(), status_endpoint=self.endpoint,
                        control_endpoint=self.config.zmq.control, pid=os.getpid()))
            if not stop.requested:
                await stopping.wait()
            log.info(kv("stopping", signals=stop.count))
        finally:
            loop.remove_reader(stop.wakeup_fd)
            await runner.cleanup()
        log.info("stopped")
        return 0

    def _auth_kind(self) -> str:
        kinds = [name for name, value in (("password", self.config.web.password),
                                          ("api_key", self.config.web.api_key)) if value]
        return "+".join(kinds) or "none (this machine only)"


async def fetch_status(sockets: Sockets, endpoint: str, timeout: float) -> dict:
    """services.status.fetch_status on the event loop: a fresh DEALER per request (so a
    late answer to an earlier one is never taken for this one), NoAnswer after ``timeout``.

    The socket is anime-status's own (``Sockets.connect``: limits, CURVE off loopback);
    its ZMQ_FD is watched with ``loop.add_reader`` and removed before the socket closes
    (a descriptor number left registered would steal the next HTTP connection's events).
    ZMQ_FD is edge-triggered: ZMQ_EVENTS is read again after every wake-up."""
    loop = asyncio.get_running_loop()
    sock = sockets.connect(zmq.DEALER, endpoint)
    fd = sock.get(zmq.FD)
    woken = asyncio.Event()
    loop.add_reader(fd, woken.set)
    try:
        sock.send_multipart(encode(StatusRequest()), zmq.NOBLOCK)
        deadline = loop.time() + timeout
        while True:
            woken.clear()
            for frames in waiting(sock):
                try:
                    reply = decode(frames)
                except ProtocolError:
                    continue
                if isinstance(reply, StatusReply):
                    return reply.status
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(woken.wait(), left)
            except asyncio.TimeoutError:
                pass
    except zmq.Again:
        pass  # nothing connected to send to: the same as no answer
    finally:
        loop.remove_reader(fd)
        sock.close(linger=0)
    raise NoAnswer(f"no answer from the dispatcher at {endpoint} within {timeout:g}s "
                   "(is anime-downloader running?)")


def listen(config: Config) -> socket.socket:
    """The listening socket of ``[web] listen``; AlreadyRunning (exit 3) when the port is
    taken, ConfigError (exit 2) for an address this machine does not have."""
    web_config = config.web
    family = socket.AF_INET6 if ":" in web_config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart within TIME_WAIT
        sock.bind((web_config.host, web_config.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        where = f"cannot listen on {web_config.listen}: {exc.strerror or exc}"
        if exc.errno == errno.EADDRINUSE:
            raise AlreadyRunning(f"{where} (another anime-web, or another program on that "
                                 "port); stop it or change [web] listen") from None
        raise ConfigError(f"{config.path}: [web] listen: {where}") from None
    sock.setblocking(False)
    return sock


def listen_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]  # the port the system chose, if 0 was asked
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
