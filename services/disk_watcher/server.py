"""The disk-watcher's loop: measures the storage directory and publishes the disk state
(``disk.state`` on an XPUB socket; what to publish is core.py's decision).

The cheap incremental re-measure runs every ``ACTIVE_MEASURE_SECONDS`` while
anything is being downloaded (files grow in ``.in_progress``) and the disk could
reach a threshold within ``HEADROOM_SECONDS`` at the fastest growth seen lately,
so a download that grows past its reservation is seen within that time (far from
every threshold, once a second is enough), and while the disk is not ``running``,
so a transcriber's deletions resume downloads at once; otherwise the measurement
is cached for ``cache_duration_seconds``. A full walk runs every
``check_interval_seconds``. A ``disk.measure`` request re-measures at once.
Before each publication the storage itself is checked (shared/storage.py: there,
with its marker, writable).
"""

from __future__ import annotations

import logging
import os
import time

import zmq

from shared import layout
from shared.config import Config
from shared.disk import DiskMonitor, DiskState
from shared.lifecycle import StopRequest
from shared.logfmt import kv
from shared.protocol import DiskMeasure, ProtocolError, decode, encode
from shared.singleton import hold_lock
from shared.sockets import Sockets, waiting
from shared.storage import StorageWatch
from shared.timers import Timers
from services.disk_watcher.core import (ACTIVE_BUSY_FRACTION, ACTIVE_MEASURE_SECONDS,
                                        IDLE_PUBLISH_SECONDS, PUBLISH_SECONDS, DiskWatcher)

log = logging.getLogger(__name__)
PUBLISH = "publish"  # the loop's one timer: the next measurement and publication


class DiskWatcherServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        hold_lock(config.run_dir / "disk-watcher.lock", f"disk-watcher for {config.storage_dir}")
        self.monitor = DiskMonitor(config.storage_dir, config.disk.cache_duration_seconds,
                                   full_walk_interval_seconds=config.disk.check_interval_seconds)
        self.watcher = DiskWatcher(config)
        self.storage = StorageWatch(config.root_dir, config.storage_dir)
        self.sockets = Sockets(config)
        self.stop = StopRequest()

    def _downloading(self) -> bool:
        try:
            with os.scandir(layout.in_progress_root(self.config.storage_dir)) as it:
                return any(not entry.name.startswith(".") for entry in it)  # not .locks
        except OSError:
            return False

    def _publish(self, joined: bool) -> float:
        """Check the storage, measure (re-measure if active), publish; return the seconds
        until the next one."""
        problem = self.storage.problem()  # a few syscalls: the disk may have gone since
        active = (self.watcher.state != DiskState.RUNNING or problem is not None
                  or self._downloading())
        # CPU time, not wall time: on a busy host a 1 ms measurement can take 20 ms of wall
        # time waiting for a core, and the pause reaction stretched to a second.
        started = time.thread_time()
        usage = self.monitor.measure(force=active)
        cost = time.thread_time() - started
        msg = self.watcher.observe(usage, time.time(), joined, problem, self.storage.storage_id)
        self.pub.send_multipart(encode(msg))
        if not active:
            return IDLE_PUBLISH_SECONDS
        if self.watcher.state == DiskState.RUNNING and not self.watcher.near_a_threshold():
            return PUBLISH_SECONDS
        return min(PUBLISH_SECONDS, max(ACTIVE_MEASURE_SECONDS, cost / ACTIVE_BUSY_FRACTION))

    def run(self) -> int:
        zc = self.config.zmq
        self.pub = self.sockets.bind(zmq.XPUB, zc.disk_state, "disk_state")
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.control = self.sockets.bind(zmq.PULL, zc.disk_control, "disk_control")
        poller = zmq.Poller()
        poller.register(self.pub, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.stop.wakeup_fd, zmq.POLLIN)
        log.info(kv("disk-watcher started", storage=self.config.storage_dir, endpoint=zc.disk_state))
        timers = Timers()
        timers.start(PUBLISH, time.monotonic(), 0)
        try:
            while not self.stop.requested:
                events = dict(poller.poll(timers.wait_ms(time.monotonic())))
                joined = self.pub in events and self._subscriptions()
                requested = self.control in events and self._requests()
                if requested:
                    self.monitor.invalidate()
                if joined or requested or timers.due(PUBLISH, time.monotonic()):
                    seconds = self._publish(joined)
                    timers.start(PUBLISH, time.monotonic(), seconds)
            return 0
        finally:
            self.sockets.close()
            log.info("disk-watcher stopped")

    def _subscriptions(self) -> bool:
        """A new subscriber gets the current state at once."""
        joined = False
        for frames in waiting(self.pub):
            joined |= frames[0][:1] == b"\x01"
        return joined

    def _requests(self) -> bool:
        requested = False
        for frames in waiting(self.control):
            try:
                msg = decode(frames)
                if not isinstance(msg, DiskMeasure):
                    raise ProtocolError(f"unexpected {msg.KIND} on the disk control channel")
            except ProtocolError as exc:
                log.warning(kv("dropped malformed message", error=exc))
                continue
            log.debug(kv("re-measure requested", reason=msg.reason))
            requested = True
        return requested
