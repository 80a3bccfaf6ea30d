"""--pad-heads through the CLI: plan suggests it, pad writes it, verify proves it (and catches the wrong layout)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.factory import Model, Quant, build_checkpoint

# Qwen2.5-7B's head layout (28 query / 4 KV heads), narrow so it builds in milliseconds.
QWEN7B_HEADS = dict(hidden=448, intermediate=1024, heads=28, kv_heads=4, head_dim=16, layers=2)


def awqpad(*args):
    return subprocess.run([sys.executable, "-m", "awqpad", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    build_checkpoint(root / "src", Model("qwen2", **QWEN7B_HEADS), Quant("fp16"), shards=2)
    proc = awqpad("pad", root / "src", root / "out", "--tp", "8", "--engine", "sglang", "--pad-heads", "--json")
    assert proc.returncode == 0, proc.stderr
    return root, json.loads(proc.stdout)


def test_plan_suggests_pad_heads_and_names_engine_support(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen2", **QWEN7B_HEADS), Quant("fp16"), shards=1, data=False)
    proc = awqpad("plan", tmp_path / "src", "--tp", "8", "--engine", "sglang", "--json")
    assert proc.returncode == 3
    blocker = json.loads(proc.stdout)["blockers"][0]
    assert "--pad-heads fixes it" in blocker["explanation"] and "28 -> 32" in blocker["explanation"]
    # vLLM's Qwen2 model derives head_dim from hidden_size, so padded heads would not load there: say so.
    proc = awqpad("plan", tmp_path / "src", "--tp", "8", "--pad-heads", "--json")
    assert proc.returncode == 3 and "ignores config head_dim" in proc.stdout
    proc = awqpad("plan", tmp_path / "src", "--tp", "8", "--engine", "sglang", "--pad-heads", "--json")
    assert proc.returncode == 0, proc.stdout
    data = json.loads(proc.stdout)
    assert data["dims"]["num_attention_heads"] == {"original": 28, "padded": 32, "kind": "attention"}
    assert data["heads"]["strategy"] == "insert-in-groups" and data["heads"]["zero_heads"] == [7, 15, 23, 31]
    assert any("SGLang >= 0.4.9" in line for line in data["heads"]["head_dim_support"])


def test_pad_writes_heads_config_and_card(padded):
    root, result = padded
    config = json.loads((root / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (32, 4, 16)
    card = (root / "out" / "README.md").read_text()
    assert "28 -> 32" in card and "head_dim" in card and "SGLang >= 0.4.9" in card
    assert json.loads((root / "out" / "awqpad.json").read_text())["pad_heads"] is True


def test_verify_passes_with_attention_checks(padded):
    root, _ = padded
    proc = awqpad("verify", root / "src", root / "out", "--json")
    assert proc.returncode == 0, proc.stdout
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["attention"]["ok"] and checks["attention"]["figures"]["max_rel_error"] < 1e-12
    assert checks["attn-shards TP=8"]["ok"]


def test_verify_fails_when_zero_heads_are_appended_at_the_end(padded, tmp_path):
    """Zero heads appended after the last KV group move real heads to the wrong KV head under GQA."""
    import shutil

    root, _ = padded
    bad = tmp_path / "bad"
    shutil.copytree(root / "out", bad)
    d, h, kv = 16, 32, 4
    per = h // kv
    inside = [g * per + i for g in range(kv) for i in range(per - 1)]  # real heads in the padded layout
    order = inside + [g * per + per - 1 for g in range(kv)]  # same heads, zero heads moved to the end
    rows = np.concatenate([np.arange(x * d, (x + 1) * d) for x in order])
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in list(tensors):
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                tensors[name] = tensors[name][rows]
            elif name.endswith("o_proj.weight"):
                tensors[name] = tensors[name][:, rows]
        save_file(tensors, shard, metadata={"format": "pt"})
    proc = awqpad("verify", root / "src", bad, "--json")
    assert proc.returncode == 1
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert not checks["attention"]["ok"]
    assert "padded attention differs from SRC" in checks["attention"]["detail"]
