"""Regrouped checkpoints under the third-party dequantizers already used for padding (tests/test_oracles.py):
AutoAWQ / GPTQModel / AutoGPTQ / compressed-tensors decode every module of OUT (groups split in two) to
bit-identically the weights they decode SRC to. Oracle marker: skips where a package is missing, fails in CI."""

from __future__ import annotations

import json
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
