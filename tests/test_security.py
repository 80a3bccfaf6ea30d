"""Untrusted checkpoints: every name from SRC stays inside SRC, every write stays inside OUT.

Each test snapshots the whole tmp tree around SRC and OUT (names, bytes, symlink targets) and checks that
nothing outside OUT changed, whatever the command's outcome. Commands run in-process through the CLI
entry point (`awqpad.cli.main`), the same code path as the console script.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from awqpad.example import make_example

SHARD1 = "model-00001-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def cli(*args) -> tuple[int, str, str]:
    """Run `awqpad ARGS` in-process; (exit code, stdout, stderr)."""
    from awqpad.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["awqpad", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def one_line_error(result, code: int, *needles: str) -> str:
    got, _, err = result
    assert got == code, (got, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("awqpad: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under `root` except `skip` (OUT): file bytes, symlink targets, directories, FIFOs."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                state[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                state[rel] = "dir"
            elif p.is_file():
                state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                state[rel] = "special"
    return state


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_example(tmp_path_factory.mktemp("good") / "tiny")


@pytest.fixture
def world(good, tmp_path):
    """tmp/src (a copy of the example), tmp/out (not yet there), and a checker for "nothing outside OUT changed"."""
    src = tmp_path / "src"
    shutil.copytree(good, src)
    out = tmp_path / "out"
    before = {}

    def freeze():
        before.clear()
        before.update(snapshot(tmp_path, skip=out))

    def unchanged():
        after = snapshot(tmp_path, skip=out)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"bytes outside OUT changed: {changed}"

    class World:
        pass

    w = World()
    w.root, w.src, w.out, w.freeze, w.unchanged = tmp_path, src, out, freeze, unchanged
    return w


def set_shard_name(src: Path, old: str, new: str) -> None:
    path = src / INDEX
    index = json.loads(path.read_text())
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))


# --- section 1: names in the index -------------------------------------------------------------


def test_absolute_shard_path_naming_src_itself_is_refused_before_any_write(world):
    """The reported defect: an absolute name equal to SRC's own shard made pad truncate SRC."""
    set_shard_name(world.src, SHARD1, str(world.src / SHARD1))
    world.freeze()
    one_line_error(cli("pad", world.src, world.out, "--tp", "4"), 2, INDEX, "absolute path")
    world.unchanged()
    assert not world.out.exists()


def test_dotdot_shard_outside_src_is_refused_by_every_command(world):
    shutil.copy(world.src / SHARD1, world.root / "victim.safetensors")
    (world.src / SHARD1).unlink()
    set_shard_name(world.src, SHARD1, "../victim.safetensors")
    world.freeze()
    for args in (("inspect", world.src), ("plan", world.src, "--tp", "4"), ("pad", world.src, world.out, "--tp", "4")):
        one_line_error(cli(*args), 2, "../victim.safetensors", "inside the checkpoint")
    world.unchanged()
    assert not world.out.exists()


def test_inspect_does_not_probe_files_outside_src(world):
    set_shard_name(world.src, SHARD1, "../../../../../../etc/passwd")
    line = one_line_error(cli("inspect", world.src), 2, "etc/passwd")
    assert "root" not in line.split("etc/passwd")[-1]  # nothing of the file's contents leaks


@pytest.mark.parametrize("name", ["sub/../" + SHARD1, "./" + SHARD1, "a//b.safetensors", "", "x\\..\\y"])
def test_odd_relative_names_are_refused(world, name):
    set_shard_name(world.src, SHARD1, name)
    one_line_error(cli("plan", world.src, "--tp", "4"), 2, INDEX)


def test_non_string_shard_name_is_a_bad_input(world):
    path = world.src / INDEX
    index = json.loads(path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = 5
    path.write_text(json.dumps(index))
    one_line_error(cli("inspect", world.src), 2, INDEX, repr(first))


def test_shard_symlink_leaving_src_is_refused(world):
    elsewhere = world.root / "elsewhere"
    elsewhere.mkdir()
    shutil.move(world.src / SHARD1, elsewhere / SHARD1)
    (world.src / SHARD1).symlink_to(elsewhere / SHARD1)
    world.freeze()
    one_line_error(cli("pad", world.src, world.out, "--tp", "4"), 2, SHARD1, "outside SRC")
    world.unchanged()


def test_shard_that_is_a_directory_is_refused(world):
    (world.src / "dir.safetensors").mkdir()
    set_shard_name(world.src, SHARD1, "dir.safetensors")
    one_line_error(cli("inspect", world.src), 2, "dir.safetensors", "not a regular file")


def _hf_cache_layout(src: Path, cache: Path, repo: str = "models--org--tiny") -> Path:
    """Rebuild `src` as the HF cache does: blobs/<sha> and snapshots/<commit>/<name> -> ../../blobs/<sha>."""
    blobs = cache / repo / "blobs"
    snap = cache / repo / "snapshots" / ("c0ffee" * 6 + "abcd")
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blobs / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    return snap


def test_hf_cache_snapshot_links_into_its_own_blobs_are_allowed(world):
    snap = _hf_cache_layout(world.src, world.root / "hub")
    world.freeze()
    code, _, err = cli("pad", snap, world.out, "--tp", "4", "--quiet")
    assert code == 0, err
    world.unchanged()
    assert (world.out / SHARD1).is_file() and not (world.out / SHARD1).is_symlink()


def test_hf_cache_link_into_another_repo_is_refused(world):
    snap = _hf_cache_layout(world.src, world.root / "hub")
    other = _hf_cache_layout(world.src, world.root / "hub", repo="models--someone--else")
    (snap / SHARD1).unlink()
    (snap / SHARD1).symlink_to(os.path.relpath((other / SHARD1).resolve(), snap))
    one_line_error(cli("inspect", snap), 2, SHARD1, "outside SRC")


def test_config_symlink_leaving_src_is_refused(world):
    (world.root / "config.json").write_text((world.src / "config.json").read_text())
    (world.src / "config.json").unlink()
    (world.src / "config.json").symlink_to(world.root / "config.json")
    one_line_error(cli("inspect", world.src), 2, "config.json", "outside SRC")


# --- side files --------------------------------------------------------------------------------


def test_side_file_symlink_to_a_secret_is_refused(world):
    secret = world.root / "secret.txt"
    secret.write_text("hunter2\n")
    (world.src / "tokenizer_config.json").symlink_to(secret)
    world.freeze()
    one_line_error(cli("pad", world.src, world.out, "--tp", "4"), 2, "tokenizer_config.json", "outside SRC",
                   "--follow-symlinks")
    world.unchanged()
    assert not world.out.exists()


def test_follow_symlinks_copies_it_and_says_so(world):
    secret = world.root / "shared_tokenizer.json"
    secret.write_text("{}\n")
    (world.src / "tokenizer.json").symlink_to(secret)
    world.freeze()
    code, _, err = cli("pad", world.src, world.out, "--tp", "4", "--follow-symlinks")
    assert code == 0, err
    assert "outside SRC" in err and "tokenizer.json" in err
    assert (world.out / "tokenizer.json").read_text() == "{}\n" and not (world.out / "tokenizer.json").is_symlink()
    world.unchanged()


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_side_file_links_are_bad_input(world, kind):
    link = world.src / "special_tokens_map.json"
    if kind == "dangling":
        link.symlink_to(world.src / "nowhere.json")
    else:
        link.symlink_to(world.src / "loop_b")
        (world.src / "loop_b").symlink_to(link)
    one_line_error(cli("pad", world.src, world.out, "--tp", "4"), 2, "special_tokens_map.json" if kind == "dangling" else "loop")
    assert not world.out.exists()


def test_fifo_among_side_files_is_bad_input(world):
    os.mkfifo(world.src / "merges.txt")
    one_line_error(cli("pad", world.src, world.out, "--tp", "4"), 2, "merges.txt", "not a regular file")
    assert not world.out.exists()


def test_fifo_named_like_a_quant_side_file_does_not_hang(world):
    os.mkfifo(world.src / "quantize_config.json")
    config = json.loads((world.src / "config.json").read_text())
    del config["quantization_config"]
    (world.src / "config.json").write_text(json.dumps(config))
    one_line_error(cli("inspect", world.src), 2, "quantize_config.json", "not a regular file")


def test_symlinked_directory_is_not_followed(world):
    outside = world.root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    (world.src / "extra").symlink_to(outside)
    code, _, err = cli("pad", world.src, world.out, "--tp", "4", "--quiet")
    assert code == 0, err
    assert not (world.out / "extra").exists()


# --- the output side ---------------------------------------------------------------------------


def test_every_written_file_is_inside_out(world):
    (world.src / "sub").mkdir()
    (world.src / "sub" / "notes.txt").write_text("kept\n")
    world.freeze()
    code, _, err = cli("pad", world.src, world.out, "--tp", "4", "--quiet")
    assert code == 0, err
    world.unchanged()
    assert (world.out / "sub" / "notes.txt").read_text() == "kept\n"
    assert not [p for p in world.root.iterdir() if p.name.startswith(".")]  # no lock or partial left behind


def test_verify_fails_an_out_whose_index_names_a_file_outside_out(world):
    code, _, err = cli("pad", world.src, world.out, "--tp", "4", "--quiet")
    assert code == 0, err
    shutil.move(world.out / SHARD1, world.root / "moved.safetensors")
    set_shard_name(world.out, SHARD1, "../moved.safetensors")
    code, stdout, err = cli("verify", world.out, "--tp", "4", "--json")
    assert code == 1, (code, err)
    report = json.loads(stdout)
    structure = next(c for c in report["checks"] if c["name"] == "structure")
    assert not structure["ok"] and "../moved.safetensors" in structure["detail"]
