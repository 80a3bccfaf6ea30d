"""`python -m awqpad.example`: a real CLI (help, one positional OUT, --force), atomic, idempotent when re-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.factory import load_tensors

REPO = Path(__file__).resolve().parent.parent


def example(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "awqpad.example", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_help_prints_usage_and_writes_nothing(tmp_path):
    for flag in ("--help", "-h"):
        r = example(flag, cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.startswith("usage: python -m awqpad.example"), r
        assert "OUT" in r.stdout and "--force" in r.stdout
    assert list(tmp_path.iterdir()) == []  # no folder named --help


def test_usage_errors_exit_2(tmp_path):
    for args in ((), ("a", "b"), ("--bogus", "a")):
        r = example(*args, cwd=tmp_path)
        assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr, (args, r)
    assert list(tmp_path.iterdir()) == []


def test_writes_a_checkpoint_that_needs_padding(tmp_path):
    r = example("models/tiny", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "wrote models/tiny", r
    out = tmp_path / "models" / "tiny"
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 2432 and config["quantization_config"]["group_size"] == 128
    assert load_tensors(out)["model.layers.0.mlp.down_proj.qweight"].shape == (2432, 512 // 8)
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["tiny"]  # no temp dirs left


def test_rerun_leaves_an_example_alone_and_refuses_anything_else(tmp_path):
    assert example("ex", cwd=tmp_path).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ex").iterdir()}
    r = example("ex", cwd=tmp_path)
    assert r.returncode == 0 and "already there" in r.stderr, r
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ex").iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    r = example("other", cwd=tmp_path)
    assert r.returncode == 4 and "--force" in r.stderr and r.stderr.count("\n") == 1, r
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    assert example("file", cwd=tmp_path).returncode == 4


def test_force_replaces_and_seed_changes_the_weights(tmp_path):
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "stale.txt").write_text("old")
    r = example("ex", "--force", "--seed", "3", cwd=tmp_path)
    assert r.returncode == 0, r
    assert not (tmp_path / "ex" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]
    seeded = load_tensors(tmp_path / "ex")
    assert example("ex", "--force", cwd=tmp_path).returncode == 0
    default = load_tensors(tmp_path / "ex")
    name = "model.layers.0.mlp.down_proj.scales"
    assert seeded.keys() == default.keys() and not (seeded[name] == default[name]).all()
