"""What a newcomer runs in the first hour, each as the real command (issue 20):
``anime-enqueue`` warns when the episodes will wait for a selection, ``--dry-run`` is not
held back by the disk budget, ``anime-status`` says why jobs back off and why nothing
starts, counts the last hour from the database, and shows the queue from ``jobs.db``
(read-only) when the dispatcher does not answer; ``anime-downloader --supervisorctl``
reaches the running instance."""

from __future__ import annotations

import pytest

from tests.system import System


@pytest.fixture
def make_system():
    made: list[System] = []

    def make(overrides=None) -> System:
        system = System(overrides)
        made.append(system)
        return system

    yield make
    for system in made:
        system.cleanup()


def test_enqueue_without_a_selection_warns_that_the_episodes_will_wait(make_system) -> None:
    system = make_system()
    done = system.run("anime-enqueue", "-c", str(system.config_path), "--mal-id", "5114",
                      "--title", "Fullmetal Alchemist: Brotherhood", "--episodes", "1-3")
    assert done.returncode == 0, done.stderr
    assert "queued 3 episode(s) of MAL ID 5114" in done.stdout
    assert "warning: MAL ID 5114 has no cached selection" in done.stderr
    assert "not downloaded until one is added" in done.stderr
    # how to add it: the same command with --selected-index
    assert ("anime-enqueue -c " + str(system.config_path) + " --mal-id 5114 --title "
            "'Fullmetal Alchemist: Brotherhood' --episodes 1-3 --selected-index N") in done.stderr

    again = system.run("anime-enqueue", "-c", str(system.config_path), "--mal-id", "5114",
                       "--title", "Fullmetal Alchemist: Brotherhood", "--episodes", "1-3",
                       "--selected-index", "2")
    assert again.returncode == 0 and again.stderr == "", again.stderr
    # once the anime has a selection, more episodes without --selected-index need no warning
    more = system.run("anime-enqueue", "-c", str(system.config_path), "--mal-id", "5114",
                      "--title", "Fullmetal Alchemist: Brotherhood", "--episodes", "4")
    assert more.returncode == 0 and more.stderr == "", more.stderr


def near_pause(usage_bytes: int) -> dict:
    """A disk budget of a few MB whose storage already holds ``usage_bytes`` of video."""
    return {"disk_management": {"hard_limit_gb": 0.010, "pause_threshold_gb": 0.006,
                                "resume_threshold_gb": 0.005, "expected_episode_size_mb": 1,
                                "min_free_gb": 0.001}}


def fill_storage(system: System, size: int) -> None:
    videos = system.storage / "videos" / "1" / "episodes"
    videos.mkdir(parents=True)
    (videos / "ep001.mkv").write_bytes(b"\0" * size)


def test_a_dry_run_near_the_pause_threshold_runs_every_job_and_exits(make_system) -> None:
    """--dry-run downloads nothing, so the disk budget must not hold it back: with the
    storage past the pause threshold every queued job is still shown and
    --exit-when-done exits with the summary (on main: every worker paused, no exit)."""
    system = make_system(near_pause(7_000_000))
    fill_storage(system, 7_000_000)  # past pause_threshold_gb: the disk-watcher says paused
    # an earlier real run identified the storage (a dry run writes not even its marker)
    first = system.run("anime-downloader", "-c", str(system.config_path), "-w", "1",
                       "--exit-when-done", timeout=60)
    assert first.returncode == 0, first.stderr[-3000:]
    system.enqueue(5114, "Fullmetal Alchemist: Brotherhood", [1, 2, 3], selected_index=2)
    done = system.run("anime-downloader", "-c", str(system.config_path), "-w", "2", "--dry-run",
                      "--exit-when-done", timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry_run_would_download=3" in done.stdout, done.stdout
    assert "disk state state=paused" in system.log("disk-watcher"), system.log("disk-watcher")
    argv_lines = [line for line in done.stderr.splitlines()
                  if line.startswith("worker_") and "dry run: would run" in line]
    assert len(argv_lines) == 3, done.stderr[-3000:]
    assert system.stages() == {"queued": 3}  # nothing changed
