"""anime-ctl's command line: each command's request, and a bad argument's one line and exit 2
(the whole console script runs against a running system in tests/integration/test_ctl.py)."""

from __future__ import annotations

import pytest

from services import ctl
from services.controls import parse, request
from shared.protocol import ControlReply


@pytest.mark.parametrize("argv,kind,fields", [
    (["pause"], "control.pause", {"duration_seconds": None, "now": False}),
    (["pause", "--for", "90m", "--now"], "control.pause", {"duration_seconds": 5400.0, "now": True}),
    (["-c", "x.toml", "resume"], "control.resume", {}),
    (["retry", "--failed"], "control.retry", {"failed": True, "job_ids": [], "anime_id": None}),
    (["retry", "--job", "3", "4"], "control.retry", {"failed": False, "job_ids": [3, 4], "anime_id": None}),
    (["retry", "--anime-id", "5114", "--json"], "control.retry",
     {"failed": False, "job_ids": [], "anime_id": 5114}),
    (["cancel", "--job", "12"], "control.cancel", {"job_id": 12}),
    (["priority", "--anime-id", "5114", "high"], "control.priority",
     {"anime_id": 5114, "job_id": None, "priority": 10}),
    (["priority", "--job", "7", "-3"], "control.priority", {"anime_id": None, "job_id": 7, "priority": -3}),
    (["bandwidth", "0"], "control.bandwidth", {"mbps": 0.0}),
    (["bandwidth", "12.5", "-c", "y.toml"], "control.bandwidth", {"mbps": 12.5}),
])
def test_each_command_is_its_request(argv, kind, fields):
    args = ctl.build_parser().parse_args(argv)
    parsed = parse(args.command, ctl.body_of(args))
    assert parsed == fields
    msg = request(args.command, parsed, ctl.SOURCE)
    assert (msg.KIND, msg.source) == (kind, "anime-ctl")


@pytest.mark.parametrize("argv,words", [
    (["pause", "--for", "soon"], "anime-ctl: --for: must be a duration such as 30s, 90m or 2h, got 'soon'"),
    (["pause", "--for", "0"], "anime-ctl: --for: must be longer than 0"),
    (["retry"], "one of the arguments --failed --job --anime-id is required"),
    (["retry", "--job", "x"], "argument --job: must be a positive whole number, got 'x'"),
    (["cancel"], "the following arguments are required: --job"),
    (["priority", "--anime-id", "1", "urgent"], "must be high, normal, low or a whole number, got 'urgent'"),
    (["bandwidth", "-1"], "MBPS: must be a number of megabits per second, 0 for unlimited, got '-1'"),
    (["bandwidth", "fast"], "got 'fast'"),
    (["--timeout", "0", "resume"], "--timeout: must be greater than 0, got 0.0"),
    (["explode"], "invalid choice: 'explode'"),
])
def test_a_bad_argument_is_one_line_naming_it_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        ctl.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.splitlines()[-1].startswith("anime-ctl: ")


def test_the_exit_code_follows_the_reply():
    assert ctl.exit_code(ControlReply(ok=True, message="ok")) == 0
    assert ctl.exit_code(ControlReply(ok=False, message="busy", result={"error": "unavailable"})) == 1
    for error in ("bad_argument", "not_found", "conflict"):
        assert ctl.exit_code(ControlReply(ok=False, message="no", result={"error": error})) == 2


def test_the_control_endpoint_is_ipc_in_run_by_default(tmp_path):
    from shared.config import load_config
    from tests.system import BASE_CONFIG, render_toml

    path = tmp_path / "config.toml"
    path.write_text(render_toml(BASE_CONFIG))
    config = load_config(path)
    assert config.zmq.control == f"ipc://{config.run_dir / 'control.sock'}"
    path.write_text(render_toml({**BASE_CONFIG, "zmq": {"control": "tcp://127.0.0.1:5599"}}))
    assert load_config(path).zmq.control == "tcp://127.0.0.1:5599"
    path.write_text(render_toml({**BASE_CONFIG, "zmq": {"control": "udp://x"}}))
    with pytest.raises(Exception, match=r"\[zmq\] control: must start with ipc:// or tcp://"):
        load_config(path)
