"""The dispatcher's socket loop: moves frames between ZeroMQ and ``Dispatcher``.

It never waits long for the database: until the database can be opened it serves
status requests and stop signals only (one log line says that it waits), and the
store's short busy timeout keeps every later write from holding the loop up.
"""

from __future__ import annotations

import json
import logging
import os
import time

import zmq

from shared.config import Config
from shared.lifecycle import StopRequest
from shared.logfmt import kv
from shared.protocol import (CONTROL_REQUESTS, ControlReply, DiskStateMsg, DiskUsageMsg, Message, ProtocolError,
                             StatusReply, StatusRequest, WorkerProbe, decode, encode)
from shared.singleton import hold_lock
from shared.sockets import Sockets, is_local_endpoint, waiting
from shared.timers import Timers
from services.dispatcher.core import Dispatcher, Options
from services.dispatcher.effects import FileEffects
from services.dispatcher.status_view import build_status
from services.dispatcher.counts import ThreadPasses
from services.dispatcher.store import QueueReader, SqlJobStore, StoreUnavailable
from services.dispatcher.store_dry_run import DryRunStore

log = logging.getLogger(__name__)
TICK_SECONDS = 0.5
IDLE_TICK_SECONDS = 1.0
START_RETRY_SECONDS = 0.25  # trying to open a locked database again
# Ticks come at most IDLE_TICK_SECONDS apart; a longer gap beyond this is a stall of the
# loop, not of the workers (their heartbeats of that time may still wait in the socket).
STALL_SECONDS = 1.0
TICK, DONE_CHECK = "tick", "done check"  # the loop's timers
WORKER_BATCH = 100  # worker messages per wake-up, at most (then the timers get their turn)
WORKER_CHUNK = 10  # ... between two looks at the status socket


class DispatcherServer:
    def __init__(self, config: Config, options: Options) -> None:
        self.config = config
        self.options = options
        hold_lock(config.run_dir / "dispatcher.lock", f"dispatcher for {config.db_path}")
        store_class = DryRunStore if options.dry_run else SqlJobStore
        self.store = store_class(config.db_path, options.anime_id)
        # The passes over the whole queue (0.3 s at a million jobs) run on a thread with a
        # read connection of its own, never in this loop (counts.py); a dry run reads the
        # queue once at start anyway.
        self.passes = None if options.dry_run else ThreadPasses(
            QueueReader(config.db_path, options.anime_id))
        self.dispatcher = Dispatcher(self.store, FileEffects(config, options.dry_run), config,
                                     options, connected=self._connected, passes=self.passes)
        self.sockets = Sockets(config)
        self.stop = StopRequest()
        # Under supervisord a kill -9 of it sends every program SIGTERM at once (parent-death
        # signal): then the workers stop too, and their hand-backs are worth waiting for.
        self.parent = os.getppid()
        # Workers on other machines authenticate with CURVE: each message then carries
        # the client's public key (ZAP's User-Id), to which the dispatcher binds worker ids.
        self.curve = not is_local_endpoint(config.zmq.dispatcher)

    def _open_sockets(self) -> None:
        zc = self.config.zmq
        self.router = self.sockets.bind(zmq.ROUTER, zc.dispatcher, "dispatcher")
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.status = self.sockets.bind(zmq.ROUTER, zc.status, "status")
        self.control = self.sockets.bind(zmq.ROUTER, zc.control, "control")
        self.disk_sub = self.sockets.connect(zmq.SUB, zc.disk_state)
        for kind in (DiskStateMsg.KIND, DiskUsageMsg.KIND):  # the state, and every re-measure
            self.disk_sub.setsockopt(zmq.SUBSCRIBE, kind.encode())
        self.disk_push = self.sockets.connect(zmq.PUSH, zc.disk_control)
        self.disk_push.setsockopt(zmq.SNDHWM, 10)
        self.poller = zmq.Poller()
        self.start_poller = zmq.Poller()  # until the database is open: no worker messages
        for sock in (self.router, self.status, self.control, self.disk_sub):
            self.poller.register(sock, zmq.POLLIN)
        for sock in (self.status, self.control, self.disk_sub):
            self.start_poller.register(sock, zmq.POLLIN)
        self.poller.register(self.stop.wakeup_fd, zmq.POLLIN)
        self.start_poller.register(self.stop.wakeup_fd, zmq.POLLIN)

    def run(self) -> int:
        self._open_sockets()  # first: an endpoint refused at start leaves the database alone
        try:
            if not self._start():
                return 0
            return self._loop()
        finally:
            if self.passes is not None:
                self.passes.close()
            self.store.close()
            self.sockets.close()
            log.info("dispatcher stopped")

    def _loop(self) -> int:
        """Until a stop, then until the workers that stop with it have handed back their
        jobs (or its grace is over); a second stop signal ends it at once."""
        d = self.dispatcher
        timers = Timers()
        timers.start(TICK, time.monotonic(), 0)
        if self.options.exit_when_done:
            timers.start(DONE_CHECK, time.monotonic(), 0)
        last_tick = time.monotonic()
        signals_at_stop = 0
        while True:
            events = dict(self.poller.poll(timers.wait_ms(time.monotonic())))
            had_leases = bool(d.leases)
            if self.stop.wakeup_fd in events:
                self.stop.drain()
                if not d.stopping:
                    signals_at_stop = self.stop.count
                    d.begin_stop(time.time(), everyone_stops=os.getppid() != self.parent)
                elif self.stop.count > signals_at_stop:
                    log.info(kv("second stop signal: stopping now", leases=len(d.leases)))
                    return 0
            if self.disk_sub in events:
                self._drain(self.disk_sub, self._on_disk)
            # Status first, and workers in batches: under a stream of worker messages a
            # status request waited behind up to 1000 of them (p50 237 ms at 1,200 jobs/s).
            if self.status in events:
                self._drain(self.status, self._on_status)
            if self.control in events:
                self._drain(self.control, self._on_control, limit=10)
            if self.router in events:
                self._drain_workers()
            if timers.due(TICK, time.monotonic()):
                stall = time.monotonic() - last_tick - IDLE_TICK_SECONDS
                if stall > STALL_SECONDS:
                    d.stalled(stall, time.time())
                last_tick = time.monotonic()
                self._send(d.tick(time.time()))
                # Nothing leased: lease deadlines need no watching, wake less often.
                timers.start(TICK, last_tick, TICK_SECONDS if d.leases else IDLE_TICK_SECONDS)
            while d.more_to_assign:  # a chunk of claims at a time, status served between
                if self.status.get(zmq.EVENTS) & zmq.POLLIN:
                    self._drain(self.status, self._on_status)
                self._send(d.assign_more(time.time()))
            self._flush_disk_requests()
            if d.stopping:
                if d.may_exit(time.time()):
                    return 0
                continue
            # At once when the last lease ends on an empty queue, else every tick.
            if timers.due(DONE_CHECK, time.monotonic()) or (
                    self.options.exit_when_done and had_leases and d.drained()):
                timers.start(DONE_CHECK, time.monotonic(), TICK_SECONDS)
                if d.done(time.time()) and (code := self._finish()) is not None:
                    return code

    def _start(self) -> bool:
        """Open the database and re-adopt its leases, waiting (one log line) while another
        program holds it locked; status requests are answered meanwhile. False if a stop
        was requested before it could start."""
        d = self.dispatcher
        began = time.monotonic()
        waiting_logged = False
        while not self.stop.requested:
            try:
                d.start(time.time())
            except StoreUnavailable as exc:
                if not waiting_logged:
                    waiting_logged = True
                    log.warning(kv("waiting for the database: another program holds it locked",
                                   db=self.config.db_path, error=exc))
                self._serve_status_for(START_RETRY_SECONDS)
                continue
            log.info(kv("dispatcher started", db=self.config.db_path, dry_run=self.options.dry_run,
                        anime_id=self.options.anime_id, endpoint=self.config.zmq.dispatcher,
                        waited=round(time.monotonic() - began, 1) if waiting_logged else None))
            return True
        log.info(kv("stop requested before the database could be opened"))
        return False

    def _serve_status_for(self, seconds: float) -> None:
        """Wait up to ``seconds``, answering status requests and following the disk; worker
        messages wait in their socket (the important ones are re-sent anyway)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.stop.requested:
            events = dict(self.start_poller.poll(left * 1000))
            if self.stop.wakeup_fd in events:
                self.stop.drain()
            if self.disk_sub in events:
                for frames in waiting(self.disk_sub):
                    try:
                        msg = decode(frames)
                    except ProtocolError:
                        continue
                    if isinstance(msg, DiskStateMsg):
                        self.dispatcher.disk.on_state(msg, time.time())
            if self.status in events:
                self._drain(self.status, self._on_status)
            if self.control in events:  # answered: "starting, try again"
                self._drain(self.control, self._on_control, limit=10)

    def _finish(self) -> int | None:
        """Print the summary and end (0); None when the counts cannot be read just now."""
        try:
            summary = self.dispatcher.summary(time.time())
        except StoreUnavailable:
            return None
        text = json.dumps(summary, sort_keys=True)
        (self.config.run_dir / "summary.json").write_text(text + "\n")
        log.info(kv("all runnable jobs done", **summary))
        print(f"summary {text}", flush=True)
        return 0

    # --- frames -------------------------------------------------------------

    def _drain(self, sock: zmq.Socket, handler, limit: int = 1000, copy: bool = True) -> int:
        """Handle the frames waiting on ``sock`` (up to ``limit``); one bad frame never stops
        the loop. Returns how many there were."""
        handled = 0
        for frames in waiting(sock, limit, copy):
            handled += 1
            try:
                handler(frames)
            except ProtocolError as exc:
                log.warning(kv("dropped malformed message", error=exc, frames=len(frames)))
            except Exception:
                log.exception(kv("error while handling a message; dropped it", frames=len(frames)))
        return handled

    def _drain_workers(self) -> None:
        """Up to WORKER_BATCH worker messages, in chunks with the status requests that came
        in meanwhile served between them: with 100 workers a batch of 100 took ~25 ms,
        and a status request waited behind all of it."""
        for _ in range(WORKER_BATCH // WORKER_CHUNK):
            handled = self._drain(self.router, self._on_worker, limit=WORKER_CHUNK,
                                  copy=not self.curve)
            if self.status.get(zmq.EVENTS) & zmq.POLLIN:
                self._drain(self.status, self._on_status)
            if handled < WORKER_CHUNK:
                return

    def _on_worker(self, frames: list) -> None:
        key = ""
        if self.curve:  # frames (not bytes): the key that authenticated this connection
            key = frames[0].get("User-Id")
            frames = [frame.bytes for frame in frames]
        identity, rest = frames[0], frames[1:]
        msg = decode(rest)
        try:  # leases, logs and the database name the owner as text: refuse anything else
            identity.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{msg.KIND} from an identity that is not UTF-8 text "
                                f"({identity[:16]!r}); workers set '<worker_id>/<session>'") from None
        self._send(self.dispatcher.handle(identity, msg, time.time(), key=key))

    def _connected(self, identity: bytes) -> bool:
        """Whether ``identity`` is still connected: a probe to a peer that is gone is
        unroutable (ROUTER_MANDATORY); a full queue means connected, but slow."""
        try:
            self.router.send_multipart([identity] + encode(WorkerProbe()), zmq.NOBLOCK)
        except zmq.Again:
            return True
        except zmq.ZMQError:  # EHOSTUNREACH
            return False
        return True

    def _on_disk(self, frames: list[bytes]) -> None:
        msg = decode(frames)
        if not isinstance(msg, DiskStateMsg):
            raise ProtocolError(f"unexpected {msg.KIND} on the disk state channel")
        self._send(self.dispatcher.on_disk_state(msg, time.time()))

    def _on_status(self, frames: list[bytes]) -> None:
        envelope, rest = _split_envelope(frames)
        if not isinstance(decode(rest), StatusRequest):
            raise ProtocolError("only status.request is served on the status endpoint")
        reply = StatusReply(status=build_status(self.dispatcher.snapshot(time.time())))
        self.status.send_multipart(envelope + encode(reply), zmq.NOBLOCK)

    def _on_control(self, frames: list[bytes]) -> None:
        """An operator's request (anime-ctl, anime-web): one ControlReply to its sender."""
        envelope, rest = _split_envelope(frames)
        msg = decode(rest)
        if type(msg) not in CONTROL_REQUESTS.values():
            raise ProtocolError(f"{msg.KIND} is not served on the control endpoint")
        try:
            reply, outgoing = self.dispatcher.control(msg, time.time())
        except Exception:  # a bug: the asker hears it at once, _drain logs the traceback
            self.control.send_multipart(envelope + encode(ControlReply(
                ok=False, message=f"{msg.KIND} failed in the dispatcher (see its log)",
                result={"error": "unavailable"})), zmq.NOBLOCK)
            raise
        self.control.send_multipart(envelope + encode(reply), zmq.NOBLOCK)
        self._send(outgoing)

    def _send(self, outgoing: list[tuple[bytes, Message]]) -> None:
        for identity, msg in outgoing:
            try:
                self.router.send_multipart([identity] + encode(msg), zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: that worker is gone
                log.warning(kv("could not deliver", kind=msg.KIND, owner=identity.decode(),
                               error=exc))
                self.dispatcher.undeliverable(identity, msg, time.time())

    def _flush_disk_requests(self) -> None:
        for request in self.dispatcher.disk.take_requests():
            try:
                self.disk_push.send_multipart(encode(request), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the disk-watcher is down or busy; it re-measures on its own


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """A ROUTER's frames as (the envelope to answer with, the message): the sender's
    identity, and the empty delimiter a REQ peer adds."""
    envelope, rest = [frames[0]], frames[1:]
    if rest and rest[0] == b"":
        envelope.append(b"")
        rest = rest[1:]
    return envelope, rest
