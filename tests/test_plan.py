"""`awqpad plan` against real published model dimensions (header-only sparse checkpoints)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awqpad.checkpoint.model import read_checkpoint
from awqpad.plan.pad_plan import make_plan
from awqpad.engines.evaluate import evaluate
from awqpad.source import resolve_source
from tests.factory import Model, Quant, build_checkpoint

AWQ = Quant("awq", sym=False)
# Dimensions from the models' published config.json (see ../shared/reference/model-configs-sample.tsv).
MODELS = {
    "Qwen2-72B-AWQ": Model("qwen2", hidden=8192, intermediate=29568, heads=64, kv_heads=8, head_dim=128, vocab=1024),
    "Qwen2.5-VL-7B-AWQ": Model("qwen2_vl", hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=1024),
    "Qwen2.5-3B-AWQ": Model("qwen2", hidden=2048, intermediate=11008, heads=16, kv_heads=2, head_dim=128, vocab=1024),
    "Qwen2.5-0.5B-AWQ": Model("qwen2", hidden=896, intermediate=4864, heads=14, kv_heads=2, head_dim=64, vocab=1024),
    "Qwen2-57B-A14B-AWQ": Model("qwen2_moe", hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=1024,
                                experts=4, moe_intermediate=2560, shared_intermediate=20480),
    "Qwen3-30B-A3B-AWQ": Model("qwen3_moe", hidden=2048, intermediate=6144, heads=32, kv_heads=4, head_dim=128, vocab=1024,
                               experts=8, moe_intermediate=768),
    "Llama-2-7B-AWQ": Model("llama", hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, vocab=1024),
    "Llama-3-8B-AWQ": Model("llama", hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=1024),
    "Mixtral-8x7B-AWQ": Model("mixtral", hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=1024, experts=8),
    "GLM-4-9B-AWQ": Model("chatglm", hidden=4096, intermediate=13696, heads=32, kv_heads=2, head_dim=128, vocab=1024),
    "Phi-4-AWQ": Model("phi3", hidden=5120, intermediate=17920, heads=40, kv_heads=10, head_dim=128, vocab=1024),
    "DeepSeek-V2-Lite-fp16": Model("deepseek_v2", hidden=2048, intermediate=10944, heads=16, kv_heads=16, head_dim=128, vocab=1024,
                                   experts=4, moe_intermediate=1408, n_shared_experts=2, first_k_dense=1),
}
# (model, tp, engine) -> {config key: padded} or "blocked:<text>" ; {} = loads as is.
EXPECTED = [
    ("Qwen2-72B-AWQ", 1, "vllm", {}),
    ("Qwen2-72B-AWQ", 2, "vllm", {"intermediate_size": 29696}),
    ("Qwen2-72B-AWQ", 4, "vllm", {"intermediate_size": 29696}),
    ("Qwen2-72B-AWQ", 8, "vllm", {"intermediate_size": 29696}),
    ("Qwen2-72B-AWQ", 16, "vllm", {"intermediate_size": 30720}),
    ("Qwen2-72B-AWQ", 4, "vllm-latest", {"intermediate_size": 29696}),
    ("Qwen2-72B-AWQ", 4, "sglang", {"intermediate_size": 29696}),
    ("Qwen2-72B-AWQ", 4, "tgi", {"intermediate_size": 29696}),
    ("Qwen2-72B-AWQ", 4, "trtllm", {"intermediate_size": 29696}),
    ("Qwen2-72B-AWQ", 8, "lmdeploy", {}),
    ("Qwen2-72B-AWQ", 16, "tgi", "blocked:8 KV heads"),
    ("Qwen2.5-VL-7B-AWQ", 4, "vllm", {}),
    ("Qwen2.5-VL-7B-AWQ", 8, "vllm", "blocked:28 attention heads do not split over 8"),
    ("Qwen2.5-3B-AWQ", 2, "vllm", {}),
    ("Qwen2.5-3B-AWQ", 4, "vllm", {"intermediate_size": 11264}),
    ("Qwen2.5-3B-AWQ", 8, "vllm", {"intermediate_size": 11264}),
    ("Qwen2.5-0.5B-AWQ", 2, "vllm", "blocked:o_proj input 448"),
    ("Qwen2-57B-A14B-AWQ", 4, "vllm", {}),
    ("Qwen2-57B-A14B-AWQ", 8, "vllm", "blocked:28 attention heads"),
    ("Qwen3-30B-A3B-AWQ", 2, "vllm", {}),
    ("Qwen3-30B-A3B-AWQ", 4, "vllm", {"moe_intermediate_size": 1024}),
    ("Qwen3-30B-A3B-AWQ", 8, "vllm", {"moe_intermediate_size": 1024}),
    ("Qwen3-30B-A3B-AWQ", 4, "tgi", {"moe_intermediate_size": 1024}),
    ("Llama-2-7B-AWQ", 2, "vllm", {}),
    ("Llama-2-7B-AWQ", 4, "vllm", {"intermediate_size": 11264}),
    ("Llama-3-8B-AWQ", 8, "vllm", {}),
    ("Mixtral-8x7B-AWQ", 8, "vllm", {}),
    ("GLM-4-9B-AWQ", 2, "vllm", {"ffn_hidden_size": 13824}),
    ("GLM-4-9B-AWQ", 8, "vllm", {"ffn_hidden_size": 14336}),
    ("Phi-4-AWQ", 2, "vllm", {}),
    ("Phi-4-AWQ", 4, "vllm", "blocked:10 KV heads"),
    ("DeepSeek-V2-Lite-fp16", 8, "vllm", {}),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-configs")
    out = {}
    for name, model in MODELS.items():
        quant = Quant("fp16") if name.endswith("fp16") else AWQ
        build_checkpoint(root / name, dataclass_replace(model, layers=2), quant, shards=2, data=False)
        out[name] = read_checkpoint(resolve_source(str(root / name)))
    return out


def dataclass_replace(model, **kw):
    import dataclasses

    return dataclasses.replace(model, **kw)


@pytest.mark.parametrize("name,tp,engine,expected", EXPECTED, ids=[f"{m}-tp{t}-{e}" for m, t, e, _ in EXPECTED])
def test_real_models(checkpoints, name, tp, engine, expected):
    plan = make_plan(checkpoints[name], (tp,), engine)
    if isinstance(expected, str):
        assert plan.blocked
        assert any(expected.split(":", 1)[1] in (b.explanation or b.message) for b in plan.blockers), plan.blockers
        return
    assert not plan.blocked, plan.blockers
    assert {d.config_key: d.padded for d in plan.changed_dims} == expected
    assert plan.needs_padding == bool(expected)
    after = [v for v in plan.violations_after if v.severity == "error"]
    assert not after, after


def test_one_checkpoint_for_several_tps(checkpoints):
    plan = make_plan(checkpoints["Qwen2-72B-AWQ"], (2, 4, 8), "vllm")
    (dim,) = plan.changed_dims
    assert (dim.original, dim.padded) == (29568, 29696)
    assert abs(100 * dim.added_fraction - 0.433) < 0.01  # "0.43 % more MLP weight"
    assert 0 < plan.added_bytes < 0.005 * plan.total_bytes


def test_deepseek_shared_experts_follow_the_expert_width(tmp_path):
    model = MODELS["DeepSeek-V2-Lite-fp16"]
    build_checkpoint(tmp_path / "ds", dataclass_replace(model, hidden=2048, layers=2, moe_intermediate=1408, intermediate=10880),
                     AWQ, shards=1, data=False)
    plan = make_plan(read_checkpoint(resolve_source(str(tmp_path / "ds"))), (4,), "vllm")
    widths = {d.kind: d.padded for d in plan.dims}
    assert widths["expert"] == 1536 and widths["shared"] == 2 * widths["expert"]
    assert "moe_intermediate_size" in plan.config_updates and plan.config_updates["moe_intermediate_size"] == 1536


def test_engine_differences_group_64(tmp_path):
    model = dataclass_replace(MODELS["Qwen2-72B-AWQ"], layers=1)
    build_checkpoint(tmp_path / "g64", model, Quant("awq", sym=False, group_size=64), shards=1, data=False)
    ckpt = read_checkpoint(resolve_source(str(tmp_path / "g64")))
    # whole groups of 64 per rank already hold at TP 2 (14784 = 231 x 64) ...
    assert not make_plan(ckpt, (2,), "vllm-latest").needs_padding
    # ... but classic Marlin wants 128-row tiles per rank
    assert {d.padded for d in make_plan(ckpt, (2,), "vllm").changed_dims} == {29696}
    everything = make_plan(ckpt, (2, 4), "all")
    assert everything.engines == ("vllm", "vllm-latest", "sglang", "tgi", "lmdeploy", "trtllm")
    assert {d.padded for d in everything.changed_dims} == {29696}
    assert any("TurboMind pads inter_size" in n for n in everything.notes)


def test_cli_json_contract_and_exit_codes(checkpoints, tmp_path):
    src = checkpoints["Qwen2-72B-AWQ"].source.root
    proc = subprocess.run([sys.executable, "-m", "awqpad", "plan", str(src), "--tp", "2", "--tp", "4", "--tp", "8", "--json",
                           "--tensors"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("tp", "engine", "format", "bits", "group_size", "needs_padding", "blocked", "dims", "blockers", "added_bytes"):
        assert key in data
    assert data["tp"] == [2, 4, 8] and data["engine"] == "vllm" and data["format"] == "awq-gemm"
    assert data["bits"] == 4 and data["group_size"] == 128 and data["needs_padding"] and not data["blocked"]
    assert data["dims"]["intermediate_size"]["original"] == 29568 and data["dims"]["intermediate_size"]["padded"] == 29696
    assert data["blockers"] == [] and data["added_bytes"] > 0
    down = next(t for t in data["tensors"] if t["name"] == "model.layers.0.mlp.down_proj.qweight")
    assert down["old_shape"] == [29568, 1024] and down["new_shape"] == [29696, 1024]
    assert "awqpad pad" in data["next"]["pad"] and "--tensor-parallel-size 8" in data["next"]["serve"]
    blocked = subprocess.run([sys.executable, "-m", "awqpad", "plan", str(checkpoints["Qwen2.5-VL-7B-AWQ"].source.root),
                              "--tp", "8", "--json"], capture_output=True, text=True)
    assert blocked.returncode == 3
    data = json.loads(blocked.stdout)
    assert data["blocked"] and "must be divisible by tensor parallel size (8)" in data["blockers"][0]["message"]
    assert data["blockers"][0]["nearest_tp"] == [4]
    human = subprocess.run([sys.executable, "-m", "awqpad", "plan", str(src), "--tp", "4"], capture_output=True, text=True)
    assert human.returncode == 0 and "29696" in human.stdout and "vllm serve" in human.stdout
    assert "The input size is not aligned with the quantized weight shape" in human.stdout


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=st.integers(2, 400), group=st.sampled_from([32, 64, 128]), tp=st.sampled_from([1, 2, 4, 8, 16]),
       engine=st.sampled_from(["vllm", "vllm-latest", "sglang", "tgi", "trtllm"]))
def test_planned_width_is_the_smallest_that_satisfies_every_rule(tmp_path_factory, groups, group, tp, engine):
    width = groups * group
    root = tmp_path_factory.mktemp("prop")
    model = Model("qwen2", hidden=1024, intermediate=width, layers=1, heads=16, kv_heads=16, head_dim=64, vocab=64)
    build_checkpoint(root / "m", model, Quant("awq", sym=False, group_size=group), shards=1, data=False)
    ckpt = read_checkpoint(resolve_source(str(root / "m")))
    plan = make_plan(ckpt, (tp,), engine)
    padded = {d.kind: d.padded for d in plan.dims}["dense"]

    def mlp_ok(w):
        return not [v for v in evaluate(ckpt, engine, tp, {"dense": w}) if v.paddable]

    assert padded >= width and padded % group == 0 and padded % 8 == 0
    assert mlp_ok(padded)
    step = math.lcm(group, 8)
    assert not any(mlp_ok(w) for w in range(width, padded, step))
