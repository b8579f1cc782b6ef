"""The worker in ani-cli v5's real surroundings, with the simulated ani-cli behaving like the
real script (tests/fakes/ani_cli_sim.py): no fzf, no TERM, titles curl mangles or that name
a subdirectory, a site title that is not the selected one, stops that reach ani-cli from
outside, a cancelled attempt, a lease shorter than the worker's own config says.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zmq

from shared.protocol import JobCancel, JobHeartbeat, JobAssign, WorkerReady
from tests.integration.test_worker_landing import ScriptedDispatcher
from tests.system import System, wait_for


@pytest.fixture(autouse=True)
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """As under supervisord started at boot: no TERM (ani-cli's tput calls complain)."""
    monkeypatch.delenv("TERM", raising=False)


def site(title: str, episodes: int = 2, episode_behaviour: dict | None = None, **behaviour) -> dict:
    return {"title": title, "episodes": episodes, "behaviour": {"size": 3000, **behaviour},
            "episode_behaviour": episode_behaviour or {}}


def episode_file(system: System, mal_id: int, ep: int) -> Path:
    return system.storage / "videos" / str(mal_id) / "episodes" / f"ep{ep:03d}.mp4"


def test_titles_land_whatever_curl_and_the_site_make_of_them(make_system) -> None:
    system = make_system()
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "[Oshi no Ko]", [site("[Oshi no Ko]")])  # curl globs [...]
    system.add_anime(catalog, "Fate/Zero", [site("Fate/Zero")])  # dl/Fate/Zero Episode 1.mp4
    system.add_anime(catalog, "Kiss & Tell", [site("Kiss &amp; Tell")])  # '&' ends the query
    system.add_anime(catalog, "Kaguya-sama", [site("Kaguya-sama"), site("Kaguya-sama Season 2")])
    system.add_anime(catalog, "Broken Show", [site("Broken Show", episode_behaviour={
        "1": {"fail": "Episode is released, but no valid sources!"}})])
    system.write_catalog(catalog)
    system.enqueue(52034, "[Oshi no Ko]", [1], selected_index=1)
    system.enqueue(10087, "Fate/Zero", [1, 2], selected_index=1)
    system.enqueue(7, "Kiss & Tell", [1], selected_index=1)
    # The selector chose "Season 2", but -S 1 gives the first season: a different show.
    system.enqueue(40591, "Kaguya-sama", [1], selected_index=1, selected_title="Kaguya-sama Season 2")
    system.enqueue(9, "Broken Show", [1], selected_index=1, max_retries=0)

    system.start_supervisord(3)
    wait_for(lambda: system.stages() == {"downloaded": 5, "failed": 1}, 30, "every job to end")

    for mal_id, ep in ((52034, 1), (10087, 1), (10087, 2), (7, 1), (40591, 1)):
        assert episode_file(system, mal_id, ep).stat().st_size == 3000
    rows = {(r["anime_id"], r["episode"]): r for r in system.jobs()}
    assert all(r["retry_count"] == 0 for k, r in rows.items() if k != (9, 1)), rows
    # An error a user reads: the spec's first line and ani-cli's message, no tput noise.
    assert rows[9, 1]["error_message"] == ("ani-cli returned non-zero exit code: 1\n"
                                           "Episode is released, but no valid sources!")
    # What ani-cli was asked, and that its menu program was never needed.
    queries = {r["query"] for r in system.sim_runs("start")}
    assert queries == {"Oshi no Ko", "Fate/Zero", "Kiss Tell", "Kaguya-sama", "Broken Show"}
    assert 'query="Oshi no Ko"' in "".join(system.log(f"worker_{i:02d}") for i in (1, 2, 3))
    meta = json.loads((system.storage / "videos" / "40591" / "metadata.json").read_text())
    assert meta["selected_title"] == "Kaguya-sama Season 2"
    assert meta["episodes"]["1"]["site_title"] == "Kaguya-sama"
    assert meta["episodes"]["1"]["title_mismatch"] is True
    kiss = json.loads((system.storage / "videos" / "7" / "metadata.json").read_text())
    assert (kiss["episodes"]["1"]["site_title"], kiss["episodes"]["1"]["title_mismatch"]) == (
        "Kiss &amp; Tell", False)

    status = system.run("anime-status", "-c", str(system.config_path), "--json")
    mismatches = json.loads(status.stdout)["title_mismatches"]
    assert [(m["anime_id"], m["selected_title"], m["site_title"]) for m in mismatches] == [
        (40591, "Kaguya-sama Season 2", "Kaguya-sama")]
    text = system.run("anime-status", "-c", str(system.config_path)).stdout
    assert "site 'Kaguya-sama', selected 'Kaguya-sama Season 2'" in text, text
    assert any("downloaded show is not the selected one" in system.log(f"worker_{i:02d}")
               for i in (1, 2, 3))


def test_on_title_mismatch_fail_keeps_the_wrong_show_out(make_system) -> None:
    system = make_system({"downloader": {"on_title_mismatch": "fail"}})
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Kaguya-sama", [site("Kaguya-sama"), site("Kaguya-sama Season 2")])
    system.write_catalog(catalog)
    system.enqueue(40591, "Kaguya-sama", [1], selected_index=1, selected_title="Kaguya-sama Season 2")
    result = system.run("anime-downloader", "-c", str(system.config_path), "-w", "1",
                        "--exit-when-done", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    job = system.jobs()[0]
    assert (job["stage"], job["retry_count"]) == ("failed", 0), job
    assert job["error_message"] == ("Downloaded show is not the selected one: the site calls it "
                                    "'Kaguya-sama', selected_title is 'Kaguya-sama Season 2' "
                                    "([downloader] on_title_mismatch = \"fail\")")
    assert not (system.storage / "videos" / "40591").exists()
    assert len(system.sim_runs("start")) == 1


def test_an_exit_that_only_looks_like_a_stop_is_counted_after_three(make_system) -> None:
    """ani-cli's trap exits 1 without a message; so does nothing else of the script. An
    ani-cli that always does (a broken install, a wrapper script) must not loop for ever."""
    system = make_system()
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Silent Show", [site("Silent Show", exit_code=1)])
    system.write_catalog(catalog)
    system.enqueue(11, "Silent Show", [1], selected_index=1, max_retries=0)
    result = system.run("anime-downloader", "-c", str(system.config_path), "-w", "1",
                        "--exit-when-done", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    job = system.jobs()[0]
    assert (job["stage"], job["attempt"], job["retry_count"]) == ("failed", 4, 0), job
    assert job["error_message"].startswith(
        "ani-cli was stopped from outside (exit code 1 without an error message, as its "
        "INT/HUP/TERM trap exits) after 3 attempts that counted no retry: counting this one"), job
    assert len(system.sim_runs("start")) == 4


def proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_a_cancelled_attempt_reaps_its_ani_cli(make_system) -> None:
    system = make_system()
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Show", [site("Show (site)", hang=True)])
    system.write_catalog(catalog)
    ctx = zmq.Context()
    try:
        d = ScriptedDispatcher(ctx, system.config_path)
        worker = system.spawn("anime-worker", "-c", str(system.config_path), "--worker-id", "w01")
        d.next(lambda m: isinstance(m, WorkerReady))
        d.assign(1, episode=1)
        pid = wait_for(lambda: [r["pid"] for r in system.sim_runs("start")], 20, "ani-cli to start")[0]
        d.next(lambda m: isinstance(m, JobHeartbeat))
        d.send(JobCancel(job_id=1, attempt=1, reason="lease lost"))
        d.next(lambda m: isinstance(m, WorkerReady) and m.seq > 0)  # idle again
        wait_for(lambda: proc_state(pid) is None, 5,
                 f"ani-cli {pid} to be gone, not a zombie (state {proc_state(pid)})")
        assert worker.poll() is None
    finally:
        ctx.destroy(linger=0)


def test_the_worker_heartbeats_against_the_lease_it_was_given(make_system) -> None:
    """A worker whose own config says heartbeat 2.9 s must still keep a 3 s lease."""
    system = make_system({"queue": {"lease_seconds": 6, "heartbeat_seconds": 2.9}})
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Show", [site("Show (site)", size=20_000, duration=4.0)])
    system.write_catalog(catalog)
    ctx = zmq.Context()
    try:
        d = ScriptedDispatcher(ctx, system.config_path)
        system.spawn("anime-worker", "-c", str(system.config_path), "--worker-id", "w01")
        d.next(lambda m: isinstance(m, WorkerReady))
        d.send(JobAssign(job_id=1, attempt=1, anime_id=1, anime_title="Show", episode=1,
                         selected_index=1, selected_title="Show (site)", confidence="high",
                         lease_seconds=3.0, rate_limit_bps=0))
        beats = []
        for _ in range(4):
            d.next(lambda m: isinstance(m, JobHeartbeat))
            beats.append(time.monotonic())
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert max(gaps) <= 1.5, f"heartbeats {gaps} s apart for a 3 s lease"
    finally:
        ctx.destroy(linger=0)
