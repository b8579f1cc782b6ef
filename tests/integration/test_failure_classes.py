"""Failures that know what they are (issue 18), against the running system: the real
supervisord, dispatcher, disk-watcher and workers, the simulated ani-cli (its catalog
says what the site lists), the SQLite file, ``anime-status``.

- An episode the site does not list yet waits for re-checks without using up a retry
  (max_retries = 0), also across a ``kill -9`` of the dispatcher, and lands once the
  site lists it.
- Selection failures fail with the stable message (``GROUP BY error_message`` groups
  them) and ``anime-status`` lists their anime for a selection review.
- A Cloudflare block holds back every start on that host for cloudflare_pause_seconds.
"""

from __future__ import annotations

import socket

from shared.failures import NOT_RELEASED
from tests.system import System, wait_for

RECHECK_HOURS = 0.002  # 7.2 s: float hours, small enough for a test
RED = "\u001b[2K\r\u001b[1;31m{}\u001b[0m"  # ani-cli's die() line


def row(system: System, job_id: int) -> dict:
    return next(r for r in system.jobs() if r["id"] == job_id)


def airing(episodes: int) -> dict:
    return {"defaults": {"size": 2048, "duration": 0.0}, "anime": [
        {"query": "Airing Show", "results": [{"title": "Airing Show", "episodes": episodes}]}]}


def runs_of(system: System, episode: int, event: str = "start") -> list[dict]:
    return [r for r in system.sim_runs(event) if r["episode"] == episode]


def test_an_unreleased_episode_waits_without_using_up_retries_then_lands(make_system) -> None:
    system = make_system({"downloader": {"recheck_unreleased_hours": RECHECK_HOURS}})
    system.write_catalog(airing(2))
    system.enqueue(500, "Airing Show", [1, 2, 3], selected_index=1, max_retries=0)
    system.start_supervisord(2)

    first = wait_for(lambda: (lambda r: r if r.get("unreleased_since") else None)(row(system, 3)),
                     30, "episode 3 to wait for its release")
    assert (first["stage"], first["retry_count"], first["failure_class"]) == \
        ("queued", 0, NOT_RELEASED), first
    assert first["error_message"] == "ani-cli returned non-zero exit code: 1\nInvalid episode!"
    assert abs(first["next_attempt_at"] - (first["unreleased_since"] + RECHECK_HOURS * 3600)) < 0.01
    wait_for(lambda: any("failure_class=not_released" in system.log(f"worker_{n:02d}")
                         for n in (1, 2)), 10, "a worker to log the class")
    status = wait_for(lambda: (lambda s: s if s and s["queue"]["waiting_for_release"] == 1
                               else None)(system.status_json()), 10, "the status to count it")
    assert status["queue"]["next_recheck_at"] == first["next_attempt_at"]
    assert status["failure_classes"]["last_hour"][NOT_RELEASED] >= 1
    assert "1 waits for a release (next re-check" in system.status_text()

    # The wait is in the database: a dispatcher killed meanwhile comes back to it.
    pid = status["dispatcher"]["pid"]
    assert system.supervisorctl("signal", "KILL", "dispatcher").returncode == 0
    again = wait_for(lambda: (lambda s: s if s and s["dispatcher"]["pid"] != pid
                              and s["queue"]["counted_at"] else None)(system.status_json()),
                     30, "the restarted dispatcher to answer")
    kept = row(system, 3)
    assert (kept["stage"], kept["retry_count"], kept["unreleased_since"]) == \
        ("queued", 0, first["unreleased_since"]), kept
    if len(runs_of(system, 3)) == 1:  # its re-check has not come yet
        assert again["queue"]["waiting_for_release"] == 1, again["queue"]

    # The re-check: ani-cli runs again, the episode is still not listed, no retry is used.
    wait_for(lambda: len(runs_of(system, 3, "end")) >= 2, 30, "a re-check of episode 3")
    second = wait_for(lambda: (lambda r: r if r["stage"] == "queued" and r["attempt"] >= 2
                               and r["next_attempt_at"] else None)(row(system, 3)),
                      10, "the re-check to be recorded")
    assert (second["retry_count"], second["unreleased_since"]) == (0, first["unreleased_since"])
    assert second["next_attempt_at"] > first["next_attempt_at"]

    # The site lists it now: the next re-check downloads it.
    system.write_catalog(airing(3))
    landed = wait_for(lambda: (lambda r: r if r["stage"] == "downloaded" else None)(row(system, 3)),
                      30, "episode 3 to land")
    assert (landed["retry_count"], landed["unreleased_since"], landed["failure_class"]) == \
        (0, None, None)
    assert (system.storage / "videos" / "500" / "episodes" / "ep003.mp4").is_file()
    assert system.stages() == {"downloaded": 3}
    wait_for(lambda: system.private_dirs() == [], 10, "the worker to remove its private dir")


def test_selection_failures_fail_with_a_stable_message_and_are_listed_for_a_review(
        make_system) -> None:
    system = make_system({"downloader": {"retry_backoff_seconds": 0.2}})
    system.write_catalog({"defaults": {"size": 2048, "duration": 0.0}, "anime": [
        {"query": "Wrong Pick", "results": [{"title": "Wrong Pick", "episodes": 3}]},
        {"query": "Flaky Show", "results": [{"title": "Flaky Show", "episodes": 1,
                                             "episode_behaviour": {"1": {
                                                 "fail_times": 1,
                                                 "fail_message": "No sources found for sub!"}}}]},
    ]})
    system.enqueue(11, "Wrong Pick", [1, 2], selected_index=2, max_retries=1)  # one result only
    system.enqueue(12, "Not On The Site", [1], selected_index=1, max_retries=0)
    system.enqueue(13, "Flaky Show", [1], selected_index=1, max_retries=1)
    system.start_supervisord(2)

    wait_for(lambda: system.stages() == {"failed": 3, "downloaded": 1}, 40, "the run to end")
    groups = system.query("SELECT error_message, COUNT(*) FROM jobs WHERE stage = 'failed' "
                          "GROUP BY error_message ORDER BY 2 DESC")
    assert groups == [("ani-cli returned non-zero exit code: 1\nInvalid anime selection", 2),
                      ("ani-cli returned non-zero exit code: 1\nNo results found!", 1)]
    flaky = next(r for r in system.jobs() if r["anime_id"] == 13)
    assert (flaky["stage"], flaky["retry_count"]) == ("downloaded", 1)  # transient: retried

    # The review comes from the dispatcher's last pass over the queue, which may have run
    # between the two failures of series 11: wait for the pass that has all three.
    status = wait_for(lambda: (lambda s: s if s and sum(r["failed"] for r in s["selection_review"]) == 3
                               else None)(system.status_json()), 10, "the review list")
    review = {r["anime_id"]: r for r in status["selection_review"]}
    assert (review[11]["anime_title"], review[11]["failed"]) == ("Wrong Pick", 2)
    assert (review[12]["anime_title"], review[12]["failed"]) == ("Not On The Site", 1)
    classes = status["failure_classes"]["last_hour"]
    assert (classes["selection"], classes["transient"]) == (5, 1), classes  # 2x2 + 1 attempts
    assert {f["failure_class"] for f in status["recent_failures"]} == {"selection"}
    text = system.status_text()
    assert "needs a selection review" in text
    assert "Wrong Pick (MAL ID 11, 2 failed jobs)" in text
    assert "Not On The Site (MAL ID 12, 1 failed job)" in text


def test_a_cloudflare_block_holds_back_the_next_starts_on_that_host(make_system) -> None:
    pause = 4.0
    system = make_system({"downloader": {"cloudflare_pause_seconds": pause}})
    said = "Blocked by cloudflare. Try installing curl-impersonate"
    system.write_catalog({"defaults": {"size": 2048, "duration": 0.0}, "anime": [
        {"query": "Blocked Show", "results": [{"title": "Blocked Show", "episodes": 3,
                                               "episode_behaviour": {
            # as the real script prints it: the block in the search's subshell, then the
            # empty result (tests/integration/test_real_ani_cli.py)
            "1": {"fail_times": 1, "fail_message": "No results found!",
                  "stderr_lines": [RED.format(said)]}}}]}]})
    system.enqueue(600, "Blocked Show", [1], selected_index=1, max_retries=1)
    system.start_supervisord(2)

    status = wait_for(lambda: (lambda s: s if s and s["failure_classes"]["cloudflare_holds"]
                               else None)(system.status_json()), 20, "the host to be held")
    hold = status["failure_classes"]["cloudflare_holds"][0]
    assert hold["host"] == socket.gethostname() and hold["blocks"] == 1
    # More work comes while the host is held: both workers are idle, neither gets it.
    system.enqueue(600, "Blocked Show", [2, 3], selected_index=1, max_retries=1)
    status = wait_for(lambda: (lambda s: s if s and sum(
        s["queue"][k] for k in ("queued", "downloading", "downloaded")) == 3 else None)(
        system.status_json()), 10, "the new jobs to be counted")
    if status["generated_at"] < hold["until"] and status["queue"]["queued"] == 3:
        assert [w["state"] for w in status["workers"]] == ["paused", "paused"], status["workers"]
    wait_for(lambda: system.stages() == {"downloaded": 3}, 40, "every episode to land")

    [blocked] = runs_of(system, 1, "end")[:1]
    assert blocked["outcome"] == "failed"
    later = [r for r in system.sim_runs("start") if r["time"] > blocked["time"]]
    assert sorted(r["episode"] for r in later) == [1, 2, 3], later  # the retry, 2 and 3
    assert min(r["time"] for r in later) >= hold["until"], (hold, later)
    assert hold["until"] - blocked["time"] >= pause
    assert row(system, 1)["retry_count"] == 1
    system.wait_logged("dispatcher", "blocked by Cloudflare")
    assert "failure_class=cloudflare" in system.log("dispatcher")
