"""Attention-head padding (issue #8): plan, pad through the real executor, check in float64.

Every padded checkpoint is written by awqpad.output_repo.pad_to_directory from a PadPlan that carries the
head ops, then judged twice: by awqpad.attention_sim (unpadded source unsharded vs padded output unsharded
and sharded per rank as vLLM shards heads) and by the factory's independent dequantizers (the padded
projections must be the source ones with zero heads at the planned positions, and an fp64 attention over
those matrices must equal the source's).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from awqpad.verify import simulate_attention as attention_sim
from awqpad.checkpoint import formats
from awqpad.plan import head_layout, heads
from awqpad.verify.simulate_attention import attention_from_weights, attention_reference, compare_attention, load_attention
from awqpad.checkpoint.model import read_checkpoint
from awqpad.errors import UnsupportedError
from awqpad.checkpoint.formats.base import LogicalInsert
from awqpad.plan.heads import HeadBlocker, HeadPlan, plan_heads
from awqpad.execute.output_repo import pad_to_directory
from awqpad.plan.pad_plan import make_plan
from awqpad.engines.evaluate import evaluate
from awqpad.source import resolve_source
from tests.factory import Model, Quant, build_checkpoint, dequantize_all, load_tensors

# Qwen2.5-7B attention (28 q / 4 KV heads, head_dim 128) on a small hidden size; MLP wide enough to need
# no padding at TP 8, so the plan is heads only.
Q7 = dict(hidden=512, intermediate=1024, layers=1, heads=28, kv_heads=4, head_dim=128, vocab=64)
# Qwen2.5-0.5B attention with its real hidden size (896 = 14 x 64: config.json has no head_dim).
Q05 = dict(hidden=896, intermediate=512, layers=1, heads=14, kv_heads=2, head_dim=64, vocab=64)


def ckpt(path):
    return read_checkpoint(resolve_source(str(path)))


def pad(src, hp: HeadPlan, tps, engine, out):
    """Run the real executor on make_plan's plan with the head ops and config updates merged in."""
    base = make_plan(src, tps, engine)
    plan = dataclasses.replace(base, ops=base.ops + hp.ops, config_updates={**base.config_updates, **hp.config_updates},
                               blockers=())
    pad_to_directory(src, plan, out, fsync=False)
    return ckpt(out)


def expected_rows(w: np.ndarray, n_old: int, n_new: int, d: int, new_index) -> np.ndarray:
    """W [n_old*d, K] -> [n_new*d, K] with old head i at new head new_index[i], zeros elsewhere."""
    out = np.zeros((n_new * d,) + w.shape[1:])
    for i in range(n_old):
        out[new_index[i] * d:(new_index[i] + 1) * d] = w[i * d:(i + 1) * d]
    return out


def check_weights(fx, out_path, hp: HeadPlan, fused: bool = False):
    """Independent oracle: the factory dequantizes the padded projections; each must be the source's with
    zero heads exactly where the plan says (q rows / o columns by head_map, new k/v heads appended)."""
    got = dequantize_all(load_tensors(out_path), fx)
    h, kv, d, h2, k2 = hp.heads, hp.kv_heads, hp.head_dim, hp.new_heads, hp.new_kv_heads
    hmap, kvmap = hp.head_map, tuple(range(kv))
    for prefix, lin in fx.linears.items():
        w = fx.weights[prefix]
        if lin.role == "q":
            want = expected_rows(w, h, h2, d, hmap)
        elif lin.role in ("k", "v"):
            want = expected_rows(w, kv, k2, d, kvmap)
        elif lin.role == "qkv":
            q, k, v = np.split(w, [h * d, (h + kv) * d])
            want = np.concatenate([expected_rows(q, h, h2, d, hmap), expected_rows(k, kv, k2, d, kvmap),
                                   expected_rows(v, kv, k2, d, kvmap)])
        elif lin.role == "o":
            want = expected_rows(w.T, h, h2, d, hmap).T
        else:
            want = w
        np.testing.assert_array_equal(got[prefix], want, err_msg=prefix)
    for prefix, b in fx.biases.items():
        role = fx.linears[prefix].role
        if role in ("q", "k", "v"):
            stored = load_tensors(out_path)[prefix + ".bias"].astype(np.float64)
            n, n2, m = (h, h2, hmap) if role == "q" else (kv, k2, kvmap)
            np.testing.assert_array_equal(stored, expected_rows(b[:, None], n, n2, d, m)[:, 0])


def attention_oracle(fx, out_path, hp: HeadPlan, spec_src):
    """fp64 attention over the factory-dequantized matrices: padded (new head counts) == source."""
    def mats(weights, biases, h, kv):
        d = hp.head_dim
        roles = {lin.role: p for p, lin in fx.linears.items() if lin.role in ("q", "k", "v", "qkv", "o")
                 and ".layers.0." in p}
        if "qkv" in roles:
            q, k, v = np.split(weights[roles["qkv"]], [h * d, (h + kv) * d])
            b = biases.get(roles["qkv"])
            bq, bk, bv = np.split(b, [h * d, (h + kv) * d]) if b is not None else (None, None, None)
        else:
            q, k, v = (weights[roles[r]] for r in "qkv")
            bq, bk, bv = (biases.get(roles[r]) for r in "qkv")
        return q, k, v, weights[roles["o"]], {"q": bq, "k": bk, "v": bv}

    x = np.random.default_rng(1).standard_normal((6, spec_src.hidden))
    padded = dequantize_all(load_tensors(out_path), fx)
    tensors = load_tensors(out_path)
    pbias = {p: tensors[p + ".bias"].astype(np.float64) for p in fx.biases}
    q, k, v, o, b = mats(fx.weights, fx.biases, hp.heads, hp.kv_heads)
    ref = attention_from_weights(q, k, v, o, x, spec_src, b)
    q, k, v, o, b = mats(padded, pbias, hp.new_heads, hp.new_kv_heads)
    spec_new = dataclasses.replace(spec_src, heads=hp.new_heads, kv_heads=hp.new_kv_heads)
    y = attention_from_weights(q, k, v, o, x, spec_new, b)
    assert np.max(np.abs(y - ref)) <= 1e-12 * np.max(np.abs(ref)), np.max(np.abs(y - ref))


# --- Qwen2.5-7B shape: 28 -> 32 heads at TP 8 -------------------------------------------------------

Q7_QUANTS = {
    "fp16": Quant("fp16"),
    "awq": Quant("awq", sym=False),
    "gptq": Quant("gptq"),
    "gptq-act-order": Quant("gptq", desc_act=True),
    "ct-asym": Quant("ct", sym=False),
    "ct-g_idx": Quant("ct", desc_act=True),
}


@pytest.mark.parametrize("name", list(Q7_QUANTS))
def test_qwen25_7b_shape_tp8_pads_to_32_heads(tmp_path, name):
    fx = build_checkpoint(tmp_path / "src", Model("qwen2", **Q7), Q7_QUANTS[name], shards=2)
    src = ckpt(tmp_path / "src")
    assert any(v.rule == "heads" for v in evaluate(src, "sglang", 8))

    hp = plan_heads(src, (8,), "sglang")
    assert isinstance(hp, HeadPlan)
    assert (hp.strategy, hp.new_heads, hp.new_kv_heads, hp.head_dim) == ("insert-in-groups", 32, 4, 128)
    assert hp.head_map == tuple(g * 8 + i for g in range(4) for i in range(7))  # one zero head after every 7
    assert hp.zero_heads == (7, 15, 23, 31)
    assert hp.config_updates == {"num_attention_heads": 32}  # head_dim is already explicit (512 != 28 x 128)
    assert hp.kv_cache_increase == 0 and hp.core_flops_increase == pytest.approx(4 / 28)
    assert hp.added_bytes > 0 and "heads" in hp.reasons
    assert any("SGLang >= 0.4.9" in c for c in hp.caveats)

    out = pad(src, hp, (8,), "sglang", tmp_path / "out")
    assert (out.dims.heads, out.dims.kv_heads, out.dims.head_dim) == (32, 4, 128)
    assert not [v for v in evaluate(out, "sglang", 8) if v.severity == "error"]

    tps = (1, 2, 4, 8) if name == "fp16" else (2, 8)  # KV heads split (TP <= 4) and replicated (TP 8)
    check = compare_attention(src, out, tps=tps)
    assert check.ok, check.failures
    assert {r.tp for r in check.results} == {0, *tps}
    check_weights(fx, tmp_path / "out", hp)
    if name in ("fp16", "awq"):
        attention_oracle(fx, tmp_path / "out", hp, attention_sim.spec_for(src))


def test_gptq_o_proj_g_idx_is_positional_after_middle_insertion(tmp_path):
    """Without act-order the o_proj g_idx is rewritten to arange(K') // g and scales go in at the group position,
    so readers that ignore g_idx (Marlin, ExLlama) and readers that use it agree."""
    fx = build_checkpoint(tmp_path / "src", Model("qwen2", **Q7), Quant("gptq"), shards=1)
    src = ckpt(tmp_path / "src")
    hp = plan_heads(src, (8,), "sglang")
    pad(src, hp, (8,), "sglang", tmp_path / "out")
    t = load_tensors(tmp_path / "out")
    o = "model.layers.0.self_attn.o_proj"
    np.testing.assert_array_equal(t[o + ".g_idx"], np.arange(32 * 128) // 128)
    positional = {k: v for k, v in t.items() if k != o + ".g_idx"}
    got = dequantize_all(positional, fx, prefixes=[o])[o]
    np.testing.assert_array_equal(got, expected_rows(fx.weights[o].T, 28, 32, 128, hp.head_map).T)


def test_gptq_act_order_o_proj_gets_fresh_groups(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen2", **Q7), Quant("gptq", desc_act=True), shards=1)
    src = ckpt(tmp_path / "src")
    hp = plan_heads(src, (8,), "sglang")
    pad(src, hp, (8,), "sglang", tmp_path / "out")
    t = load_tensors(tmp_path / "out")
    o = "model.layers.0.self_attn.o_proj"
    g_idx = t[o + ".g_idx"]
    assert t[o + ".scales"].shape[0] == 32 and np.all(t[o + ".scales"][28:] == 0)
    for slot, new_group in zip(hp.zero_heads, range(28, 32)):  # head j's rows -> fresh group 28 + j
        assert np.all(g_idx[slot * 128:(slot + 1) * 128] == new_group)
    assert np.bincount(g_idx).tolist() == [128] * 32


def test_vllm_qwen2_ignores_head_dim_so_it_blocks(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen2", **Q7), Quant("awq", sym=False), shards=1, data=False)
    src = ckpt(tmp_path / "src")
    blocked = plan_heads(src, (8,), "vllm")
    assert isinstance(blocked, HeadBlocker) and blocked.rule == "head-dim-ignored"
    assert "qwen2.py" in blocked.message and "0.33.0" in blocked.message
    assert "SGLang >= 0.4.9" in blocked.explanation and "--hf-overrides" in blocked.explanation
    forced = plan_heads(src, (8,), "vllm", allow_ignored_head_dim=True)
    assert isinstance(forced, HeadPlan) and forced.unsupported_engines == ("vllm",) and forced.new_heads == 32


def test_plain_heads_that_split_need_nothing(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen2", **Q7), Quant("fp16"), shards=1, data=False)
    hp = plan_heads(ckpt(tmp_path / "src"), (4,), "vllm")
    assert isinstance(hp, HeadPlan) and not hp.changed and hp.strategy == "none" and hp.ops == ()


# --- Qwen2.5-0.5B shape: 14 -> 16 heads at TP 4 -----------------------------------------------------


def test_qwen25_05b_shape_tp4_fp16_writes_explicit_head_dim(tmp_path):
    fx = build_checkpoint(tmp_path / "src", Model("qwen2", **Q05), Quant("fp16"), shards=2)
    assert "head_dim" not in fx.config
    src = ckpt(tmp_path / "src")
    hp = plan_heads(src, (4,), "sglang")
    assert (hp.strategy, hp.new_heads, hp.new_kv_heads) == ("insert-in-groups", 16, 2)
    assert hp.config_updates == {"num_attention_heads": 16, "head_dim": 64}
    out = pad(src, hp, (4,), "sglang", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"], config["hidden_size"]) == (16, 2, 64, 896)
    check = compare_attention(src, out, tps=(1, 2, 4))
    assert check.ok, check.failures
    check_weights(fx, tmp_path / "out", hp)
    attention_oracle(fx, tmp_path / "out", hp, attention_sim.spec_for(src))


@pytest.mark.parametrize("quant", [Quant("awq", sym=False), Quant("gptq"), Quant("ct")], ids=["awq", "gptq", "ct"])
def test_qwen25_05b_quantized_o_proj_group_128_is_refused(tmp_path, quant):
    build_checkpoint(tmp_path / "src", Model("qwen2", **Q05), quant, shards=1, data=False)
    with pytest.raises(UnsupportedError) as exc:
        plan_heads(ckpt(tmp_path / "src"), (4,), "sglang")
    msg = exc.value.message
    assert "o_proj" in msg and "head_dim 64" in msg and "group size 128" in msg and "\n" not in msg


def test_qwen25_05b_gptq_group_64_pads(tmp_path):
    fx = build_checkpoint(tmp_path / "src", Model("qwen2", **Q05), Quant("gptq", group_size=64, sym=False), shards=1)
    src = ckpt(tmp_path / "src")
    hp = plan_heads(src, (4,), "sglang")
    out = pad(src, hp, (4,), "sglang", tmp_path / "out")
    check = compare_attention(src, out, tps=(4,))
    assert check.ok, check.failures
    check_weights(fx, tmp_path / "out", hp)


# --- other strategies and layouts ----------------------------------------------------------------


def test_mha_appends_zero_q_k_v_heads(tmp_path):
    model = Model("llama", hidden=512, intermediate=1024, layers=1, heads=12, kv_heads=12, head_dim=64, vocab=64)
    fx = build_checkpoint(tmp_path / "src", model, Quant("gptq", group_size=64), shards=1)
    src = ckpt(tmp_path / "src")
    hp = plan_heads(src, (8,), "vllm")
    assert (hp.strategy, hp.new_heads, hp.new_kv_heads) == ("append", 16, 16)
    assert hp.kv_cache_increase == pytest.approx(4 / 12)
    assert hp.config_updates == {"num_attention_heads": 16, "num_key_value_heads": 16}
    assert any("vLLM >= 0.5.3" in c for c in hp.caveats)
    out = pad(src, hp, (8,), "vllm", tmp_path / "out")
    check = compare_attention(src, out, tps=(8,))
    assert check.ok, check.failures
    check_weights(fx, tmp_path / "out", hp)


def test_phi3_fused_qkv_new_kv_groups_at_tp16(tmp_path):
    """Phi-4-like 40 q / 10 KV heads: 10 KV heads neither divide nor are divided by 16, so whole zero KV
    groups are appended (KV cache grows) inside the fused [q; k; v] tensor."""
    model = Model("phi3", hidden=512, intermediate=2048, layers=1, heads=40, kv_heads=10, head_dim=64, vocab=64)
    fx = build_checkpoint(tmp_path / "src", model, Quant("awq", sym=False, group_size=64), shards=2)
    src = ckpt(tmp_path / "src")
    hp = plan_heads(src, (16,), "vllm")
    assert (hp.strategy, hp.new_heads, hp.new_kv_heads) == ("new-kv-groups", 64, 16)
    assert hp.kv_cache_increase == pytest.approx(0.6)
    assert any("KV cache grows by 60.0 %" in n for n in hp.notes)
    out = pad(src, hp, (16,), "vllm", tmp_path / "out")
    check = compare_attention(src, out, tps=(16,))
    assert check.ok, check.failures
    check_weights(fx, tmp_path / "out", hp)


def test_phi3_fused_qkv_insert_in_groups(tmp_path):
    model = Model("phi3", hidden=512, intermediate=1024, layers=1, heads=28, kv_heads=4, head_dim=128, vocab=64)
    fx = build_checkpoint(tmp_path / "src", model, Quant("ct", sym=False), shards=1)
    src = ckpt(tmp_path / "src")
    hp = plan_heads(src, (8,), "vllm")
    assert (hp.strategy, hp.new_heads) == ("insert-in-groups", 32)
    out = pad(src, hp, (8,), "vllm", tmp_path / "out")
    check = compare_attention(src, out, tps=(8,))
    assert check.ok, check.failures
    check_weights(fx, tmp_path / "out", hp)


def test_chatglm_fused_qkv_with_bias(tmp_path):
    model = Model("chatglm", hidden=512, intermediate=1024, layers=1, heads=12, kv_heads=2, head_dim=128, vocab=64)
    fx = build_checkpoint(tmp_path / "src", model, Quant("awq", sym=False), shards=1)
    src = ckpt(tmp_path / "src")
    assert isinstance(plan_heads(src, (8,), "vllm"), HeadBlocker)  # vLLM chatglm.py derives head_dim
    hp = plan_heads(src, (8,), "vllm", allow_ignored_head_dim=True)
    assert (hp.strategy, hp.new_heads, hp.new_kv_heads) == ("insert-in-groups", 16, 2)
    assert hp.config_updates == {"num_attention_heads": 16}  # kv_channels is ChatGLM's explicit head_dim
    out = pad(src, hp, (8,), "vllm", tmp_path / "out")
    check = compare_attention(src, out, tps=(8,))
    assert check.ok, check.failures
    check_weights(fx, tmp_path / "out", hp)


def test_qwen3_q_k_norms_stay(tmp_path):
    model = Model("qwen3_moe", hidden=256, layers=1, heads=28, kv_heads=4, head_dim=128, vocab=64, experts=2,
                  moe_intermediate=256)
    build_checkpoint(tmp_path / "src", model, Quant("bf16"), shards=1)
    src = ckpt(tmp_path / "src")
    hp = plan_heads(src, (8,), "vllm")
    assert (hp.strategy, hp.new_heads) == ("insert-in-groups", 32)
    assert not any("norm" in op.tensor for op in hp.ops)
    out = pad(src, hp, (8,), "vllm", tmp_path / "out")
    assert set(load_attention(out, 0).norms) == {"q", "k"}
    check = compare_attention(src, out, tps=(8,))
    assert check.ok, check.failures


def test_insert_and_new_groups_combined(tmp_path):
    """4 q / 2 KV -> 9 q / 3 KV: one zero query head per old group AND one new zero group of 3 (built by hand:
    no engine rule picks it, but the layout must still be exact)."""
    model = Model("qwen2", hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2, head_dim=64, vocab=64)
    build_checkpoint(tmp_path / "src", model, Quant("awq", sym=False, group_size=64), shards=1)
    src = ckpt(tmp_path / "src")
    roles = {lin.role: lin for lin in src.linears if lin.block == "attn"}
    ops = tuple(head_layout.layer_ops(src, roles, 9, 3))
    assert head_layout.strategy_name(4, 2, 9, 3) == "insert-in-groups+new-kv-groups"
    hp = dataclasses.replace(plan_heads(src, (1,), "sglang"), ops=ops, config_updates={"num_attention_heads": 9, "num_key_value_heads": 3})
    out = pad(src, hp, (1,), "sglang", tmp_path / "out")
    check = compare_attention(src, out, tps=(3,))
    assert check.ok, check.failures


# --- the wrong strategy must be caught --------------------------------------------------------------


def test_heads_appended_at_the_end_of_a_gqa_model_fail(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen2", **Q7), Quant("awq", sym=False), shards=1)
    src = ckpt(tmp_path / "src")
    ops = []
    for lin in src.linears:
        fmt = formats.BY_NAME[lin.format]
        if lin.role == "q":
            ops += fmt.pad_ops(lin, "out", (LogicalInsert(28 * 128, 4 * 128),))
        elif lin.role == "o":
            ops += fmt.pad_ops(lin, "in", (LogicalInsert(28 * 128, 4 * 128),))
    hp = dataclasses.replace(plan_heads(src, (8,), "sglang"), ops=tuple(ops))
    out = pad(src, hp, (8,), "sglang", tmp_path / "out")
    check = compare_attention(src, out, tps=(8,))
    assert not check.ok and check.max_error > 0.1
    assert all(r.error > 0.1 for r in check.results)


def test_unpadded_source_does_not_shard_at_tp8(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen2", **Q7), Quant("fp16"), shards=1)
    src = ckpt(tmp_path / "src")
    check = compare_attention(src, src, tps=(4, 8))
    by_tp = {r.tp: r for r in check.results}
    assert by_tp[4].error <= 1e-12 and by_tp[0].error == 0.0
    assert by_tp[8].error == float("inf") and "28 attention heads do not split over 8" in by_tp[8].detail
    assert "do not split over 8" in attention_sim.shard_problems(src, 8)[0].message
    assert attention_sim.shard_problems(src, 4) == []


def test_shard_problems_name_a_straddled_o_proj_group(tmp_path):
    """Qwen2.5-0.5B AWQ g=128 unpadded at TP 2: 7 heads x 64 = 448 o_proj inputs per rank straddle a group."""
    build_checkpoint(tmp_path / "src", Model("qwen2", **Q05), Quant("awq", sym=False), shards=1, data=False)
    problems = attention_sim.shard_problems(ckpt(tmp_path / "src"), 2)
    assert problems and problems[0].kind == "group" and "o_proj" in problems[0].message


def test_reference_matches_factory_weights(tmp_path):
    """attention_sim's loader (awqpad dequantizers, fused split, biases) against the factory's matrices."""
    fx = build_checkpoint(tmp_path / "src", Model("chatglm", hidden=256, intermediate=512, layers=1, heads=4,
                                                 kv_heads=2, head_dim=64, vocab=64), Quant("gptq", sym=False), shards=1)
    src = ckpt(tmp_path / "src")
    data = load_attention(src, 0)
    x = np.random.default_rng(2).standard_normal((5, 256))
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value"
    q, k, v = np.split(fx.weights[qkv], [4 * 64, 6 * 64])
    bq, bk, bv = np.split(fx.biases[qkv], [4 * 64, 6 * 64])
    want = attention_from_weights(q, k, v, fx.weights["transformer.encoder.layers.0.self_attention.dense"], x,
                                  data.spec, {"q": bq, "k": bk, "v": bv})
    got = attention_reference(data, x, "v1-unmasked")
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))


# --- refusals ----------------------------------------------------------------------------------------


def _add_tensor(path, name, array):
    """Add one tensor to a sharded fixture: a new shard file named in the index."""
    save_file({name: np.asarray(array)}, str(path / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_per_head_parameters_are_refused(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen2", **Q7), Quant("fp16"), shards=2, data=False)
    _add_tensor(tmp_path / "src", "model.layers.0.self_attn.sinks", np.zeros(28, np.float16))
    with pytest.raises(UnsupportedError, match=r"self_attn\.sinks \[28\].*per-head"):
        plan_heads(ckpt(tmp_path / "src"), (8,), "sglang")


def test_whole_projection_q_norm_is_refused(tmp_path):
    build_checkpoint(tmp_path / "src", Model("qwen2", **Q7), Quant("fp16"), shards=2, data=False)
    _add_tensor(tmp_path / "src", "model.layers.0.self_attn.q_norm.weight", np.ones(28 * 128, np.float16))
    with pytest.raises(UnsupportedError, match="q/k norm over more than one head"):
        plan_heads(ckpt(tmp_path / "src"), (8,), "sglang")


def test_alibi_is_refused(tmp_path):
    build_checkpoint(tmp_path / "src", Model("llama", **{**Q7, "heads": 12, "kv_heads": 12, "head_dim": 64}),
                     Quant("fp16"), shards=1, data=False)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["alibi"] = True
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="ALiBi slopes depend on the number of heads"):
        plan_heads(ckpt(tmp_path / "src"), (8,), "vllm")


def test_mla_is_refused(tmp_path):
    model = Model("deepseek_v2", hidden=256, layers=2, heads=12, kv_heads=12, head_dim=64, vocab=64)
    build_checkpoint(tmp_path / "src", model, Quant("fp16"), shards=1, data=False)
    with pytest.raises(UnsupportedError, match="multi-head latent attention"):
        plan_heads(ckpt(tmp_path / "src"), (8,), "vllm")


# --- pure layout properties ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 3), st.integers(0, 3), st.sampled_from([1, 2, 8]))
def test_inserts_put_every_head_in_its_kv_group(kv, r, add_r, add_kv, d):
    h, k2, r2 = kv * r, kv + add_kv, r + add_r
    h2 = k2 * r2
    hmap = head_layout.head_map(h, kv, h2, k2)
    # Apply q_inserts to head labels (a feature of head i is labelled i; new features -1).
    labels = np.repeat(np.arange(h), d)
    for ins in sorted(head_layout.q_inserts(h, kv, h2, k2, d), key=lambda i: -i.at):
        labels = np.insert(labels, ins.at, np.full(ins.count, -1))
    assert labels.size == h2 * d
    for i in range(h):
        assert np.all(labels[hmap[i] * d:(hmap[i] + 1) * d] == i)
        assert hmap[i] // r2 == i // r  # the same KV head under the padded ratio
    # Fused [q; k; v] and InternLM2-grouped layouts put q, k and v heads in their padded places.
    for layout in ("fused", "grouped"):
        qkv = _qkv_labels(layout, h, kv, d)
        for ins in sorted(head_layout.qkv_inserts(layout, h, kv, h2, k2, d), key=lambda i: -i.at):
            qkv = np.insert(qkv, ins.at, np.full(ins.count, -1))
        assert np.array_equal(qkv, _qkv_padded(layout, h, kv, h2, k2, d, hmap))


def _qkv_labels(layout, h, kv, d):
    q = [("q", i) for i in range(h)]
    k = [("k", j) for j in range(kv)]
    v = [("v", j) for j in range(kv)]
    if layout == "fused":
        order = q + k + v
    else:
        r = h // kv
        order = [x for j in range(kv) for x in q[j * r:(j + 1) * r] + [k[j], v[j]]]
    codes = {("q", i): i for i in range(h)} | {("k", j): 1000 + j for j in range(kv)} | {("v", j): 2000 + j for j in range(kv)}
    return np.repeat([codes[x] for x in order], d)


def _qkv_padded(layout, h, kv, h2, k2, d, hmap):
    inv = {new: old for old, new in enumerate(hmap)}
    q = [inv.get(i, -1) for i in range(h2)]
    k = [1000 + j if j < kv else -1 for j in range(k2)]
    v = [2000 + j if j < kv else -1 for j in range(k2)]
    if layout == "fused":
        order = q + k + v
    else:
        r2 = h2 // k2
        order = [x for j in range(k2) for x in q[j * r2:(j + 1) * r2] + [k[j], v[j]]]
    return np.repeat(order, d)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(28, 4), (14, 2), (52, 52), (40, 10), (40, 40), (12, 1), (64, 8), (20, 5)]),
       st.sampled_from([2, 4, 8, 16]), st.sampled_from(["vllm", "sglang", "tgi", "vllm-latest"]))
def test_chosen_head_count_is_minimal_and_valid(tmp_path_factory, counts, t, engine):
    h, kv = counts
    path = tmp_path_factory.mktemp("m")
    build_checkpoint(path, Model("llama", hidden=256, intermediate=512, layers=1, heads=h, kv_heads=kv, head_dim=64,
                                 vocab=64), Quant("fp16"), shards=1, data=False)
    src = ckpt(path)
    chosen = heads.choose_heads(src, (t,), engine)
    if chosen is None:  # e.g. MQA 12/1 under TGI at TP 8 would need 8 KV groups of 12: 96 > 4 x 12 heads
        h2, k2 = heads.MAX_GROWTH * h + 1, None
    else:
        h2, k2 = chosen
        assert heads.padded_heads_ok(src, (t,), engine, h2, k2)
        assert h2 % k2 == 0 and k2 >= kv and h2 // k2 >= h // kv
    for smaller in range(h, h2):  # nothing smaller works with any valid KV count
        assert not any(heads.padded_heads_ok(src, (t,), engine, smaller, k) for k in range(kv, smaller // (h // kv) + 1)
                       if smaller % k == 0)
