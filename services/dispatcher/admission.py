"""Disk admission: a job starts only if its expected size still fits the budget.

``committed = (usage - in_progress) + max(in_progress, sum of reservations)``
counts finished files as measured and in-flight downloads at the larger of
what they have written and what they are expected to write, so a download is
never counted twice and never counted as less than its reservation. A job is
admitted only if ``committed + expected(job) <= pause_threshold`` and the
filesystem keeps ``min_free`` free after every reservation is filled.

A released reservation keeps counting until a measurement taken after its
release arrives: a landed file moves from ``.in_progress`` to ``videos``, and an
old measurement may have seen neither.

A job is reserved at its peak, not at its final size: with ``container = "mkv"``
the remux writes a second full copy next to the download before the download is
deleted, so a job holds up to twice its episode at once (``peak_factor``).

An ``unavailable`` storage refuses every job (but in a dry run, which writes
nothing), and so does a worker's report that it found the storage unavailable,
until the disk-watcher has looked again. A dry run downloads nothing, so the disk
never refuses it (``dry_run``): neither the budget nor a paused disk holds it back.

``refusal()`` words a refusal the same way while it holds (the log says it once per
change); ``explain()`` is the same refusal with the figures behind it, for the status
(``usage 56.1 MB + expected 4.0 MB would pass pause_threshold_gb 60.0 MB``).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from shared.config import DiskConfig, DownloaderConfig
from shared.protocol import DiskStateMsg

STALE_AFTER_SECONDS = 5.0  # no fresh disk state for this long: treat as paused
UNAVAILABLE = "unavailable"
BUDGET = "budget: in-flight reservations would pass pause_threshold_gb"
MIN_FREE = "free space would fall below min_free_gb"


def size_text(n: float) -> str:
    """Decimal units, as anime-status prints them (1 MB = 1,000,000 bytes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def peak_factor(downloader: DownloaderConfig) -> float:
    """How many copies of an episode a job holds at its peak: the download and its MKV
    remux side by side (ffmpeg cannot remux in place), else the download alone."""
    return 2.0 if downloader.container == "mkv" else 1.0


@dataclass
class Reservation:
    anime_id: int
    expected: int
    written: int = 0

    @property
    def bytes(self) -> int:
        return max(self.expected, self.written)


@dataclass
class Admission:
    disk: DiskConfig
    stale_after: float = STALE_AFTER_SECONDS
    peak_factor: float = 1.0  # see peak_factor()
    ignore_storage: bool = False  # a dry run writes nothing: an unavailable storage is no refusal
    dry_run: bool = False  # a dry run downloads nothing: the disk never refuses it
    state: DiskStateMsg | None = None
    received_at: float = 0.0
    reservations: dict[int, Reservation] = field(default_factory=dict)
    settling: list[tuple[float, int]] = field(default_factory=list)
    no_space_at: float | None = None  # set by an ENOSPC failure, cleared by a fresh state
    storage_failed_at: float | None = None  # a worker found the storage unavailable
    _per_anime: dict[int, deque] = field(default_factory=lambda: defaultdict(lambda: deque(maxlen=20)))
    _overall: deque = field(default_factory=lambda: deque(maxlen=50))

    # --- inputs -------------------------------------------------------------

    def on_disk_state(self, msg: DiskStateMsg, now: float) -> None:
        if self.state is not None and msg.seq < self.state.seq and msg.published_at < self.state.published_at:
            return  # an older state delivered late
        self.state = msg
        self.received_at = now
        self.settling = [(t, b) for t, b in self.settling if t >= msg.measured_at]
        if self.no_space_at is not None and msg.measured_at > self.no_space_at:
            if msg.free_bytes - self.disk.min_free_bytes >= self.peak_for(None):
                self.no_space_at = None
        if self.storage_failed_at is not None and msg.published_at > self.storage_failed_at:
            self.storage_failed_at = None  # the disk-watcher has looked since: its word holds

    def record_size(self, anime_id: int, size: int) -> None:
        if size > 0:
            self._per_anime[anime_id].append(size)
            self._overall.append(size)

    def expected_for(self, anime_id: int | None) -> int:
        sizes = self._per_anime.get(anime_id) if anime_id is not None else None
        if not sizes:
            sizes = self._overall
        if sizes:
            return int(sum(sizes) / len(sizes))
        return self.disk.expected_episode_bytes

    def peak_for(self, anime_id: int | None) -> int:
        """What a job of this anime may occupy at once (see ``peak_factor``)."""
        return int(self.expected_for(anime_id) * self.peak_factor)

    def reserve(self, job_id: int, anime_id: int) -> None:
        self.reservations[job_id] = Reservation(anime_id, self.peak_for(anime_id))

    def written(self, job_id: int, written: int) -> None:
        reservation = self.reservations.get(job_id)
        if reservation is not None:
            reservation.written = max(reservation.written, written)

    def release(self, job_id: int, now: float) -> None:
        reservation = self.reservations.pop(job_id, None)
        if reservation is not None:
            self.settling.append((now, reservation.bytes))

    # --- the decision -------------------------------------------------------

    def fresh(self, now: float) -> bool:
        return self.state is not None and now - self.received_at <= self.stale_after

    def reserved_bytes(self) -> int:
        return sum(r.bytes for r in self.reservations.values()) + sum(b for _, b in self.settling)

    def committed_bytes(self) -> int:
        assert self.state is not None
        in_progress = int(self.state.breakdown.get("in_progress", 0))
        finished = self.state.usage_bytes - in_progress
        return finished + max(in_progress, self.reserved_bytes())

    def measurement_too_old(self, now: float) -> bool:
        return self.state is not None and now - self.state.measured_at > self.disk.cache_duration_seconds

    def refusal(self, now: float, anime_id: int | None = None) -> str | None:
        """Why a new job may not start now, or None when it may."""
        if self.dry_run:
            return None
        if self.state is None:
            return "no disk state yet"
        if not self.fresh(now):
            return "disk state is stale (disk-watcher down?)"
        if self.state.state == UNAVAILABLE:
            if self.ignore_storage:
                return None
            return f"storage unavailable: {self.state.reason or 'no reason given'}"
        if self.storage_failed_at is not None:
            return "a worker found the storage unavailable; waiting for the disk-watcher"
        if self.state.state != "running":
            return f"disk {self.state.state}: {self._why_not_running()}"
        if self.no_space_at is not None:
            return "no space left on device; waiting for space"
        expected = self.peak_for(anime_id)
        if self.committed_bytes() + expected > self.disk.pause_bytes:
            return BUDGET
        free_after = self.state.free_bytes - self._unwritten() - expected
        if free_after < self.disk.min_free_bytes:
            return MIN_FREE
        return None

    def explain(self, now: float, anime_id: int | None = None) -> str | None:
        """``refusal()`` with the figures that make it (for the status), or None."""
        refusal = self.refusal(now, anime_id)
        if refusal not in (BUDGET, MIN_FREE):
            return refusal
        assert self.state is not None
        expected = self.peak_for(anime_id)
        wanted = f"expected {size_text(expected)}"
        if self.peak_factor > 1:
            wanted += f" ({self.peak_factor:g} x {size_text(self.expected_for(anime_id))}: " \
                      "the download and its MKV remux)"
        if refusal == MIN_FREE:
            unwritten = self._unwritten()
            held = f" - {size_text(unwritten)} still to be written" if unwritten else ""
            return (f"free {size_text(self.state.free_bytes)}{held} - {wanted} would fall below "
                    f"min_free_gb {size_text(self.disk.min_free_bytes)}")
        # committed = usage + the reservations beyond what the downloads have written yet
        ahead = self.committed_bytes() - self.state.usage_bytes
        held = f" + {size_text(ahead)} reserved for running downloads" if ahead > 0 else ""
        return (f"usage {size_text(self.state.usage_bytes)}{held} + {wanted} would pass "
                f"pause_threshold_gb {size_text(self.disk.pause_bytes)}")

    def _why_not_running(self) -> str:
        """The disk-watcher's reason, in words that stay the same while it holds (logged on change)."""
        s = self.state
        assert s is not None
        if s.usage_bytes >= s.hard_limit_bytes:
            return "usage reached hard_limit_gb"
        if s.free_bytes < s.min_free_bytes:
            return "free space below min_free_gb"
        if s.usage_bytes >= s.pause_threshold_bytes:
            return "usage reached pause_threshold_gb"
        return "waiting for usage below resume_threshold_gb"

    def _unwritten(self) -> int:
        return sum(r.bytes - r.written for r in self.reservations.values())
