"""Admission (services/dispatcher/admission.py): pure, every decision at an injected ``now``.

Thresholds in these tests: pause 1 MB, resume 500 kB, hard limit 1.5 MB,
expected episode 100 kB (config default), min_free 0 unless a test sets it.
"""

from __future__ import annotations

import pytest

from services.dispatcher.admission import STALE_AFTER_SECONDS, Admission
from shared.config import DiskConfig
from shared.protocol import DiskStateMsg

KB = 1000
PAUSE, RESUME, HARD, EXPECTED = 1_000 * KB, 500 * KB, 1_500 * KB, 100 * KB
BUDGET = "budget: in-flight reservations would pass pause_threshold_gb"


def disk_config(min_free: int = 0, cache: float = 5.0) -> DiskConfig:
    return DiskConfig(hard_limit_gb=HARD / 1e9, pause_threshold_gb=PAUSE / 1e9,
                      resume_threshold_gb=RESUME / 1e9, min_free_gb=min_free / 1e9,
                      expected_episode_size_mb=EXPECTED / 1e6, cache_duration_seconds=cache)


def msg(usage: int = 0, in_progress: int = 0, state: str = "running", free: int = 10**12,
        seq: int = 1, measured_at: float = 0.0, published_at: float | None = None,
        min_free: int = 0) -> DiskStateMsg:
    return DiskStateMsg(seq=seq, state=state, usage_bytes=usage,
                        breakdown={"videos": usage - in_progress, "in_progress": in_progress},
                        free_bytes=free, pause_threshold_bytes=PAUSE, resume_threshold_bytes=RESUME,
                        hard_limit_bytes=HARD, min_free_bytes=min_free, measured_at=measured_at,
                        published_at=measured_at if published_at is None else published_at)


@pytest.fixture
def adm() -> Admission:
    return Admission(disk_config())


# --- refusal reasons -------------------------------------------------------------


def test_no_state_yet_refuses(adm: Admission) -> None:
    assert adm.refusal(0.0) == "no disk state yet"


def test_a_state_older_than_the_staleness_window_counts_as_paused(adm: Admission) -> None:
    adm.on_disk_state(msg(measured_at=100.0), now=100.0)
    assert adm.refusal(100.0 + STALE_AFTER_SECONDS) is None
    assert adm.refusal(100.0 + STALE_AFTER_SECONDS + 0.01) == "disk state is stale (disk-watcher down?)"
    adm.on_disk_state(msg(seq=2, measured_at=106.0), now=106.0)
    assert adm.refusal(106.0) is None


@pytest.mark.parametrize("state,usage,free,why", [
    ("paused", PAUSE, 10**12, "disk paused: usage reached pause_threshold_gb"),
    ("paused", RESUME + 1, 10**12, "disk paused: waiting for usage below resume_threshold_gb"),
    ("paused", 0, 10, "disk paused: free space below min_free_gb"),
    ("hard_limit", HARD, 10**12, "disk hard_limit: usage reached hard_limit_gb"),
])
def test_a_disk_that_is_not_running_refuses_and_says_why(state, usage, free, why) -> None:
    adm = Admission(disk_config(min_free=1000))
    adm.on_disk_state(msg(usage=usage, state=state, free=free, min_free=1000), now=0.0)
    assert adm.refusal(0.0) == why


def test_admits_up_to_the_pause_threshold_exactly(adm: Admission) -> None:
    adm.on_disk_state(msg(usage=PAUSE - EXPECTED), now=0.0)
    assert adm.refusal(0.0) is None
    adm.on_disk_state(msg(usage=PAUSE - EXPECTED + 1, seq=2), now=0.0)
    assert adm.refusal(0.0) == BUDGET


def test_free_space_after_every_reservation_must_stay_above_min_free() -> None:
    adm = Admission(disk_config(min_free=50 * KB))
    adm.on_disk_state(msg(free=249 * KB, min_free=50 * KB), now=0.0)
    assert adm.refusal(0.0) is None  # 249 - 100 >= 50
    adm.reserve(1, anime_id=7)
    assert adm.refusal(0.0) == "free space would fall below min_free_gb"  # 249 - 100 - 100 < 50
    adm.written(1, 60 * KB)  # the 60 kB written are already out of the free figure
    adm.on_disk_state(msg(usage=60 * KB, in_progress=60 * KB, free=189 * KB, seq=2, min_free=50 * KB),
                      now=0.0)
    assert adm.refusal(0.0) == "free space would fall below min_free_gb"  # 189 - 40 - 100 < 50
    adm.on_disk_state(msg(usage=60 * KB, in_progress=60 * KB, free=190 * KB, seq=3, min_free=50 * KB),
                      now=0.0)
    assert adm.refusal(0.0) is None  # 190 - 40 - 100 = 50


# --- reservations against what is in progress -------------------------------------


def test_in_flight_downloads_count_at_their_reservation_until_they_write_more(adm: Admission) -> None:
    for job in (1, 2, 3):
        adm.reserve(job, anime_id=7)
    # 200 kB finished, 120 kB written so far by the three downloads: counted as 300 kB reserved.
    adm.on_disk_state(msg(usage=320 * KB, in_progress=120 * KB), now=0.0)
    assert adm.reserved_bytes() == 3 * EXPECTED
    assert adm.committed_bytes() == 200 * KB + 300 * KB
    # The in-progress directories hold more than reserved (e.g. directory blocks): that counts.
    adm.on_disk_state(msg(usage=650 * KB, in_progress=450 * KB, seq=2), now=0.0)
    assert adm.committed_bytes() == 200 * KB + 450 * KB


def test_a_download_past_its_reservation_grows_it(adm: Admission) -> None:
    adm.reserve(1, anime_id=7)
    adm.written(1, 250 * KB)
    adm.written(1, 10 * KB)  # an older heartbeat: the reservation never shrinks
    assert adm.reservations[1].bytes == 250 * KB
    adm.written(99, 10**9)  # unknown job: ignored
    adm.on_disk_state(msg(usage=250 * KB, in_progress=250 * KB), now=0.0)
    assert adm.committed_bytes() == 250 * KB
    adm.on_disk_state(msg(usage=900 * KB, in_progress=250 * KB, seq=2), now=0.0)
    assert adm.refusal(0.0) is None  # 650 finished + 250 + 100 for the next one = 1 MB
    adm.written(1, 251 * KB)
    assert adm.refusal(0.0) == BUDGET  # the heartbeat's figure counts before the disk shows it


def test_the_reservations_of_in_flight_jobs_stop_admission_before_the_disk_shows_them(
        adm: Admission) -> None:
    adm.on_disk_state(msg(usage=300 * KB), now=0.0)
    admitted = 0
    while adm.refusal(0.0) is None:
        admitted += 1
        adm.reserve(admitted, anime_id=7)
    assert admitted == 7  # 300 + 7 * 100 = 1000
    assert adm.refusal(0.0) == BUDGET


# --- release and settling ----------------------------------------------------------


def test_a_released_reservation_counts_until_a_newer_measurement(adm: Admission) -> None:
    adm.on_disk_state(msg(usage=850 * KB, measured_at=9.0), now=9.0)
    adm.reserve(1, anime_id=7)
    adm.written(1, 100 * KB)
    assert adm.refusal(9.5) == BUDGET  # 850 + 100 + 100 > 1000
    adm.release(1, now=10.0)  # landed: the file moved from .in_progress to videos
    assert adm.reservations == {}
    assert adm.reserved_bytes() == 100 * KB  # settling
    assert adm.refusal(10.0) == BUDGET
    adm.on_disk_state(msg(usage=850 * KB, seq=2, measured_at=9.9), now=10.1)  # taken before
    assert adm.reserved_bytes() == 100 * KB
    adm.on_disk_state(msg(usage=900 * KB, seq=3, measured_at=10.2), now=10.2)  # sees the file
    assert adm.reserved_bytes() == 0
    assert adm.committed_bytes() == 900 * KB
    assert adm.refusal(10.2) is None  # 900 + 100 = pause


def test_an_older_state_delivered_late_is_ignored(adm: Admission) -> None:
    adm.on_disk_state(msg(usage=900 * KB, seq=5, measured_at=10.0), now=10.0)
    adm.on_disk_state(msg(usage=0, seq=4, measured_at=9.0), now=10.1)
    assert adm.state.usage_bytes == 900 * KB
    # A restarted disk-watcher counts from 1 again: newer by its publication time.
    adm.on_disk_state(msg(usage=0, seq=1, measured_at=11.0), now=11.0)
    assert adm.state.usage_bytes == 0


def test_a_measurement_older_than_the_cache_duration_is_too_old() -> None:
    adm = Admission(disk_config(cache=5.0))
    assert not adm.measurement_too_old(0.0)  # no state at all: nothing to re-measure
    adm.on_disk_state(msg(measured_at=100.0, published_at=104.0), now=104.0)
    assert not adm.measurement_too_old(105.0)
    assert adm.measurement_too_old(105.1)


# --- expected size -------------------------------------------------------------------


def test_expected_size_per_anime_then_overall_then_config(adm: Admission) -> None:
    assert adm.expected_for(1) == EXPECTED
    assert adm.expected_for(None) == EXPECTED
    adm.record_size(2, 300 * KB)
    adm.record_size(2, 500 * KB)
    adm.record_size(1, 0)  # an empty file says nothing about sizes
    assert adm.expected_for(1) == 400 * KB  # no size of anime 1 yet: the overall average
    adm.record_size(1, 1_000 * KB)
    assert adm.expected_for(1) == 1_000 * KB
    assert adm.expected_for(2) == 400 * KB
    assert adm.expected_for(None) == 600 * KB
    adm.reserve(9, anime_id=1)
    assert adm.reservations[9].bytes == 1_000 * KB


def test_expected_size_is_a_rolling_average(adm: Admission) -> None:
    for _ in range(20):
        adm.record_size(1, 100 * KB)
    for _ in range(20):
        adm.record_size(1, 300 * KB)
    assert adm.expected_for(1) == 300 * KB  # the last 20 of this anime
    for _ in range(30):
        adm.record_size(2, 100 * KB)
    assert adm.expected_for(3) == (20 * 300 * KB + 30 * 100 * KB) // 50  # the last 50 overall


def test_admission_uses_the_expected_size_of_the_jobs_anime(adm: Admission) -> None:
    adm.record_size(1, 500 * KB)
    adm.record_size(2, 50 * KB)
    adm.on_disk_state(msg(usage=600 * KB), now=0.0)
    assert adm.refusal(0.0, anime_id=1) == BUDGET
    assert adm.refusal(0.0, anime_id=2) is None


# --- no space left on device ------------------------------------------------------------


def test_no_space_pauses_until_a_fresh_measurement_shows_room(adm: Admission) -> None:
    adm.on_disk_state(msg(free=10 * KB, measured_at=9.0), now=9.0)
    adm.no_space_at = 10.0  # a worker hit ENOSPC
    assert adm.refusal(10.0) == "no space left on device; waiting for space"
    adm.on_disk_state(msg(free=10**9, seq=2, measured_at=9.5), now=10.1)  # measured before it
    assert adm.refusal(10.1) == "no space left on device; waiting for space"
    adm.on_disk_state(msg(free=EXPECTED - 1, seq=3, measured_at=10.5), now=10.5)  # no room yet
    assert adm.refusal(10.5) == "no space left on device; waiting for space"
    adm.on_disk_state(msg(free=EXPECTED, seq=4, measured_at=11.0), now=11.0)  # the partial is gone
    assert adm.no_space_at is None
    assert adm.refusal(11.0) is None


# --- the storage, and the peak of a job -------------------------------------------


def test_an_unavailable_storage_refuses_with_the_disk_watchers_reason(adm: Admission) -> None:
    why = "storage_dir /srv/anime is read-only (remount it read-write)"
    gone = DiskStateMsg(**{**msg(measured_at=10.0).as_dict(), "state": "unavailable", "reason": why})
    adm.on_disk_state(gone, now=10.0)
    assert adm.refusal(10.0) == f"storage unavailable: {why}"
    dry = Admission(disk_config(), ignore_storage=True)  # a dry run writes nothing
    dry.on_disk_state(gone, now=10.0)
    assert dry.refusal(10.0) is None


def test_a_worker_finding_the_storage_gone_stops_admission_until_the_watcher_looked(
        adm: Admission) -> None:
    adm.on_disk_state(msg(measured_at=10.0), now=10.0)
    adm.storage_failed_at = 10.5
    assert "storage unavailable" in adm.refusal(10.6)
    adm.on_disk_state(msg(seq=2, measured_at=10.4, published_at=10.4), now=10.7)  # looked before
    assert adm.refusal(10.7) is not None
    adm.on_disk_state(msg(seq=3, measured_at=11.0), now=11.0)
    assert adm.refusal(11.0) is None


def test_an_mkv_job_is_reserved_at_its_peak_of_two_copies() -> None:
    from services.dispatcher.admission import peak_factor
    from shared.config import DownloaderConfig

    assert peak_factor(DownloaderConfig(container="mkv")) == 2.0
    assert peak_factor(DownloaderConfig(container="keep")) == 1.0
    adm = Admission(disk_config(), peak_factor=2.0)
    adm.on_disk_state(msg(usage=0, measured_at=0.0), now=0.0)
    for job in range(4):  # 200 kB each at its peak: 5 fit under the 1 MB pause, not 10
        assert adm.refusal(0.0, anime_id=1) is None
        adm.reserve(job, anime_id=1)
    assert adm.reserved_bytes() == 4 * 2 * EXPECTED
    adm.reserve(4, anime_id=1)
    assert adm.refusal(0.0, anime_id=1) == BUDGET
    adm.written(0, 3 * EXPECTED)  # a remux copy bigger than expected: counted as written
    assert adm.reserved_bytes() == 4 * 2 * EXPECTED + 3 * EXPECTED


# --- what the status says, and a dry run ------------------------------------------


def test_the_status_names_the_figures_of_a_budget_refusal(adm: Admission) -> None:
    """Not "in-flight reservations" while nothing is reserved: the usage, the expected
    size and the threshold they would pass."""
    adm.on_disk_state(msg(usage=950 * KB, measured_at=10.0), now=10.0)
    assert adm.refusal(10.0) == BUDGET  # the same words while it holds: logged once
    assert adm.explain(10.0) == ("usage 950.0 KB + expected 100.0 KB would pass "
                                 "pause_threshold_gb 1.0 MB")
    adm.on_disk_state(msg(usage=750 * KB, measured_at=11.0, seq=2), now=11.0)
    adm.reserve(1, anime_id=5)  # nothing written yet: 100 kB reserved beyond the usage
    adm.reserve(2, anime_id=5)
    assert adm.explain(11.0) == ("usage 750.0 KB + 200.0 KB reserved for running downloads + "
                                 "expected 100.0 KB would pass pause_threshold_gb 1.0 MB")


def test_the_status_names_the_figures_of_a_free_space_refusal() -> None:
    adm = Admission(disk_config(min_free=500 * KB), peak_factor=2.0)
    adm.on_disk_state(msg(free=600 * KB, measured_at=10.0), now=10.0)
    assert adm.explain(10.0) == ("free 600.0 KB - expected 200.0 KB (2 x 100.0 KB: the download "
                                 "and its MKV remux) would fall below min_free_gb 500.0 KB")


def test_a_dry_run_is_never_refused_by_the_disk() -> None:
    """It downloads nothing: a budget near the pause threshold, a paused disk or no disk
    state at all must not leave its workers waiting (and --exit-when-done never exiting)."""
    dry = Admission(disk_config(), dry_run=True)
    assert dry.refusal(0.0) is None
    dry.on_disk_state(msg(usage=990 * KB, measured_at=10.0), now=10.0)
    for job_id in range(20):
        dry.reserve(job_id, anime_id=1)
    assert dry.refusal(10.0) is None and dry.explain(10.0) is None
    dry.on_disk_state(msg(usage=1_200 * KB, state="paused", measured_at=11.0, seq=2), now=11.0)
    assert dry.refusal(11.0) is None
