"""`awqpad pad` as a user runs it: refusals, re-runs, interruptions, full disks. Real files, real processes."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.factory import Model, Quant, build_checkpoint

BASE = dict(hidden=512, heads=8, kv_heads=4, head_dim=64)


def awqpad(*args, **kw):
    return subprocess.run([sys.executable, "-m", "awqpad", *map(str, args)], capture_output=True, text=True, **kw)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    build_checkpoint(root / "src", Model("qwen2", **BASE), Quant("awq", sym=False), shards=3)
    return root / "src"


def test_pad_then_rerun_is_a_clean_noop(src, tmp_path):
    before = tree_hash(src)
    proc = awqpad("pad", src, tmp_path / "out", "--tp", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "padded" and result["plan"]["dims"]["intermediate_size"]["padded"] == 2560
    again = awqpad("pad", tmp_path / "out", tmp_path / "out2", "--tp", "4")
    assert again.returncode == 0 and "already padded" in again.stdout
    # Issue 16: OUT is always produced (`awqpad pad A B && vllm serve B`), as hard links on one filesystem,
    # and its awqpad.json keeps the padding record of the bytes it holds, marked as needing no padding.
    out, out2 = tmp_path / "out", tmp_path / "out2"
    for shard in out.glob("*.safetensors"):
        assert (out2 / shard.name).stat().st_ino == shard.stat().st_ino
    record = json.loads((out2 / "awqpad.json").read_text())
    assert record["status"] == "already padded" and record["padding_needed"] is False
    assert record["ops"] == json.loads((out / "awqpad.json").read_text())["ops"] != []
    for path in out.iterdir():
        if path.name != "awqpad.json":
            assert (out2 / path.name).read_bytes() == path.read_bytes(), path.name
    assert tree_hash(src) == before


def test_nothing_to_do_when_tp_already_works(src, tmp_path):
    proc = awqpad("pad", src, tmp_path / "out", "--tp", "1", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "nothing to do"
    out = tmp_path / "out"
    for name in ["config.json", *(p.name for p in src.glob("*.safetensors"))]:
        assert (out / name).read_bytes() == (src / name).read_bytes()
        assert (out / name).stat().st_ino == (src / name).stat().st_ino  # a hard link, not a copy
    record = json.loads((out / "awqpad.json").read_text())
    assert record["padding_needed"] is False and record["status"] == "nothing to do" and record["ops"] == []


def test_existing_out_is_refused_without_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = awqpad("pad", src, out, "--tp", "2")
    assert proc.returncode == 4 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    proc = awqpad("pad", src, out, "--tp", "2", "--force", "--quiet")
    assert proc.returncode == 0 and proc.stdout == ""
    assert not (out / "keep.txt").exists() and (out / "awqpad.json").exists()


def test_out_inside_src_is_refused(src):
    proc = awqpad("pad", src, src / "padded", "--tp", "2")
    assert proc.returncode == 4 and "never writes into the source" in proc.stderr
    assert not (src / "padded").exists()


def test_blocked_tp_exits_3_and_writes_nothing(src, tmp_path):
    proc = awqpad("pad", src, tmp_path / "out", "--tp", "16")
    assert proc.returncode == 3, proc.stderr
    assert "8 attention heads do not split over 16 GPUs" in proc.stderr
    assert not (tmp_path / "out").exists()


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_leaves_no_output(src, tmp_path):
    """RLIMIT_FSIZE makes writes past 1 MB fail with EFBIG, as a full disk fails with ENOSPC."""
    before = tree_hash(src)
    proc = awqpad("pad", src, tmp_path / "out", "--tp", "4", preexec_fn=_limit_file_size(1 << 20))
    assert proc.returncode == 4, (proc.returncode, proc.stderr)
    assert "disk full or file size limit" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
    assert tree_hash(src) == before


def test_not_enough_free_space_is_refused_before_writing(src, tmp_path):
    """A tmpfs smaller than the output: refused up front with the numbers."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = awqpad("pad", src, mount / "out", "--tp", "4")
        assert proc.returncode == 4 and "not enough free space" in proc.stderr and "GB free" in proc.stderr
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_mid_write_leaves_nothing_that_looks_complete(tmp_path, sig):
    big = tmp_path / "big"
    build_checkpoint(big, Model("qwen2", hidden=1024, heads=8, kv_heads=4, head_dim=128, intermediate=2432 * 4 + 128 * 3, layers=6,
                                vocab=8000), Quant("awq", sym=False), shards=4, data=False)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "awqpad", "pad", str(big), str(out), "--tp", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 30
    while time.time() < deadline and not list(tmp_path.glob(".out.awqpad-partial-*")):
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(30)
    if proc.returncode == 0:
        pytest.skip("pad finished before the signal arrived")
    assert not out.exists()
    if sig != signal.SIGKILL:
        assert proc.returncode == 4
        assert "interrupted; the partial output was removed" in proc.stderr.read().decode()
        assert not list(tmp_path.glob(".out.awqpad-partial-*"))
    else:
        # the next run cleans the leftover of a SIGKILLed run and succeeds
        rerun = awqpad("pad", big, out, "--tp", "4")
        assert rerun.returncode == 0, rerun.stderr
        assert "partial output of an interrupted run" in rerun.stderr
        assert not list(tmp_path.glob(".out.awqpad-partial-*"))
