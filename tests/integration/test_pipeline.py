"""The whole pipeline, end to end, under the real supervisord (issue: the pipeline)."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

HOSTILE = [
    (5114, "JoJo's Bizarre Adventure", "JoJo's Bizarre Adventure (TV)", 1),
    (9253, '"Quoted" $(touch pwned) ; rm -rf x', '"Quoted" $(touch pwned) ; rm -rf x`', 2),
    (31240, "Re:Zero − 彼女 `whoami`", "Re:Zero kara Hajimeru: 彼女 – Site", 3),
]


def catalog_for(entries, episodes=4, size_of=lambda mal_id, ep: 1000 + 37 * ep + mal_id % 97):
    anime = []
    for mal_id, query, site_title, index in entries:
        results = [{"title": f"Decoy {i} of {query}", "episodes": 1} for i in range(1, index)]
        results.append({"title": site_title, "episodes": episodes, "episode_behaviour": {
            str(ep): {"size": size_of(mal_id, ep)} for ep in range(1, episodes + 1)}})
        anime.append({"query": query, "results": results})
    return {"defaults": {"size": 2048, "duration": 0.05}, "anime": anime}


def expected_size(mal_id: int, ep: int) -> int:
    return 1000 + 37 * ep + mal_id % 97


def run_to_completion(system, *extra: str, timeout: float = 90):
    result = system.run("anime-downloader", "-c", str(system.config_path), *extra,
                        "--exit-when-done", timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_three_anime_four_episodes_three_workers(make_system):
    system = make_system()
    system.write_catalog(catalog_for(HOSTILE))
    for mal_id, query, _, index in HOSTILE:
        system.enqueue(mal_id, query, [1, 2, 3, 4], selected_index=index)

    result = run_to_completion(system, "-w", "3")

    assert "summary: downloaded=12, failed=0" in result.stdout
    for mal_id, _, _, _ in HOSTILE:
        for ep in range(1, 5):
            path = system.storage / "videos" / str(mal_id) / "episodes" / f"ep{ep:03d}.mp4"
            assert path.stat().st_size == expected_size(mal_id, ep), path
    rows = system.jobs()
    assert {r["stage"] for r in rows} == {"downloaded"}
    for r in rows:
        path = system.storage / "videos" / str(r["anime_id"]) / "episodes" / f"ep{r['episode']:03d}.mp4"
        assert r["video_path"] == str(path)
        assert r["video_size_bytes"] == expected_size(r["anime_id"], r["episode"])
    videos = [p for p in system.storage_files() if "/videos/" in str(p) and p.suffix == ".mp4"]
    assert len(videos) == 12
    assert system.private_dirs() == []
    assert not [p for p in system.root.rglob("*pwned*")], "a title reached a shell"
    assert not (system.root / "pwned").exists() and not os.path.exists("pwned")
    # The three workers shared the work and each run had its own private directories.
    starts = system.sim_runs("start")
    assert len(starts) == 12
    assert len({r["download_dir"] for r in starts}) == 12
    assert len({r["hist_dir"] for r in starts}) == 12
    assert all(r["player"] == "download" for r in starts)
    # The spec's monitoring queries, as a user runs them beside the system.
    conn = sqlite3.connect(system.db_path)
    assert conn.execute("SELECT stage, COUNT(*) FROM jobs GROUP BY stage").fetchall() == [("downloaded", 12)]
    success, failed, rate = conn.execute(
        "SELECT COUNT(CASE WHEN stage = 'downloaded' THEN 1 END), "
        "COUNT(CASE WHEN stage = 'failed' THEN 1 END), "
        "ROUND(100.0 * COUNT(CASE WHEN stage = 'downloaded' THEN 1 END) / "
        "(COUNT(CASE WHEN stage = 'downloaded' THEN 1 END) + "
        "COUNT(CASE WHEN stage = 'failed' THEN 1 END)), 2) FROM jobs "
        "WHERE stage IN ('downloaded', 'failed')").fetchone()
    assert (success, failed, rate) == (12, 0, 100.0)
    by_anime = conn.execute(
        "SELECT anime_title, COUNT(*), SUM(CASE WHEN stage = 'downloaded' THEN 1 ELSE 0 END) "
        "FROM jobs GROUP BY anime_id, anime_title").fetchall()
    assert sorted(by_anime) == sorted((q, 4, 4) for _, q, _, _ in HOSTILE)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    meta = json.loads((system.storage / "videos" / "31240" / "metadata.json").read_text())
    assert meta["mal_id"] == 31240 and meta["selected_index"] == 3
    assert meta["title"] == HOSTILE[2][1] and set(meta["episodes"]) == {"1", "2", "3", "4"}


def test_selection_index_reaches_ani_cli_and_site_title_does_not_name_the_file(make_system):
    system = make_system()
    entries = [(21, "One Piece", "ONE PIECE: 航海王 (Sub)", 3)]
    system.write_catalog(catalog_for(entries, episodes=2))
    system.enqueue(21, "One Piece", [1, 2], selected_index=3)

    run_to_completion(system, "-w", "2")

    starts = system.sim_runs("start")
    assert sorted((r["select"], r["episode"]) for r in starts) == [(3, 1), (3, 2)]
    assert all(r["query"] == "One Piece" for r in starts)
    episodes = system.storage / "videos" / "21" / "episodes"
    assert sorted(p.name for p in episodes.iterdir()) == ["ep001.mp4", "ep002.mp4"]
    assert {r["title"] for r in system.sim_runs("end")} == {"ONE PIECE: 航海王 (Sub)"}


def test_dry_run_changes_nothing_and_runs_no_ani_cli(make_system):
    system = make_system()
    system.write_catalog(catalog_for(HOSTILE[:2], episodes=2))
    for mal_id, query, _, index in HOSTILE[:2]:
        system.enqueue(mal_id, query, [1, 2], selected_index=index)
    system.enqueue(777, "No selection yet", [1])
    before = system.query("SELECT * FROM jobs ORDER BY id")
    before_columns = [c[1] for c in system.query("PRAGMA table_info(jobs)")]

    result = run_to_completion(system, "-w", "2", "--dry-run")

    assert system.query("SELECT * FROM jobs ORDER BY id") == before
    assert [c[1] for c in system.query("PRAGMA table_info(jobs)")] == before_columns
    assert not system.storage.exists()
    assert system.sim_runs() == []
    assert "dry_run_would_download=4" in result.stdout
    workers_log = "".join(system.log(f"worker_{i:02d}") for i in (1, 2))
    assert workers_log.count("dry run: would run") == 4
    # The title made search-safe (quotes dropped), still one argv element, logged beside it.
    assert r'\"-S\", \"2\", \"-e\", \"1\", \"-d\", \"Quoted $(touch pwned) ; rm -rf x\"]' in workers_log


def test_anime_id_filter_hands_out_only_that_anime(make_system):
    system = make_system()
    system.write_catalog(catalog_for(HOSTILE[:2], episodes=2))
    for mal_id, query, _, index in HOSTILE[:2]:
        system.enqueue(mal_id, query, [1, 2], selected_index=index)

    run_to_completion(system, "-w", "2", "--anime-id", "9253")

    assert dict(system.query("SELECT anime_id, GROUP_CONCAT(DISTINCT stage) FROM jobs GROUP BY anime_id")) == {
        5114: "queued", 9253: "downloaded"}


def test_missing_selection_waits_and_is_picked_up_once_it_appears(make_system):
    system = make_system()
    system.write_catalog(catalog_for([(42, "Later", "Later (site)", 1)], episodes=2))
    system.enqueue(42, "Later", [1, 2])

    result = run_to_completion(system, "-w", "1")

    assert "waiting_for_selection=2" in result.stdout
    assert system.stages() == {"queued": 2}
    assert system.log("dispatcher").count("No cached selection for MAL ID 42") == 1
    system.enqueue(42, "Later", [], selected_index=1)
    result = run_to_completion(system, "-w", "1")
    assert system.stages() == {"downloaded": 2}


def test_failures_end_as_the_spec_says(make_system):
    system = make_system({"downloader": {"timeout_seconds": 2}})
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": [
        {"query": "Broken", "results": [{"title": "Broken", "episodes": 3, "episode_behaviour": {
            "1": {"fail": "Episode is released, but no valid sources!"},
            "2": {"no_file": True},
            "3": {"hang": "ignore_term", "spawn_child": True}}}]},
        {"query": "Crashy", "results": [{"title": "Crashy", "episodes": 1, "behaviour": {
            "exit_code": 7, "stderr_lines": ["segfault in the scraper", "last words"]}}]},
    ]}
    system.write_catalog(catalog)
    system.enqueue(1, "Broken", [1, 2, 3], selected_index=1, max_retries=1)
    system.enqueue(2, "Crashy", [1], selected_index=1, max_retries=0)

    run_to_completion(system, "-w", "2", timeout=120)

    rows = {(r["anime_id"], r["episode"]): r for r in system.jobs()}
    assert {r["stage"] for r in rows.values()} == {"failed"}
    exit1 = rows[(1, 1)]["error_message"]
    assert exit1.startswith("ani-cli returned non-zero exit code: 1")
    assert "Episode is released, but no valid sources!" in exit1
    assert rows[(1, 1)]["retry_count"] == 1
    assert rows[(1, 2)]["error_message"].startswith("Downloaded video not found in expected location")
    assert "timed out after 2s" in rows[(1, 3)]["error_message"]
    crash = rows[(2, 1)]["error_message"]
    assert crash.startswith("ani-cli returned non-zero exit code: 7") and "last words" in crash
    assert rows[(2, 1)]["retry_count"] == 0
    assert len([r for r in system.sim_runs() if r["episode"] == 3]) == 2  # a retry, then failed
    for child in [r["child_pid"] for r in system.sim_runs("child")]:
        assert not _alive(child), f"ani-cli's child {child} survived the kill"
    assert system.private_dirs() == []
    assert not [p for p in system.storage_files() if "/videos/" in str(p)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("table,key,value,message", [
    ("disk_management", "pause_threshold_gb", 400,
     "[disk_management] pause_threshold_gb: must be below hard_limit_gb (10)"),
    ("disk_management", "resume_threshold_gb", 9.5,
     "[disk_management] resume_threshold_gb: must be below pause_threshold_gb (9)"),
    ("disk_management", "max_concurrent_downloads", "five",
     "[disk_management] max_concurrent_downloads: must be a whole number, got 'five'"),
    ("downloader", "timeout_secs", 3, "[downloader] timeout_secs: unknown key"),
    ("downloader", "container", "avi", "[downloader] container: must be one of 'mkv', 'keep'"),
])
def test_bad_config_is_refused_with_one_clear_line(make_system, table, key, value, message):
    system = make_system({table: {key: value}})
    for command in ("anime-downloader", "anime-dispatcher", "anime-worker", "anime-disk-watcher"):
        result = system.run(command, "-c", str(system.config_path), timeout=30)
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and str(system.config_path) in lines[0]
    assert not (system.data / "run" / "supervisord.conf").exists()
    assert not system.db_path.exists()


def test_missing_required_key_is_refused(make_system):
    system = make_system()
    text = system.config_path.read_text().replace("hard_limit_gb = 10\n", "")
    system.config_path.write_text(text)
    result = system.run("anime-downloader", "-c", str(system.config_path))
    assert result.returncode == 2
    assert "[disk_management] hard_limit_gb: missing (required)" in result.stderr


def test_upstream_database_with_only_contract_columns(make_system):
    system = make_system()
    system.write_catalog(catalog_for([(100, "Upstream", "Upstream (site)", 1)], episodes=2))
    system.data.mkdir(parents=True)
    conn = sqlite3.connect(system.db_path)
    conn.executescript("""
        CREATE TABLE anime_selection_cache (mal_id INTEGER PRIMARY KEY, selected_index INTEGER NOT NULL,
          selected_title TEXT NOT NULL, confidence TEXT NOT NULL);
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, anime_id INTEGER NOT NULL, anime_title TEXT NOT NULL,
          episode INTEGER NOT NULL, stage TEXT NOT NULL DEFAULT 'queued', retry_count INTEGER DEFAULT 0,
          max_retries INTEGER DEFAULT 3, error_message TEXT, video_path TEXT, video_size_bytes INTEGER);
        INSERT INTO anime_selection_cache VALUES (100, 1, 'Upstream (site)', 'medium');
        INSERT INTO jobs (anime_id, anime_title, episode) VALUES (100, 'Upstream', 1), (100, 'Upstream', 2);
        INSERT INTO jobs (anime_id, anime_title, episode, stage, video_path)
          VALUES (100, 'Upstream', 3, 'transcribing', '/elsewhere/ep003.mkv');
    """)
    conn.commit()
    conn.close()

    run_to_completion(system, "-w", "2")

    rows = system.jobs()
    assert [(r["episode"], r["stage"]) for r in rows] == [(1, "downloaded"), (2, "downloaded"),
                                                          (3, "transcribing")]
    assert rows[2]["video_path"] == "/elsewhere/ep003.mkv"
    assert system.query("SELECT * FROM anime_selection_cache") == [(100, 1, "Upstream (site)", "medium")]
