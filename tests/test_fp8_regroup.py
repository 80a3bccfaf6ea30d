"""Block-FP8 scale refinement (`--strategy regroup|auto` on `quant_method: fp8` checkpoints).

Blocks [bn, bk] become [bn/r, bk/r], every new block repeating its parent's scale; weights are untouched.
Judged here by independent code: the factory's own float64 dequantizer (tests/fp8_factory.py, e4m3fn from
the OCP formula) reads SRC with its block size and OUT with the refined one and must get bit-identical
weights; each refined scale is compared with its parent's raw bits by index arithmetic written here; the
scale grid must have ceil(N / (bn/r)) rows (N = 576 in blocks of 128 -> 32: 18, not 20). A transformers
FineGrainedFP8 oracle (marker `oracle`) loads SRC and OUT and must produce identical logits.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from awqpad.checkpoint.model import read_checkpoint
from awqpad.plan.strategy import plan_with_strategy
from awqpad.source import resolve_source
from tests.fp8_factory import Spec, build_fp8, dequant, read_tensors, scale_name

# DeepSeek-V3 layout with kv_lora_rank 512: kv_a_proj_with_mqa has N = 512 + 64 = 576 (a partial last block of 64)
DSV3 = Spec(arch="deepseek_v3", mla=(96, 512, 64, 128, 128), moe_intermediate=192, intermediate=384, experts=2)
# head_dim 64: q / o per rank at TP 4 = 64, which no padding fixes (attention-side linears are never padded)
SMALL_HEADS = Spec(arch="qwen3", head_dim=64, intermediate=384)


def awqpad(*args):
    return subprocess.run([sys.executable, "-m", "awqpad", *map(str, args)], capture_output=True, text=True)


def pad(src, out, tp, engine, strategy):
    done = awqpad("pad", src, out, "--tp", tp, "--engine", engine, "--strategy", strategy, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def parent_scales_hold(old: np.ndarray, new: np.ndarray, r: int, n: int, k: int, block) -> int:
    """Every refined cell (i, j) holds the raw bits of parent (i // r, j // r); the grid is exactly the refined
    blocks that hold weights. Returns the number of cells compared."""
    bn, bk = block
    assert new.shape == (math.ceil(n / (bn // r)), math.ceil(k / (bk // r))), (new.shape, n, k, block, r)
    compared = 0
    for i in range(new.shape[0]):
        for j in range(new.shape[1]):
            assert new[i, j] == old[i // r, j // r], (i, j)  # raw uint16 / float32 words: bitwise
            compared += 1
    return compared


def judge(built, out, r: int) -> dict:
    """SRC and OUT: same weight bytes, refined scales = parent scales, bit-identical float64 weights."""
    s = built.spec
    bn, bk = s.block
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["weight_block_size"] == [bn // r, bk // r]
    src, dst = read_tensors(built.path), read_tensors(out)
    partial = cells = 0
    for prefix, want in built.weights.items():
        assert np.array_equal(src[f"{prefix}.weight"][1], dst[f"{prefix}.weight"][1]), prefix  # weights untouched
        n, k = want.shape
        name = f"{prefix}.{scale_name(s)}"
        old, new = src[name][1].view(np.uint32 if src[name][0] == "F32" else np.uint16), dst[name][1]
        new = new.view(old.dtype)
        cells += parent_scales_hold(old, new, r, n, k, s.block)
        partial += n % bn != 0
        a = dequant(src, prefix, s)
        b = dequant(dst, prefix, s, block=(bn // r, bk // r))
        assert np.array_equal(a.view(np.uint64), b.view(np.uint64)), prefix  # bit-identical float64
        assert np.array_equal(a, want), prefix  # and what the factory quantized
    return {"linears": len(built.weights), "partial": partial, "cells": cells}


def test_deepseek_576_rows_refined_exactly_via_the_cli(tmp_path):
    built = build_fp8(tmp_path / "src", DSV3)
    report = pad(built.path, tmp_path / "out", 2, "vllm-latest", "regroup")
    plan = report["plan"]
    # 96 per rank (192 / 2) needs blocks of 32; 64 x 64 would still need padding, so --strategy regroup takes 32 x 32
    assert plan["regroup"]["factor"] == 4 and plan["regroup"]["new_block"] == [32, 32]
    assert all(d["padded"] == d["original"] for d in plan["dims"].values())
    seen = judge(built, tmp_path / "out", 4)
    assert seen["partial"] >= 2 and seen["cells"] > 1000  # kv_a_proj_with_mqa of both layers: 576 = 4.5 blocks
    kv = read_tensors(tmp_path / "out")["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"][1]
    assert kv.shape == (18, 8)  # ceil(576 / 32) = 18 rows, not 4 * ceil(576 / 128) = 20
    done = awqpad("verify", built.path, tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "regroup" in done.stdout and "dequantize bit-identically" in done.stdout


# shared expert / dense layer 192 / 384: 96 / 192 per rank, which vLLM refuses for dense FP8 linears (experts alone it
# refines at load itself, so a MoE-only checkpoint needs nothing: `none` wins there)
@pytest.mark.parametrize("spec", [Spec(arch="qwen3_next", scale_dtype="BF16", moe_intermediate=192, shared=192),
                                  Spec(arch="glm4_moe", scale_fmt="ue8m0", moe_intermediate=192, intermediate=384)],
                         ids=["qwen3_next-bf16", "glm4_moe-ue8m0"])
def test_bf16_and_ue8m0_scales_are_copied_bit_for_bit(tmp_path, spec):
    built = build_fp8(tmp_path / "src", spec)
    pad(built.path, tmp_path / "out", 2, "vllm-latest", "regroup")
    seen = judge(built, tmp_path / "out", 4)
    assert seen["linears"] == len(built.weights) > 10
    done = awqpad("verify", built.path, tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr


def test_auto_never_refines_fp8_blocks_regroup_does_and_says_it_runs_on_triton(tmp_path):
    """Refined blocks dequantize bit-identically, but W8A8 kernels then quantize activations per [1, 32]: not the
    same function, so auto refuses it (exit 3, with a hint) and only an explicit --strategy regroup writes it."""
    built = build_fp8(tmp_path / "src", SMALL_HEADS)
    done = awqpad("pad", built.path, tmp_path / "auto", "--tp", 4, "--engine", "vllm-latest")
    assert done.returncode == 3 and not (tmp_path / "auto").exists()
    assert "hint: --strategy regroup refines the FP8 blocks instead" in done.stderr, done.stderr
    plan = json.loads(awqpad("plan", built.path, "--tp", 4, "--engine", "vllm-latest", "--json").stdout)
    assert all("auto only picks exact plans" in c["rejected"] for c in plan["candidates"] if c["name"].startswith("regroup"))
    report = pad(built.path, tmp_path / "out", 4, "vllm-latest", "regroup")
    plan = report["plan"]
    assert plan["regroup"]["new_block"] == [32, 32]
    cands = {c["name"]: c for c in plan["candidates"]}
    assert cands["regroup 32x32"]["chosen"] and cands["regroup 32x32"]["fallbacks"] == 1
    fallbacks = [v for v in plan["violations_after"] if v["severity"] == "fallback"]
    assert [v["rule"] for v in fallbacks] == ["fp8-block-triton"] and "Triton" in fallbacks[0]["message"]
    assert any("[128, 128] -> [32, 32]" in note and "not identical rounding" in note for note in plan["notes"])
    judge(built, tmp_path / "out", 4)
    assert awqpad("verify", built.path, tmp_path / "out").returncode == 0


def test_auto_prefers_padding_on_the_fast_kernel_and_says_why(tmp_path):
    build_fp8(tmp_path / "src", DSV3, data=False)
    plan = plan_with_strategy(read_checkpoint(resolve_source(str(tmp_path / "src"))), (2,), "vllm-latest")
    assert plan.regroup is None and plan.candidates[0].name == "pad" and plan.candidates[0].chosen
    refine = {c.name: c for c in plan.candidates}["regroup 32x32"]
    assert "auto only picks exact plans" in refine.rejected
    regroup = plan_with_strategy(read_checkpoint(resolve_source(str(tmp_path / "src"))), (2,), "vllm-latest",
                                 strategy="regroup")
    refine = {c.name: c for c in regroup.candidates}["regroup 32x32"]
    assert refine.chosen and refine.fallbacks == 1  # on the slower Triton kernel, which plan says
    assert refine.added_flops_percent == 0.0 and 0 < refine.added_percent < plan.candidates[0].added_percent


def test_refine_then_pad_is_not_offered(tmp_path):
    # MLP 336 = 2.625 blocks of 128; k_proj 64 per rank at TP 2 rules out padding alone, 168 per rank splits into
    # neither 64 nor 32: only refining to 64 x 64 *and* padding 336 -> 384 would load, and refining is not exact
    # for W8A8 activations, so auto refuses; --strategy regroup refuses too (regrouping alone does not split 168)
    built = build_fp8(tmp_path / "src", Spec(arch="qwen3", head_dim=64, intermediate=336), data=False)
    for strategy, why in (("auto", "hint: --strategy regroup"), ("regroup", "needs padding too")):
        done = awqpad("pad", built.path, tmp_path / strategy, "--tp", 2, "--engine", "vllm-latest", "--strategy", strategy)
        assert done.returncode == 3 and not (tmp_path / strategy).exists(), done.stderr
        plan = json.loads(awqpad("plan", built.path, "--tp", 2, "--engine", "vllm-latest", "--strategy", strategy,
                                 "--json").stdout)
        assert any(why.split(": ")[-1] in (c["rejected"] or "") for c in plan["candidates"]) or why in done.stderr, \
            (strategy, done.stderr, plan["candidates"])


@pytest.mark.parametrize("engine", ["trtllm", "sglang", "vllm"])
def test_engines_that_need_128_blocks_refuse_refining_and_pad(tmp_path, engine):
    built = build_fp8(tmp_path / "src", Spec(arch="qwen3", intermediate=384))
    report = pad(built.path, tmp_path / "out", 2, engine, "auto")
    plan = report["plan"]
    assert plan["regroup"] is None and {d["padded"] for d in plan["dims"].values() if d["padded"] != d["original"]} == {512}
    rejected = {c["name"]: c["rejected"] for c in plan["candidates"]}
    # 192 per rank: 32 x 32 blocks would split it alone (TRT-LLM's own 128 rows still want padding), 64 x 64 with
    # padding; every one refused by these engines
    names = [n for n in rejected if n.startswith("regroup")]
    assert len(names) == 2
    for name in names:
        assert "not 128 x 128" in rejected[name] and f"by {engine} at TP 2" in rejected[name], rejected[name]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["weight_block_size"] == [128, 128]
    only = awqpad("pad", built.path, tmp_path / "out2", "--tp", 2, "--engine", engine, "--strategy", "regroup")
    assert only.returncode == 3 and only.stderr.strip() and "Traceback" not in only.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("flavour,why", [("ct-block", "compressed-tensors FP8 blocks"), ("ct-channel", "compressed-tensors"),
                                         ("tensor", "no K-blocks")])
def test_other_fp8_layouts_are_refused_with_a_reason(tmp_path, flavour, why):
    build_fp8(tmp_path / "src", Spec(arch="qwen3", flavour=flavour, intermediate=384), data=False)
    plan = plan_with_strategy(read_checkpoint(resolve_source(str(tmp_path / "src"))), (2,), "vllm-latest")
    assert plan.regroup is None
    refusals = [c.rejected for c in plan.candidates if c.name.startswith("regroup")]
    assert refusals and all(why in r for r in refusals), refusals


def _rewrite(path, tensor: str, change) -> None:
    """Apply `change(raw bytes of tensor) -> bytes` in place in whichever shard holds it, and record the shard's new
    sha256 in awqpad.json (as a careless re-upload would): the content checks must catch it, not the checksums."""
    for shard in sorted(path.glob("*.safetensors")):
        data = bytearray(shard.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        entry = json.loads(data[8 : 8 + n]).get(tensor)
        if entry is not None:
            a, b = (8 + n + x for x in entry["data_offsets"])
            data[a:b] = change(bytes(data[a:b]))
            shard.write_bytes(bytes(data))
            record = path / "awqpad.json"
            if record.exists():
                meta = json.loads(record.read_text())
                meta.get("files", {}).get(shard.name, {})["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
                record.write_text(json.dumps(meta, indent=2))
            return
    raise AssertionError(tensor)


def test_a_corrupted_refined_scale_fails_verify(tmp_path):
    built = build_fp8(tmp_path / "src", DSV3)
    pad(built.path, tmp_path / "out", 2, "vllm-latest", "regroup")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "out", bad)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    rows, cols = read_tensors(bad)[name][1].shape

    def double_last(raw: bytes) -> bytes:  # the refined block over rows 544..575 (inside the partial parent block)
        s = np.frombuffer(raw, "<f4").copy().reshape(rows, cols)
        s[-1, 0] *= 2
        return s.tobytes()

    _rewrite(bad, name, double_last)
    done = awqpad("verify", built.path, bad, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert [n for n, c in checks.items() if not c["ok"]] == ["regroup"]  # the check that compares refined scales
    problems = " ".join(checks["regroup"]["figures"]["problems"])
    assert name in problems and "FP8 block scales" in problems
    assert "dequantizes OUT differently from SRC (1024 weights)" in problems  # one 32 x 32 block, under both readers


# --- third-party judge: transformers FineGrainedFP8 reads weight_block_size from config.json -------------------


@pytest.mark.oracle
@pytest.mark.parametrize("tp,block", [(2, 64), (4, 32)])
def test_transformers_finegrained_fp8_logits_unchanged(tmp_path, tp, block):
    from tests.test_fp8_oracles import _logits, _need

    try:
        import torch  # noqa: F401
        from transformers import FineGrainedFP8Config  # noqa: F401
    except Exception as exc:
        _need("transformers FineGrainedFP8", exc)
    # a dense model (test_fp8_oracles: transformers 5.23 misreads partial-block fused experts); head_dim 64: k_proj per
    # rank is 64 at TP 2 and q_proj 64 at TP 4, MLP 192 / 96, so TP 2 takes 64 x 64 blocks and TP 4 32 x 32
    built = build_fp8(tmp_path / "src", Spec(arch="qwen3", head_dim=64, intermediate=384))
    pad(built.path, tmp_path / "out", tp, "vllm-latest", "regroup")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["weight_block_size"] == [block, block]
    ref, got = _logits(built.path), _logits(tmp_path / "out")
    assert np.abs(ref).max() > 0 and np.array_equal(ref, got)  # same dequantized weights: the same logits, bit for bit

    # negative control: one refined scale of layer 0's q_proj doubled must change the logits
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "out", bad)
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    shape = read_tensors(bad)[name][1].shape

    def double_first(raw: bytes) -> bytes:
        s = np.frombuffer(raw, "<f4").copy().reshape(shape)
        s[0, 0] *= 2
        return s.tobytes()

    _rewrite(bad, name, double_first)
    assert not np.array_equal(_logits(bad), ref)
