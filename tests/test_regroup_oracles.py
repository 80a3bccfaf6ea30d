"""Regrouped checkpoints under the third-party dequantizers already used for padding (tests/test_oracles.py):
AutoAWQ / GPTQModel / AutoGPTQ / compressed-tensors decode every module of OUT (groups split in two) to
bit-identically the weights they decode SRC to; transformers' AutoModelForCausalLM and GPTQModel.load (the
runtimes of tests/test_runtime.py) compute identical logits on SRC and OUT. Oracle marker: skips where a
package is missing, fails in CI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.factory import build_checkpoint
from tests.test_oracles import CASES, MODEL, bit_equal, decoders_for, load_torch, module_tensors, require_oracles

pytestmark = pytest.mark.oracle
REGROUP_CASES = ["awq-zero_point", "gptq-v1-sym", "gptq-v2-asym", "gptq-v1-act_order", "gptq-v1-8bit", "ct-asym"]


@pytest.mark.parametrize("case", REGROUP_CASES)
def test_third_party_decoders_see_the_same_weights_after_regrouping(case, tmp_path):
    q = CASES[case]
    require_oracles(q.method)
    src, out = tmp_path / "src", tmp_path / "out"
    fx = build_checkpoint(src, MODEL, q, shards=2, seed=11)
    done = subprocess.run([sys.executable, "-m", "awqpad", "pad", str(src), str(out), "--tp", "2", "--engine", "vllm-latest",
                           "--strategy", "regroup", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cfg_s = json.loads((src / "config.json").read_text())
    cfg_o = json.loads((out / "config.json").read_text())
    assert json.loads((out / "awqpad.json").read_text())["plan"]["regroup"]["factor"] == 2
    t_s, t_o = load_torch(src), load_torch(out)
    compared = 0
    for prefix, mq in fx.module_quant.items():
        if mq is None:
            continue
        for (name, decode), (_, decode_o) in zip(decoders_for(cfg_s), decoders_for(cfg_o)):
            w_s = decode(module_tensors(t_s, prefix), cfg_s)
            w_o = decode_o(module_tensors(t_o, prefix), cfg_o)
            assert bit_equal(w_s, w_o), (name, prefix)
            compared += 1
    assert compared > 0


# --- a runtime we did not write: transformers (GPTQModel's kernels) computes the same logits ---------------------

RUNTIME_CASES = {  # case -> (quant, the GPTQModel.load backend test_runtime.py pins for that method)
    "awq-zero_point": (CASES["awq-zero_point"], "AWQ_TORCH_ATEN"),
    "gptq-v1-sym": (CASES["gptq-v1-sym"], "GPTQ_TORCH_ATEN"),
    "gptq-v2-asym": (CASES["gptq-v2-asym"], "GPTQ_TORCH_ATEN"),
    "gptq-v1-act_order": (CASES["gptq-v1-act_order"], "GPTQ_TORCH_ATEN"),
}


def _regrouped(tmp_path, quant):
    src, out = tmp_path / "src", tmp_path / "out"
    build_checkpoint(src, MODEL, quant, shards=2, seed=21)
    done = subprocess.run([sys.executable, "-m", "awqpad", "pad", str(src), str(out), "--tp", "2", "--engine", "vllm-latest",
                           "--strategy", "regroup", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "awqpad.json").read_text())
    assert record["plan"]["regroup"]["factor"] == 2, "awqpad did not regroup; the test would prove nothing"
    cfg_s, cfg_o = (json.loads((p / "config.json").read_text())["quantization_config"] for p in (src, out))
    assert (cfg_s["group_size"], cfg_o["group_size"]) == (128, 64)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == MODEL.intermediate  # no padding
    return src, out


@pytest.mark.parametrize("case", sorted(RUNTIME_CASES))
def test_transformers_logits_identical_after_regrouping(case, tmp_path):
    """AutoModelForCausalLM (CPU, float16; test_runtime.py's pinned GPTQModel kernels) on SRC and on OUT with its
    groups split in two: the same logits, max |diff| == 0 exactly, the tolerance the padded test uses. The kernels
    dequantize to a dense weight and run one matmul; the regrouped weight is bit-identical, so nothing may move."""
    from tests import test_runtime as runtime

    runtime._require_runtime()
    src, out = _regrouped(tmp_path, RUNTIME_CASES[case][0])
    a, kind_a = runtime.hf_logits(src)
    b, kind_b = runtime.hf_logits(out)
    assert kind_a == kind_b
    runtime.assert_same_logits(a, b, f"regrouped {case} via transformers ({kind_a})")
    # The runtime really reads group_size from config.json: OUT's halved scale rows read with the old group
    # size pair each input row with the wrong scale, so the logits move (or the load refuses the shapes).
    wrong = tmp_path / "wrong"
    shutil.copytree(out, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 128
    (wrong / "config.json").write_text(json.dumps(cfg))
    try:
        c, _ = runtime.hf_logits(wrong)
    except RuntimeError as exc:  # transformers 5.23 refuses the scale shapes: group_size is read from config.json
        assert "mismatched_sizes" in str(exc), exc
        return
    assert (a - c).abs().max().item() > 0, f"{case}: logits ignore group_size, so 'identical' above proves little"


@pytest.mark.parametrize("case", sorted(RUNTIME_CASES))
def test_gptqmodel_loader_logits_identical_after_regrouping(case, tmp_path):
    """GPTQModel.load with its ATen int4 kernel (as test_runtime.py runs it on padded outputs)."""
    from tests import test_runtime as runtime

    runtime._require_runtime()
    quant, backend = RUNTIME_CASES[case]
    src, out = _regrouped(tmp_path, quant)
    a, kind = runtime.gptqmodel_logits(src, backend)
    b, _ = runtime.gptqmodel_logits(out, backend)
    runtime.assert_same_logits(a, b, f"regrouped {case} via GPTQModel.load ({kind})")
