"""The disk-watcher's decisions, without sockets or a file system: which state to
publish for a measurement, as ``disk.state`` or ``disk.usage``, and how near a
threshold the disk is (which sets the re-measure cadence, server.py).

The state is level state: published on every change, at once to each new
subscriber, and again every second (every two when nothing is downloading). A
re-measure that changes no state and comes less than a second after the last
``disk.state`` goes out as ``disk.usage``, which only the dispatcher reads: each
worker wakes once a second for the disk, not five times. A storage that is not
there (shared/storage.py) is published as ``unavailable`` with the reason, whatever
the usage, and the running/paused state machine stands still until it is back (a
bare mount point measures as empty, which must not read as "resume").
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from shared.config import MB, Config
from shared.disk import DiskState, DiskUsage, Thresholds, next_state
from shared.logfmt import kv
from shared.protocol import DiskStateMsg, DiskUsageMsg

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
    ``disk.usage`` (the same fields, read by the dispatcher alone). ``clock``: a monotonic
    clock for that cadence (the published times are the ``now`` passed in)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
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
        if changed or joined or self.clock() - self.state_sent_at >= PUBLISH_SECONDS:
            self.state_sent_at = self.clock()
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
