"""The worker process's loop: moves frames, polls fds, carries out the core's actions.

One thread runs the loop (a zmq poller over the dispatcher socket, the disk state
subscription, the stop signal, ani-cli's pipes and exit, the post step's wake-up);
every decision is services/worker/core.py's. The post step runs in a helper thread
so heartbeats continue.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from collections import deque
from typing import Callable

import zmq

from shared import storage
from shared.config import Config
from shared.lifecycle import StopRequest
from shared.logfmt import kv
from shared.protocol import DiskStateMsg, Message, ProtocolError, decode, encode
from shared.sockets import Sockets, waiting
from services.worker import private_dir, shims
from services.worker.actions import (Action, ClearPartials, Discard, ExitNow, Figures, Kill, Land,
                                     Reap, Send, Start, StartPost, StopPost)
from services.worker.attempt import Attempt
from services.worker.core import WorkerCore

log = logging.getLogger(__name__)
IDLE_WAIT_SECONDS = 5.0  # the longest poll: an idle worker wakes for the disk state anyway


class Worker:
    def __init__(self, config: Config, worker_id: str) -> None:
        self.config = config
        self.worker_id = worker_id
        # Not secrets (it loads OpenSSL, +3.5 MB RSS). 128 bits: the routing id is what the
        # ROUTER hands over to a new connection, so another machine must not guess it.
        session = os.urandom(16).hex()
        self.identity = f"{worker_id}/{session}".encode()
        self.sockets = Sockets(config)
        self.stop = StopRequest()
        self.attempt: Attempt | None = None
        self.tools = self._install_shims()
        self.core = WorkerCore(config, worker_id, session, socket.gethostname(),
                               storage_problem=self._storage_problem, figures=self._figures)

    def _install_shims(self) -> shims.Shims | None:
        try:
            return shims.install(self.config.run_dir)
        except OSError as exc:
            log.error(kv("cannot write the downloader wrappers: the bandwidth cap and exact "
                         "progress are off", error=exc, directory=self.config.run_dir,
                         worker_id=self.worker_id))
            return None

    def _storage_problem(self, storage_id: str) -> str | None:
        return storage.problem(self.config.storage_dir, storage_id)

    def _figures(self, phase: str) -> Figures:
        return self.attempt.figures(phase) if self.attempt is not None else Figures()

    # --- sockets ------------------------------------------------------------

    def _open(self) -> None:
        zc = self.config.zmq
        self.dealer = self.sockets.connect_dealer(zc.dispatcher, self.identity)
        self.sub = self.sockets.connect(zmq.SUB, zc.disk_state)
        self.sub.setsockopt(zmq.SUBSCRIBE, DiskStateMsg.KIND.encode())
        self.poller = zmq.Poller()
        for item in (self.dealer, self.sub, self.stop.wakeup_fd):
            self.poller.register(item, zmq.POLLIN)
        self.polled_pipes: list[int] = []

    def send(self, msg: Message) -> bool:
        try:
            self.dealer.send_multipart(encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected (IMMEDIATE): the caller retries later
            return False

    # --- the loop -----------------------------------------------------------

    def run(self) -> int:
        # What a worker killed with SIGKILL left running stops now, not at a later attempt.
        private_dir.sweep_orphans(self.config.storage_dir)
        self._open()
        log.info(kv("worker started", worker_id=self.worker_id, session=self.core.session,
                    endpoint=self.config.zmq.dispatcher))
        try:
            while not self.core.finished(time.monotonic()):
                self._poll_once()
            self.send(self.core.bye().msg)
            return 0
        finally:
            if self.attempt is not None:
                self.attempt.reap()
            self.sockets.close()
            log.info(kv("worker stopped", worker_id=self.worker_id))

    def _poll_once(self) -> None:
        fds = self._poll_pipes()
        events = dict(self.poller.poll(self._poll_timeout_ms()))
        if self.stop.wakeup_fd in events:
            self.stop.drain()
            self._do(self.core.on_stop_signal(self.stop.count, time.monotonic()))
        if self.attempt and any(fd in events for fd in fds):
            self.attempt.read_pipes()
        if self.sub in events:
            self._drain(self.sub, self.core.on_disk)
        if self.dealer in events:
            self._drain(self.dealer, self.core.on_message)
        self._check_attempt()
        self._do(self.core.tick(time.monotonic()))

    def _poll_pipes(self) -> list[int]:
        """Keep the poller's set of the attempt's fds in step with the attempt; the
        sockets stay registered."""
        fds = self.attempt.fds() if self.attempt else []
        if fds != self.polled_pipes:
            for fd in self.polled_pipes:
                self.poller.unregister(fd)
            for fd in fds:
                self.poller.register(fd, zmq.POLLIN)
            self.polled_pipes = fds
        return fds

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        seconds = min(self.core.wait_seconds(now), IDLE_WAIT_SECONDS)
        if self.attempt is not None:
            seconds = min(seconds, self.attempt.seconds_to_wait())
        return math.ceil(seconds * 1000)  # rounded up: never wake just before a timer

    def _drain(self, sock: zmq.Socket, handler: Callable[[Message, float], list[Action]]) -> None:
        for frames in waiting(sock, 100):
            try:
                self._do(handler(decode(frames), time.monotonic()))
            except ProtocolError as exc:
                log.warning(kv("dropped malformed message", error=exc, worker_id=self.worker_id))
            except Exception:
                log.exception(kv("error while handling a message; dropped it", **self.core.context))

    def _check_attempt(self) -> None:
        """Tell the core what became of the attempt: ani-cli's exit, the post step's end."""
        a = self.attempt
        if a is None:
            return
        try:
            exit = a.exited()
            if exit is not None:
                self._do(self.core.exited(exit, time.monotonic()))
            post = a.post_result() if self.attempt is a else None
            if post is not None:
                self._do(self.core.post_done(post, time.monotonic()))
        except Exception as exc:  # a bug judging one attempt must not end the worker
            log.exception(kv("error while checking the attempt", **self.core.context))
            self._do(self.core.attempt_error(exc, time.monotonic()))

    # --- the core's actions -------------------------------------------------

    def _do(self, actions: list[Action]) -> None:
        todo = deque(actions)
        while todo:
            todo.extend(self._carry_out(todo.popleft()))

    def _carry_out(self, action: Action) -> list[Action]:
        """Carry out one action; what the core says to its outcome."""
        now = time.monotonic()
        a = self.attempt
        if isinstance(action, Send):
            return [] if self.send(action.msg) else self.core.unsent(action.msg, now)
        if isinstance(action, Start):
            return self._start(action, now)
        if isinstance(action, Land):
            try:
                a.land(action.video_path, action.site_title, action.title_mismatch)
            except OSError as exc:
                return self.core.land_failed(exc, now)
            return self.core.landed(now)
        if isinstance(action, ExitNow):
            if a is not None:
                a.kill(signal.SIGKILL)
            os._exit(1)
        if a is None:
            return []  # an attempt that never started (dry run, invalid job): nothing to do
        if isinstance(action, Kill):
            a.kill(action.sig)
        elif isinstance(action, StartPost):
            a.start_post(action.name)
        elif isinstance(action, StopPost):
            a.stop_post()
        elif isinstance(action, ClearPartials):
            a.clear_partials()
        elif isinstance(action, Reap):
            a.reap()
        elif isinstance(action, Discard):
            a.discard(action.keep_partials)
            self.attempt = None
        return []

    def _start(self, action: Start, now: float) -> list[Action]:
        if self.attempt is not None:  # never: the core discards each attempt it ends
            self.attempt.discard(keep_partials=True)
        self.attempt = Attempt(action.job, self.config, worker_id=self.worker_id, tools=self.tools)
        try:
            self.attempt.prepare()
            pid = self.attempt.spawn(action.argv)
        except (OSError, RuntimeError) as exc:
            return self.core.start_failed(exc, now)
        return self.core.started(pid, now)
