"""Bounded inputs and lying headers / configs: one line naming the file, exit 2, the same rules for pad and verify."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from awqpad.checkpoint.header import read_header
from awqpad.errors import InputError
from awqpad.example import make_example
from awqpad.source import bounded_json
from test_security import INDEX, SHARD1, cli, one_line_error


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_example(tmp_path_factory.mktemp("good") / "tiny")


@pytest.fixture
def src(good, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(good, dst)
    return dst


def edit_json(path: Path, mutate) -> None:
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


def rewrite_header(path: Path, mutate, raw_json: bytes | None = None) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if raw_json is None:
        header = json.loads(raw[8 : 8 + n])
        mutate(header)
        raw_json = json.dumps(header).encode()
    raw_json += b" " * (-len(raw_json) % 8)
    path.write_bytes(struct.pack("<Q", len(raw_json)) + raw_json + raw[8 + n :])


def first_tensor(header: dict, suffix: str) -> str:
    return next(k for k in header if k.endswith(suffix))


# --- section 2: bounded inputs ---------------------------------------------------------------


def test_huge_config_is_refused_without_reading_it(src):
    with open(src / "config.json", "r+b") as fh:  # sparse: 17 MB that cost no disk
        fh.seek(17 << 20)
        fh.write(b" ")
    one_line_error(cli("inspect", src), 2, "config.json", "limit")


@pytest.mark.parametrize("target", ["config.json", INDEX, "quantize_config.json"])
def test_deep_nesting_is_refused(src, target):
    if target == "quantize_config.json":
        edit_json(src / "config.json", lambda c: c.pop("quantization_config"))
    deep = "[" * 5000 + "]" * 5000
    (src / target).write_text('{"weight_map": {}, "x": ' + deep + "}")
    one_line_error(cli("inspect", src), 2, target, "nested", "64")


def test_huge_integer_is_refused(src):
    edit_json(src / "config.json", lambda c: c.update(hidden_size=0))
    text = (src / "config.json").read_text().replace('"hidden_size": 0', '"hidden_size": ' + "9" * 5000)
    (src / "config.json").write_text(text)
    one_line_error(cli("inspect", src), 2, "config.json", "40 digits")


def test_deeply_nested_header_is_refused(src):
    rewrite_header(src / SHARD1, None, raw_json=b'{"__metadata__": ' + b"[" * 3000 + b"]" * 3000 + b"}")
    one_line_error(cli("inspect", src), 2, SHARD1, "nested")


def test_depth_scan_ignores_brackets_in_strings():
    raw = json.dumps({"a": "[" * 500, "b": ["\\\"[[["]}).encode()
    assert bounded_json.loads(raw, "x", "config")["a"] == "[" * 500


# --- section 3: headers that lie -------------------------------------------------------------


@pytest.mark.parametrize(
    "header, data",
    [
        ({"t": {"dtype": "U8", "shape": [True, 2], "data_offsets": [0, 2]}}, b"ab"),
        ({"t": {"dtype": "U8", "shape": [0, 1 << 64], "data_offsets": [0, 0]}}, b""),
        ({"t": {"dtype": "U8", "shape": [1 << 32, 1 << 32, 0], "data_offsets": [0, 0]}}, b""),
        ({"t": {"dtype": "U8", "shape": [2.0], "data_offsets": [0, 2]}}, b"ab"),
        ({"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2, 3]}}, b"ab"),
        ({"t": {"dtype": "U8", "shape": [2], "data_offsets": [False, 2]}}, b"ab"),
        ({"__metadata__": {"a": 1}, "t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"ab"),
        ({"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, b"a"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"ab"),
    ],
)
def test_headers_safetensors_rejects_are_rejected(tmp_path, header, data):
    """Each of these is refused by the safetensors library itself (checked here), so awqpad refuses it too."""
    from safetensors import SafetensorError, safe_open

    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    with pytest.raises(SafetensorError):
        with safe_open(str(path), framework="numpy"):
            pass
    with pytest.raises(InputError, match="bad.safetensors"):
        read_header(path)


def test_duplicate_tensor_name_in_header_is_refused(tmp_path):
    raw = b'{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"ab")
    with pytest.raises(InputError, match="twice"):
        read_header(path)


def test_bool_in_shape_through_the_cli(src):
    def mutate(h):
        name = first_tensor(h, "scales")
        h[name]["shape"] = [True] + h[name]["shape"][1:]

    rewrite_header(src / SHARD1, mutate)
    for args in (("inspect", src), ("pad", src, src.parent / "out", "--tp", "4")):
        one_line_error(cli(*args), 2, SHARD1)


def test_scales_with_one_dim_is_bad_input(src):
    def mutate(h):
        name = first_tensor(h, "mlp.down_proj.scales")
        h[name]["shape"] = [h[name]["shape"][0] * h[name]["shape"][1]]

    rewrite_header(src / SHARD1, mutate)
    one_line_error(cli("inspect", src), 2, SHARD1, "scales")


# --- section 3: configs that lie -------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c["quantization_config"].update(group_size="abc"), "group_size"),
        (lambda c: c["quantization_config"].update(bits=None), "bits"),
        (lambda c: c["quantization_config"].update(bits=True), "bits"),
        (lambda c: c.update(architectures=5), "architectures"),
        (lambda c: c["quantization_config"].update(modules_to_not_convert=5), "modules_to_not_convert"),
        (lambda c: c["quantization_config"].update(quant_method="gptq", dynamic={"(": {}}), "regular expression"),
        (lambda c: c["quantization_config"].update(quant_method="gptq", dynamic={"x": 5}), "dynamic"),
        (lambda c: c.update(quantization_config={"quant_method": "compressed-tensors", "config_groups": [1]}),
         "config_groups"),
        (lambda c: c["quantization_config"].update(group_size=0), "group_size = 0"),
        (lambda c: c["quantization_config"].update(group_size=-1), "group size"),
        (lambda c: c.pop("quantization_config"), "no quantization_config"),
        (lambda c: c.update(num_attention_heads=0), "num_attention_heads"),
        (lambda c: c.update(num_attention_heads=-8), "num_attention_heads"),
        (lambda c: c.update(hidden_size="512"), "hidden_size"),
    ],
)
def test_wrong_config_values_are_bad_input_naming_the_key(src, tmp_path, mutate, needle):
    edit_json(src / "config.json", mutate)
    for args in (("plan", src, "--tp", "4"), ("pad", src, tmp_path / "out", "--tp", "4")):
        one_line_error(cli(*args), 2, needle)
    assert not (tmp_path / "out").exists()


def test_intermediate_size_smaller_than_tensors_is_said(src, tmp_path):
    edit_json(src / "config.json", lambda c: c.update(intermediate_size=2048))
    code, _, err = cli("pad", src, tmp_path / "out", "--tp", "4")
    assert code == 0, err
    assert "SMALLER than the tensors" in err


def test_checkpoint_with_no_tensors_is_bad_input(src):
    for f in src.glob("*.safetensors*"):
        f.unlink()
    raw = b"{}" + b" " * 6
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    one_line_error(cli("pad", src, src.parent / "out", "--tp", "4"), 2, "no tensors")


def test_tensor_missing_from_the_index_is_refused_by_pad_as_by_verify(src):
    def drop_one(index):
        index["weight_map"].pop(next(iter(index["weight_map"])))

    edit_json(src / INDEX, drop_one)
    one_line_error(cli("pad", src, src.parent / "out", "--tp", "4"), 2, INDEX, "not in the index")


def test_unreadable_src(src):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    src.chmod(0)
    try:
        one_line_error(cli("inspect", src), 2, "cannot read")
    finally:
        src.chmod(0o755)


# --- verify: the same rules, plus the safetensors library's own reading of OUT --------------------


def test_malformed_awqpad_json_given_to_verify(src, tmp_path):
    out = tmp_path / "out"
    assert cli("pad", src, out, "--tp", "4", "--quiet")[0] == 0
    (out / "awqpad.json").write_text("[" * 10000 + "]" * 10000)
    code, stdout, err = cli("verify", out, "--tp", "4", "--json")
    assert code == 1 and "Traceback" not in err and "internal error" not in err, (code, err)
    provenance = next(c for c in json.loads(stdout)["checks"] if c["name"] == "provenance")
    assert not provenance["ok"] and "nested" in provenance["detail"]


def test_verify_opens_every_output_shard_with_safetensors(src, tmp_path):
    out = tmp_path / "out"
    assert cli("pad", src, out, "--tp", "4", "--quiet")[0] == 0
    code, stdout, err = cli("verify", src, out, "--tp", "4", "--json")
    assert code == 0, err
    structure = next(c for c in json.loads(stdout)["checks"] if c["name"] == "structure")
    assert structure["ok"] and structure["figures"]["library_opened"] == len(list(out.glob("*.safetensors"))) == 2


def test_verify_fails_an_output_shard_with_a_bool_in_a_shape(src, tmp_path):
    """The reported defect: bool passed Python's int check, so verify passed a shard safetensors rejects."""
    out = tmp_path / "out"
    assert cli("pad", src, out, "--tp", "4", "--quiet")[0] == 0

    def mutate(h):
        name = first_tensor(h, "input_layernorm.weight")
        h[name]["shape"] = [True] + h[name]["shape"]  # same byte count

    rewrite_header(out / SHARD1, mutate)
    code, stdout, _ = cli("verify", out, "--tp", "4", "--json")
    assert code == 1
    structure = next(c for c in json.loads(stdout)["checks"] if c["name"] == "structure")
    assert not structure["ok"] and SHARD1 in structure["detail"]
