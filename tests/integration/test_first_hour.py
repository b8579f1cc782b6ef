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
