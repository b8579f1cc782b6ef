"""The simulated ani-cli (tests/fakes/ani-cli), run as a real executable, where it must
behave as the real ani-cli v5 does (its line numbers: ../shared/ani-cli-v5.md) and print
what yt-dlp prints, since the worker reads it: messages, exit codes, menus, the query
through curl, file names, signals, the downloader's command line.

Knobs that exist only in the simulation (fail_times, hang, leave_part, the run log) are
not tested here: the integration tests that use them would fail first."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from tests.system import wait_for as system_wait_for

FAKES = Path(__file__).resolve().parents[1] / "fakes"
SIM = FAKES / "ani-cli"
FMA_QUERY = "Fullmetal Alchemist: Brotherhood"
FMA_SITE = "Fullmetal Alchemist: Brotherhood (site)"
HOSTILE = "Naruto \"S\" $(touch pwned) `touch pwned2`; echo x > pwned3 'q' — Ünïcödé ☃"


def red(message: str) -> str:
    return "\033[2K\r\033[1;31m%s\033[0m\n" % message


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass."""
    return system_wait_for(predicate, timeout, "the simulated ani-cli", interval=0.01)


class Sim:
    """A catalog, a download dir and a run log in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dl = root / "dl"
        self.log = root / "run.jsonl"
        self.catalog_path = root / "catalog.json"
        self.procs: List[subprocess.Popen] = []

    def catalog(self, results: List[Dict[str, Any]], query: str = FMA_QUERY,
                defaults: Optional[Dict[str, Any]] = None) -> None:
        data = {"defaults": defaults or {"size": 1024, "duration": 0.0},
                "anime": [{"query": query, "results": results}]}
        self.catalog_path.write_text(json.dumps(data), encoding="utf-8")

    def env(self, **overrides: Optional[str]) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANI_CLI")}
        # The venv's python3 first: skips slow shims behind /usr/bin/env python3.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env.update({
            "ANI_CLI_PLAYER": "download",
            "ANI_CLI_MENU": "false",  # exists, chooses nothing (what the worker's does)
            "TERM": "dumb",
            "ANI_CLI_SIM_CATALOG": str(self.catalog_path),
            "ANI_CLI_SIM_LOG": str(self.log),
            "ANI_CLI_DOWNLOAD_DIR": str(self.dl),
        })
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(self, *args: str, timeout: float = 10, **env: Optional[str]
            ) -> subprocess.CompletedProcess:
        # Bytes, decoded by hand: text mode would turn the "\r" redraws into "\n".
        res = subprocess.run([str(SIM), *args], env=self.env(**env), cwd=self.root,
                             stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=timeout)
        return subprocess.CompletedProcess(res.args, res.returncode,
                                           res.stdout.decode("utf-8"),
                                           res.stderr.decode("utf-8"))

    def popen(self, *args: str, **env: Optional[str]) -> subprocess.Popen:
        proc = subprocess.Popen([str(SIM), *args], env=self.env(**env), cwd=self.root,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def events(self, event: Optional[str] = None) -> List[Dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [e for e in lines if event is None or e["event"] == event]

    def files(self) -> List[str]:
        return sorted(p.name for p in self.dl.iterdir()) if self.dl.exists() else []

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    s = Sim(tmp_path)
    s.catalog([{"title": "Fullmetal Alchemist", "episodes": 51},
               {"title": FMA_SITE, "episodes": 64}])
    yield s
    s.cleanup()


def test_normal_download(sim: Sim) -> None:
    size = 300_000
    sim.catalog([{"title": "Fullmetal Alchemist", "episodes": 51},
                 {"title": FMA_SITE, "episodes": 64,
                  "behaviour": {"size": size, "duration": 0.3, "chunk": 8192}}])
    res = sim.run("-S", "2", "-e", "3", "fullmetal", "alchemist:", "BROTHERHOOD")
    assert res.returncode == 0, res.stderr
    name = "%s Episode 3.mp4" % FMA_SITE
    assert sim.files() == [name]
    assert (sim.dl / name).stat().st_size == size
    assert res.stderr == ""
    assert res.stdout.startswith("Playing episode 3...\n[download] Destination: %s\n"
                                 % (sim.dl / name))
    progress = res.stdout.split("Destination: ", 1)[1].split("\n", 1)[1]
    assert progress.count("\n") == 1 and progress.endswith("\n")
    frames = progress.rstrip("\n").split("\r")[1:]
    assert len(frames) >= 3  # redrawn at least every 0.1 s over 0.3 s
    line = re.compile(r"\[download\] +\d+\.\d% of +[\d.]+KiB at +(\S+|Unknown B/s) ETA \S+$")
    assert all(line.match(f) for f in frames[:-1]), frames
    assert re.match(r"\[download\] 100% of  292\.97KiB in 00:00:0\d at [\d.]+[KM]iB/s$",
                    frames[-1]), frames[-1]


def test_part_file_grows_during_the_run(sim: Sim) -> None:
    size = 1_000_000
    sim.catalog([{"title": "FMA", "episodes": 2,
                  "behaviour": {"size": size, "duration": 0.6, "chunk": 4096}}])
    proc = sim.popen("-S", "1", "-e", "2", FMA_QUERY)
    part = sim.dl / "FMA Episode 2.mp4.part"

    def partial_size() -> bool:
        return part.exists() and 0 < part.stat().st_size < size

    wait_for(partial_size)
    assert proc.wait(timeout=5) == 0
    assert sim.files() == ["FMA Episode 2.mp4"]


def fake_program(directory: Path, name: str, body: str = "exit 0") -> Path:
    directory.mkdir(exist_ok=True)
    script = directory / name
    script.write_text("#!/bin/sh\n%s\n" % body)
    script.chmod(0o755)
    return script


def test_d_flag_downloads_when_a_player_is_installed(sim: Sim) -> None:
    path = "%s%s%s" % (fake_program(sim.root / "bin", "mpv").parent, os.pathsep, sim.env()["PATH"])
    res = sim.run("-d", "-S", "1", "-e", "1", FMA_QUERY, ANI_CLI_PLAYER=None, PATH=path)
    assert res.returncode == 0, res.stderr
    assert sim.files() == ["Fullmetal Alchemist Episode 1.mp4"]


def test_no_player_found_even_with_d(sim: Sim) -> None:
    """The player is looked for before the flags are parsed (line 410)."""
    res = sim.run("-d", "-S", "1", "-e", "1", FMA_QUERY, ANI_CLI_PLAYER=None)
    assert (res.returncode, res.stderr) == (1, red("No player found. Looked for mpv and vlc"))
    assert sim.files() == []


def test_the_menu_program_must_exist_even_when_no_menu_opens(sim: Sim) -> None:
    """dep_ch "$menu_program" (line 511): fzf, unless ANI_CLI_MENU names a program."""
    res = sim.run("-S", "1", "-e", "1", FMA_QUERY, ANI_CLI_MENU=None)
    assert (res.returncode, res.stderr) == (1, red("Program fzf not found. Please install it."))
    res = sim.run("-S", "1", "-e", "1", FMA_QUERY, ANI_CLI_MENU="/nonexistent/menu")
    assert (res.returncode, res.stderr) == (1, red("Program /nonexistent/menu not found. Please install it."))
    assert sim.files() == []
    res = sim.run("-S", "1", "-e", "1", FMA_QUERY, ANI_CLI_MENU="true")
    assert res.returncode == 0, res.stderr


def test_an_installed_dmenu_replaces_the_menu_without_a_terminal(sim: Sim) -> None:
    """Lines 421-424: stdin not a terminal and dmenu installed: dmenu must exist, and it
    does: ANI_CLI_MENU is ignored (harmless with -S and -e)."""
    path = "%s%s%s" % (fake_program(sim.root / "bin", "dmenu").parent, os.pathsep, sim.env()["PATH"])
    res = sim.run("-S", "1", "-e", "1", FMA_QUERY, ANI_CLI_MENU="/nonexistent/menu", PATH=path)
    assert res.returncode == 0, res.stderr


def test_the_menu_is_asked_when_a_choice_is_missing(sim: Sim) -> None:
    menu = fake_program(sim.root / "bin", "menu", 'echo "asked: $*" >&2; exit 1')
    res = sim.run("-e", "1", FMA_QUERY, ANI_CLI_MENU=str(menu))
    assert (res.returncode, res.stderr) == (1, "asked: Select anime: \n" + red("Invalid anime selection"))
    res = sim.run("-S", "1", FMA_QUERY, ANI_CLI_MENU=str(menu))
    assert (res.returncode, res.stderr) == (1, "asked: Select episode: \n" + red("Invalid episode selection"))


def test_without_term_every_tput_complains(sim: Sim) -> None:
    noise = "tput: No value for $TERM and no -T specified\n"
    res = sim.run("-S", "1", "-e", "99", FMA_QUERY, TERM=None)
    assert (res.returncode, res.stderr) == (1, red("Invalid episode!"))  # dies before tput
    sim.catalog([{"title": "FMA", "episodes": 3, "episode_behaviour": {"2": {"fail": "Nope"}}}])
    res = sim.run("-S", "1", "-e", "2", FMA_QUERY, TERM=None)
    assert (res.returncode, res.stderr) == (1, noise * 2 + red("Nope"))
    res = sim.run("-S", "1", "-e", "2", FMA_QUERY, TERM="dumb")
    assert (res.returncode, res.stderr) == (1, red("Nope"))


@pytest.mark.parametrize("title, catalog_query, found", [
    ("[Oshi no Ko]", "[Oshi no Ko]", False),  # curl: bad range in URL
    ("Oshi no Ko", "[Oshi no Ko]", True),  # the site's search ignores punctuation
    ("Steins;Gate #2", "Steins;Gate 2", False),  # '#' starts the fragment: "Steins;Gate "
    ("Kiss & Tell", "Kiss & Tell", False),  # '&' ends q: "Kiss "
    ("Kiss Tell", "Kiss & Tell", True),
    ("Ep %41", "Ep %41", False),  # the site decodes %41: "Ep A"
    ("{Show}", "Show", True),  # a set of one: curl fetches "Show"
    ("[Show]", "Show", False),  # not a range: curl refuses the URL
])
def test_the_query_goes_through_curl_and_the_url(sim: Sim, title: str, catalog_query: str,
                                                 found: bool) -> None:
    sim.catalog([{"title": "Site Title", "episodes": 1}], query=catalog_query)
    res = sim.run("-S", "1", "-e", "1", title)
    assert (res.returncode == 0) is found, res.stderr
    if not found:
        assert res.stderr == red("No results found!")


def test_a_slash_in_the_site_title_makes_a_subdirectory(sim: Sim) -> None:
    sim.catalog([{"title": "Fate/Zero", "episodes": 2}], query="Fate/Zero")
    res = sim.run("-S", "1", "-e", "2", "Fate/Zero")
    assert res.returncode == 0, res.stderr
    assert (sim.dl / "Fate" / "Zero Episode 2.mp4").stat().st_size == 1024


@pytest.mark.parametrize("select", ["3", "0", "-1", "abc", ""])
def test_select_out_of_range(sim: Sim, select: str) -> None:
    res = sim.run("-S", select, "-e", "1", FMA_QUERY)
    assert (res.returncode, res.stderr) == (1, red("Invalid anime selection"))
    assert sim.files() == []


def test_unknown_flags_are_query_words(sim: Sim) -> None:
    sim.catalog([{"title": "X", "episodes": 1}], query="--frobnicate naruto")
    res = sim.run("--frobnicate", "-S", "1", "--dub", "-e", "1", "naruto",
                  "--skip", "--no-detach", "--exit-after-play", "-c", "-v")
    assert res.returncode == 0, res.stderr
    assert sim.events("end")[0]["query"] == "--frobnicate naruto"


@pytest.mark.parametrize("args, message", [
    (["-S", "1", FMA_QUERY], "Invalid episode selection"),
    (["-S", "1", "-e", "", FMA_QUERY], "Invalid episode selection"),
    (["-S", "1", "-e", "abc", FMA_QUERY], "Invalid episode!"),
    (["-S", "1", "-e", "1-3", FMA_QUERY], "Invalid range!"),
    (["-S", "1", "-e", "52", FMA_QUERY], "Invalid episode!"),
    (["-S", "1", "-e", "0", FMA_QUERY], "Invalid episode!"),
    (["-S", "1", "-e", "01", FMA_QUERY], "Invalid episode!"),
    (["-S", "1", FMA_QUERY, "-e"], "missing argument!"),
])
def test_episode_and_argument_errors(sim: Sim, args: List[str], message: str) -> None:
    res = sim.run(*args)
    assert (res.returncode, res.stderr) == (1, red(message))
    assert sim.files() == []


def test_an_empty_query_asks_the_menu_and_exits_1_in_silence(sim: Sim) -> None:
    """Line 546: with a menu other than fzf the query comes from the menu; none: exit 1."""
    res = sim.run("-S", "1", "-e", "1")
    assert (res.returncode, res.stderr) == (1, "")


def test_quality_warning_goes_on(sim: Sim) -> None:
    res = sim.run("-q", "4k", "-S", "1", "-e", "1", FMA_QUERY)
    assert res.returncode == 0
    assert res.stderr == "4k not found, defaulting to best\n"
    res = sim.run("-q", "720", "-S", "1", "-e", "2", FMA_QUERY)
    assert (res.returncode, res.stderr) == (0, "")
    assert len(sim.files()) == 2


def test_no_file(sim: Sim) -> None:
    sim.catalog([{"title": "FMA", "episodes": 3, "behaviour": {"no_file": True}}])
    res = sim.run("-S", "1", "-e", "1", FMA_QUERY)
    assert res.returncode == 0
    assert "\r[download]" in res.stdout
    assert res.stderr.startswith("ERROR:")
    assert sim.files() == []
    assert sim.events("end")[0]["outcome"] == "no_file"


def test_enospc(sim: Sim) -> None:
    sim.catalog([{"title": "FMA", "episodes": 3,
                  "behaviour": {"size": 10_000, "chunk": 1000, "enospc_after": 4_500}}])
    res = sim.run("-S", "1", "-e", "1", FMA_QUERY)
    assert res.returncode == 0
    assert res.stderr == ("ERROR: unable to write data: "
                          "[Errno 28] No space left on device\n")
    assert sim.files() == ["FMA Episode 1.mp4.part"]
    assert (sim.dl / "FMA Episode 1.mp4.part").stat().st_size == 4_500
    end = sim.events("end")[0]
    assert (end["outcome"], end["bytes"], end["exit_code"]) == ("enospc", 4_500, 0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_trapped_signal_exits_1_without_a_message_leaving_part(sim: Sim, signum: int) -> None:
    """trap 'cleanup; exit 1' INT HUP TERM (line 522): exit 1, not 128+N, and no die()."""
    sim.catalog([{"title": "FMA", "episodes": 3, "behaviour": {"size": 4096, "hang": True}}])
    proc = subprocess.Popen([str(SIM), "-S", "1", "-e", "1", FMA_QUERY], env=sim.env(TERM=None),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    sim.procs.append(proc)
    part = sim.dl / "FMA Episode 1.mp4.part"
    wait_for(lambda: part.exists() and part.stat().st_size == 2048)
    proc.send_signal(signum)
    assert proc.wait(timeout=5) == 1
    noise = "tput: No value for $TERM and no -T specified\n"
    assert proc.stderr.read().decode() == noise * 3  # cuu1, sc, then the trap's sgr0
    assert sim.files() == ["FMA Episode 1.mp4.part"]
    end = sim.events("end")[0]
    assert (end["outcome"], end["exit_code"], end["bytes"]) == ("terminated", 1, 2048)


def test_sigterm_to_the_script_alone_waits_for_its_downloader(sim: Sim) -> None:
    """sh runs a trap only once the foreground command has ended: yt-dlp goes on."""
    marker = sim.root / "downloader-done"
    fake_program(sim.root / "bin", "yt-dlp", 'sleep 1; printf x > "%s"; exit 1' % marker)
    fake_program(sim.root / "bin", "ffmpeg", "exit 1")
    sim.catalog([{"title": "T", "episodes": 1, "behaviour": {"hls_url": "http://h/{episode}.m3u8"}}])
    path = "%s%s%s" % (sim.root / "bin", os.pathsep, sim.env()["PATH"])
    proc = sim.popen("-S", "1", "-e", "1", FMA_QUERY, PATH=path)
    wait_for(lambda: sim.events("exec"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 1
    assert marker.exists(), "the script exited before its downloader"
    assert [e["cmd"][0] for e in sim.events("exec")] == ["yt-dlp"]  # no ffmpeg fallback


def test_hostile_title_is_literal(sim: Sim) -> None:
    title = HOSTILE + "\nsecond line"
    sim.catalog([{"title": title, "episodes": 3}], query=HOSTILE)
    hist = sim.root / "hist"
    res = sim.run("-S", "1", "-e", "2", HOSTILE, ANI_CLI_HIST_DIR=str(hist))
    assert res.returncode == 0, res.stderr
    assert sim.files() == ["%s Episode 2.mp4" % title]
    assert list(sim.root.rglob("pwned*")) == []
    # Word splitting of the query does not matter, case neither.
    res = sim.run("-S", "1", "-e", "3", *HOSTILE.upper().split(), ANI_CLI_HIST_DIR=str(hist))
    assert res.returncode == 0, res.stderr
    assert list(sim.root.rglob("pwned*")) == []
    lines = (hist / "ani-hsts").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("2\t") and lines[0].endswith("\t" + HOSTILE)
    assert sim.events("end")[0]["title"] == title


def test_hls_url_runs_ytdlp_then_ffmpeg(sim: Sim) -> None:
    """The code path only, with fake yt-dlp (fails) and ffmpeg (writes the file)."""
    bin_dir = sim.root / "bin"
    bin_dir.mkdir()
    sim.dl.mkdir()  # ani-cli does not create it; yt-dlp would, ffmpeg does not
    for name, body in [("yt-dlp", "exit 1"),
                       ("ffmpeg", 'printf x > "${10}"')]:
        script = bin_dir / name
        script.write_text('#!/bin/sh\nprintf "%%s\\n" "$@" > "%s/%s.args"\n%s\n'
                          % (sim.root, name, body))
        script.chmod(0o755)
    sim.catalog([{"title": "T", "episodes": 2,
                  "behaviour": {"hls_url": "http://h/{episode}/index.m3u8"}}])
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable),
                            os.environ.get("PATH", "")])
    res = sim.run("-S", "1", "-e", "2", FMA_QUERY, PATH=path,
                  ANI_CLI_PLAYER_FLAGS="--limit-rate 1M")
    assert res.returncode == 0, res.stderr
    out = str(sim.dl / "T Episode 2.mp4")
    url = "http://h/2/index.m3u8"
    # Only the first word of ANI_CLI_PLAYER_FLAGS reaches the downloader ($3, line 300)
    assert (sim.root / "yt-dlp.args").read_text().splitlines() == [
        url, "--no-skip-unavailable-fragments", "--fragment-retries", "infinite",
        "-N", "16", "-o", out, "--limit-rate"]
    assert (sim.root / "ffmpeg.args").read_text().splitlines() == [
        "-extension_picky", "0", "-loglevel", "error", "-stats", "-i", url,
        "-c", "copy", out, "--limit-rate"]
    assert [e["cmd"][0] for e in sim.events("exec")] == ["yt-dlp", "ffmpeg"]
    assert Path(out).read_bytes() == b"x"
    end = sim.events("end")[0]
    assert (end["outcome"], end["bytes"], end["path"]) == ("ok", 1, out)


def test_video_writes_a_clip_that_verification_accepts(sim: Sim) -> None:
    """Behaviour ``video`` (the README's recipe with verify and remux on): a real MP4,
    not counted bytes, that the worker's own verification accepts as 2 s of video."""
    from services.worker.verify import verify_video

    sim.catalog([{"title": FMA_SITE, "episodes": 3, "behaviour": {"video": 2}}])
    res = sim.run("-S", "1", "-e", "2", FMA_QUERY, timeout=60,
                  ANI_CLI_SIM_STATE=str(sim.root / "state"))
    assert res.returncode == 0, res.stderr
    info = verify_video(sim.dl / ("%s Episode 2.mp4" % FMA_SITE))
    assert info.has_video and info.has_audio
    assert abs(info.duration_seconds - 2.0) < 0.2
    assert [p.name for p in (sim.root / "state" / ".sim-media").iterdir()] == ["clip-2s.mp4"]
