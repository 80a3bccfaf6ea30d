"""Every bad input gets a one-line error naming the file and the problem, a non-zero exit, no traceback."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from awqpad.example import make_example


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_example(tmp_path_factory.mktemp("good") / "tiny")


@pytest.fixture
def ckpt(good, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def run(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "awqpad", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    return proc


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("awqpad: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.safetensors"))[0]


def _rewrite_header(path: Path, mutate) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def test_good_checkpoint_inspects(ckpt):
    proc = run("inspect", ckpt, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["format"] == "awq-gemm" and report["dims"]["intermediate_size"]["tensors"] == 2432


def test_missing_directory(tmp_path):
    assert_one_line_error(run("inspect", tmp_path / "nope"), 2, "nope", "no such directory")


def test_no_config(ckpt):
    (ckpt / "config.json").unlink()
    assert_one_line_error(run("inspect", ckpt), 2, "no config.json")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    assert_one_line_error(run("plan", ckpt, "--tp", "2"), 2, "config.json", "not valid JSON")


def test_only_pickled_weights(ckpt):
    for f in ckpt.glob("*.safetensors*"):
        f.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert_one_line_error(run("inspect", ckpt), 2, "pytorch_model.bin", "pickle", "safetensors")


def test_index_lists_missing_shard(ckpt):
    _shard(ckpt).unlink()
    assert_one_line_error(run("inspect", ckpt), 2, "model.safetensors.index.json", "does not exist")


def test_index_names_tensor_the_shard_lacks(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.qweight"] = _shard(ckpt).name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(run("inspect", ckpt), 2, "model.layers.9.mlp.up_proj.qweight", "lacks it")


def test_index_points_at_wrong_shard(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(run("inspect", ckpt), 2, name, f"it is in {shards[0]}")


def test_header_length_larger_than_file(ckpt):
    path = _shard(ckpt)
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    assert_one_line_error(run("inspect", ckpt), 2, path.name, "larger than the file")


def test_header_not_json(ckpt):
    path = _shard(ckpt)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8] + b"#" * n + raw[8 + n :])
    assert_one_line_error(run("inspect", ckpt), 2, path.name, "not valid JSON")


def test_unknown_dtype(ckpt):
    path = _shard(ckpt)

    def mutate(h):
        name = next(k for k in h if k != "__metadata__")
        h[name]["dtype"] = "X7"

    _rewrite_header(path, mutate)
    assert_one_line_error(run("inspect", ckpt), 2, path.name, "unknown dtype 'X7'")


def test_byte_span_mismatch(ckpt):
    path = _shard(ckpt)

    def mutate(h):
        name = next(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 2)
        h[name]["shape"][0] += 1

    _rewrite_header(path, mutate)
    assert_one_line_error(run("inspect", ckpt), 2, path.name, "does not match")


def test_offsets_past_end_of_file(ckpt):
    path = _shard(ckpt)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    assert_one_line_error(run("inspect", ckpt), 2, path.name, "truncated")


def test_overlapping_tensors(ckpt):
    path = _shard(ckpt)

    def mutate(h):
        items = sorted((v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")
        first, second = items[0][1], items[1][1]
        size = h[second]["data_offsets"][1] - h[second]["data_offsets"][0]
        start = h[first]["data_offsets"][1] - 2
        h[second]["data_offsets"] = [start, start + size]

    _rewrite_header(path, mutate)
    assert_one_line_error(run("inspect", ckpt), 2, path.name, "overlaps")


def test_repo_id_not_in_cache_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    assert_one_line_error(run("inspect", "someorg/somemodel", env=env), 2, "someorg/somemodel", "cache")


def test_unknown_quant_method_is_named_by_inspect_and_refused_by_pad(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (ckpt / "config.json").write_text(json.dumps(config))
    proc = run("inspect", ckpt, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "fp8"
    proc = run("pad", ckpt, tmp_path / "out", "--tp", "4")
    assert_one_line_error(proc, 2, "FP8")  # unsupported input: exit 2 (errors.UnsupportedError), not 3
    assert not (tmp_path / "out").exists()


def test_awq_gemv_layout_refused(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (ckpt / "config.json").write_text(json.dumps(config))
    # exit 2: an unsupported layout is a bad input whatever the TP (errors.UnsupportedError; README exit codes)
    assert_one_line_error(run("pad", ckpt, tmp_path / "out", "--tp", "4"), 2, "gemv", "GEMM")


def test_unknown_subcommand_option_is_usage_error(ckpt):
    proc = run("plan", ckpt, "--tp", "two")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
