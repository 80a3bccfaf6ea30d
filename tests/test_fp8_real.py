"""Header-only planning of published FP8 checkpoints' real shapes (sparse files: headers, no bytes).

Dimensions from the models' config.json (../shared/reference/fp8-fp4-engines.md sections 3.1, 5, and
the Hugging Face configs named there); layers are cut to a few (widths do not depend on depth), expert
counts are the real ones. Expected widths: t * ceil(ceil(W / 128) / t) * 128 (whole blocks per rank).
"""

from __future__ import annotations

import pytest

from awqpad.checkpoint.model import read_checkpoint
from awqpad.plan.pad_plan import make_plan
from awqpad.source import resolve_source
from tests.fp8_factory import Spec, build_fp8

REAL = {
    "Qwen3-30B-A3B-FP8": Spec(arch="qwen3_moe", hidden=2048, layers=2, heads=32, kv_heads=4, head_dim=128,
                              moe_intermediate=768, experts=128, vocab=151936),
    "Qwen3-235B-A22B-FP8": Spec(arch="qwen3_moe", hidden=4096, layers=2, heads=64, kv_heads=4, head_dim=128,
                                moe_intermediate=1536, experts=128, vocab=151936),
    "MiniMax-M2": Spec(arch="minimax_m2", hidden=3072, layers=2, heads=48, kv_heads=8, head_dim=128,
                       moe_intermediate=1536, experts=256, vocab=200064),
    "DeepSeek-V3": Spec(arch="deepseek_v3", hidden=7168, layers=4, heads=128, kv_heads=128, intermediate=18432,
                        moe_intermediate=2048, experts=256, n_shared=1, first_k_dense=3, vocab=129280,
                        mla=(1536, 512, 64, 128, 128)),
    "Qwen3-Next-80B-A3B-FP8": Spec(arch="qwen3_next", hidden=2048, layers=4, heads=16, kv_heads=2, head_dim=256,
                                   moe_intermediate=512, shared=512, experts=512, linear_every=4, vocab=151936,
                                   gdn=(16, 32, 128, 128)),
}
CASES = [  # (model, tp, {kind: padded width}, config updates)
    ("Qwen3-30B-A3B-FP8", 2, {"expert": 768}, {}),
    ("Qwen3-30B-A3B-FP8", 4, {"expert": 1024}, {"moe_intermediate_size": 1024}),
    ("Qwen3-30B-A3B-FP8", 8, {"expert": 1024}, {"moe_intermediate_size": 1024}),
    ("Qwen3-235B-A22B-FP8", 4, {"expert": 1536}, {}),
    ("Qwen3-235B-A22B-FP8", 8, {"expert": 2048}, {"moe_intermediate_size": 2048}),
    ("MiniMax-M2", 8, {"expert": 2048}, {"intermediate_size": 2048}),
    ("DeepSeek-V3", 8, {"dense": 18432, "expert": 2048, "shared": 2048}, {}),
    ("DeepSeek-V3", 32, {"dense": 20480, "expert": 4096, "shared": 4096},
     {"intermediate_size": 20480, "moe_intermediate_size": 4096}),
    ("Qwen3-Next-80B-A3B-FP8", 8, {"expert": 1024, "shared": 1024},
     {"moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024}),
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8real")
    return {name: read_checkpoint(resolve_source(str(build_fp8(root / name, s, data=False, shards=4).path)))
            for name, s in REAL.items()}


@pytest.mark.parametrize("name,tp,widths,updates", CASES, ids=[f"{c[0]}-tp{c[1]}" for c in CASES])
def test_real_fp8_widths(real, name, tp, widths, updates):
    plan = make_plan(real[name], (tp,), "vllm")
    assert not plan.blockers, [b.explanation for b in plan.blockers]
    assert {d.kind: d.padded for d in plan.dims} == widths
    assert plan.config_updates == updates
    for d in plan.dims:
        assert d.padded == tp * -(-(-(-d.original // 128)) // tp) * 128 or d.padded == d.original


def test_real_fp8_engines_differ(real):
    """SGLang is as strict as classic vLLM; vllm-latest loads the 192-per-rank experts unpadded through
    scale refinement (a slower-kernel fallback only; awqpad still pads to keep the fast kernels)."""
    ckpt = real["Qwen3-235B-A22B-FP8"]
    sglang = make_plan(ckpt, (8,), "sglang")
    assert {d.kind: d.padded for d in sglang.dims} == {"expert": 2048}
    assert any(v.severity == "error" and "block_n = 128" in v.message for v in sglang.violations_before)
    latest = make_plan(ckpt, (8,), "vllm-latest")
    assert {v.severity for v in latest.violations_before} == {"fallback"}
    assert {v.rule for v in latest.violations_before} == {"expert-fp8-triton-only"}


def test_real_fp8_cost_and_alternatives(real):
    """plan never hides the cost: added bytes per GPU, then the unpadded layouts with their launch lines."""
    plan = make_plan(real["Qwen3-235B-A22B-FP8"], (8,), "vllm")
    (expert,) = [d for d in plan.dims if d.kind == "expert"]
    head = next(w for w in plan.warnings if w.startswith("FP8 padding cost at TP 8"))
    assert f"+{expert.added_bytes / 8 / 1e9:.2f} GB of weights per GPU" in head and "expert 1536 -> 2048 (+33%)" in head
    lines = [w for w in plan.warnings if w.startswith("  ")]
    assert any(w.endswith("--tensor-parallel-size 8 --enable-expert-parallel") for w in lines)
    assert any("--tensor-parallel-size 4 --pipeline-parallel-size 2" in w for w in lines)
    sglang = make_plan(real["Qwen3-235B-A22B-FP8"], (8,), "sglang")
    assert any(w.endswith("--tp 8 --ep-size 8") for w in sglang.warnings)
    # DeepSeek-V3 at TP 32: EP alone does not help (the dense 18432 still splits to 576), so it is not offered
    ds = make_plan(real["DeepSeek-V3"], (32,), "vllm")
    alts = [w for w in ds.warnings if w.startswith("  ")]
    assert alts and not any("expert-parallel" in w for w in alts)
