"""The page's header: one overall state and why, for each situation a user must tell apart."""

from __future__ import annotations

import copy

import pytest

from services.web.overview import overview

BASE = {
    "generated_at": 100.0,
    "dispatcher": {"pid": 1, "dry_run": False, "anime_id": None, "stopping": False},
    "queue": {"queued": 5, "downloading": 1, "downloaded": 3, "failed": 0,
              "waiting_for_selection": 1, "backing_off": 0},
    "workers": [{"id": "w01", "state": "downloading", "job": {"id": 1}},
                {"id": "w02", "state": "idle", "job": None}],
    "disk": {"state": "running", "admitting": True, "refusal": None},
}


def doc(**changes) -> dict:
    status = copy.deepcopy(BASE)
    for path, value in changes.items():
        section, _, key = path.partition("__")
        if key:
            status.setdefault(section, {})[key] = value
        else:
            status[section] = value
    return status


def test_nothing_answers():
    o = overview(None, "no answer from the dispatcher at ipc:///x within 2s", since=50.0)
    assert (o["state"], o["label"], o["since"]) == ("not_answering", "dispatcher not answering", 50.0)
    assert "no answer" in o["why"]
    assert overview(BASE, "no answer")["state"] == "not_answering"  # an old document is not an answer


@pytest.mark.parametrize("changes,state,label,why", [
    ({}, "downloading", "downloading", "1 downloading, 5 queued"),
    ({"workers": []}, "idle", "idle", "5 queued (1 wait for a selection); no worker connected"),
    ({"workers": [{"id": "w01", "state": "idle", "job": None}], "queue__queued": 0},
     "idle", "idle", "nothing queued"),
    ({"disk__state": "paused", "disk__refusal": "disk paused: waiting for usage below resume_threshold_gb"},
     "paused_disk", "paused by the disk", "disk paused: waiting for usage below resume_threshold_gb"),
    ({"disk__state": "hard_limit"}, "hard_limit", "hard limit reached",
     "usage reached hard_limit_gb: running downloads are aborted"),
    ({"disk__state": "stale"}, "no_disk_state", "waiting for the disk-watcher",
     "no recent measurement of the disk (is the disk-watcher running?)"),
    ({"disk__admitting": False, "disk__refusal": "no space left on device: waiting for room"},
     "not_admitting", "not starting downloads", "no space left on device: waiting for room"),
    ({"dispatcher__stopping": True}, "stopping", "stopping", "the dispatcher hands out no more jobs"),
    ({"database": {"busy_since": 90.0, "error": "database is locked", "pending_writes": 2}},
     "database_busy", "database busy", "database is locked; 2 writes waiting"),
    ({"disk__state": "unavailable", "disk__reason": "storage_dir /srv/anime is not mounted"},
     "storage_unavailable", "storage unavailable", "storage_dir /srv/anime is not mounted"),
    ({"pause": {"paused": True, "until": 200.0, "by": "anime-ctl", "at": 80.0}},
     "paused_operator", "paused by the operator", "no new download starts until resumed (by anime-ctl)"),
    ({"disk__admitting": False, "disk__refusal": "paused by the operator (until 18:00)"},
     "paused_operator", "paused by the operator", "paused by the operator (until 18:00)"),
    ({"dispatcher__dry_run": True, "dispatcher__anime_id": 5114}, "downloading", "downloading",
     "1 downloading, 5 queued (dry run, only MAL ID 5114)"),
])
def test_each_state_and_why(changes, state, label, why):
    o = overview(doc(**changes))
    assert (o["state"], o["label"], o["why"]) == (state, label, why)


def test_what_blocks_everything_is_said_first():
    both = doc(database={"busy_since": 90.0}, disk__state="unavailable")
    assert overview(both)["state"] == "database_busy"
    assert overview(doc(disk__state="unavailable", dispatcher__stopping=True))["state"] == "storage_unavailable"
    assert overview(doc(pause={"paused": True}, disk__state="paused"))["state"] == "paused_operator"
    o = overview(doc(database={"busy_since": 90.0}))
    assert o["since"] == 90.0 and o["why"] == "another program holds jobs.db"
    assert overview(doc(pause={"paused": True, "until": 200.0}))["until"] == 200.0


def test_a_document_with_odd_or_missing_parts_still_has_a_state():
    assert overview({})["state"] == "idle"
    assert overview({"disk": "x", "queue": None, "workers": [None, 3], "database": []})["state"] == "idle"
    assert overview(doc(database={"busy_since": None, "error": None}))["state"] == "downloading"
