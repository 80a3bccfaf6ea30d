"""The test checkpoint factory writes what real producers write, and its dequantizers are right.

Everything here reads the files back from disk (safetensors' own loaders), so a packer bug, a wrong
index or a shape mix-up fails here before it can hide a bug in awqpad. The tests marked `oracle` use torch
and third-party code (AutoAWQ, AutoGPTQ, compressed-tensors): skipped when not installed, failed under CI
(tests/oracle_env.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import oracle_env
from factory import (
    ARCHS, AWQ_INV, AWQ_ORDER, W7, W8, DequantError, Model, Quant, arch_linears, awq_pack, awq_unpack,
    build_checkpoint, dequant_awq, dequant_ct, dequant_gptq, dequantize, dequantize_all, dequantize_module,
    load_tensors, mlp_forward, pack, read_index, rel_err, shard_files, unpack,
)

VARIANTS = {
    "awq": Quant("awq", sym=False),
    "gptq_v1_sym": Quant("gptq"),
    "gptq_v2_asym": Quant("gptq", sym=False, checkpoint_format="gptq_v2"),
    "gptq_desc_act": Quant("gptq", desc_act=True),
    "gptq_8bit": Quant("gptq", bits=8),
    "ct_sym": Quant("ct", scale_dtype="BF16"),
    "ct_asym": Quant("ct", sym=False, scale_dtype="BF16"),
    "fp16": Quant("fp16"),
    "bf16": Quant("bf16"),
}
NBYTES = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8}
MATRIX = [(a, v) for a in ARCHS for v in VARIANTS]
QUANT_TENSORS = {"awq": {"qweight", "qzeros", "scales"}, "gptq": {"qweight", "qzeros", "scales", "g_idx"},
                 "ct": {"weight_packed", "weight_scale", "weight_shape"}}


def _small(arch: str) -> Model:
    # intermediate 640 = 5 groups of 128 and 2 experts keep the 99-build matrix fast; default dims are tested below.
    moe = arch in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")
    ds = arch == "deepseek_v2"
    return Model(arch=arch, intermediate=640, experts=2 if moe else 0, n_shared_experts=2 if ds else 0,
                 first_k_dense=1 if ds else 0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict = {}
    root = tmp_path_factory.mktemp("factory")

    def get(arch: str, variant: str):
        if (arch, variant) not in cache:
            fx = build_checkpoint(root / f"{arch}-{variant}", _small(arch), VARIANTS[variant], shards=3, seed=1)
            cache[arch, variant] = (fx, load_tensors(fx.path))
        return cache[arch, variant]

    return get


@pytest.fixture(scope="module", params=MATRIX, ids=[f"{a}-{v}" for a, v in MATRIX])
def matrix(request, tmp_path_factory):
    """One (fixture, loaded tensors) of the matrix at a time: pytest runs every test of one parameter before
    building the next and drops the previous one, so memory stays at one checkpoint, not 99."""
    arch, variant = request.param
    fx = build_checkpoint(tmp_path_factory.mktemp("matrix") / f"{arch}-{variant}", _small(arch), VARIANTS[variant],
                          shards=3, seed=1)
    return fx, load_tensors(fx.path)


def _modules(names):
    mods: dict[str, set[str]] = {}
    for n in names:
        p, leaf = n.rsplit(".", 1)
        mods.setdefault(p, set()).add(leaf)
    return mods


# ---------------------------------------------------------------------------------------------------------
# The matrix: every arch x format builds, opens, is indexed right, and dequantizes to Fixture.weights
# ---------------------------------------------------------------------------------------------------------

def test_shards_open_and_index_maps_every_tensor_to_its_shard(matrix):
    fx, tensors = matrix
    files = shard_files(fx.path)
    assert [f.name for f in files] == fx.shard_names and len(files) == 3
    held: dict[str, str] = {}
    total = 0
    for f in files:
        with safe_open(str(f), "numpy") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                assert k not in held, f"{k} in two shards"
                held[k] = f.name
                sl = h.get_slice(k)
                dt, shape = fx.tensors[k]
                assert (sl.get_dtype(), tuple(sl.get_shape())) == (dt, shape), k
                total += NBYTES[dt] * int(np.prod(shape))
    index = read_index(fx.path)
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == total
    assert set(held) == set(fx.tensors) == set(tensors)


def test_weights_are_what_the_stored_tensors_dequantize_to(matrix):
    fx, tensors = matrix
    assert list(fx.weights) == list(fx.linears)
    for prefix, W in fx.weights.items():
        lin = fx.linears[prefix]
        mq = fx.module_quant[prefix]
        got = dequantize_module(tensors, prefix, mq or fx.quant)
        assert got.shape == (lin.out, lin.inp)
        assert np.array_equal(got, W), prefix
        if lin.bias:
            assert np.array_equal(tensors[prefix + ".bias"].astype(np.float64), fx.biases[prefix])
        else:
            assert prefix + ".bias" not in tensors


def test_quantization_is_close_to_the_float_weights(matrix):
    fx, _ = matrix
    q = fx.quant
    limit = {"fp16": 1e-3, "bf16": 1e-2}.get(q.method, 0.12 if q.bits == 4 else 0.01)
    for prefix, W in fx.weights.items():
        err = rel_err(W, fx.original[prefix])
        assert err < limit, (prefix, err)
        if fx.module_quant[prefix] is not None:
            assert err > 0  # it really was quantized


def test_only_decoder_linears_are_quantized(matrix):
    fx, tensors = matrix
    q = fx.quant
    mods = _modules(tensors)
    for prefix, lin in fx.linears.items():
        leaves = mods[prefix] - {"bias"}
        if q.method in QUANT_TENSORS and lin.quantizable:
            want = set(QUANT_TENSORS[q.method])
            if q.method == "ct" and not q.sym:
                want.add("weight_zero_point")
            assert leaves == want, prefix
        else:
            assert leaves == {"weight"}, prefix
    quantizable = {p for p, lin in fx.linears.items() if lin.quantizable}
    roles = {lin.role for lin in fx.linears.values() if not lin.quantizable}
    assert roles <= {"router", "lm_head", "vision"} and "lm_head" in roles
    # every attention/MLP/expert linear of every layer is a quantization candidate
    assert all(".layers." in p for p in quantizable)
    assert sum(1 for p in quantizable if p.endswith(("o_proj", "self_attention.dense"))) == fx.model.layers
    for name, (dt, _) in fx.tensors.items():
        if name.rsplit(".", 1)[0] not in fx.linears:  # embeddings, norms, vision convs...
            assert dt == fx.dtype, name


# ---------------------------------------------------------------------------------------------------------
# Packers and readers
# ---------------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([4, 8]), axis=st.sampled_from([0, 1]), rows=st.integers(1, 5), words=st.integers(1, 4),
       seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, axis, rows, words, seed):
    rng = np.random.default_rng(seed)
    n = words * (32 // bits)
    shape = (n, rows) if axis == 0 else (rows, n)
    codes = rng.integers(0, 1 << bits, shape)
    packed = pack(codes, bits, axis)
    assert packed.dtype == np.int32
    assert packed.shape == ((words, rows) if axis == 0 else (rows, words))
    assert np.array_equal(unpack(packed, bits, axis), codes)
    if bits == 4 and axis == 1:
        a = awq_pack(codes)
        assert np.array_equal(awq_unpack(a), codes)
        # the AWQ interleave is a per-word permutation of the sequential layout (fmt §1)
        assert np.array_equal(unpack(a, 4, 1).reshape(rows, -1, 8), codes.reshape(rows, -1, 8)[:, :, list(AWQ_ORDER)])


def test_known_words():
    assert AWQ_INV == (0, 4, 1, 5, 2, 6, 3, 7)
    assert pack(np.full((1, 8), 8), 4, 1)[0, 0] == W8
    assert pack(np.full((1, 8), 7), 4, 1)[0, 0] == W7
    assert pack(np.full((1, 4), 128), 8, 1)[0, 0] == np.int32(np.uint32(0x80808080).view(np.int32))
    assert np.uint32(awq_pack(np.arange(8)[None])[0, 0].view(np.uint32)) == 0x75316420
    assert np.uint32(pack(np.arange(8)[None], 4, 1)[0, 0].view(np.uint32)) == 0x76543210
    with pytest.raises(ValueError):
        pack(np.full((1, 8), 16), 4, 1)


@pytest.mark.parametrize("variant", ["awq", "gptq_v1_sym", "gptq_v2_asym", "gptq_desc_act", "gptq_8bit", "ct_sym",
                                     "ct_asym"])
def test_unpacking_the_files_gives_back_the_integer_codes(built, variant):
    fx, t = built("qwen2", variant)
    q = fx.quant
    for prefix, (codes, zeros) in fx.codes.items():
        if q.method == "awq":
            assert np.array_equal(awq_unpack(t[prefix + ".qweight"]).T, codes)
            assert np.array_equal(awq_unpack(t[prefix + ".qzeros"]).T, zeros)
        elif q.method == "gptq":
            assert np.array_equal(unpack(t[prefix + ".qweight"], q.bits, 0).T, codes)
            stored = unpack(t[prefix + ".qzeros"], q.bits, 1).T
            assert np.array_equal(stored, zeros if q.v2 else zeros - 1)
            assert np.array_equal(t[prefix + ".g_idx"], fx.g_idx[prefix])
        else:
            assert np.array_equal(unpack(t[prefix + ".weight_packed"], q.bits, 1), codes)
            assert t[prefix + ".weight_shape"].tolist() == list(codes.shape)
            if not q.sym:
                assert np.array_equal(unpack(t[prefix + ".weight_zero_point"], q.bits, 0), zeros)
            else:
                assert (zeros == 8).all()


def test_symmetric_zero_point_words(built):
    for variant, word in [("gptq_v1_sym", W7), ("gptq_desc_act", W7), ("gptq_8bit", 0x7F7F7F7F)]:
        fx, t = built("llama", variant)
        for prefix in fx.quantized:
            assert (t[prefix + ".qzeros"] == word).all(), (variant, prefix)
    fx = build_checkpoint(Path(fx.path).parent / "awq-sym", _small("qwen2"), Quant("awq"))
    t = load_tensors(fx.path)
    assert fx.config["quantization_config"]["zero_point"] is False
    for prefix in fx.quantized:  # our decision for AWQ zero_point=false: GEMM layout, every zero nibble 8
        assert (t[prefix + ".qzeros"] == W8).all()
        assert np.array_equal(dequant_awq(t[prefix + ".qweight"], t[prefix + ".qzeros"], t[prefix + ".scales"]),
                              fx.weights[prefix])
        assert np.array_equal(dequant_awq(t[prefix + ".qweight"], None, t[prefix + ".scales"]), fx.weights[prefix])


def test_gptq_v1_asym_never_stores_a_wrapping_zero(tmp_path):
    fx = build_checkpoint(tmp_path, _small("qwen2"), Quant("gptq", sym=False))
    t = load_tensors(fx.path)
    for prefix in fx.quantized:
        stored = unpack(t[prefix + ".qzeros"], 4, 1)
        assert stored.max() <= 14  # z - 1 with z in 1..15: no 0xF nibble (fmt §3)
        W = dequant_gptq(t[prefix + ".qweight"], t[prefix + ".qzeros"], t[prefix + ".scales"], t[prefix + ".g_idx"])
        assert np.array_equal(W, fx.weights[prefix])


def test_gptq_reader_variants(built):
    fx, t = built("qwen2", "gptq_v1_sym")
    p = "model.layers.0.mlp.down_proj"
    args = (t[p + ".qweight"], t[p + ".qzeros"], t[p + ".scales"], t[p + ".g_idx"])
    assert np.array_equal(dequant_gptq(*args, marlin_sym=True), fx.weights[p])  # Marlin ignores qzeros: same
    assert not np.array_equal(dequant_gptq(*args, v2=True), fx.weights[p])      # v2 reading of v1 zeros is off
    assert np.array_equal(dequant_gptq(args[0], args[1], args[2], None), fx.weights[p])  # trivial g_idx
    fx8, t8 = built("qwen2", "gptq_8bit")
    assert np.array_equal(dequant_gptq(t8[p + ".qweight"], None, t8[p + ".scales"], None, bits=8, marlin_sym=True),
                          fx8.weights[p])
    fx2, t2 = built("qwen2", "gptq_v2_asym")
    assert fx2.config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert np.array_equal(dequantize({"method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"},
                                     {k: t2[p + "." + k] for k in ("qweight", "qzeros", "scales", "g_idx")}),
                          fx2.weights[p])


@pytest.mark.parametrize("variant", ["gptq_desc_act", "ct_sym"])
def test_act_order_g_idx(built, tmp_path, variant):
    if variant == "ct_sym":
        fx = build_checkpoint(tmp_path, _small("qwen2"), Quant("ct", desc_act=True))
        t, key = load_tensors(fx.path), "weight_g_idx"
        assert fx.config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    else:
        (fx, t), key = built("qwen2", variant), "g_idx"
        assert fx.config["quantization_config"]["desc_act"] is True
    for prefix in fx.quantized:
        gi = t[f"{prefix}.{key}"]
        K = fx.linears[prefix].inp
        assert gi.dtype == np.int32 and gi.shape == (K,)
        assert (np.bincount(gi) == 128).all()        # every group has exactly group_size members
        assert not (np.diff(gi) >= 0).all()          # and it is not the trivial k // g
        # ignoring g_idx must give a different weight: the test really depends on it
        q = fx.quant
        local = {k.rsplit(".", 1)[1]: v for k, v in t.items()
                 if k.rsplit(".", 1)[0] == prefix and k != f"{prefix}.{key}"}
        assert not np.array_equal(dequantize(q, local), fx.weights[prefix])


@pytest.mark.parametrize("quant", [Quant("awq", sym=False, group_size=-1), Quant("awq", group_size=-1),
                                   Quant("gptq", group_size=-1), Quant("gptq", group_size=-1, sym=False,
                                                                       checkpoint_format="gptq_v2"),
                                   Quant("gptq", group_size=-1, bits=8), Quant("ct", group_size=-1),
                                   Quant("ct", group_size=-1, sym=False), Quant("awq", group_size=64, sym=False),
                                   Quant("gptq", group_size=32, desc_act=True)],
                         ids=lambda q: f"{q.method}-g{q.group_size}-b{q.bits}-{'sym' if q.sym else 'asym'}")
def test_per_channel_and_other_group_sizes(tmp_path, quant):
    fx = build_checkpoint(tmp_path, _small("qwen2"), quant, shards=2)
    t = load_tensors(fx.path)
    for prefix in fx.quantized:
        K = fx.linears[prefix].inp
        G = 1 if quant.group_size == -1 else K // quant.group_size
        scale = t[prefix + (".weight_scale" if quant.method == "ct" else ".scales")]
        assert scale.shape == ((fx.linears[prefix].out, G) if quant.method == "ct" else (G, fx.linears[prefix].out))
        W = dequantize_module(t, prefix, quant)
        assert np.array_equal(W, fx.weights[prefix])
        assert rel_err(W, fx.original[prefix]) < (0.12 if quant.bits == 4 else 0.01)
    qc = fx.config["quantization_config"]
    if quant.method == "ct":
        w = qc["config_groups"]["group_0"]["weights"]
        want = ("channel", None) if quant.group_size == -1 else ("group", quant.group_size)
        assert (w["strategy"], w["group_size"]) == want
    else:
        assert qc["group_size"] == quant.group_size


def test_dequant_ct_honours_weight_shape_and_dequant_dispatch(built):
    fx, t = built("qwen2_moe", "ct_asym")
    p = "model.layers.1.mlp.experts.1.down_proj"
    W = dequant_ct(t[p + ".weight_packed"], t[p + ".weight_scale"], t[p + ".weight_zero_point"])
    assert np.array_equal(W, fx.weights[p])
    # bf16 scales are stored as BF16 (safetensors' own header reader says so) and come back as float32
    (f,) = {fx.weight_map[p + ".weight_scale"]}
    with safe_open(str(fx.path / f), framework="numpy") as st:
        assert st.get_slice(p + ".weight_scale").get_dtype() == "BF16"
    assert t[p + ".weight_scale"].dtype == np.float32
    assert np.array_equal(dequant_ct(t[p + ".weight_packed"], t[p + ".weight_scale"], t[p + ".weight_zero_point"],
                                     shape=t[p + ".weight_shape"]), W)


@pytest.mark.oracle
def test_dequant_accepts_bf16_torch_tensors(built):
    """Oracle tests hand the dequantizers torch tensors exactly as safetensors.torch loads them (bf16 stays bf16)."""
    torch = oracle_env.import_torch()
    from safetensors.torch import load_file
    fx, t = built("qwen2_moe", "ct_asym")
    p = "model.layers.1.mlp.experts.1.down_proj"
    raw = {}
    for f in shard_files(fx.path):
        raw.update(load_file(str(f)))
    assert raw[p + ".weight_scale"].dtype == torch.bfloat16
    assert np.array_equal(dequant_ct(raw[p + ".weight_packed"], raw[p + ".weight_scale"],
                                     raw[p + ".weight_zero_point"], shape=raw[p + ".weight_shape"]), fx.weights[p])


def test_gptq_dynamic_overrides(tmp_path):
    dyn = {"-:.*mlp.down_proj": {}, "+:.*mlp\\.gate_proj": {"bits": 8, "group_size": 64}}
    fx = build_checkpoint(tmp_path, Model(), Quant("gptq", dynamic=dyn))
    t = load_tensors(fx.path)
    assert fx.config["quantization_config"]["dynamic"] == dyn
    for L in range(2):
        p = f"model.layers.{L}.mlp"
        assert fx.module_quant[f"{p}.down_proj"] is None
        assert t[f"{p}.down_proj.weight"].dtype == np.float16 and f"{p}.down_proj.qweight" not in t
        g = fx.module_quant[f"{p}.gate_proj"]
        assert (g.bits, g.group_size) == (8, 64)
        assert t[f"{p}.gate_proj.qweight"].shape == (256 // 4, 2432)
        assert t[f"{p}.gate_proj.scales"].shape == (256 // 64, 2432)
        assert fx.module_quant[f"{p}.up_proj"].bits == 4
        for m in ("gate_proj", "up_proj", "down_proj"):
            assert np.array_equal(dequantize_module(t, f"{p}.{m}", fx.module_quant[f"{p}.{m}"] or fx.quant),
                                  fx.weights[f"{p}.{m}"])


def _cat(a, n, axis, fill):
    shape = list(a.shape)
    shape[axis] = n
    return np.concatenate([a, np.full(shape, fill, a.dtype)], axis)


def test_dequantizers_read_padded_tensors(built):
    """The oracles must work on awqpad-style padded tensors (fmt §10 recipe, re-done here in numpy): padded
    region exactly 0, original region bit-identical, under every reader variant."""
    dK, dN = 256, 64
    fx, t = built("qwen2", "awq")
    p = "model.layers.0.mlp."
    W = fx.weights[p + "down_proj"]
    qw, qz, s = (t[p + "down_proj." + k] for k in ("qweight", "qzeros", "scales"))
    got = dequant_awq(_cat(qw, dK, 0, W8), _cat(qz, dK // 128, 0, W8), _cat(s, dK // 128, 0, 0), 128)
    assert np.array_equal(got[:, : W.shape[1]], W) and not got[:, W.shape[1]:].any()
    W = fx.weights[p + "up_proj"]
    qw, qz, s = (t[p + "up_proj." + k] for k in ("qweight", "qzeros", "scales"))
    got = dequant_awq(_cat(qw, dN // 8, 1, W8), _cat(qz, dN // 8, 1, W8), _cat(s, dN, 1, 0), 128)
    assert np.array_equal(got[: W.shape[0]], W) and not got[W.shape[0]:].any()

    fx, t = built("qwen2", "gptq_desc_act")
    W = fx.weights[p + "down_proj"]
    qw, qz, s, gi = (t[p + "down_proj." + k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    G = s.shape[0]
    gi2 = np.concatenate([gi, (G + np.arange(dK) // 128).astype(np.int32)])
    args = (_cat(qw, dK // 8, 0, W8), _cat(qz, dK // 128, 0, W7), _cat(s, dK // 128, 0, 0), gi2)
    for got in (dequant_gptq(*args), dequant_gptq(*args, marlin_sym=True)):
        assert np.array_equal(got[:, : W.shape[1]], W) and not got[:, W.shape[1]:].any()

    fx, t = built("qwen2", "ct_asym")
    W = fx.weights[p + "down_proj"]
    wp, ws, wz = (t[p + "down_proj." + k] for k in ("weight_packed", "weight_scale", "weight_zero_point"))
    N, K = W.shape
    got = dequant_ct(_cat(wp, dK // 8, 1, W8), _cat(ws, dK // 128, 1, 0), _cat(wz, dK // 128, 1, W8),
                     shape=np.array([N, K + dK]))
    assert np.array_equal(got[:, :K], W) and not got[:, K:].any()


def test_dequantizers_refuse_inconsistent_tensors(built):
    p = "model.layers.0.mlp.down_proj."
    fx, t = built("qwen2", "awq")
    qw, qz, s = (t[p + k] for k in ("qweight", "qzeros", "scales"))
    with pytest.raises(DequantError):  # rows padded, scales/zeros not
        dequant_awq(_cat(qw, 128, 0, W8), qz, s, 128)
    fx, t = built("qwen2", "gptq_v1_sym")
    qw, qz, s, gi = (t[p + k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    with pytest.raises(DequantError):  # g_idx not extended
        dequant_gptq(_cat(qw, 16, 0, W8), _cat(qz, 1, 0, W7), _cat(s, 1, 0, 0), gi)
    fx, t = built("qwen2", "ct_sym")
    wp, ws, shape = (t[p + k] for k in ("weight_packed", "weight_scale", "weight_shape"))
    with pytest.raises(DequantError):  # weight_shape left stale
        dequant_ct(_cat(wp, 16, 1, W8), _cat(ws, 1, 1, 0), shape=shape)


def test_dequantize_all_uses_each_modules_quantization(tmp_path):
    fx = build_checkpoint(tmp_path, _small("qwen2"), Quant("gptq", dynamic={"-:.*down_proj": {},
                                                                           ".*up_proj": {"bits": 8}}))
    out = dequantize_all(load_tensors(fx.path), fx)
    assert out.keys() == fx.weights.keys()
    assert all(np.array_equal(out[k], fx.weights[k]) for k in out)
    # rebuilding into the same directory with fewer shards leaves no stale shard behind
    fx2 = build_checkpoint(tmp_path, _small("qwen2"), Quant("fp16"), shards=2)
    assert [f.name for f in shard_files(tmp_path)] == fx2.shard_names


# ---------------------------------------------------------------------------------------------------------
# Architectures and config.json
# ---------------------------------------------------------------------------------------------------------

def test_default_qwen2_is_the_awqpad_case(tmp_path):
    fx = build_checkpoint(tmp_path, Model(), Quant("awq", sym=False))
    c = fx.config
    assert c["architectures"] == ["Qwen2ForCausalLM"] and c["intermediate_size"] == 2432 == 19 * 128
    assert c["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                        "version": "gemm", "modules_to_not_convert": None}
    t = load_tensors(fx.path)
    assert t["model.layers.0.mlp.down_proj.qweight"].shape == (2432, 256 // 8)
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (19, 256)
    assert t["model.layers.0.mlp.gate_proj.qweight"].shape == (256, 2432 // 8)
    assert t["model.layers.0.self_attn.q_proj.bias"].shape == (256,)
    assert "model.layers.0.self_attn.o_proj.bias" not in t
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "LICENSE",
              "chat_template.jinja", "config.json", "model.safetensors.index.json"):
        assert (fx.path / f).is_file(), f
    json.loads((fx.path / "tokenizer.json").read_text())
    # byte-balanced module-order sharding makes some module straddle two shards, as in real checkpoints
    mods: dict[str, set] = {}
    for n, f in fx.weight_map.items():
        mods.setdefault(n.rsplit(".", 1)[0], set()).add(f)
    assert any(len(s) > 1 for s in mods.values())
    # the MLP reference: float64, gate/up/down; silu written another way (x * sigmoid via tanh), einsum products
    x = np.random.default_rng(0).standard_normal((3, 256))
    p = "model.layers.1.mlp."
    y = mlp_forward(fx.weights, p + "gate_proj", p + "up_proj", p + "down_proj", x)
    g, u, d = (fx.weights[p + n] for n in ("gate_proj", "up_proj", "down_proj"))
    gx = np.einsum("bk,nk->bn", x, g)
    ref = np.einsum("bn,kn->bk", gx * (1 + np.tanh(gx / 2)) / 2 * np.einsum("bk,nk->bn", x, u), d)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.oracle
def test_mlp_forward_matches_torch(tmp_path):
    torch = oracle_env.import_torch()
    fx = build_checkpoint(tmp_path, Model(), Quant("awq", sym=False))
    x = np.random.default_rng(0).standard_normal((3, 256))
    p = "model.layers.1.mlp."
    y = mlp_forward(fx.weights, p + "gate_proj", p + "up_proj", p + "down_proj", x)
    xt = torch.from_numpy(x)
    ref = torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(xt, torch.from_numpy(fx.weights[p + "gate_proj"])))
        * torch.nn.functional.linear(xt, torch.from_numpy(fx.weights[p + "up_proj"])),
        torch.from_numpy(fx.weights[p + "down_proj"]))
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-12, atol=1e-14)


ARCH_EXPECT = {  # arch -> (architectures[0], a tensor name that must exist, config keys that must exist)
    "qwen2": ("Qwen2ForCausalLM", "model.layers.0.self_attn.k_proj.bias", ["num_key_value_heads", "rope_theta"]),
    "llama": ("LlamaForCausalLM", "model.layers.1.mlp.down_proj", ["head_dim", "rms_norm_eps"]),
    "mixtral": ("MixtralForCausalLM", "model.layers.1.block_sparse_moe.experts.1.w2",
                ["num_local_experts", "num_experts_per_tok"]),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "model.layers.0.mlp.shared_expert_gate.weight",
                  ["moe_intermediate_size", "shared_expert_intermediate_size", "num_experts", "mlp_only_layers",
                   "decoder_sparse_step"]),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "model.layers.0.self_attn.k_norm.weight",
                  ["head_dim", "moe_intermediate_size", "num_experts", "mlp_only_layers"]),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "visual.blocks.1.mlp.fc2.weight",
                 ["vision_config", "hidden_size", "intermediate_size"]),
    "qwen2_5_vl_nested": ("Qwen2_5_VLForConditionalGeneration", "model.visual.merger.mlp.2.weight",
                          ["text_config", "vision_config"]),
    "internvl": ("InternVLChatModel", "mlp1.3.weight", ["llm_config", "vision_config"]),
    "phi3": ("Phi3ForCausalLM", "model.layers.0.mlp.gate_up_proj", ["intermediate_size"]),
    "chatglm": ("ChatGLMModel", "transformer.encoder.layers.0.self_attention.query_key_value.bias",
                ["ffn_hidden_size", "num_layers", "multi_query_attention", "multi_query_group_num", "kv_channels",
                 "padded_vocab_size"]),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "model.layers.1.mlp.shared_experts.down_proj",
                    ["n_routed_experts", "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace",
                     "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_names_and_config(built, arch):
    fx, t = built(arch, "awq")
    c = fx.config
    archname, tensor, keys = ARCH_EXPECT[arch]
    assert c["architectures"] == [archname]
    assert any(k == tensor or k.startswith(tensor + ".") for k in t), tensor
    for k in keys:
        assert k in c, k
    m = fx.model
    text = c.get("text_config") or c.get("llm_config") or c
    assert text.get("hidden_size") == m.hidden
    assert text.get("num_hidden_layers", text.get("num_layers")) == m.layers
    assert c["quantization_config"]["quant_method"] == "awq"
    not_conv = c["quantization_config"]["modules_to_not_convert"] or []
    routers = [p for p, lin in fx.linears.items() if lin.role == "router"]
    if arch == "mixtral":
        assert not_conv == ["gate"]
    else:
        assert set(routers) <= set(not_conv)
    vision = [p for p, lin in fx.linears.items() if lin.role == "vision"]
    assert all(any(v.startswith(s) or s in v for s in not_conv) for v in vision)
    if arch in ("qwen2_vl", "qwen2_5_vl_nested", "internvl"):
        assert vision
    # shapes that tests of padding rely on
    lin = fx.linears
    if arch == "phi3":
        assert lin["model.layers.0.self_attn.qkv_proj"].out == (m.heads + 2 * m.kv_heads) * m.head_dim
        assert lin["model.layers.0.mlp.gate_up_proj"].out == 2 * m.intermediate
        p = "model.layers.0.mlp."
        x = np.ones((1, m.hidden))
        gu = fx.weights[p + "gate_up_proj"]
        split = {"g": gu[: m.intermediate], "u": gu[m.intermediate:], "d": fx.weights[p + "down_proj"]}
        assert np.array_equal(mlp_forward(fx.weights, p + "gate_up_proj", None, p + "down_proj", x),
                              mlp_forward(split, "g", "u", "d", x))
    if arch == "chatglm":
        assert lin["transformer.encoder.layers.0.mlp.dense_h_to_4h"].out == 2 * c["ffn_hidden_size"]
        assert lin["transformer.output_layer"].out == c["padded_vocab_size"]
    if arch == "deepseek_v2":
        assert "model.layers.0.mlp.gate_proj" in lin and "model.layers.0.mlp.gate" not in lin  # first_k_dense
        assert lin["model.layers.1.mlp.experts.0.gate_proj"].out == c["moe_intermediate_size"]
        shared = lin["model.layers.1.mlp.shared_experts.gate_proj"].out
        assert shared == c["n_shared_experts"] * c["moe_intermediate_size"]
        assert lin["model.layers.1.self_attn.kv_b_proj"].inp == c["kv_lora_rank"]
    if arch == "mixtral":
        assert lin["model.layers.0.block_sparse_moe.experts.0.w1"].out == c["intermediate_size"]
    if arch == "qwen2_moe":
        assert lin["model.layers.0.mlp.shared_expert.up_proj"].out == c["shared_expert_intermediate_size"]
    if arch == "qwen2_5_vl_nested":
        assert c["text_config"]["intermediate_size"] == m.intermediate
        assert "model.language_model.layers.1.mlp.down_proj" in lin
    if arch == "internvl":
        assert c["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
        assert "language_model.model.layers.1.mlp.down_proj" in lin and "language_model.lm_head" in lin


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "internvl", "qwen2_5_vl_nested"])
def test_ct_ignore_lists_unquantized_linears(built, arch):
    fx, _ = built(arch, "ct_sym")
    qc = fx.config["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    ignore = qc["ignore"]
    import re
    for prefix, lin in fx.linears.items():
        hit = prefix in ignore or any(i.startswith("re:") and re.match(i[3:], prefix) for i in ignore)
        assert hit == (not lin.quantizable), prefix


def test_mlp_only_layers_for_qwen_moe(tmp_path):
    fx = build_checkpoint(tmp_path, Model(arch="qwen3_moe", intermediate=640, first_k_dense=1), Quant("gptq"))
    assert fx.config["mlp_only_layers"] == [0]
    assert "model.layers.0.mlp.down_proj" in fx.linears and "model.layers.1.mlp.experts.0.down_proj" in fx.linears
    assert "model.layers.0.mlp.gate" not in fx.linears


# ---------------------------------------------------------------------------------------------------------
# Sparse header-only builds, determinism
# ---------------------------------------------------------------------------------------------------------

def test_sparse_72b_build_is_fast_and_full_size(tmp_path):
    m = Model(arch="qwen2", hidden=8192, intermediate=29568, layers=80, heads=64, kv_heads=8, head_dim=128,
              vocab=152064)
    t0 = time.perf_counter()
    fx = build_checkpoint(tmp_path, m, Quant("awq", sym=False), shards=8, data=False)
    assert time.perf_counter() - t0 < 2.0
    assert fx.weights == {}
    data_total = 0
    for name in fx.shard_names:
        f = fx.path / name
        raw = f.open("rb").read(8)
        hlen = int.from_bytes(raw, "little")
        assert hlen % 8 == 0
        with safe_open(str(f), "numpy") as h:
            keys = list(h.keys())
            end = 0
            for k in keys:
                dt, shape = fx.tensors[k]
                assert tuple(h.get_slice(k).get_shape()) == shape
            header = json.loads(f.open("rb").read(8 + hlen)[8:])
            end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert os.stat(f).st_size == 8 + hlen + end
        data_total += end
    assert read_index(fx.path)["metadata"]["total_size"] == data_total
    assert data_total > 38e9  # ~41 GB of 4-bit Qwen2-72B
    d = fx.tensors["model.layers.79.mlp.down_proj.qweight"]
    assert d == ("I32", (29568, 1024))
    assert fx.tensors["model.layers.79.mlp.down_proj.scales"] == ("F16", (231, 8192))


@pytest.mark.parametrize("variant", ["gptq_desc_act", "ct_asym", "bf16"])
def test_sparse_layout_equals_real_layout(tmp_path, variant):
    real = build_checkpoint(tmp_path / "real", _small("deepseek_v2"), VARIANTS[variant])
    sparse = build_checkpoint(tmp_path / "sparse", _small("deepseek_v2"), VARIANTS[variant], data=False)
    assert real.tensors == sparse.tensors and real.weight_map == sparse.weight_map
    assert read_index(real.path) == read_index(sparse.path)
    assert real.config == sparse.config
    for name in real.shard_names:  # same data bytes (headers differ only in JSON spacing)
        assert _data_size(real.path / name) == _data_size(sparse.path / name)
        with safe_open(str(sparse.path / name), "numpy") as h:
            assert set(h.keys()) == {k for k, f in real.weight_map.items() if f == name}


def _data_size(f: Path) -> int:
    return os.stat(f).st_size - 8 - int.from_bytes(f.open("rb").read(8), "little")


def test_same_seed_same_bytes(tmp_path):
    a = build_checkpoint(tmp_path / "a", _small("qwen2"), Quant("ct", sym=False), seed=7)
    b = build_checkpoint(tmp_path / "b", _small("qwen2"), Quant("ct", sym=False), seed=7)
    c = build_checkpoint(tmp_path / "c", _small("qwen2"), Quant("ct", sym=False), seed=8)
    for name in a.shard_names:
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()
    assert any((a.path / n).read_bytes() != (c.path / n).read_bytes() for n in a.shard_names)


def test_single_shard_writes_model_safetensors_without_index(tmp_path):
    fx = build_checkpoint(tmp_path, _small("llama"), Quant("fp32"), shards=1)
    assert fx.shard_names == ["model.safetensors"] and read_index(fx.path) is None
    assert load_tensors(fx.path)["lm_head.weight"].dtype == np.float32


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(ValueError):
        build_checkpoint(tmp_path, Model(), Quant("awq", bits=8))
    with pytest.raises(ValueError):
        build_checkpoint(tmp_path, Model(intermediate=2400), Quant("gptq"))  # 2400 % 128
    with pytest.raises(ValueError):
        build_checkpoint(tmp_path, Model(arch="gpt2"), Quant("fp16"))
    assert len(arch_linears(Model(arch="mixtral"))) == 2 * (4 + 1 + 4 * 3) + 1  # per layer: attn, router, experts


# ---------------------------------------------------------------------------------------------------------
# Third-party oracles (skipped locally when not installed, failed under CI: tests/oracle_env.py)
# ---------------------------------------------------------------------------------------------------------

def _autoawq_packing_utils():
    """AutoAWQ's `awq/utils/packing_utils.py`, loaded by file path: importing the `awq` package itself pulls in
    transformers/accelerate, but this one file only needs torch."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        oracle_env.missing("autoawq", "package 'autoawq' (module awq) not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "packing_utils.py"
    if not path.is_file():
        oracle_env.missing("autoawq", f"it has no {path}")
    mspec = importlib.util.spec_from_file_location("_autoawq_packing_utils", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def _ct_helpers():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError:
        try:  # older compressed-tensors layout
            from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
                pack_to_int32, unpack_from_int32)
        except ImportError:
            oracle_env.missing("compressed-tensors", "not installed")
    return pack_to_int32, unpack_from_int32


@pytest.mark.oracle
@pytest.mark.parametrize("quant", [Quant("awq", sym=False), Quant("awq"), Quant("awq", sym=False, group_size=-1)],
                         ids=["asym", "sym", "per-channel"])
def test_oracle_autoawq_dequantize_gemm(tmp_path, quant):
    torch = oracle_env.import_torch()
    pu = _autoawq_packing_utils()
    fx = build_checkpoint(tmp_path, Model(arch="mixtral", intermediate=640), quant)
    t = load_tensors(fx.path)
    assert pu.AWQ_ORDER == list(AWQ_ORDER) and pu.AWQ_REVERSE_ORDER == list(AWQ_INV)
    for prefix in fx.quantized:
        qw, qz, s = (torch.from_numpy(t[f"{prefix}.{k}"]) for k in ("qweight", "qzeros", "scales"))
        g = fx.linears[prefix].inp if quant.group_size == -1 else quant.group_size
        ref = pu.dequantize_gemm(qw, qz, s.double(), 4, g)  # [K, N]
        assert np.array_equal(ref.numpy().T, fx.weights[prefix]), prefix
        iw, iz = pu.unpack_awq(qw, qz, 4)
        iw, iz = pu.reverse_awq_order(iw, iz, 4)
        codes, zeros = fx.codes[prefix]
        assert np.array_equal((iw & 0xF).numpy().T, codes) and np.array_equal((iz & 0xF).numpy().T, zeros)


@pytest.mark.oracle
@pytest.mark.parametrize("bits", [4, 8])
def test_oracle_compressed_tensors_packing(tmp_path, bits):
    torch = oracle_env.import_torch()
    pack_to_int32, unpack_from_int32 = _ct_helpers()
    fx = build_checkpoint(tmp_path, _small("qwen3_moe"), Quant("ct", bits=bits, sym=False, scale_dtype="BF16"))
    t = load_tensors(fx.path)
    mid = 1 << (bits - 1)
    for prefix in fx.quantized:
        codes, zeros = fx.codes[prefix]
        signed = torch.from_numpy(codes - mid).to(torch.int8)
        assert np.array_equal(pack_to_int32(signed, bits).numpy(), t[prefix + ".weight_packed"]), prefix
        zs = torch.from_numpy(zeros - mid).to(torch.int8)
        assert np.array_equal(pack_to_int32(zs, bits, packed_dim=0).numpy(), t[prefix + ".weight_zero_point"]), prefix
        un = unpack_from_int32(torch.from_numpy(t[prefix + ".weight_packed"]), bits, torch.Size(codes.shape))
        assert np.array_equal(un.numpy().astype(np.int64) + mid, codes)


@pytest.mark.oracle
@pytest.mark.parametrize("quant", [Quant("ct", scale_dtype="BF16"), Quant("ct", sym=False),
                                   Quant("ct", sym=False, group_size=-1)], ids=["sym", "asym", "asym-channel"])
def test_oracle_compressed_tensors_decompress(tmp_path, quant):
    torch = oracle_env.import_torch()
    _ct_helpers()
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    fx = build_checkpoint(tmp_path, _small("qwen2"), quant)
    qc = fx.config["quantization_config"]["config_groups"]["group_0"]
    args = QuantizationArgs(**{k: v for k, v in qc["weights"].items() if k in
                               ("num_bits", "type", "symmetric", "strategy", "group_size")})
    scheme = QuantizationScheme(targets=qc["targets"], weights=args)
    from safetensors.torch import load_file
    raw = {}
    for f in shard_files(fx.path):  # tensors exactly as stored (bf16 stays bf16)
        raw.update(load_file(str(f)))
    for prefix in fx.quantized:
        sd = {k.rsplit(".", 1)[1]: v for k, v in raw.items() if k.rsplit(".", 1)[0] == prefix}
        out = PackedQuantizationCompressor.decompress(sd, scheme)
        # their dequantize computes in the scale dtype: it must equal our exact float64 weight rounded once to it
        got = out["weight"]
        assert got.shape == fx.weights[prefix].shape
        assert torch.equal(got, torch.from_numpy(fx.weights[prefix]).to(got.dtype)), prefix


@pytest.mark.oracle
def test_oracle_autoawq_gemm_packer(tmp_path):
    """AutoAWQ's own GEMM packer (`WQLinear_GEMM.from_linear`) fed our codes writes our exact words."""
    torch = oracle_env.import_torch()
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from awq.modules.linear.gemm import WQLinear_GEMM
    except Exception as e:  # not installed, or its package import needs transformers/accelerate
        oracle_env.missing("AutoAWQ's WQLinear_GEMM", repr(e))
    fx = build_checkpoint(tmp_path, _small("qwen2"), Quant("awq", sym=False, group_size=64))
    t = load_tensors(fx.path)
    for p in fx.quantized:
        lin = fx.linears[p]
        linear = torch.nn.Linear(lin.inp, lin.out, bias=False)
        linear.weight.data = torch.from_numpy(fx.weights[p]).float()
        _, zeros = fx.codes[p]
        ql = WQLinear_GEMM.from_linear(linear, 4, 64, scales=torch.from_numpy(t[p + ".scales"].astype(np.float32)),
                                       zeros=torch.from_numpy(zeros.T.copy()).float())
        assert np.array_equal(ql.qweight.numpy(), t[p + ".qweight"]), p
        assert np.array_equal(ql.qzeros.numpy(), t[p + ".qzeros"]), p


@pytest.mark.oracle
@pytest.mark.parametrize("quant", [Quant("gptq"), Quant("gptq", desc_act=True), Quant("gptq", bits=8, sym=False)],
                         ids=["sym", "act-order", "8bit-asym"])
def test_oracle_autogptq_packer(tmp_path, quant):
    """AutoGPTQ's `QuantLinear.pack` (qlinear_cuda.py, loaded by path) writes our exact v1 words."""
    # The auto-gptq wheel cannot be installed beside this repo (it ships a top-level `tests` package), so
    # .ci/oracles.sh extracts its qlinear sources; an installed auto_gptq is used when present.
    torch = oracle_env.import_torch()
    spec = importlib.util.find_spec("auto_gptq")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "nn_modules" / "qlinear" / "qlinear_cuda.py"
    else:
        path = Path(os.environ.get("AWQPAD_AUTOGPTQ_DIR", Path(__file__).resolve().parent.parent / ".cache" / "oracles"
                                   / "auto_gptq-0.7.1")) / "qlinear_cuda.py"
    if not path.exists():
        oracle_env.missing("AutoGPTQ 0.7.1's qlinear_cuda.py", f"{path} missing; .ci/oracles.sh extracts it")
    try:
        mspec = importlib.util.spec_from_file_location("_autogptq_qlinear_cuda", path)
        qlc = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(qlc)
    except Exception as e:
        oracle_env.missing("AutoGPTQ 0.7.1's qlinear_cuda.py", f"cannot load {path}: {e!r}")
    fx = build_checkpoint(tmp_path, _small("qwen2"), quant)
    t = load_tensors(fx.path)
    for p in fx.quantized:
        lin = fx.linears[p]
        ql = qlc.QuantLinear(quant.bits, quant.group_size, lin.inp, lin.out, False, weight_dtype=torch.float32)
        linear = torch.nn.Linear(lin.inp, lin.out, bias=False)
        linear.weight.data = torch.from_numpy(fx.weights[p]).float()
        _, zeros = fx.codes[p]
        ql.pack(linear, torch.from_numpy(t[p + ".scales"].T.astype(np.float32).copy()),
                torch.from_numpy(zeros.astype(np.float32)), torch.from_numpy(fx.g_idx[p].astype(np.int32)))
        assert np.array_equal(ql.qweight.numpy(), t[p + ".qweight"]), p
        assert np.array_equal(ql.qzeros.numpy(), t[p + ".qzeros"]), p
