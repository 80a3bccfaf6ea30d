"""`awqpad verify` on FP8 outputs: bytes, fills, zeros under e4m3fn / e4m3fnuz readers, fp64 TP simulation.

Negative controls: a 0x80 fill (-0.0 in e4m3fn, NaN under a raw e4m3fnuz reader), a changed scale of a
partial block, and a changed original byte must each fail the check that owns them.
"""

from __future__ import annotations

import json

import pytest

from awqpad.checkpoint.model import read_checkpoint
from awqpad.execute.output_repo import pad_to_directory
from awqpad.plan.pad_plan import make_plan
from awqpad.source import resolve_source
from awqpad.verify.runner import verify_output
from tests.fp8_factory import Spec, build_fp8


def _pad(tmp_path, s: Spec, tps):
    built = build_fp8(tmp_path / "src", s)
    ckpt = read_checkpoint(resolve_source(str(built.path)))
    plan = make_plan(ckpt, tps)
    assert plan.ops and not plan.blockers
    pad_to_directory(ckpt, plan, tmp_path / "out", fsync=False)
    return built.path, tmp_path / "out"


def _verify(src, out, tps, layers="all"):
    return verify_output(resolve_source(str(out)), tps, src_source=resolve_source(str(src)), layers=layers)


def _checks(report) -> dict:
    return {c.name: c for c in report.checks}


@pytest.mark.parametrize("arch,flavour,tps", [
    ("qwen3_moe", "block", (2, 4)), ("deepseek_v3", "block", (2,)), ("minimax_m2", "block", (2,)),
    ("qwen3_next", "block", (2,)), ("glm4_moe", "block", (2, 4)), ("qwen3", "ct-block", (2,)),
    ("qwen3_moe", "ct-channel", (4,)), ("qwen3_moe", "ct-tensor", (4,)),
])
def test_verify_passes(tmp_path, arch, flavour, tps):
    kw = {"moe_intermediate": 190, "shared": 190, "intermediate": 382} if flavour in ("ct-channel", "ct-tensor") else {}
    s = Spec(arch=arch, flavour=flavour, heads=8 if arch == "deepseek_v3" else 4, **kw)
    src, out = _pad(tmp_path, s, tps)
    report = _verify(src, out, tps)
    assert report.passed, [(c.name, c.detail) for c in report.failed]
    checks = _checks(report)
    assert set(checks["zeros"].figures["readers"]) == {"e4m3fn", "e4m3fnuz", "e4m3fnuz-raw"}
    assert checks["zeros"].figures["weights"] > 0
    for t in tps:
        fn = checks[f"function TP={t}"].figures
        assert fn["blocks"] > 0 and fn["max_rel_error"] < 1e-12


def _patch(out, tensor: str, offset_in_tensor: int, value: int):
    for shard in sorted(out.glob("*.safetensors")):
        data = bytearray(shard.read_bytes())
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        if tensor in header:
            data[8 + n + header[tensor]["data_offsets"][0] + offset_in_tensor] = value
            shard.write_bytes(bytes(data))
            return header[tensor]
    raise KeyError(tensor)


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    return _pad(tmp_path_factory.mktemp("fp8v"), Spec(arch="qwen3_moe"), (2,))


def _copy(padded, tmp_path):
    import shutil

    src, out = padded
    shutil.copytree(out, tmp_path / "out")
    return src, tmp_path / "out"


def test_negative_fill_0x80_fails_zeros_under_raw_fnuz(padded, tmp_path):
    src, out = _copy(padded, tmp_path)
    # gate_proj [256, 256] of expert 1: row 200 is padding (original width 192)
    _patch(out, "model.layers.0.mlp.experts.1.gate_proj.weight", 200 * 256 + 3, 0x80)
    checks = _checks(_verify(src, out, (2,)))
    assert not checks["pad-fill"].ok
    assert not checks["zeros"].ok and "e4m3fnuz-raw" in checks["zeros"].detail


def test_negative_partial_block_scale_fails_function(padded, tmp_path):
    src, out = _copy(padded, tmp_path)
    # down_proj weight_scale_inv [2, 2] F32: column 1 is the partial block 128..191 (+ padding): change its scale
    _patch(out, "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv", 4 * 1 + 3, 0x40)
    checks = _checks(_verify(src, out, (2,)))
    assert not checks["bytes-original"].ok
    assert not checks["function TP=2"].ok


def test_negative_original_byte_fails(padded, tmp_path):
    src, out = _copy(padded, tmp_path)
    _patch(out, "model.layers.0.mlp.experts.0.up_proj.weight", 7, 0x33)
    report = _verify(src, out, (2,))
    assert not _checks(report)["bytes-original"].ok and not report.passed
