"""The failure classifier (shared/failures.py): one test per known ani-cli message, each
read the way the worker reads it (ani-cli's red die() line on stderr, through the
output tail, into the spec's error message), the simulated ani-cli saying the same
for the messages it reaches by itself, and the worker's report carrying the class.

The real script's own output for these messages is checked in
tests/integration/test_real_ani_cli.py (``test_the_real_scripts_messages_are_classified``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import failures
from shared.failures import CLOUDFLARE, NOT_RELEASED, OTHER, SELECTION, TRANSIENT, classify
from shared.protocol import JobFailed, decode, encode
from services.worker import download
from services.worker.output import AniCliOutput

SIM = Path(__file__).resolve().parents[1] / "fakes" / "ani-cli"


def die(message: str) -> bytes:
    """ani-cli's die(): ``printf "\\33[2K\\r\\033[1;31m%s\\033[0m\\n"`` on stderr."""
    return f"\033[2K\r\033[1;31m{message}\033[0m\n".encode()


def error_of(stderr: bytes, code: int = 1, stdout: bytes = b"") -> str:
    """The job's error message as the worker builds it from ani-cli's output."""
    out = AniCliOutput()
    out.feed("stdout", stdout)
    out.feed("stderr", stderr)
    assert out.died
    result = download.judge(code, [], out.tail())
    assert result.error is not None
    return result.error


# Every die() line of ani-cli v5 (82574d2) that a batch run can reach, and its class.
KNOWN = [
    ("Invalid episode!", NOT_RELEASED),
    ("Episode not released!", NOT_RELEASED),
    ("No results found!", SELECTION),
    ("Invalid anime selection", SELECTION),
    ("Blocked by cloudflare.", CLOUDFLARE),
    ("Blocked by cloudflare. Try installing curl-impersonate", CLOUDFLARE),  # with plain curl
    ("Episode is released, but no valid sources!", TRANSIENT),
    ("No sources found for sub!", TRANSIENT),
    ("No sources found for dub!", TRANSIENT),
    ("Invalid range!", OTHER),
    ("Invalid episode selection", OTHER),
    ("missing argument!", OTHER),
    ("Program fzf not found. Please install it.", OTHER),
]


@pytest.mark.parametrize("message,expected", KNOWN)
def test_each_known_message_has_its_class(message: str, expected: str) -> None:
    error = error_of(die(message), stdout=b"\033[1;34mChecking dependencies...\033[0m\n")
    assert error == f"ani-cli returned non-zero exit code: 1\n{message}"
    found = classify("error", error)
    assert found is not None and found.cls == expected
    assert found.line == (message if expected != OTHER else None)


def test_a_cloudflare_block_wins_over_the_no_results_that_follows_it() -> None:
    """The real script dies with the Cloudflare line in a subshell, then again with
    ``No results found!`` (what tests/integration/test_real_ani_cli.py reads from it)."""
    said = "Blocked by cloudflare. Try installing curl-impersonate"
    error = error_of(die(said) + die("No results found!"))
    found = classify("error", error)
    assert found == failures.Classified(CLOUDFLARE, said)
    assert failures.stable_error(error, found) == f"ani-cli returned non-zero exit code: 1\n{said}"


def test_the_die_line_wins_over_what_came_before_it() -> None:
    """Lines before the die line (a downloader's complaint, a tput warning) do not decide;
    the stable form keeps only what failed and why."""
    stderr = (b"tput: No value for $TERM and no -T specified\n"
              b"ERROR: Connection reset by peer\n" + die("Invalid anime selection"))
    error = error_of(stderr)
    found = classify("error", error)
    assert found is not None and found.cls == SELECTION
    assert failures.stable_error(error, found) == \
        "ani-cli returned non-zero exit code: 1\nInvalid anime selection"


@pytest.mark.parametrize("tail", [
    "ERROR: [generic] Unable to download webpage: <urlopen error [Errno 111] Connection refused>",
    "ERROR: unable to download video data: HTTP Error 503: Service Unavailable",
    "curl: (6) Could not resolve host: anidb.app",
    "[Errno -3] Temporary failure in name resolution",
    "ERROR: Read timed out.",
])
def test_network_errors_are_transient(tail: str) -> None:
    error = f"Downloaded video not found in expected location\n{tail}"
    assert classify("error", error) == failures.Classified(TRANSIENT)
    assert failures.stable_error(error, classify("error", error)) == error  # kept whole


def test_a_time_out_is_transient_and_a_missing_stream_is_not() -> None:
    assert classify("timeout", "ani-cli timed out after 3600s and was killed").cls == TRANSIENT
    error = "Downloaded video not found in expected location\nERROR: HTTP Error 404: Not Found"
    assert classify("error", error).cls == OTHER


@pytest.mark.parametrize("reason", ["interrupted", "no_space", "hard_limit", "invalid",
                                    "dry_run", "storage_unavailable", "something new"])
def test_failures_that_are_not_the_jobs_are_not_classified(reason: str) -> None:
    assert classify(reason, "ani-cli returned non-zero exit code: 1\nInvalid episode!") is None


@pytest.mark.parametrize("error", ["", "\n\n", "Invalid episode!!", "x" * 100_000, None, 42,
                                   b"Invalid episode!", "Invalid episode!\udcff\x00"])
def test_an_unknown_message_is_other_and_never_raises(error: object) -> None:
    """A line with more after the message is not the message; bytes or None are nothing."""
    assert classify("error", error) == failures.Classified(OTHER)
    assert failures.known("frobnicated") is None and failures.known(None) is None


def test_cloudflare_is_a_transient_sub_class() -> None:
    assert failures.PARENT[CLOUDFLARE] == TRANSIENT
    assert failures.is_transient(CLOUDFLARE) and failures.is_transient(TRANSIENT)
    assert not failures.is_transient(SELECTION) and not failures.is_transient(None)


def test_the_class_travels_in_job_failed_and_an_older_peer_still_decodes() -> None:
    msg = JobFailed(worker_id="w01", session="s", job_id=1, attempt=1, reason="error",
                    error="x", failure_class=NOT_RELEASED)
    assert decode(encode(msg)).failure_class == NOT_RELEASED
    # an older worker's report has no such field: it decodes, with no class
    import msgspec
    body = msgspec.msgpack.encode({"v": 1, "worker_id": "w01", "session": "s", "job_id": 1,
                                   "attempt": 1, "reason": "error", "error": "x"})
    assert decode([b"job.failed", body]).failure_class == ""


# --- the simulated ani-cli says the same ---------------------------------------------

@pytest.fixture
def sim(tmp_path: Path):
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"anime": [{"query": "Airing Show", "results": [
        {"title": "Airing Show", "episodes": 2}]}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANI_CLI")}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               ANI_CLI_PLAYER="download", ANI_CLI_MENU="false", TERM="dumb",
               ANI_CLI_SIM_CATALOG=str(catalog), ANI_CLI_DOWNLOAD_DIR=str(tmp_path / "dl"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(SIM), *args], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=20)

    return run


@pytest.mark.parametrize("args,message,expected", [
    (("-S", "1", "-e", "3", "-d", "Airing Show"), "Invalid episode!", NOT_RELEASED),
    (("-S", "1", "-e", "1", "-d", "Unknown Show"), "No results found!", SELECTION),
    (("-S", "2", "-e", "1", "-d", "Airing Show"), "Invalid anime selection", SELECTION),
])
def test_the_simulation_says_what_the_real_script_says(sim, args, message, expected) -> None:
    result = sim(*args)
    assert result.returncode == 1 and result.stderr.endswith(die(message)), result.stderr
    error = error_of(result.stderr, stdout=result.stdout)
    assert classify("error", error) == failures.Classified(expected, message)
