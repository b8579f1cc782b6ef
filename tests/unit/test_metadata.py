"""metadata.json (shared/metadata.py): what the transcriber reads of an anime's episodes."""

from __future__ import annotations

import json
from pathlib import Path

from shared import layout, metadata
from shared.protocol import JobAssign


def job(episode: int) -> JobAssign:
    return JobAssign(job_id=episode, attempt=1, anime_id=5114, anime_title="Show",
                     episode=episode, selected_index=1, selected_title="Show (site)",
                     confidence="high", lease_seconds=60, rate_limit_bps=0)


def read(storage: Path) -> dict:
    return json.loads(layout.metadata_path(storage, 5114).read_text(encoding="utf-8"))


def test_a_settled_episode_is_listed_once_and_a_written_entry_is_kept(tmp_path: Path) -> None:
    ep1 = layout.episode_path(tmp_path, 5114, 1, ".mkv")
    metadata.write(tmp_path, job(1), ep1, 1420.5, "Show Episode 1", False)
    # a killed worker linked episode 2 but never wrote it: the dispatcher lists it
    ep2 = layout.episode_path(tmp_path, 5114, 2, ".mp4")
    assert metadata.ensure_listed(tmp_path, job(2), ep2)
    assert not metadata.ensure_listed(tmp_path, job(1), ep1)  # its worker's entry stays
    episodes = read(tmp_path)["episodes"]
    assert episodes["1"] == {"file": "ep001.mkv", "duration_seconds": 1420.5,
                             "site_title": "Show Episode 1", "title_mismatch": False}
    assert episodes["2"] == {"file": "ep002.mp4", "duration_seconds": None,
                             "site_title": None, "title_mismatch": False}
    assert read(tmp_path)["selected_title"] == "Show (site)"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    ep1 = layout.episode_path(tmp_path, 5114, 1, ".mkv")
    metadata.write(tmp_path, job(1), ep1, None)
    folder = layout.metadata_path(tmp_path, 5114).parent
    stale = folder / ".metadata.json.4242.tmp"  # a worker killed between write and rename
    stale.write_text("{", encoding="utf-8")
    metadata.write(tmp_path, job(2), layout.episode_path(tmp_path, 5114, 2, ".mkv"), None)
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["metadata.json"]
    assert set(read(tmp_path)["episodes"]) == {"1", "2"}
