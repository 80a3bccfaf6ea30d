"""Block-FP8 and compressed-tensors float-quantized: inspect, plan, pad, bad input (numpy only).

Fixtures come from tests/fp8_factory.py (its own e4m3fn decoder and header writer); the padded
output is judged by re-reading the raw bytes with that independent code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from awqpad.checkpoint.model import read_checkpoint
from awqpad.execute.output_repo import pad_to_directory
from awqpad.plan.pad_plan import make_plan
from awqpad.source import resolve_source
from tests.fp8_factory import E4M3FN_F64, Spec, bf16_value, build_fp8, dequant, read_tensors, scale_name


def run(*args):
    return subprocess.run([sys.executable, "-m", "awqpad", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "AWQPAD_DEBUG": ""})


def one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("awqpad: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def plan_for(path, tp, engine="vllm"):
    return make_plan(read_checkpoint(resolve_source(str(path))), (tp,), engine)


def padded(plan) -> dict:
    return {d.kind: d.padded for d in plan.dims}


ARCHS = ("qwen3", "qwen3_moe", "qwen3_next", "deepseek_v3", "minimax_m2", "glm4_moe")
FLAVOURS = ("block", "ct-block", "ct-channel", "ct-tensor")


def spec(arch, flavour="block", **kw):
    return Spec(arch=arch, flavour=flavour, heads=8 if arch == "deepseek_v3" else 4, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_recognises_block_fp8(tmp_path, arch):
    built = build_fp8(tmp_path / arch, spec(arch))
    ckpt = read_checkpoint(resolve_source(str(built.path)))
    assert ckpt.family_known and ckpt.format == "fp8"
    fp8 = [lin for lin in ckpt.linears if lin.format == "fp8"]
    assert fp8 and all((lin.block_n, lin.group_size, lin.bits) == (128, 128, 8) for lin in fp8)
    assert {lin.prefix for lin in fp8} == set(built.weights)  # every FP8 linear found, none invented
    proc = run("inspect", built.path, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "fp8"


@pytest.mark.parametrize("flavour", FLAVOURS[1:])
def test_inspect_compressed_tensors_float(tmp_path, flavour):
    built = build_fp8(tmp_path / flavour, spec("qwen3_moe", flavour))
    ckpt = read_checkpoint(resolve_source(str(built.path)))
    lin = next(lin for lin in ckpt.linears if lin.role == "down" and lin.block == "expert")
    want = {"ct-block": (128, 128), "ct-channel": (1, -1), "ct-tensor": (None, -1)}[flavour]
    assert (lin.block_n, lin.group_size) == want


@pytest.mark.parametrize("tp,width", [(1, 256), (2, 256), (4, 512)])
def test_plan_widths_whole_blocks_per_rank(tmp_path, tp, width):
    # 192 = 1.5 blocks of 128: vLLM's Fp8MoEMethod needs I_r % 128 at every TP, so t * ceil(ceil(W/b)/t) * b
    plan = plan_for(build_fp8(tmp_path / "m", spec("qwen3_moe")).path, tp)
    assert padded(plan)["expert"] == width == tp * -(-(-(-192 // 128)) // tp) * 128
    assert plan.config_updates == {"moe_intermediate_size": width}


def test_plan_deepseek_keeps_shared_tied_to_experts(tmp_path):
    built = build_fp8(tmp_path / "d", spec("deepseek_v3", n_shared=2, moe_intermediate=192))
    plan = plan_for(built.path, 4)
    p = padded(plan)
    assert p["expert"] == 512 and p["shared"] == 2 * p["expert"] and p["dense"] == 512
    assert plan.config_updates == {"moe_intermediate_size": 512, "intermediate_size": 512}
    assert not plan.blockers


def test_plan_minimax_uses_intermediate_size(tmp_path):
    plan = plan_for(build_fp8(tmp_path / "mm", spec("minimax_m2")).path, 2)
    assert plan.config_updates == {"intermediate_size": 256}


def test_per_channel_fp8_never_splits_a_group(tmp_path):
    plan = plan_for(build_fp8(tmp_path / "c", spec("qwen3_moe", "ct-channel")).path, 4)
    assert not plan.ops and not plan.blockers  # 192 / 4 = 48 per rank is fine: no K-groups to split
    assert any("never splits a scale group" in n for n in plan.notes)
    plan = plan_for(build_fp8(tmp_path / "c2", spec("qwen3_moe", "ct-channel", moe_intermediate=190)).path, 4)
    assert padded(plan)["expert"] == 192  # only the plain split (W % t) constrains it


def test_qwen3_next_linear_attention_is_checked_not_padded(tmp_path):
    built = build_fp8(tmp_path / "n", spec("qwen3_next", quantize_linear_ba=True))
    plan = plan_for(built.path, 2)
    assert any("in_proj_ba" in b.explanation for b in plan.blockers)  # [8, 8] heads -> 4 per rank < block 128
    assert not any("linear_attn" in op.tensor for op in plan.ops)
    ok = plan_for(build_fp8(tmp_path / "n2", spec("qwen3_next")).path, 2)  # in_proj_ba in BF16 (as published)
    assert not ok.blockers and padded(ok) == {"expert": 256, "shared": 256}


def _check_padded(src_dir, out_dir, s: Spec, plan):
    src, out = read_tensors(src_dir), read_tensors(out_dir)
    widths = padded(plan)
    seen = 0
    for name, (dtype, arr) in src.items():
        if not name.endswith(".weight") or dtype != "F8_E4M3":
            assert np.array_equal(out[name][1], arr) or name.rsplit(".", 1)[0] + ".weight" in src, name
            continue
        prefix = name[: -len(".weight")]
        a, b = dequant(src, prefix, s), dequant(out, prefix, s)
        if a.shape == b.shape:
            assert np.array_equal(out[name][1], arr), name  # untouched bytes
            continue
        seen += 1
        rows, cols = a.shape
        assert np.array_equal(b[:rows, :cols], a), prefix  # same function on the original features
        assert np.count_nonzero(b[rows:]) == 0 and np.count_nonzero(b[:, cols:]) == 0, prefix
        codes = out[name][1]
        assert not (codes[rows:] == 0x80).any() and not (codes[:, cols:] == 0x80).any()  # +0.0 bytes, never 0x80
        assert (codes[rows:] == 0).all() and (codes[:, cols:] == 0).all()
        sdt, sc = out[f"{prefix}.{scale_name(s)}"]
        if s.flavour in ("block", "ct-block"):
            bn, bk = s.block
            full_r, full_c = -(-rows // bn), -(-cols // bk)
            assert sc.shape == (-(-b.shape[0] // bn), -(-b.shape[1] // bk))
            old = src[f"{prefix}.{scale_name(s)}"][1]
            assert np.array_equal(sc[:full_r, :full_c], old)  # partial blocks keep their scale
            extra = np.concatenate([sc[full_r:].ravel(), sc[:, full_c:].ravel()])
            extra = bf16_value(extra) if sdt == "BF16" else extra.astype(np.float64)
            assert (extra == 1.0).all()  # blocks of padding only: 1.0 (exact in UE8M0)
        assert b.shape[0] in widths.values() or b.shape[1] in widths.values() or 2 * max(widths.values()) == b.shape[0]
    assert seen


@pytest.mark.parametrize("arch,flavour,tp", [
    ("qwen3_moe", "block", 2), ("qwen3_moe", "block", 4), ("deepseek_v3", "block", 2), ("minimax_m2", "block", 2),
    ("glm4_moe", "block", 2), ("qwen3_next", "block", 2), ("qwen3", "block", 2), ("qwen3_moe", "ct-block", 2),
    ("qwen3_moe", "ct-channel", 4), ("qwen3_moe", "ct-tensor", 4),
])
def test_pad_bytes_and_fills(tmp_path, arch, flavour, tp):
    kw = {"moe_intermediate": 190, "shared": 190, "intermediate": 382} if flavour in ("ct-channel", "ct-tensor") else {}
    s = spec(arch, flavour, **kw)
    built = build_fp8(tmp_path / "src", s)
    ckpt = read_checkpoint(resolve_source(str(built.path)))
    plan = make_plan(ckpt, (tp,))
    assert plan.ops and not plan.blockers
    pad_to_directory(ckpt, plan, tmp_path / "out", fsync=False)
    _check_padded(built.path, tmp_path / "out", s, plan)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in plan.config_updates.items():
        assert cfg[key] == value
    assert cfg["quantization_config"] == built.config["quantization_config"]


def test_pad_bf16_scales_and_ue8m0(tmp_path):
    s = spec("qwen3_moe", scale_dtype="BF16", scale_fmt="ue8m0")
    built = build_fp8(tmp_path / "src", s)
    plan = plan_for(built.path, 4)  # 192 -> 512: two scale rows of padding only
    assert run("pad", built.path, tmp_path / "out", "--tp", 4).returncode == 0
    _check_padded(built.path, tmp_path / "out", s, plan)
    out = read_tensors(tmp_path / "out")
    _, sc = out["model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv"]
    assert sc[-1, 0] == 0x3F80  # bf16 1.0


# --- bad input: one line, exit 2 ----------------------------------------------------------------


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization_config"]
    for k, v in changes.items():
        if v is None:
            q.pop(k, None)
        else:
            q[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_scale_shape_disagrees_with_block(tmp_path):
    built = build_fp8(tmp_path / "m", spec("qwen3_moe"))
    _edit_config(built.path, weight_block_size=[64, 128])
    one_line_error(run("inspect", built.path), 2, "weight_scale_inv shape", "blocks of [64, 128]", "expected")


def test_missing_weight_block_size(tmp_path):
    built = build_fp8(tmp_path / "m", spec("qwen3_moe"))
    _edit_config(built.path, weight_block_size=None)
    one_line_error(run("plan", built.path, "--tp", 2), 2, "no weight_block_size")


def test_unknown_scale_fmt(tmp_path):
    built = build_fp8(tmp_path / "m", spec("qwen3_moe"))
    _edit_config(built.path, scale_fmt="e4m3-pow2")
    one_line_error(run("pad", built.path, tmp_path / "out", "--tp", 2, "-q"), 2, "unknown FP8 scale_fmt 'e4m3-pow2'")
    assert not (tmp_path / "out").exists()


def test_e5m2_weights_refused(tmp_path):
    built = build_fp8(tmp_path / "m", spec("qwen3_moe"))
    shard = sorted(built.path.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    head = data[8 : 8 + n].replace(b'"F8_E4M3"', b'"F8_E5M2"')
    shard.write_bytes(bytes(data[:8]) + head + bytes(data[8 + n :]))
    one_line_error(run("inspect", built.path), 2, "FP8 E5M2 weights are not supported", "weight F8_E5M2[512, 256]")


def test_nan_codes_where_padding_goes(tmp_path):
    built = build_fp8(tmp_path / "m", spec("qwen3_moe"))
    name = "model.layers.1.mlp.experts.2.down_proj.weight"  # [256, 192]: columns 128..191 are the partial block
    shard = next(p for p in built.path.glob("*.safetensors") if name.encode() in p.read_bytes()[:200000])
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8 : 8 + n])[name]["data_offsets"][0] + 8 + n
    data[begin + 5 * 192 + 150] = 0x7F  # row 5, column 150: e4m3fn NaN
    shard.write_bytes(bytes(data))
    one_line_error(run("pad", built.path, tmp_path / "out", "--tp", 2, "-q"), 2, name, "NaN codes", "columns 128..191")
    assert not (tmp_path / "out").exists()
    assert E4M3FN_F64[0x7F] != E4M3FN_F64[0x7F]  # the byte is NaN


@pytest.mark.parametrize("flavour", ["block", "ct-block"])
def test_pad_static_activations_keep_input_scales(tmp_path, flavour):
    """activation_scheme static adds a per-tensor input_scale: padded inputs are 0 so it stays as it is."""
    s = spec("qwen3_moe", flavour, activation_scheme="static")
    built = build_fp8(tmp_path / "src", s)
    ckpt = read_checkpoint(resolve_source(str(built.path)))
    plan = make_plan(ckpt, (2,))
    assert plan.ops and not any(op.tensor.endswith("input_scale") for op in plan.ops)
    pad_to_directory(ckpt, plan, tmp_path / "out", fsync=False)
    _check_padded(built.path, tmp_path / "out", s, plan)
    src, out = read_tensors(built.path), read_tensors(tmp_path / "out")
    scales = [n for n in src if n.endswith(".input_scale")]
    assert scales and all(np.array_equal(src[n][1], out[n][1]) for n in scales)
