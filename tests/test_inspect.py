"""`awqpad inspect` on every fixture format and architecture: the facts, human and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from awqpad.checkpoint.model import read_checkpoint
from awqpad.plan.inspect_report import inspect_report
from awqpad.source import resolve_source
from tests.factory import ARCHS, MOE_ARCHS, Model, Quant, build_checkpoint

BASE = dict(hidden=512, heads=8, kv_heads=4, head_dim=64)
FORMATS = {
    "awq": (Quant("awq", sym=False), "awq-gemm"),
    "gptq-v2-act-order": (Quant("gptq", sym=False, checkpoint_format="gptq_v2", desc_act=True), "gptq"),
    "ct-asym": (Quant("ct", sym=False, group_size=64), "compressed-tensors"),
    "bf16": (Quant("bf16"), "dense"),
}


def model_for(arch: str) -> Model:
    if arch not in MOE_ARCHS:
        return Model(arch, **BASE)
    extra = {"mixtral": {}, "qwen2_moe": dict(moe_intermediate=768, shared_intermediate=1408),
             "qwen3_moe": dict(moe_intermediate=768), "deepseek_v2": dict(moe_intermediate=768, n_shared_experts=2, first_k_dense=1)}
    return Model(arch, **BASE, experts=3, **extra[arch])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_every_arch_and_format(tmp_path, arch, fmt):
    quant, expected_format = FORMATS[fmt]
    fx = build_checkpoint(tmp_path / "m", model_for(arch), quant, shards=2, data=False)
    report = inspect_report(read_checkpoint(resolve_source(str(tmp_path / "m"))))
    assert report.format == expected_format
    assert report.family_known
    assert not [f for f in report.findings if f["level"] != "info"], report.findings
    if quant.method != "bf16":
        assert report.quantization["bits"] == 4 and report.quantization["group_size"] == quant.group_size
        assert report.linears_quantized > 0
    else:
        assert report.quantization == {"method": "none"} and report.linears_quantized == 0
    dims = report.dims
    assert dims["hidden_size"] == 512 and dims["heads"] == 8
    if arch != "deepseek_v2":
        assert dims["kv_heads"] == 4 and dims["head_dim"] == 64
    widths = {k: v["tensors"] for k, v in dims.items() if isinstance(v, dict)}
    m = fx.model
    if arch == "mixtral":
        assert widths == {"intermediate_size": m.intermediate}
    elif arch == "qwen2_moe":
        assert widths == {"moe_intermediate_size": 768, "shared_expert_intermediate_size": 1408}
    elif arch == "qwen3_moe":
        assert widths == {"moe_intermediate_size": 768}
    elif arch == "deepseek_v2":
        assert widths == {"intermediate_size": m.intermediate, "moe_intermediate_size": 768, "shared_width": 1536}
    elif arch == "chatglm":
        assert widths == {"ffn_hidden_size": m.intermediate}
    else:
        assert widths == {"intermediate_size": m.intermediate}
    if arch in ("qwen2_vl", "qwen2_5_vl_nested", "internvl"):
        assert report.vision_tensors > 0
    statuses = {row.tp: row.status for row in report.tp_table}
    assert statuses[1] == "loadable"
    assert statuses[16] == "blocked"  # 8 heads
    if quant.method != "bf16":
        # Qwen3-MoE experts 768 -> 192 per rank at TP 4: 3 whole groups of 64, Marlin MoE takes them (g64 only)
        assert statuses[4] == ("loadable" if arch == "qwen3_moe" and fmt == "ct-asym" else "needs padding")
        # Qwen3-MoE's only width is 768 = 3 groups per rank at TP 2
        # mixtral experts 2432 -> 1216 per rank: whole groups of 64, and 1216 % max(64, g) == 0, so vLLM's MoE Marlin
        # gate (marlin_utils.py check_moe_marlin_supports_layer) takes the g64 compressed-tensors experts as they are
        loads = arch == "qwen3_moe" or (arch == "mixtral" and fmt == "ct-asym")
        assert statuses[2] == ("loadable" if loads else "needs padding")


def test_config_smaller_than_tensors_is_reported(tmp_path):
    """Users hand-edit intermediate_size 29568 -> 29440 and silently drop weights."""
    fx = build_checkpoint(tmp_path / "m", Model("qwen2", **BASE), Quant("awq", sym=False), shards=1, data=False)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] = 2304
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    report = inspect_report(read_checkpoint(resolve_source(str(tmp_path / "m"))))
    errors = [f["message"] for f in report.findings if f["level"] == "error"]
    assert errors and "SMALLER than the tensors (2432)" in errors[0] and "drop 128 channels" in errors[0]
    assert report.dims["intermediate_size"] == {"tensors": fx.model.intermediate, "config": 2304}


def test_cli_human_and_json_agree(tmp_path):
    build_checkpoint(tmp_path / "m", Model("qwen2", **BASE), Quant("gptq", group_size=64), shards=2)
    human = subprocess.run([sys.executable, "-m", "awqpad", "inspect", str(tmp_path / "m")], capture_output=True, text=True)
    data = subprocess.run([sys.executable, "-m", "awqpad", "inspect", str(tmp_path / "m"), "--json"], capture_output=True, text=True)
    assert human.returncode == data.returncode == 0
    report = json.loads(data.stdout)
    assert report["format"] == "gptq" and report["quantization"]["group_size"] == 64
    assert report["quantization"]["checkpoint_format"] == "gptq" and report["quantization"]["sym"] is True
    assert [row["status"] for row in report["tp_table"]] == ["loadable", "needs padding", "needs padding", "blocked", "blocked"]
    for fact in ("gptq", "group_size=64", "2432", "needs padding", "loadable", "8 heads, 4 KV heads"):
        assert fact in human.stdout, fact


def test_inspect_reads_headers_only_and_is_fast(tmp_path):
    """A sparse 80-layer Qwen2-72B-shaped AWQ checkpoint (~40 GB apparent): headers only, well under a second."""
    model = Model("qwen2", hidden=8192, intermediate=29568, heads=64, kv_heads=8, head_dim=128, layers=80, vocab=152064)
    build_checkpoint(tmp_path / "big", model, Quant("awq", sym=False), shards=8, data=False)
    size = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert size > 30e9
    start = time.perf_counter()
    report = inspect_report(read_checkpoint(resolve_source(str(tmp_path / "big"))))
    elapsed = time.perf_counter() - start
    assert report.dims["intermediate_size"]["tensors"] == 29568
    assert elapsed < 1.0, elapsed


def _sparse(path, config, tensors):
    """Header-only checkpoint: real safetensors header, file truncated to its full size."""
    import os

    from awqpad.checkpoint.header import encode_header

    path.mkdir()
    entries = [(n, "F16", shape, 2 * int(np.prod(shape))) for n, shape in tensors.items()]
    head = encode_header(entries, {"format": "pt"})
    with open(path / "model.safetensors", "wb") as fh:
        fh.write(head)
    os.truncate(path / "model.safetensors", len(head) + sum(e[3] for e in entries))
    (path / "config.json").write_text(json.dumps(config))


def test_qwen_v1_doubled_intermediate_size_is_understood(tmp_path):
    """Qwen (v1) stores intermediate_size = 2 x the w1/w2 projection width: not a mismatch, and pads as such."""
    h, half = 512, 2434
    tensors = {}
    for layer in range(2):
        p = f"transformer.h.{layer}."
        tensors.update({p + "attn.c_attn.weight": (3 * h, h), p + "attn.c_proj.weight": (h, h),
                        p + "mlp.w1.weight": (half, h), p + "mlp.w2.weight": (half, h), p + "mlp.c_proj.weight": (h, half)})
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": h, "intermediate_size": 2 * half,
              "num_attention_heads": 8, "kv_channels": 64, "num_hidden_layers": 2}
    _sparse(tmp_path / "qwen", config, tensors)
    ckpt = read_checkpoint(resolve_source(str(tmp_path / "qwen")))
    assert ckpt.dims.widths == {"dense": (half,)}
    assert [f.level for f in ckpt.findings] == ["info"] and "2 x the projection width" in ckpt.findings[0].message
    from awqpad.plan.pad_plan import make_plan

    assert not make_plan(ckpt, (2,), "vllm").needs_padding  # unquantized: only whole splits: 2434 % 2 == 0
    plan = make_plan(ckpt, (4,), "vllm")  # 2434 -> 2436 per projection, so the config says 2 x 2436
    assert plan.config_updates == {"intermediate_size": 2 * 2436}
