"""A worker that cannot reach its dispatcher waits cheaply (it runs for days)."""

from __future__ import annotations

import psutil

from tests.system import wait_for


def test_a_worker_without_its_dispatcher_does_not_spin(make_system):
    system = make_system()
    system.spawn("anime-disk-watcher", "-c", str(system.config_path))
    worker = system.spawn("anime-worker", "-c", str(system.config_path), "--worker-id", "w01")
    wait_for(lambda: "disk state" in system.output(worker), 20, "the worker to hear the disk state")
    # It now asks for work and nobody answers: measure its CPU over two seconds.
    used = psutil.Process(worker.pid).cpu_times()
    psutil.Process(worker.pid).cpu_percent(interval=2.0)
    after = psutil.Process(worker.pid).cpu_times()
    cpu = (after.user + after.system) - (used.user + used.system)
    assert cpu < 0.2, f"an idle worker used {cpu:.2f} s of CPU in 2 s"
