"""The disk-watcher: measures the storage directory and publishes the disk state.

The state is level state (``disk.state`` on an XPUB socket): published on every
change, at once to each new subscriber, and again every second (every two when
nothing is downloading). The cheap incremental re-measure runs every
``ACTIVE_MEASURE_SECONDS`` while anything is being downloaded (files grow in
``.in_progress``) and the disk could reach a threshold within
``HEADROOM_SECONDS`` at the fastest growth seen lately, so a download that grows
past its reservation is seen within that time (far from every threshold, once a
second is enough), and while the disk is not ``running``, so a transcriber's
deletions resume downloads at once; otherwise the measurement is cached for
``cache_duration_seconds``. A re-measure that changes no state and comes less
than a second after the last ``disk.state`` goes out as ``disk.usage``, which only
the dispatcher reads: each worker wakes once a second for the disk, not five
times. A full walk runs every ``check_interval_seconds``. A ``disk.measure``
request re-measures at once.

Before each publication the storage itself is checked (shared/storage.py: there,
with its marker, writable): if it is not, the state published is ``unavailable``
with the reason, whatever the usage, and the running/paused state machine stands
still until the storage is back (a bare mount point measures as empty, which must
not read as "resume").
"""

from __future__ import annotations

import logging
import os
import time

import zmq

from shared import layout
from shared.config import MB, Config
from shared.disk import DiskMonitor, DiskState, DiskUsage, Thresholds, next_state
from shared.lifecycle import StopRequest, kv
from shared.protocol import (DiskMeasure, DiskStateMsg, DiskUsageMsg, ProtocolError, decode,
                             encode)
from shared.singleton import hold_lock
from shared.sockets import Sockets, waiting
from shared.storage import StorageWatch

log = logging.getLogger(__name__)
PUBLISH_SECONDS = 1.0
# Nothing downloading and running: every subscriber (each worker, the dispatcher) wakes
# for each publication; the level state stays well inside their 5 s staleness limit.
IDLE_PUBLISH_SECONDS = 2.0
# While files grow in .in_progress, or while the disk is paused and waiting for a
# transcriber's deletions, re-measure this often (incremental: ~10 ms on 100,000 files),
# but never spend more than ACTIVE_BUSY_FRACTION of the time measuring.
ACTIVE_MEASURE_SECONDS = 0.2
ACTIVE_BUSY_FRACTION = 0.02
# Downloads running but the disk far from every threshold: at the fastest growth seen
# over the last measurements it needs more than this long to reach one, so re-measure
# once a second (five times a second cost a busy run ~0.4 ms of CPU per downloaded job,
# and the dispatcher four wake-ups a second, to learn that 299 GB of 300 are still free).
HEADROOM_SECONDS = 10.0
# ... assuming downloads may write at least this fast (a gigabit link: the work is
# network bound), so a download that has only just started cannot catch the watcher out.
ASSUMED_WRITE_BPS = 125 * MB


def thresholds(config: Config) -> Thresholds:
    d = config.disk
    return Thresholds(pause_bytes=d.pause_bytes, resume_bytes=d.resume_bytes,
                      hard_limit_bytes=d.hard_limit_bytes, min_free_bytes=d.min_free_bytes)


class DiskWatcher:
    """State logic without sockets: ``observe(usage)`` returns the message to publish:
    ``disk.state`` on a change, to a new subscriber and at least once a second, otherwise
    ``disk.usage`` (the same fields, read by the dispatcher alone)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.thresholds = thresholds(config)
        self.state = DiskState.RUNNING  # a fresh start is no transition: judged by pause
        self.seq = 0
        self.last: DiskStateMsg | None = None
        self.state_sent_at = -1e9  # monotonic time of the last disk.state
        self.growth: list[float] = []  # bytes/s towards a threshold, the last few intervals
        self._previous: DiskUsage | None = None
        self.problem: str | None = None  # why the storage is unavailable

    def observe(self, usage: DiskUsage, now: float, joined: bool = False,
                problem: str | None = None, storage_id: str = "") -> DiskStateMsg:
        """``problem``: the storage is unavailable (published as such, with the reason);
        the state machine moves only on measurements of the real storage."""
        changed = self.last is None or problem != self.problem
        if problem != self.problem:
            if problem is not None:
                log.warning(kv("storage unavailable", reason=problem))
            else:
                log.info(kv("storage available again", storage_id=storage_id or None))
            self.problem = problem
        if problem is None:
            new = next_state(self.state, usage.total, usage.free_bytes, self.thresholds)
            if new != self.state or self.last is None:
                changed = True
                log.info(kv("disk state", state=new.value, previous=self.state.value,
                            usage=usage.total, free=usage.free_bytes, **usage.breakdown()))
            self.state = new
        self.seq += 1
        t = self.thresholds
        kind = DiskStateMsg
        if changed or joined or time.monotonic() - self.state_sent_at >= PUBLISH_SECONDS:
            self.state_sent_at = time.monotonic()
        else:
            kind = DiskUsageMsg
        self.last = kind(
            seq=self.seq, state="unavailable" if problem else self.state.value,
            usage_bytes=usage.total, breakdown=usage.breakdown(),
            free_bytes=usage.free_bytes, pause_threshold_bytes=t.pause_bytes,
            resume_threshold_bytes=t.resume_bytes, hard_limit_bytes=t.hard_limit_bytes,
            min_free_bytes=t.min_free_bytes, measured_at=usage.measured_at, published_at=now,
            reason=problem or "", storage_id=storage_id)
        self._track_growth(usage)
        return self.last

    def _track_growth(self, usage: DiskUsage) -> None:
        """Remember how fast usage grew (or free space shrank) since the last measurement."""
        before, self._previous = self._previous, usage
        if before is None or usage.measured_at <= before.measured_at:
            return
        seconds = usage.measured_at - before.measured_at
        grew = max(usage.total - before.total, before.free_bytes - usage.free_bytes, 0)
        self.growth = (self.growth + [grew / seconds])[-5:]

    def near_a_threshold(self) -> bool:
        """Whether the disk could reach pause (or min_free) within HEADROOM_SECONDS, growing
        at ASSUMED_WRITE_BPS or the fastest rate of the last few measurements."""
        usage = self._previous
        if usage is None:
            return True
        t = self.thresholds
        headroom = min(t.pause_bytes - usage.total, usage.free_bytes - t.min_free_bytes)
        return headroom <= max([ASSUMED_WRITE_BPS, *self.growth]) * HEADROOM_SECONDS


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
        next_publish = 0.0
        try:
            while not self.stop.requested:
                events = dict(poller.poll(max(0.0, next_publish - time.monotonic()) * 1000))
                joined = self.pub in events and self._subscriptions()
                requested = self.control in events and self._requests()
                if requested:
                    self.monitor.invalidate()
                if joined or requested or time.monotonic() >= next_publish:
                    next_publish = time.monotonic() + self._publish(joined)
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
