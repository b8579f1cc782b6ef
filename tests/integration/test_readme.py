"""The README, followed as a newcomer would (issue 20).

The commands are not copied here: they are read from the README's fenced blocks, each
marked by an HTML comment ``<!-- readme-test: NAME -->`` on the line before it, and run
as written, in a shell whose HOME is a temporary directory. Two placeholders are
replaced, both named in the README's text: ``<clone>`` (where the clone is: this tree)
and ``/mnt/anime`` (the external disk's mount point: a temporary directory). A TOML
block is applied to the config file as the README asks (those keys set in those
sections), the way a user edits it.

The second test runs every ``anime-downloader --supervisorctl`` example of the README
against a running instance and checks that each does what its line says.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from shared.config import load_config
from tests.system import BIN, REPO, System, wait_for

pytestmark = pytest.mark.slow

README = REPO / "README.md"
MARKED = re.compile(r"^<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)^```$", re.S | re.M)
FENCED = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
CLONE = "<clone>"
DISK = "/mnt/anime"
EPISODES = ("ep001.mkv", "ep002.mkv", "ep003.mkv")


def marked_blocks() -> dict[str, tuple[str, str]]:
    text = README.read_text()
    found = {name: (lang, body) for name, lang, body in MARKED.findall(text)}
    assert set(found) >= {"setup", "config", "enqueue", "run", "watch", "sim-config",
                          "sim-catalog"}, sorted(found)
    return found


class Reader:
    """A user at a shell: HOME in a temp dir, no venv active, the README's blocks run as
    written (placeholders replaced), and the shell's variables and directory kept from
    one block to the next."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.disk = root / "disk"  # the external disk, mounted
        self.home.mkdir()
        self.disk.mkdir()
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != BIN]
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("ANI_CLI", "VIRTUAL_ENV", "PYTHON"))}
        self.env.update(HOME=str(self.home), PATH=os.pathsep.join(path))
        self.cwd = REPO  # "From the clone"
        self.blocks = marked_blocks()
        self.fresh = (dict(self.env), self.home)  # a new terminal: this env, in HOME

    def text(self, name: str) -> str:
        return self.blocks[name][1].replace(CLONE, str(REPO)).replace(DISK, str(self.disk))

    def shell(self, name: str, timeout: float = 60, new_terminal: bool = False
              ) -> subprocess.CompletedProcess:
        """Run block ``name`` in bash; keep its environment and directory. In a
        ``new_terminal``: from the login environment, in HOME."""
        assert self.blocks[name][0] == "bash", name
        if new_terminal:
            self.env, self.cwd = dict(self.fresh[0]), self.fresh[1]
        state = self.home / ".readme-test-state"
        script = f"set -e\n{self.text(name)}\nenv -0 > {shlex.quote(str(state))}.env\n" \
                 f"pwd > {shlex.quote(str(state))}.pwd\n"
        done = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env, text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"README block {name!r} failed:\n{done.stdout}\n{done.stderr}"
        raw = Path(f"{state}.env").read_bytes().split(b"\0")
        self.env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        self.cwd = Path(Path(f"{state}.pwd").read_text().strip())
        return done

    def spawn(self, name: str) -> subprocess.Popen:
        """A block that runs in the foreground until Ctrl-C, in a terminal of its own."""
        log = open(self.home / f".{name}.out", "wb")
        return subprocess.Popen(["bash", "-c", self.text(name)], cwd=self.cwd, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def output(self, name: str) -> str:
        return (self.home / f".{name}.out").read_text(errors="replace")

    def edit(self, config: Path, name: str) -> None:
        """Set the block's keys in their sections of ``config``, as a user edits it."""
        assert self.blocks[name][0] == "toml", name
        lines = config.read_text().splitlines()
        section = None
        for raw in self.text(name).splitlines():
            line = raw.split(" #")[0].strip()
            if not line:
                continue
            if line.startswith("["):
                section = line
                continue
            key = line.split("=", 1)[0].strip()
            start = lines.index(section) + 1
            end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
            at = next((i for i in range(start, end) if re.match(rf"#?\s*{re.escape(key)}\s*=", lines[i])),
                      None)
            if at is None:
                lines.insert(start, line)
            else:
                lines[at] = line
        config.write_text("\n".join(lines) + "\n")


def stages(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(conn.execute("SELECT stage, COUNT(*) FROM jobs GROUP BY stage"))
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


@pytest.fixture
def system():
    made = System()  # for its temporary root and its clean-up of whatever runs under it
    yield made
    made.cleanup()


def test_your_own_setup_with_the_simulated_ani_cli_as_the_readme_says(system) -> None:
    from services.worker.verify import verify_video

    user = Reader(system.root)
    user.shell("setup")
    config = user.home / "anime" / "config.toml"
    assert user.cwd == config.parent and config.is_file()
    user.edit(config, "config")
    user.edit(config, "sim-config")  # "Try it without ani-cli or the network"
    user.shell("sim-catalog")
    queued = user.shell("enqueue")
    assert "queued 3 episode(s) of MAL ID 1" in queued.stdout and queued.stderr == ""

    launcher = user.spawn("run")
    episodes = user.disk / "videos" / "1" / "episodes"
    db = config.parent / "data" / "jobs.db"
    try:
        wait_for(lambda: stages(db).get("downloaded") == 3, 120,
                 f"the README's three episodes to land; the launcher said:\n{user.output('run')[-3000:]}")
        # the dispatcher's counts follow its writes within a second (docs/status-json.md)
        def counted() -> bool:
            answer = subprocess.run([str(BIN / "anime-status"), "-c", str(config), "--json"],
                                    capture_output=True, text=True, timeout=30)
            return answer.returncode == 0 and json.loads(answer.stdout)["queue"]["downloaded"] == 3
        wait_for(counted, 10, "anime-status to count the three episodes")
        watched = user.shell("watch", new_terminal=True)  # "from another terminal"
    finally:
        os.killpg(launcher.pid, signal.SIGINT)  # "Stop with Ctrl-C"
        code = launcher.wait(timeout=60)
    assert code == 0, user.output("run")[-3000:]
    assert "summary: downloaded=3, failed=0, still_queued=0, waiting_for_selection=0" \
        in user.output("run")
    assert "CRIT" not in user.output("run")

    # what the user watched: the status, the programs, the episodes
    assert "anime-downloader at " in watched.stdout
    assert "3 downloaded, 0 failed" in watched.stdout, watched.stdout
    # (not "web": the README's config listens on the fixed 127.0.0.1:8766, which another
    # installation on this machine may hold; the next test checks it on a free port)
    for program in ("disk-watcher", "dispatcher", "worker:worker_01", "worker:worker_05"):
        assert re.search(rf"^{re.escape(program)}\s+RUNNING", watched.stdout, re.M), watched.stdout
    assert all(name in watched.stdout.split() for name in EPISODES), watched.stdout
    # real, playable episodes, remuxed as the defaults say, none retried
    assert sorted(p.name for p in episodes.iterdir()) == list(EPISODES)
    info = verify_video(episodes / "ep001.mkv")
    assert info.container.startswith("matroska") and abs(info.duration_seconds - 2.0) < 0.3
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT SUM(retry_count) FROM jobs").fetchone() == (0,)
    finally:
        conn.close()


def supervisorctl_examples() -> list[str]:
    """Every ``--supervisorctl`` example of the README, in order, with the lines of its
    block around it (the scaling block edits the conf first); the marked blocks are the
    first test's."""
    text = README.read_text()
    marked = {body for _, _, body in MARKED.findall(text)}
    lines = []
    for lang, body in FENCED.findall(text):
        if lang == "bash" and "--supervisorctl" in body and body not in marked:
            lines += [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
    return lines


def subcommand(line: str) -> str:
    words = shlex.split(line, comments=True)
    return words[words.index("--supervisorctl") + 1] if "--supervisorctl" in words else words[0]


def test_every_supervisorctl_example_of_the_readme(system) -> None:
    lines = supervisorctl_examples()
    assert {subcommand(line) for line in lines} >= {"status", "stop", "start", "restart", "update"}
    env = dict(system.env(), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")

    def run(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], cwd=system.root, env=env, text=True,
                              capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

    not_running = run(next(line for line in lines if subcommand(line) == "status"))
    assert not_running.returncode == 1
    assert not_running.stderr.startswith("anime-downloader: no supervisord is running for ")

    system.start_supervisord(2)
    wait_for(lambda: all(i["statename"] == "RUNNING" for i in system.rpc().supervisor.getAllProcessInfo()),
             30, "every program to run")

    def states(group: str = "worker") -> set[str]:
        return {i["statename"] for i in system.rpc().supervisor.getAllProcessInfo() if i["group"] == group}

    for line in lines:
        what = subcommand(line)
        before = system.process_info("dispatcher")["pid"]
        done = run(line)
        assert done.returncode == 0, (line, done.stdout, done.stderr)
        if what == "status":
            for program in ("disk-watcher", "dispatcher", "web", "worker:worker_01", "worker:worker_02"):
                assert re.search(rf"^{re.escape(program)}\s+RUNNING", done.stdout, re.M), done.stdout
        elif what == "stop":
            assert states() == {"STOPPED"}
        elif what == "start":
            assert states() == {"RUNNING"}
        elif what == "restart":
            info = system.process_info("dispatcher")
            assert info["statename"] == "RUNNING" and info["pid"] != before
        elif what == "tail":
            assert "worker started" in done.stdout, done.stdout
        elif what == "sed":
            conf = configparser.RawConfigParser(strict=False)
            conf.read(system.data / "run" / "supervisord.conf")
            wanted = int(conf.get("program:worker", "numprocs"))
            assert wanted > 2
        elif what == "update":
            wait_for(lambda: len([i for i in system.rpc().supervisor.getAllProcessInfo()
                                  if i["group"] == "worker" and i["statename"] == "RUNNING"]) == wanted,
                     30, f"{wanted} workers after update")
        else:
            raise AssertionError(f"the README has a supervisorctl example this test does not "
                                 f"check yet: {line!r}")


def test_the_repos_own_supervisord_conf_uses_the_socket_that_supervisorctl_finds() -> None:
    """Run directly from the repo (supervisord -c supervisord.conf), supervisord listens
    where ``anime-downloader -c config.toml --supervisorctl`` looks: the socket in the
    repo config's run directory."""
    conf = configparser.RawConfigParser(strict=False)
    conf.read(REPO / "supervisord.conf")
    socket = conf.get("unix_http_server", "file").replace("%(here)s", str(REPO))
    assert Path(socket) == load_config(REPO / "config.toml").run_dir / "supervisor.sock"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_inside_the_readme_leads_to_a_heading() -> None:
    text = README.read_text()
    headings = {anchor(h) for h in re.findall(r"^#{1,6} (.+)$", FENCED.sub("", text), re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= headings, sorted(links - headings)
