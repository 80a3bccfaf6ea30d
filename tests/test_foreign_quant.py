"""Quantized checkpoints awqpad does not pad: named by inspect (already quantized, TP behaviour), refused by
plan and pad with one line; MXFP4 is recognised as engine-sharded (plan says what works, pad refuses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.factory_fp4 import build_bnb, build_mxfp4


def awqpad(*args):
    return subprocess.run([sys.executable, "-m", "awqpad", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("kind,with_config,label", [
    ("nf4", True, "bitsandbytes nf4"),
    ("fp4", True, "bitsandbytes fp4"),
    ("int8", True, "bitsandbytes int8"),
    ("nf4", False, "bitsandbytes nf4 (found by its tensors"),
])
def test_bitsandbytes_is_named_not_a_dtype_error(tmp_path, kind, with_config, label):
    build_bnb(tmp_path / "m", kind=kind, with_config=with_config)
    proc = awqpad("inspect", tmp_path / "m", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    text = json.dumps(report["findings"])
    assert label in text and "already quantized" in text and "dtype" not in text
    assert "TP:" in text and "vLLM" in text
    assert {row["status"] for row in report["tp_table"]} == {"not padded"}
    human = awqpad("inspect", tmp_path / "m")
    assert human.returncode == 0 and "already quantized" in human.stdout and "not padded" in human.stdout
    for cmd in (("plan", tmp_path / "m", "--tp", "2"), ("pad", tmp_path / "m", tmp_path / "out", "--tp", "2")):
        proc = awqpad(*cmd)
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        assert label.split(" (")[0] in proc.stderr and "already quantized" in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,label", [("hqq", "HQQ"), ("gguf", "GGUF"), ("aqlm", "AQLM"), ("eetq", "EETQ"),
                                          ("torchao", "torchao")])
def test_other_methods_are_named(tmp_path, method, label):
    build_bnb(tmp_path / "m", with_config=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    proc = awqpad("inspect", tmp_path / "m", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["quantization"]["recognised"] == label and report["quantization"]["already_quantized"] is True
    proc = awqpad("pad", tmp_path / "m", tmp_path / "out", "--tp", "2")
    assert proc.returncode == 2 and label in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("with_config", [True, False])
def test_mxfp4_plan_says_what_works_and_pad_refuses(tmp_path, with_config):
    build_mxfp4(tmp_path / "m", intermediate=2880 // 10, with_config=with_config)  # 288 = 9 blocks of 32
    proc = awqpad("inspect", tmp_path / "m", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["format"] == "mxfp4"
    text = json.dumps(report["findings"])
    assert "ceil" in text and "TP 8: 64/rank" in text  # ceil(9 / 8) = 2 blocks of 32 per rank
    plan = awqpad("plan", tmp_path / "m", "--tp", "2", "--json")
    assert plan.returncode == 0, plan.stderr
    summary = json.loads(plan.stdout)
    assert not summary["needs_padding"] and any("MXFP4" in n for n in summary["notes"])
    proc = awqpad("pad", tmp_path / "m", tmp_path / "out", "--tp", "2")
    assert proc.returncode == 2 and "MXFP4" in proc.stderr and "ceil" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_fp8_e5m2_weights_refused_naming_what_was_found(tmp_path):
    from tests.factory_fp4 import Shape, write_safetensors

    (tmp_path / "m").mkdir()
    arrays = {}
    for name, (n, k) in {"q_proj": (128, 128), "k_proj": (64, 128), "v_proj": (64, 128), "o_proj": (128, 128)}.items():
        arrays[f"model.layers.0.self_attn.{name}.weight"] = ("BF16", Shape((n, k)))
    for name, (n, k) in {"gate_proj": (464, 128), "up_proj": (464, 128), "down_proj": (128, 464)}.items():
        arrays[f"model.layers.0.mlp.{name}.weight"] = ("F8_E5M2", Shape((n, k)))
    write_safetensors(tmp_path / "m", arrays, 1)
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 464,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}))
    proc = awqpad("inspect", tmp_path / "m")
    assert proc.returncode == 2
    assert "FP8 E5M2" in proc.stderr and "F8_E5M2[464, 128]" in proc.stderr and "Traceback" not in proc.stderr
