"""Regrouping (`--strategy pad|regroup|auto`): which plan wins, and that `pad` writes it exactly.

Exactness is judged by the factory's independent dequantizers (numpy): every module of OUT, read with the
new group size, dequantizes to exactly the float64 weights SRC dequantizes to with the old one, and every
packed weight byte is unchanged. Plans use header-only checkpoints with real published dimensions.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from awqpad.checkpoint.model import read_checkpoint
from awqpad.engines.evaluate import evaluate
from awqpad.plan.strategy import plan_with_strategy
from awqpad.source import resolve_source
from tests.factory import Model, Quant, build_checkpoint, dequantize_module, load_tensors

AWQ = Quant("awq", sym=False)
QWEN3_30B = Model("qwen3_moe", hidden=2048, intermediate=6144, heads=32, kv_heads=4, head_dim=128, vocab=1024,
                  experts=8, moe_intermediate=768, layers=2)
QWEN2_72B = Model("qwen2", hidden=8192, intermediate=29568, heads=64, kv_heads=8, head_dim=128, vocab=1024, layers=1)


def header_only(tmp_path, model, quant=AWQ):
    build_checkpoint(tmp_path, model, quant, shards=1, data=False)
    return read_checkpoint(resolve_source(str(tmp_path)))


def by_name(plan):
    return {c.name: c for c in plan.candidates}


def test_qwen3_30b_at_tp4_regroups_to_64_instead_of_padding(tmp_path):
    plan = plan_with_strategy(header_only(tmp_path, QWEN3_30B), (4,), "vllm-latest")
    assert plan.regroup is not None and (plan.regroup.group_size, plan.regroup.new_group_size) == (128, 64)
    assert not plan.changed_dims  # no width changes: 768 stays 768
    cands = by_name(plan)
    chosen = cands["regroup g64"]
    assert chosen.chosen and chosen.added_flops_percent == 0.0
    # scales + zeros of every linear double: (16 + 4) / 128 -> (16 + 4) / 64 bits per weight, about 3 % more
    assert 3.0 < chosen.added_percent < 4.0
    pad = cands["pad"]
    assert pad.widths == {"expert": 1024} and pad.added_flops_percent == pytest.approx(33.333, abs=0.01)
    assert "costs more" in pad.rejected
    assert "slower fallback kernel" in cands["none"].rejected
    assert plan.config_updates["quantization_config"]["group_size"] == 64
    assert not [v for v in plan.violations_after if v.severity == "error"]
    # what the engine sees after regrouping: nothing left to fall back on
    assert not plan.violations_after


def test_profiles_that_refuse_group_64_say_so_and_pad(tmp_path):
    ckpt = header_only(tmp_path, QWEN3_30B)
    plan = plan_with_strategy(ckpt, (4,), "all")  # includes LMDeploy TurboMind (group 128 only)
    assert plan.regroup is None
    assert {d.kind: d.padded for d in plan.changed_dims} == {"expert": 1024}
    rejected = by_name(plan)["regroup g64"].rejected
    assert "lmdeploy" in rejected and "group size 64 is not 128" in rejected
    trt = plan_with_strategy(ckpt, (4,), "trtllm")  # TRT-LLM's CUTLASS kernels: 64 yes, 32 no
    assert trt.regroup.new_group_size == 64 and "group size 32 is not 64 or 128" in by_name(trt)["regroup g32"].rejected


def test_dense_29568_at_tp8_cannot_be_regrouped_alone(tmp_path):
    ckpt = header_only(tmp_path, QWEN2_72B)
    plan = plan_with_strategy(ckpt, (8,), "vllm-latest")
    assert plan.regroup is None and {d.padded for d in plan.changed_dims} == {29696}
    cands = by_name(plan)
    # 29568 / 8 = 3696 = 16 * 231: 57.75 groups of 64, 115.5 of 32
    assert "regroup g64 + pad" in cands and "regroup g32 + pad" in cands
    assert all("costs more" in cands[n].rejected for n in ("regroup g64 + pad", "regroup g32 + pad"))
    only = plan_with_strategy(ckpt, (8,), "vllm-latest", strategy="regroup")
    assert only.blocked and only.blockers[-1].rule == "regroup-alone"
    assert plan_with_strategy(ckpt, (8,), "vllm-latest", strategy="pad").candidates[0].name == "pad"


COMBINED = Model("qwen2", hidden=1024, intermediate=1152, heads=8, kv_heads=4, head_dim=128, vocab=1024, layers=1)


def test_regroup_and_pad_combined_is_cheapest_when_neither_alone_is(tmp_path):
    # 1152 = 9 groups of 128; at TP 8 144 per rank = 1.125 / 2.25 / 4.5 groups of 128 / 64 / 32: nothing
    # regroups alone. pad: 2048 (+78 % FLOPs); g64 + pad: 1536 (+33 %); g32 + pad: 1280 (+11 %)
    plan = plan_with_strategy(header_only(tmp_path, COMBINED), (8,), "vllm-latest")
    assert plan.candidates[0].name == "regroup g32 + pad" and plan.candidates[0].chosen
    assert plan.regroup.new_group_size == 32 and {d.padded for d in plan.changed_dims} == {1280}
    cands = by_name(plan)
    assert cands["pad"].widths == {"dense": 2048} and cands["regroup g64 + pad"].widths == {"dense": 1536}
    assert not [v for v in plan.violations_after if v.severity == "error"]


def test_plan_cli_shows_the_candidates(tmp_path):
    build_checkpoint(tmp_path / "q3", QWEN3_30B, AWQ, shards=1, data=False)
    run = [sys.executable, "-m", "awqpad", "plan", str(tmp_path / "q3"), "--tp", "4", "--engine", "vllm-latest"]
    human = subprocess.run(run, capture_output=True, text=True)
    assert human.returncode == 0, human.stderr
    assert "Regroup: group_size 128 -> 64" in human.stdout and "regroup g64" in human.stdout
    data = json.loads(subprocess.run(run + ["--json"], capture_output=True, text=True).stdout)
    assert data["strategy"] == "auto" and data["regroup"]["new_group_size"] == 64
    assert [c["name"] for c in data["candidates"]][0] == "regroup g64" and data["candidates"][0]["chosen"]
    bad = subprocess.run(run + ["--strategy", "shrink"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--strategy 'shrink'" in bad.stderr


# --- pad writes it exactly ------------------------------------------------------------------------

SMALL = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=640, layers=2)  # 320 per rank at TP 2
CASES = {
    "awq": (Model(**SMALL), AWQ),
    "awq-sym": (Model(**SMALL), Quant("awq", sym=True)),
    "gptq-v1-sym": (Model(**SMALL), Quant("gptq")),
    "gptq-v2-asym": (Model(**SMALL), Quant("gptq", sym=False, checkpoint_format="gptq_v2")),
    "gptq-act-order": (Model(**SMALL), Quant("gptq", desc_act=True)),
    "gptq-8bit": (Model(**SMALL), Quant("gptq", bits=8)),
    "gptq-dynamic": (Model(**SMALL), Quant("gptq", dynamic={r"+:.*\.self_attn\.o_proj": {"group_size": 64}})),
    "ct-sym": (Model(**SMALL), Quant("ct")),
    "ct-asym-act-order": (Model(**SMALL), Quant("ct", sym=False, desc_act=True)),
    "moe-qwen2-awq": (Model(arch="qwen2_moe", **SMALL), AWQ),
    "moe-qwen3-ct": (Model(arch="qwen3_moe", **SMALL, experts=3, moe_intermediate=384), Quant("ct")),
}


def pad_cli(src, out, *extra):
    cmd = [sys.executable, "-m", "awqpad", "pad", str(src), str(out), "--tp", "2", "--engine", "vllm-latest", "--json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("case", list(CASES))
def test_pad_writes_the_regrouped_checkpoint_exactly(tmp_path, case):
    model, quant = CASES[case]
    src, out = tmp_path / "src", tmp_path / "out"
    fx = build_checkpoint(src, model, quant, shards=2, seed=3)
    report = pad_cli(src, out, "--strategy", "regroup")
    plan = report["plan"]
    assert plan["regroup"]["factor"] == 2 and not [d for d in plan["dims"].values() if d["padded"] != d["original"]]
    before, after = load_tensors(src), load_tensors(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    if quant.method == "ct":
        assert {g["weights"]["group_size"] for g in cfg["config_groups"].values()} == {64}
    else:
        assert cfg["group_size"] == 64
    if quant.dynamic:
        assert cfg["dynamic"][r"+:.*\.self_attn\.o_proj"]["group_size"] == 32
    packed = [n for n in before if n.rsplit(".", 1)[-1] in ("qweight", "weight_packed", "weight")]
    assert packed and all(np.array_equal(before[n], after[n]) for n in packed)  # every weight byte unchanged
    checked = 0
    for prefix, mq in fx.module_quant.items():
        if mq is None:
            continue
        regrouped = dataclasses.replace(mq, group_size=mq.group_size // 2)
        w_src = dequantize_module(before, prefix, mq)
        w_out = dequantize_module(after, prefix, regrouped)
        assert np.array_equal(w_src, w_out), prefix  # bit-identical float64 weights
        assert np.array_equal(w_src, fx.weights[prefix])
        checked += 1
    assert checked == sum(1 for mq in fx.module_quant.values() if mq is not None) > 0
    scales = [n for n in before if n.endswith(("scales", "weight_scale"))]
    axis = 1 if quant.method == "ct" else 0
    assert all(np.array_equal(np.repeat(before[n], 2, axis=axis), after[n]) for n in scales)  # parent's scale, twice
    ckpt = read_checkpoint(resolve_source(str(out)))
    assert {lin.group_size for lin in ckpt.linears if lin.quantized} == {g // 2 for g in {mq.group_size for mq in fx.module_quant.values() if mq}}
    assert not evaluate(ckpt, "vllm-latest", 2)


def test_regroup_then_pad_writes_both_exactly(tmp_path):
    for name, quant in (("gptq-act-order", Quant("gptq", desc_act=True)), ("ct-asym", Quant("ct", sym=False)),
                        ("awq", AWQ)):
        src, out = tmp_path / f"{name}-src", tmp_path / f"{name}-out"
        fx = build_checkpoint(src, COMBINED, quant, shards=1, seed=5)
        cmd = [sys.executable, "-m", "awqpad", "pad", str(src), str(out), "--tp", "8", "--engine", "vllm-latest", "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        plan = json.loads(done.stdout)["plan"]
        assert plan["regroup"]["new_group_size"] == 32 and plan["dims"]["intermediate_size"]["padded"] == 1280
        after = load_tensors(out)
        for prefix, mq in fx.module_quant.items():
            if mq is None:
                continue
            w = dequantize_module(after, prefix, dataclasses.replace(mq, group_size=32))
            ref = fx.weights[prefix]
            if prefix.endswith("down_proj"):
                assert np.array_equal(w[:, :1152], ref) and not w[:, 1152:].any(), (name, prefix)
            elif prefix.endswith(("gate_proj", "up_proj")):
                assert np.array_equal(w[:1152], ref) and not w[1152:].any(), (name, prefix)
            else:
                assert np.array_equal(w, ref), (name, prefix)
        assert not evaluate(read_checkpoint(resolve_source(str(out))), "vllm-latest", 8)


# --- verify proves a regrouped checkpoint like a padded one ---------------------------------------

def verify_json(*args):
    done = subprocess.run([sys.executable, "-m", "awqpad", "verify", *map(str, args), "--json"], capture_output=True, text=True)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}, done.stderr


def check(report, name):
    return next(c for c in report["checks"] if c["name"] == name)


@pytest.mark.parametrize("case", ["awq", "gptq-act-order", "gptq-v2-asym", "ct-asym-act-order", "moe-qwen2-awq"])
def test_verify_passes_on_regrouped_outputs_and_catches_a_changed_child_group(tmp_path, case):
    model, quant = CASES[case]
    src, out = tmp_path / "src", tmp_path / "out"
    build_checkpoint(src, model, quant, shards=2, seed=4)
    pad_cli(src, out, "--strategy", "regroup")
    code, report, err = verify_json(src, out, "--tp", 2, "--engine", "vllm-latest")
    assert code == 0, ([c for c in report.get("checks", []) if not c["ok"]], err)
    rg = check(report, "regroup")
    assert rg["ok"] and rg["figures"]["tensors"] > 0 and rg["figures"]["linears_compared"] > 0  # it compared something
    assert check(report, "function TP=2")["ok"]
    # one child group's scale no longer equals its parent's: the function changes and verify says where
    from tests.test_verify import edit

    scale = next(n for n in load_tensors(out) if n.endswith((".mlp.down_proj.scales", ".mlp.down_proj.weight_scale",
                                                             ".experts.0.down_proj.scales")))
    edit(out, scale, lambda a: a.reshape(-1).__setitem__(1, a.reshape(-1)[0] * 2 + 1))
    code, report, _ = verify_json(src, out, "--tp", 2, "--engine", "vllm-latest")
    assert code == 1
    assert not check(report, "regroup")["ok"] and scale in check(report, "regroup")["detail"]


def test_verify_catches_a_g_idx_moved_to_another_parent(tmp_path):
    model, quant = CASES["gptq-act-order"]
    src, out = tmp_path / "src", tmp_path / "out"
    build_checkpoint(src, model, quant, shards=2, seed=6)
    pad_cli(src, out, "--strategy", "regroup")
    from tests.test_verify import edit

    name = "model.layers.0.mlp.down_proj.g_idx"
    edit(out, name, lambda a: a.__setitem__(0, (a[0] + 2) % a.max()))
    code, report, _ = verify_json(src, out, "--tp", 2, "--engine", "vllm-latest")
    assert code == 1 and name in check(report, "regroup")["detail"]
