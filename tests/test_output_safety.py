"""OUT is never lost or clobbered: crash-safe --force, one writer per OUT, no-replace renames, one line for
output-side OS errors, and the command-line contracts around them.

The crash and concurrency tests run real `awqpad pad` subprocesses and stop them at a named point with
the test-only hook AWQPAD_TEST_PAUSE_AT (see awqpad/execute/atomic.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from awqpad.errors import OutputError
from awqpad.example import make_example
from awqpad.execute.atomic import output_os_error, rename_noreplace
from test_security import cli, one_line_error, snapshot

ENV = {k: v for k, v in os.environ.items() if k != "AWQPAD_DEBUG"}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_example(tmp_path_factory.mktemp("good") / "tiny")


def start(*args, pause: str, resume: Path) -> subprocess.Popen:
    """`awqpad pad ARGS` in a subprocess, returned once it reports it is paused at `pause`."""
    env = {**ENV, "AWQPAD_TEST_PAUSE_AT": pause, "AWQPAD_TEST_RESUME": str(resume)}
    proc = subprocess.Popen([sys.executable, "-m", "awqpad", *map(str, args)], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if f"paused at {pause}" in line or proc.poll() is not None:
            break
    assert f"paused at {pause}" in line, (line, proc.poll())
    return proc


def recorded_tp(out: Path) -> list[int]:
    return json.loads((out / "awqpad.json").read_text())["tp"]


def test_force_killed_between_the_renames_keeps_the_old_out(good, tmp_path):
    out = tmp_path / "out"
    assert cli("pad", good, out, "--tp", "2", "--quiet")[0] == 0
    before = snapshot(out)
    proc = start("pad", good, out, "--tp", "4", "--force", pause="force-swap", resume=tmp_path / "never")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not out.exists()  # the dangerous moment: OUT moved aside, the new one not yet in place
    stranded = [p for p in tmp_path.iterdir() if ".awqpad-old-" in p.name]
    assert len(stranded) == 1
    # The next run, whatever it is asked, first puts the old OUT back.
    code, _, err = cli("pad", good, out, "--tp", "4")
    assert code == 4 and "restored" in err and err.strip().splitlines()[-1].endswith("pass --force to replace it")
    assert snapshot(out) == before and recorded_tp(out) == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # And --force then completes the replacement.
    assert cli("pad", good, out, "--tp", "4", "--force", "--quiet")[0] == 0
    assert recorded_tp(out) == [4]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_terminated_between_the_renames_puts_the_old_out_back_at_once(good, tmp_path):
    out = tmp_path / "out"
    assert cli("pad", good, out, "--tp", "2", "--quiet")[0] == 0
    before = snapshot(out)
    proc = start("pad", good, out, "--tp", "4", "--force", pause="force-swap", resume=tmp_path / "never")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 4
    err = proc.stderr.read()
    proc.stderr.close()
    assert "interrupted" in err and "Traceback" not in err
    assert snapshot(out) == before and recorded_tp(out) == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_second_run_into_the_same_out_is_refused_while_the_first_holds_it(good, tmp_path):
    out = tmp_path / "out"
    resume = tmp_path / "resume"
    first = start("pad", good, out, "--tp", "2", pause="install", resume=resume)
    try:
        one_line_error(cli("pad", good, out, "--tp", "4", "--force"), 4, "another awqpad run")
    finally:
        resume.touch()
        assert first.wait(120) == 0
        first.stderr.close()
    assert recorded_tp(out) == [2]


def test_out_that_appears_meanwhile_is_not_replaced(good, tmp_path):
    out = tmp_path / "out"
    resume = tmp_path / "resume"
    proc = start("pad", good, out, "--tp", "2", pause="install", resume=resume)
    out.mkdir()  # someone else's (empty) directory: plain rename(2) would silently replace it
    (tmp_path / "resume").touch()
    assert proc.wait(120) == 4
    err = proc.stderr.read()
    proc.stderr.close()
    assert "appeared while this run was writing" in err and "Traceback" not in err
    assert out.is_dir() and not list(out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_leftover_of_a_killed_run_is_removed_even_if_its_pid_is_reused(good, tmp_path):
    out = tmp_path / "out"
    proc = start("pad", good, out, "--tp", "2", pause="install", resume=tmp_path / "never")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    partials = [p for p in tmp_path.iterdir() if ".awqpad-partial-" in p.name]
    assert partials
    # The pre-lock scheme named partials by PID and kept any whose PID was alive; PID 1 always is.
    legacy = tmp_path / ".out.awqpad-partial-1"
    shutil.copytree(partials[0], legacy)
    code, _, err = cli("pad", good, out, "--tp", "2")
    assert code == 0, err
    assert "removed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "resume"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_rename_noreplace_refuses_an_existing_empty_directory(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").is_dir()
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not (tmp_path / "a").exists()


# --- output-side OS errors: exit 4, one line ------------------------------------------------------


def test_overlong_out_name_is_an_output_error(good, tmp_path):
    one_line_error(cli("pad", good, tmp_path / ("x" * 300), "--tp", "4"), 4, "too long")


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "disk full"), (errno.EDQUOT, "disk full"), (errno.EROFS, "read-only"),
    (errno.EACCES, "permission denied"), (errno.ENAMETOOLONG, "too long"), (errno.EIO, "I/O error"),
])
def test_output_os_errors_read_as_one_line(code, words):
    err = output_os_error(OSError(code, os.strerror(code), "/out/x.json"), "/out")
    assert isinstance(err, OutputError) and err.exit_code == 4
    assert err.message.startswith("/out/x.json: ") and words in err.message and "\n" not in err.message


def test_read_only_parent_is_exit_4(good, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through permissions")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        one_line_error(cli("pad", good, parent / "out", "--tp", "4"), 4, "permission denied")
    finally:
        parent.chmod(0o755)


def test_dangling_symlink_out_names_the_symlink(good, tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    one_line_error(cli("pad", good, out, "--tp", "4"), 4, "dangling symlink")
    assert out.is_symlink()


# --- contracts -------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", ["0", "-1", "abc"])
def test_bad_tp_is_one_line(good, tmp_path, tp):
    proc = subprocess.run([sys.executable, "-m", "awqpad", "plan", str(good), "--tp", tp], capture_output=True,
                          text=True, env=ENV, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("awqpad: error: ") and "--tp" in lines[0], proc.stderr


def test_unsupported_layout_is_exit_2_in_plan_and_pad(good, tmp_path):
    """Exit 2, not 3 (blocked): the decision is recorded on errors.UnsupportedError and in the README."""
    src = tmp_path / "src"
    shutil.copytree(good, src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = cli("pad", src, tmp_path / "out", "--tp", "4")
    assert code == 2 and "not supported" in err, (code, err)
    assert cli("plan", src, "--tp", "4")[0] == 2
