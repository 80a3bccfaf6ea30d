"""`awqpad pad` on real tiny checkpoints of every format, judged by the factory's independent dequantizers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from awqpad.checkpoint.model import read_checkpoint
from awqpad.execute.output_repo import pad_to_directory
from awqpad.plan.pad_plan import make_plan
from awqpad.source import resolve_source
from tests.factory import (
    Model, Quant, build_checkpoint, dequant_awq, dequant_ct, dequant_gptq, load_tensors, mlp_forward, unpack,
)

BASE = dict(hidden=512, heads=8, kv_heads=4, head_dim=64)
MOE = dict(experts=3, moe_intermediate=768)

CASES = {
    "qwen2-awq": (Model("qwen2", **BASE), Quant("awq", sym=False)),
    "qwen2-awq-no-zero-point": (Model("qwen2", **BASE), Quant("awq", sym=True)),
    "llama-gptq-v1-sym": (Model("llama", **BASE), Quant("gptq")),
    "llama-gptq-v1-asym": (Model("llama", **BASE), Quant("gptq", sym=False)),
    "qwen2-gptq-v2-asym": (Model("qwen2", **BASE), Quant("gptq", sym=False, checkpoint_format="gptq_v2")),
    "qwen2-gptq-act-order": (Model("qwen2", **BASE), Quant("gptq", desc_act=True)),
    "qwen2-gptq-8bit": (Model("qwen2", **BASE), Quant("gptq", bits=8)),
    "qwen2-gptq-group64": (Model("qwen2", **BASE), Quant("gptq", group_size=64)),
    "qwen2-gptq-dynamic": (Model("qwen2", **BASE), Quant("gptq", dynamic={r"-:.*\.mlp\.gate_proj": {}})),
    "qwen2-ct-sym": (Model("qwen2", **BASE), Quant("ct", scale_dtype="BF16")),
    "qwen2-ct-asym": (Model("qwen2", **BASE), Quant("ct", sym=False)),
    "qwen2-ct-g_idx": (Model("qwen2", **BASE), Quant("ct", desc_act=True)),
    "qwen2-ct-8bit": (Model("qwen2", **BASE), Quant("ct", bits=8)),
    "qwen2-fp16": (Model("qwen2", **BASE, intermediate=2430), Quant("fp16")),
    "llama-bf16": (Model("llama", **BASE, intermediate=2430), Quant("bf16")),
    "phi3-awq-fused": (Model("phi3", **BASE), Quant("awq", sym=False)),
    "chatglm-gptq-fused": (Model("chatglm", **BASE), Quant("gptq", sym=False, checkpoint_format="gptq_v2")),
    "mixtral-gptq": (Model("mixtral", **BASE, experts=3), Quant("gptq")),
    "qwen2_moe-awq": (Model("qwen2_moe", **BASE, **MOE, shared_intermediate=1408), Quant("awq", sym=False)),
    "qwen3_moe-ct": (Model("qwen3_moe", **BASE, **MOE), Quant("ct", sym=False)),
    "deepseek_v2-awq": (Model("deepseek_v2", **BASE, **MOE, n_shared_experts=2, first_k_dense=1), Quant("awq", sym=False)),
    "qwen2_5_vl-nested-awq": (Model("qwen2_5_vl_nested", **BASE), Quant("awq", sym=False)),
    "internvl-gptq": (Model("internvl", **BASE), Quant("gptq")),
}


def readers(quant: Quant, module_quant: Quant | None):
    """Every way a runtime decodes this module's tensors: name -> function(tensors) -> W [out, in]."""
    q = module_quant
    if q is None:
        return {"dense": lambda t: t["weight"].astype(np.float64)}
    if q.method == "awq":
        return {"awq": lambda t: dequant_awq(t["qweight"], t["qzeros"], t["scales"], q.group_size)}
    if q.method == "gptq":
        out = {"v1-unmasked" if not q.v2 else "v2": lambda t: dequant_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), q.bits, v2=q.v2)}
        if not q.v2:
            def masked(t):  # AutoGPTQ qlinear_cuda_old: (stored + 1) & mask
                qw = unpack(t["qweight"], q.bits, 0)
                z = (unpack(t["qzeros"], q.bits, 1) + 1) & ((1 << q.bits) - 1)
                s = t["scales"].astype(np.float64)
                gi = t["g_idx"].astype(np.int64)
                return ((qw - z[gi]) * s[gi]).T
            out["v1-masked"] = masked
        if q.sym:
            out["marlin-sym"] = lambda t: dequant_gptq(t["qweight"], None, t["scales"], t.get("g_idx"), q.bits, marlin_sym=True)
        return out
    return {"ct": lambda t: dequant_ct(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), t.get("weight_g_idx"),
                                       q.group_size, q.bits)}


def module_tensors(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1 :]}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def do_pad(src: Path, out: Path, tps=(2, 4), engine="vllm"):
    ckpt = read_checkpoint(resolve_source(str(src)))
    plan = make_plan(ckpt, tps, engine)
    assert not plan.blocked, plan.blockers
    pad_to_directory(ckpt, plan, out)
    return ckpt, plan


@pytest.fixture(scope="module", params=sorted(CASES))
def padded(request, tmp_path_factory):
    model, quant = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    fx = build_checkpoint(root / "src", model, quant, shards=3, seed=7)
    before = {p.name: sha(p) for p in sorted((root / "src").iterdir())}
    ckpt, plan = do_pad(root / "src", root / "out")
    after = {p.name: sha(p) for p in sorted((root / "src").iterdir())}
    assert before == after, "SRC was modified"
    return fx, ckpt, plan, root / "out"


def test_plan_pads_to_whole_marlin_groups_per_rank(padded):
    fx, ckpt, plan, out = padded
    assert plan.needs_padding
    for d in plan.changed_dims:
        group = fx.quant.group_size if fx.quant.method in ("awq", "gptq", "ct") else 1
        step = max(group, 128) if fx.quant.method in ("awq", "gptq", "ct") else 1
        for t in (2, 4):
            per_rank = d.padded / t
            assert per_rank == int(per_rank) and int(per_rank) % step == 0, (d, t)
        assert d.padded - d.original < 4 * max(step, 4) * (2 if d.kind == "shared" else 1)


def test_unchanged_tensors_are_byte_identical_and_padded_keep_their_original_region(padded):
    fx, ckpt, plan, out = padded
    src, dst = load_tensors(fx.path), load_tensors(out)
    assert set(src) == set(dst)
    changed = {op.tensor: op for op in plan.ops}
    for name, a in src.items():
        b = dst[name]
        op = changed.get(name)
        if op is None:
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), name
        elif op.replace is not None:
            assert list(b) == list(op.replace), name
        else:
            assert b.shape == op.new_shape, name
            keep = np.ones(b.shape[op.axis], bool)
            shift = 0
            for ins in op.inserts:
                keep[ins.at + shift : ins.at + shift + ins.count] = False
                shift += ins.count
            assert np.array_equal(np.compress(keep, b, axis=op.axis), a), name


def test_padded_weights_dequantize_to_exactly_zero_under_every_reader(padded):
    fx, ckpt, plan, out = padded
    dst = load_tensors(out)
    widths = {d.kind: (d.original, d.padded) for d in plan.changed_dims}
    checked = 0
    for block in ckpt.mlps:
        if block.kind not in widths:
            continue
        old, new = widths[block.kind]
        for lin in block.linears:
            for reader, decode in readers(fx.quant, fx.module_quant[lin.prefix]).items():
                w = decode(module_tensors(dst, lin.prefix))
                ref = fx.weights[lin.prefix]
                if lin.role == "down":
                    assert w.shape == (ref.shape[0], new)
                    assert np.array_equal(w[:, :old], ref), (lin.prefix, reader)
                    assert not w[:, old:].any(), (lin.prefix, reader)
                elif lin.role == "gate_up":
                    halves = np.split(w, 2, axis=0)
                    for half, ref_half in zip(halves, np.split(ref, 2, axis=0)):
                        assert np.array_equal(half[:old], ref_half) and not half[old:].any(), (lin.prefix, reader)
                else:
                    assert np.array_equal(w[:old], ref) and not w[old:].any(), (lin.prefix, reader)
                checked += 1
    assert checked


def test_mlp_outputs_are_unchanged_in_float64(padded):
    fx, ckpt, plan, out = padded
    dst = load_tensors(out)
    x = np.random.default_rng(0).standard_normal((5, fx.model.hidden))
    changed = {d.kind for d in plan.changed_dims}
    for block in ckpt.mlps:
        if block.kind not in changed:
            continue
        padded_w = {lin.prefix: next(iter(readers(fx.quant, fx.module_quant[lin.prefix]).values()))(module_tensors(dst, lin.prefix))
                    for lin in block.linears}
        names = [lin.prefix for lin in block.linears]
        if len(names) == 2:  # fused gate_up
            ref = mlp_forward(fx.weights, names[0], None, names[1], x)
            got = mlp_forward(padded_w, names[0], None, names[1], x)
        else:
            ref = mlp_forward(fx.weights, *names, x)
            got = mlp_forward(padded_w, *names, x)
        assert np.max(np.abs(got - ref)) <= 1e-12 * max(1.0, np.max(np.abs(ref))), block.label


def test_output_loads_and_is_consistent(padded):
    fx, ckpt, plan, out = padded
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, "np") as fh:
            assert name in fh.keys()
    sizes = sum(np.prod(t.shape) * t.itemsize for t in load_tensors(out).values())
    # bf16 is loaded as float32 by the factory: compare with the header instead of the arrays there
    if fx.quant.method != "bf16" and fx.quant.scale_dtype != "BF16":
        assert index["metadata"]["total_size"] == sizes
    padded_ckpt = read_checkpoint(resolve_source(str(out)))
    assert not [f for f in padded_ckpt.findings if f.level == "error"]
    again = make_plan(padded_ckpt, (2, 4))
    assert not again.needs_padding and not again.blocked
    config = json.loads((out / "config.json").read_text())
    for path, value in plan.config_updates.items():
        node = config
        for key in path.split("."):
            node = node[key]
        assert node == value
    assert config.get("quantization_config") == fx.config.get("quantization_config")
    provenance = json.loads((out / "awqpad.json").read_text())
    assert provenance["tp"] == [2, 4] and len(provenance["ops"]) == len(plan.ops)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "LICENSE"):
        if (fx.path / name).exists():
            assert (out / name).read_bytes() == (fx.path / name).read_bytes()
    card = (out / "README.md").read_text()
    assert (fx.path / "README.md").read_text().strip() in card
    assert "vllm serve" in card and "--tensor-parallel-size 4" in card


def test_nested_vl_config_updates_every_copy(tmp_path):
    fx = build_checkpoint(tmp_path / "src", Model("qwen2_5_vl_nested", **BASE), Quant("awq", sym=False), shards=2)
    do_pad(tmp_path / "src", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["intermediate_size"] == 2560
    if "intermediate_size" in fx.config:
        assert config["intermediate_size"] == 2560
    assert config["vision_config"] == fx.config["vision_config"]


def test_gelu_act_scales_are_padded_with_one(tmp_path):
    """AWQ ScaledActivation divides by act.scales: padding with 0 would give 0/0 = NaN."""
    from safetensors.numpy import load_file, save_file

    fx = build_checkpoint(tmp_path / "src", Model("qwen2", **BASE), Quant("awq", sym=False), shards=1)
    shard = next((tmp_path / "src").glob("*.safetensors"))
    tensors = load_file(shard)
    for layer in range(fx.model.layers):
        tensors[f"model.layers.{layer}.mlp.act.scales"] = np.full(fx.model.intermediate, 0.5, np.float16)
    save_file(tensors, shard)
    ckpt, plan = do_pad(tmp_path / "src", tmp_path / "out")
    out = load_file(next((tmp_path / "out").glob("*.safetensors")))
    scales = out["model.layers.0.mlp.act.scales"]
    assert scales.shape == (2560,) and (scales[:2432] == 0.5).all() and (scales[2432:] == 1.0).all()


def test_moe_padding_warns_about_its_cost(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen3_moe", **BASE, **MOE), Quant("awq", sym=False), shards=1, data=False)
    plan = make_plan(read_checkpoint(resolve_source(str(tmp_path / "src"))), (4,))
    assert any("33%" in w and "--enable-expert-parallel" in w for w in plan.warnings)
    skipped = make_plan(read_checkpoint(resolve_source(str(tmp_path / "src"))), (4,), skip_experts=True)
    assert not skipped.needs_padding


def test_per_channel_input_padding_is_refused(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen2", **BASE), Quant("gptq", group_size=-1), shards=1, data=False)
    plan = make_plan(read_checkpoint(resolve_source(str(tmp_path / "src"))), (4,), "vllm")
    # per-channel: no group straddles a shard, but Marlin's min_thread_k still needs 608 -> 640 per rank
    assert plan.blocked and "per-channel" in plan.blockers[0].message


@pytest.mark.parametrize("fp8", [False, True], ids=["awq", "fp8-moe"])
def test_every_padded_copy_path_writes_the_same_bytes(tmp_path, monkeypatch, fp8):
    """Padded tensors take one of three copy paths by stretch length (kernel copy for long stretches,
    preadv scatter for medium ones, one block read + numpy for short ones). Tiny fixtures only reach the
    last by default, so each path is forced in turn: every output file must be byte-identical, and the
    forced paths must really have run (counted through the functions they call)."""
    from awqpad.api import pad as api_pad
    from awqpad.execute import shard_writer

    src = tmp_path / "src"
    if fp8:
        from tests.fp8_factory import Spec, build_fp8

        build_fp8(src, Spec(arch="qwen3_moe", moe_intermediate=192, experts=4))
    else:
        build_checkpoint(src, Model("qwen2", hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=384,
                                    layers=2, vocab=64), Quant("awq"), shards=2)
    calls = {"preadv_iovecs": 0, "kernel": 0}
    real_preadv, real_copy = os.preadv, shard_writer.ShardWriter.copy_from

    def counting_preadv(fd, buffers, offset):
        calls["preadv_iovecs"] = max(calls["preadv_iovecs"], len(buffers))
        return real_preadv(fd, buffers, offset)

    def counting_copy(self, *args):
        calls["kernel"] += 1
        return real_copy(self, *args)

    outputs, kernel_copies = {}, {}
    for name, scatter, kernel in (("numpy", 1 << 40, 1 << 40), ("scatter", 0, 1 << 40), ("kernel", 0, 0)):
        monkeypatch.setattr(shard_writer, "SCATTER_STRETCH", scatter)
        monkeypatch.setattr(shard_writer, "KERNEL_STRETCH", kernel)
        monkeypatch.setattr(shard_writer.os, "preadv", counting_preadv)
        monkeypatch.setattr(shard_writer.ShardWriter, "copy_from", counting_copy)
        calls.update(preadv_iovecs=0, kernel=0)
        api_pad(str(src), tmp_path / name, tp=4 if fp8 else 2)
        record = json.loads((tmp_path / name / "awqpad.json").read_text())
        assert any(op["inserts"] for op in record["ops"]), "nothing was padded: the paths compared nothing"
        outputs[name] = {p.name: p.read_bytes() for p in (tmp_path / name).glob("*.safetensors")}
        if name == "scatter":
            assert calls["preadv_iovecs"] > 1, "the scatter path did not run"
        kernel_copies[name] = calls["kernel"]  # unchanged tensors are kernel-copied on every path
    assert kernel_copies["kernel"] > kernel_copies["numpy"], "the kernel-copy path did not run for padded tensors"
    assert len(outputs["numpy"]) >= 1
    assert outputs["numpy"] == outputs["scatter"] == outputs["kernel"]
