"""The worker's protocol conversation, decided by services/worker/core.py (and held_job.py,
verdict.py, reports.py, disk_view.py) without sockets, processes or files: messages and
timer events in, messages and actions out, on a fake clock. What each test asserts is
what the dispatcher (or the attempt) would see.
"""

from __future__ import annotations

import errno
import logging
import signal
from pathlib import Path

import pytest

from services.worker import core as core_mod
from services.worker import held_job
from services.worker.actions import (ClearPartials, Discard, Exit, ExitNow, Figures, Kill, Land,
                                     Reap, Send, Start, StartPost, StopPost)
from services.worker.core import WorkerCore
from services.worker.post_step import PostResult
from shared.config import load_config
from shared.protocol import (REASON_DRY_RUN, REASON_ERROR, REASON_HARD_LIMIT, REASON_INTERRUPTED,
                             REASON_INVALID, REASON_NO_SPACE, REASON_STORAGE, REASON_TIMEOUT,
                             DiskStateMsg, JobAck, JobAssign, JobCancel, JobCommit, JobFailed,
                             JobFinished, JobHeartbeat, JobLanded, ProtocolError, WorkerProbe,
                             WorkerReady, WorkerRefused)
from tests.system import render_toml

FILE = "Show (site) Episode 3.mp4"


def job(**fields) -> JobAssign:
    values = dict(job_id=7, attempt=1, anime_id=5114, anime_title="Show", episode=3,
                  selected_index=2, selected_title="Show (site)", confidence="high",
                  lease_seconds=30.0, rate_limit_bps=0)
    return JobAssign(**{**values, **fields})


def disk(state: str = "running", reason: str = "", storage_id: str = "") -> DiskStateMsg:
    return DiskStateMsg(seq=1, state=state, usage_bytes=0, breakdown={}, free_bytes=10**12,
                        pause_threshold_bytes=1, resume_threshold_bytes=0, hard_limit_bytes=2,
                        min_free_bytes=0, measured_at=0.0, published_at=0.0, reason=reason,
                        storage_id=storage_id)


class Worker:
    """A WorkerCore on a fake clock, with the answers of its surroundings set by the test."""

    def __init__(self, tmp_path: Path, **downloader) -> None:
        config_path = tmp_path / "config.toml"
        config_path.write_text(render_toml({
            "data": {"root_dir": str(tmp_path / "data"), "storage_dir": str(tmp_path / "disk")},
            "disk_management": {"hard_limit_gb": 10, "pause_threshold_gb": 9, "resume_threshold_gb": 8},
            "downloader": {"command": "ani-cli", "timeout_seconds": 30, **downloader},
            "queue": {"lease_seconds": 30, "heartbeat_seconds": 2},
            "zmq": {"dispatcher": "tcp://127.0.0.1:1", "status": "tcp://127.0.0.1:2",
                    "disk_state": "tcp://127.0.0.1:3", "disk_control": "tcp://127.0.0.1:4"},
        }))
        self.now = 1000.0
        self.problem: str | None = None  # what storage.problem would say
        self.looked_up: list[str] = []
        self.figures = Figures(bytes=5000, percent=42.0, speed_bps=1e6, eta_seconds=3.0)
        self.core = WorkerCore(load_config(config_path), "w01", "s1", "nas",
                               storage_problem=self._problem, figures=lambda phase: self.figures,
                               wall_clock=lambda: 1.7e9)

    def _problem(self, storage_id: str) -> str | None:
        self.looked_up.append(storage_id)
        return self.problem

    def tick(self, seconds: float = 0.0) -> list:
        self.now += seconds
        actions = self.core.tick(self.now)
        # A tick does what is due: a timer left due would keep the loop from sleeping.
        assert self.core.wait_seconds(self.now) > 0, self.core.timers._at
        return actions

    def hear(self, msg) -> list:
        return self.core.on_message(msg, self.now)

    def ready(self) -> list:
        """Connected to a running disk: the first tick asks for work."""
        self.core.on_disk(disk(), self.now)
        return self.tick()

    def downloading(self, assigned: JobAssign | None = None) -> JobAssign:
        self.ready()
        assigned = assigned or job()
        actions = self.hear(assigned)
        assert [type(a) for a in actions] == [Start]
        assert self.core.started(4242, self.now) == []
        return assigned

    def verifying(self, assigned: JobAssign | None = None) -> JobAssign:
        assigned = self.downloading(assigned)
        assert StartPost(FILE) in self.core.exited(Exit(0, files=[(FILE, 1000)]), self.now)
        return assigned

    def awaiting_commit(self) -> JobFinished:
        self.verifying()
        post = PostResult(staged=Path("/s/ready-a1.mkv"), ext=".mkv", size=1000, duration=24.0)
        [finished] = sent(self.core.post_done(post, self.now))
        assert isinstance(finished, JobFinished)
        return finished


def sent(actions: list) -> list:
    return [a.msg for a in actions if isinstance(a, Send)]


def others(actions: list) -> list:
    return [a for a in actions if not isinstance(a, Send)]


def failure(actions: list) -> tuple[str, str]:
    [msg] = [m for m in sent(actions) if isinstance(m, JobFailed)]
    return msg.reason, msg.error


@pytest.fixture
def w(tmp_path: Path) -> Worker:
    return Worker(tmp_path)


# --- asking for work ------------------------------------------------------------


def test_an_idle_worker_asks_for_work_only_while_the_disk_state_is_fresh_and_ok(w: Worker) -> None:
    assert sent(w.tick()) == []  # no disk state heard yet: start paused
    w.core.on_disk(disk(), w.now)
    [ready] = sent(w.tick())
    assert ready == WorkerReady(worker_id="w01", session="s1", seq=0, host="nas")
    assert sent(w.tick(1.0)) == []  # next heartbeat not yet due
    assert sent(w.tick(1.0)) == [ready]  # an idle worker repeats its credit each heartbeat
    assert sent(w.tick(4.0)) == []  # the state is over 5 s old: stale, asks for nothing
    w.core.on_disk(disk("hard_limit"), w.now)
    assert sent(w.tick(2.0)) == []
    w.core.on_disk(disk("paused"), w.now)  # paused is the dispatcher's business: still asks
    assert sent(w.tick()) == [ready]


def test_a_ready_that_found_no_connection_is_retried_soon(w: Worker) -> None:
    [ready] = sent(w.ready())
    w.core.unsent(ready, w.now)
    assert w.core.wait_seconds(w.now) == pytest.approx(core_mod.RECONNECT_RETRY_SECONDS)
    assert sent(w.tick(core_mod.RECONNECT_RETRY_SECONDS)) == [ready]


def test_the_storage_missing_on_this_machine_asks_for_no_work(w: Worker) -> None:
    w.problem = "storage_dir /srv is not a mount point"
    w.core.on_disk(disk(storage_id="abc"), w.now)
    assert w.looked_up == ["abc"] and sent(w.tick()) == []
    w.problem = None
    w.core.on_disk(disk(storage_id="abc"), w.now)  # back: asks at once
    assert [type(m) for m in sent(w.tick())] == [WorkerReady]


def test_a_malformed_message_on_the_disk_channel_is_a_protocol_error(w: Worker) -> None:
    with pytest.raises(ProtocolError):
        w.core.on_disk(JobAck(job_id=1, attempt=1), w.now)


# --- assignments ------------------------------------------------------------------


def test_an_assignment_starts_ani_cli_with_the_exact_argument_list(w: Worker) -> None:
    w.ready()
    [start] = w.hear(job(anime_title="[Oshi no Ko]"))
    assert start.argv == ["ani-cli", "-S", "2", "-e", "3", "-d", "Oshi no Ko"]
    assert w.hear(job(anime_title="[Oshi no Ko]")) == []  # a repeat of the same lease
    busy = w.hear(job(job_id=8))
    assert failure(busy) == (REASON_INTERRUPTED, "worker busy")
    assert sent(busy)[0].job_id == 8


def test_no_assignment_is_taken_while_stopping_or_without_a_disk_state(w: Worker) -> None:
    assert failure(w.hear(job())) == (REASON_INTERRUPTED, "worker stopping or disk not available")
    w.ready()
    w.core.on_stop_signal(1, w.now)
    assert failure(w.hear(job())) == (REASON_INTERRUPTED, "worker stopping or disk not available")


def test_a_dry_run_reports_the_command_it_would_run(w: Worker) -> None:
    w.ready()
    actions = w.hear(job(dry_run=True))
    [msg] = sent(actions)
    assert (msg.reason, msg.argv) == (REASON_DRY_RUN, ["ani-cli", "-S", "2", "-e", "3", "-d", "Show"])
    assert others(actions) == []  # nothing is started, nothing written
    assert others(w.hear(JobAck(job_id=7, attempt=1))) == [Discard(keep_partials=False)]


def test_a_title_with_nothing_to_search_for_is_an_invalid_job(w: Worker) -> None:
    w.ready()
    reason, error = failure(w.hear(job(anime_title="[]#")))
    assert reason == REASON_INVALID and "fix anime_title" in error


def test_a_private_directory_held_by_another_attempt_hands_the_job_back(w: Worker) -> None:
    w.ready()
    w.hear(job())
    actions = w.core.start_failed(RuntimeError("private directory is in use by another attempt"), w.now)
    assert failure(actions) == (REASON_INTERRUPTED, "private directory is in use by another attempt")


def test_no_space_when_starting_ani_cli_is_lack_of_space(w: Worker) -> None:
    w.ready()
    w.hear(job())
    actions = w.core.start_failed(OSError(errno.ENOSPC, "No space left on device"), w.now)
    assert failure(actions)[0] == REASON_NO_SPACE


# --- heartbeats -------------------------------------------------------------------


def test_heartbeats_carry_the_figures_and_come_a_period_after_the_claim(w: Worker) -> None:
    w.downloading(job(lease_seconds=3.0))  # a third of the lease is sooner than 2 s
    assert sent(w.tick(0.9)) == []
    [beat] = sent(w.tick(0.1))
    assert beat == JobHeartbeat(worker_id="w01", session="s1", job_id=7, attempt=1, bytes=5000,
                                percent=42.0, speed_bps=1e6, eta_seconds=3.0, state="downloading",
                                started_at=1.7e9)
    w.core.on_stop_signal(1, w.now)
    [beat] = sent(w.tick(1.0))
    assert beat.state == "stopping"


# --- ani-cli's end ------------------------------------------------------------------


def test_a_download_past_its_deadline_is_killed_then_killed_harder(w: Worker) -> None:
    w.downloading()
    assert others(w.tick(29.9)) == []
    assert others(w.tick(0.1)) == [Kill(signal.SIGTERM)]
    # nothing is due until the SIGKILL: the loop sleeps, it does not spin
    assert w.core.wait_seconds(w.now) > 0
    assert others(w.tick(held_job.KILL_GRACE_SECONDS)) == [Kill(signal.SIGKILL)]
    assert others(w.tick(held_job.KILL_GRACE_SECONDS)) == [Kill(signal.SIGKILL)]
    actions = w.core.exited(Exit(-9, tail="[download] 12% of 5MiB"), w.now)
    assert failure(actions) == (REASON_TIMEOUT, "ani-cli timed out after 30s and was killed\n"
                                                "[download] 12% of 5MiB")


def test_a_good_download_is_verified_reported_committed_landed_and_acked(w: Worker) -> None:
    finished = w.awaiting_commit()
    assert (finished.ext, finished.size_bytes, finished.site_title, finished.title_mismatch) == \
        (".mkv", 1000, "Show (site)", False)
    assert sent(w.tick(0.5)) == [] and sent(w.tick(0.5)) == [finished]  # re-sent until answered
    assert w.hear(JobCommit(job_id=7, attempt=2, video_path="/v/ep003.mkv")) == []  # not ours
    [land] = w.hear(JobCommit(job_id=7, attempt=1, video_path="/v/ep003.mkv"))
    assert land == Land("/v/ep003.mkv", "Show (site)", False)
    actions = w.core.landed(w.now)
    [landed] = sent(actions)
    assert landed == JobLanded(worker_id="w01", session="s1", job_id=7, attempt=1,
                               video_path="/v/ep003.mkv", size_bytes=1000, duration_seconds=24.0,
                               site_title="Show (site)", title_mismatch=False)
    assert others(actions) == [Discard(keep_partials=False)]
    assert sent(w.tick()) == [WorkerReady(worker_id="w01", session="s1", seq=1, host="nas")]
    # the next job runs while the landing is re-sent until its ack
    w.hear(job(job_id=8))
    w.core.started(4343, w.now)
    assert landed in sent(w.tick(1.0))
    assert w.hear(JobAck(job_id=7, attempt=1)) == []
    assert landed not in sent(w.tick(1.0)) and w.core.attempt.job.job_id == 8


def test_a_failure_is_re_sent_until_acked_and_its_partials_are_kept(w: Worker) -> None:
    w.downloading()
    actions = w.core.exited(Exit(0, files=[(FILE + ".part", 10)]), w.now)
    reason, error = failure(actions)
    assert reason == REASON_ERROR and error.startswith("Downloaded video not found")
    [failed] = sent(actions)
    assert sent(w.tick(1.0)) == [failed]
    assert sent(w.tick(1.0)) == [failed]  # no heartbeat while reporting
    assert others(w.hear(JobAck(job_id=7, attempt=1))) == [Discard(keep_partials=True)]
    assert [type(m) for m in sent(w.tick())] == [WorkerReady]


def test_a_cancelled_lease_discards_the_attempt_and_keeps_its_partials(w: Worker) -> None:
    w.downloading()
    assert w.hear(JobCancel(job_id=7, attempt=2, reason="x")) == []  # another attempt's
    assert w.hear(JobCancel(job_id=7, attempt=1, reason="lease lost")) == [Discard(keep_partials=True)]
    assert w.core.attempt is None and [type(m) for m in sent(w.tick())] == [WorkerReady]


def test_an_exit_with_a_message_is_judged_by_what_it_left(w: Worker) -> None:
    w.downloading()
    actions = w.core.exited(Exit(1, died=True, tail="Episode not released!"), w.now)
    assert failure(actions) == (REASON_ERROR, "ani-cli returned non-zero exit code: 1\n"
                                              "Episode not released!")


@pytest.mark.parametrize("tail,cls", [("Episode not released!", "not_released"),
                                       ("Invalid anime selection", "selection"),
                                       ("something else entirely", "other")])
def test_the_failure_report_carries_its_class_and_the_log_says_it(
        w: Worker, caplog, tail: str, cls: str) -> None:
    """shared/failures.py's class travels in job.failed (issue 18) and is logged."""
    w.downloading()
    caplog.set_level(logging.WARNING)
    actions = w.core.exited(Exit(1, died=True, tail=tail), w.now)
    [msg] = [m for m in sent(actions) if isinstance(m, JobFailed)]
    assert msg.failure_class == cls
    assert f"failure_class={cls}" in caplog.text


def test_a_stop_is_not_classified(w: Worker) -> None:
    w.downloading()
    w.core.on_stop_signal(1, w.now)
    [msg] = [m for m in sent(w.core.exited(Exit(-signal.SIGTERM), w.now)) if isinstance(m, JobFailed)]
    assert (msg.reason, msg.failure_class) == (REASON_INTERRUPTED, "")


def test_a_full_disk_in_ani_cli_s_output_is_lack_of_space(w: Worker) -> None:
    w.downloading()
    actions = w.core.exited(Exit(1, died=True, tail="ERROR: [Errno 28] No space left on device"), w.now)
    assert ClearPartials() in actions and failure(actions)[0] == REASON_NO_SPACE


# --- a stop from outside ------------------------------------------------------------------


@pytest.mark.parametrize("code", [-signal.SIGTERM, 128 + signal.SIGHUP, 1])
def test_a_stop_from_outside_waits_a_moment_then_counts_no_retry(w: Worker, code: int) -> None:
    w.downloading()
    assert w.core.exited(Exit(code), w.now) == []
    assert sent(w.tick(held_job.OUTSIDE_STOP_GRACE_SECONDS - 0.01)) == []
    reason, error = failure(w.tick(0.01))
    assert reason == REASON_INTERRUPTED and error.startswith("ani-cli was stopped from outside")


def test_the_worker_s_own_stop_during_that_moment_is_a_stop_request(w: Worker) -> None:
    w.downloading()
    w.core.exited(Exit(-signal.SIGTERM), w.now)
    actions = w.core.on_stop_signal(1, w.now + 0.2)
    assert failure(actions) == (REASON_INTERRUPTED, "interrupted by a stop request")


def test_a_stop_from_outside_again_and_again_counts_a_retry_at_last(w: Worker) -> None:
    w.downloading(job(attempt=4, retry_count=0))  # three earlier attempts counted nothing
    w.core.exited(Exit(1, tail="yt-dlp: 40%"), w.now)
    reason, error = failure(w.tick(held_job.OUTSIDE_STOP_GRACE_SECONDS))
    assert reason == REASON_ERROR and "after 3 attempts that counted no retry" in error


# --- stopping ---------------------------------------------------------------------------


def test_a_stop_kills_ani_cli_hands_the_job_back_and_then_lets_the_worker_exit(w: Worker) -> None:
    w.downloading()
    actions = w.core.on_stop_signal(1, w.now)
    assert actions == [Kill(signal.SIGTERM)] and not w.core.finished(w.now)
    actions = w.core.exited(Exit(-signal.SIGTERM), w.now)
    assert failure(actions) == (REASON_INTERRUPTED, "interrupted by a stop request")
    assert not w.core.finished(w.now)  # the failure waits for its ack
    w.hear(JobAck(job_id=7, attempt=1))
    assert w.core.finished(w.now) and sent(w.tick(2.0)) == []  # and asks for no more work


def test_a_stop_that_cannot_finish_ends_after_its_grace(w: Worker) -> None:
    w.downloading()
    w.core.on_stop_signal(1, w.now)
    assert not w.core.finished(w.now + core_mod.STOP_GRACE_SECONDS - 0.1)
    assert w.core.finished(w.now + core_mod.STOP_GRACE_SECONDS)


def test_a_second_stop_signal_exits_at_once(w: Worker) -> None:
    w.downloading()
    w.core.on_stop_signal(1, w.now)
    assert w.core.on_stop_signal(2, w.now) == [ExitNow()]


def test_a_stop_while_awaiting_the_go_ahead_hands_the_file_back(w: Worker) -> None:
    w.awaiting_commit()
    assert failure(w.core.on_stop_signal(1, w.now)) == (REASON_INTERRUPTED, "stopped before landing")


# --- the disk ---------------------------------------------------------------------------


def test_the_hard_limit_aborts_a_download_and_frees_what_it_wrote(w: Worker) -> None:
    w.downloading()
    assert w.core.on_disk(disk("hard_limit"), w.now) == [Kill(signal.SIGTERM)]
    assert w.core.on_disk(disk("hard_limit"), w.now) == []  # once: the escalation stays due
    actions = w.core.exited(Exit(-signal.SIGTERM), w.now)
    assert ClearPartials() in actions
    assert failure(actions) == (REASON_HARD_LIMIT, "aborted: disk usage reached hard_limit_gb")


def test_the_hard_limit_stops_a_remux_at_once(w: Worker) -> None:
    w.verifying()
    actions = w.core.on_disk(disk("hard_limit"), w.now)
    assert others(actions) == [StopPost(), ClearPartials()]
    assert failure(actions)[0] == REASON_HARD_LIMIT
    # the post step's own end comes later and changes nothing
    assert w.core.post_done(PostResult(error="post-processing stopped", stopped=True), w.now) == []


def test_the_hard_limit_leaves_a_file_waiting_for_its_go_ahead_alone(w: Worker) -> None:
    w.awaiting_commit()
    assert w.core.on_disk(disk("hard_limit"), w.now) == []


def test_a_storage_that_went_away_hands_the_job_back_uncounted(w: Worker) -> None:
    w.awaiting_commit()
    why = "storage_dir /srv is no longer a mount point (is the disk mounted?)"
    actions = w.core.on_disk(disk("unavailable", why), w.now)
    assert failure(actions) == (REASON_STORAGE, f"storage unavailable: {why}")


def test_a_failure_while_the_storage_is_gone_is_not_the_job_s_fault(w: Worker) -> None:
    w.downloading(job(storage_id="abc"))
    w.problem = "storage_dir /srv is read-only"
    actions = w.core.exited(Exit(1, died=True, tail="ERROR: unable to write"), w.now)
    assert failure(actions) == (REASON_STORAGE, "storage unavailable: storage_dir /srv is read-only")
    assert w.looked_up[-1] == "abc"


def test_a_storage_missing_on_this_machine_stops_the_download(w: Worker) -> None:
    w.downloading()
    w.problem = "storage_dir /srv has lost its marker"
    assert w.core.on_disk(disk(storage_id="abc"), w.now) == [Kill(signal.SIGTERM)]
    reason, error = failure(w.core.exited(Exit(-signal.SIGTERM), w.now + 0.1) or
                            w.tick(held_job.OUTSIDE_STOP_GRACE_SECONDS + 0.1))
    assert (reason, error) == (REASON_STORAGE, "storage unavailable: storage_dir /srv has lost its marker")


# --- the post step and the title -------------------------------------------------------------


@pytest.mark.parametrize("post, reason", [
    (PostResult(error="verify timed out: ...", timed_out=True), REASON_TIMEOUT),
    (PostResult(error="post-processing stopped", stopped=True), REASON_INTERRUPTED),
    (PostResult(error="Downloaded file is not a playable video: an HTML page"), REASON_ERROR),
])
def test_the_post_step_s_failures_say_whose_fault(w: Worker, post: PostResult, reason: str) -> None:
    w.verifying()
    actions = w.core.post_done(post, w.now)
    assert failure(actions) == (reason, post.error) and ClearPartials() not in actions


def test_a_remux_out_of_space_is_lack_of_space_and_frees_the_download(w: Worker) -> None:
    w.verifying()
    actions = w.core.post_done(PostResult(error="Failed to write video file: No space left on "
                                                "device (remux: ...)", no_space=True), w.now)
    assert ClearPartials() in actions and failure(actions)[0] == REASON_NO_SPACE


def test_another_show_than_the_selected_one_warns_by_default(w: Worker, caplog) -> None:
    w.downloading()
    with caplog.at_level(logging.WARNING):
        actions = w.core.exited(Exit(0, files=[("Show Season 2 Episode 3.mp4", 10)]), w.now)
    assert others(actions) == [StartPost("Show Season 2 Episode 3.mp4")]
    assert "downloaded show is not the selected one" in caplog.text
    [finished] = sent(w.core.post_done(PostResult(ext=".mkv", size=10), w.now))
    assert (finished.site_title, finished.title_mismatch) == ("Show Season 2", True)


def test_another_show_than_the_selected_one_fails_when_told_to(tmp_path: Path) -> None:
    w = Worker(tmp_path, on_title_mismatch="fail")
    w.downloading()
    actions = w.core.exited(Exit(0, files=[("Show Season 2 Episode 3.mp4", 10)]), w.now)
    assert ClearPartials() in actions and failure(actions)[0] == REASON_INVALID


def test_a_landing_that_fails_is_reported(w: Worker) -> None:
    w.awaiting_commit()
    w.hear(JobCommit(job_id=7, attempt=1, video_path="/v/ep003.mkv"))
    actions = w.core.land_failed(FileExistsError(errno.EEXIST, "File exists"), w.now)
    assert failure(actions) == (REASON_ERROR, "Failed to move video into place: [Errno 17] File exists")


def test_a_bug_while_checking_the_download_fails_the_attempt_not_the_worker(w: Worker) -> None:
    w.downloading()
    actions = w.core.attempt_error(ValueError("boom"), w.now)
    assert Reap() in actions
    assert failure(actions) == (REASON_ERROR, "worker error while checking the download: boom")


# --- other messages -------------------------------------------------------------------------


def test_a_refusal_is_logged_once_a_minute(w: Worker, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            assert w.hear(WorkerRefused(worker_id="w01", reason="id in use")) == []
        w.now += core_mod.REFUSED_LOG_SECONDS
        w.hear(WorkerRefused(worker_id="w01", reason="id in use"))
    assert caplog.text.count("the dispatcher refused this worker") == 2


def test_probes_and_messages_not_meant_for_a_worker_change_nothing(w: Worker) -> None:
    w.downloading()
    assert w.hear(WorkerProbe()) == []
    assert w.hear(WorkerReady(worker_id="x", session="y", seq=1)) == []
    assert w.core.attempt.phase == "downloading"
