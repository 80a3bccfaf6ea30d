"""awqpad.simulate: float64 tensor-parallel simulation of gated MLPs, sharded the way vLLM shards them.

The reference for "what the source computes" is tests/factory.py's own dequantized weights and
`mlp_forward` (an implementation that shares no code with awqpad), so a wrong shard, scale row or
merge order in simulate shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awqpad.verify import simulate_mlp as simulate
from awqpad.checkpoint.model import Linear, MLPBlock, read_checkpoint
from awqpad.checkpoint.header import TensorInfo
from awqpad.execute.output_repo import pad_to_directory
from awqpad.plan.pad_plan import make_plan
from awqpad.engines.evaluate import evaluate
from awqpad.source import resolve_source
from awqpad.execute.tensor_io import read_array
from tests.factory import Model, Quant, build_checkpoint, mlp_forward

SMALL = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=640)
FORMATS = {
    "awq": (Model(**SMALL), Quant("awq")),
    "gptq-v1-sym": (Model(**SMALL), Quant("gptq")),
    "gptq-v2-asym": (Model(**SMALL), Quant("gptq", sym=False, checkpoint_format="gptq_v2")),
    "gptq-act-order": (Model(**SMALL), Quant("gptq", desc_act=True)),
    "ct-asym-act-order": (Model(**SMALL), Quant("ct", sym=False, desc_act=True)),
    "fp16": (Model(**{**SMALL, "intermediate": 642}), Quant("fp16")),
    "phi3-fused": (Model(arch="phi3", **SMALL), Quant("awq")),
}


def load(ckpt, block) -> simulate.MLPData:
    root = ckpt.source.root
    return simulate.MLPData(block, {lin.prefix: {p: read_array(root, i) for p, i in lin.parts.items()} for lin in block.linears})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name: str, tp: int = 2):
        key = (name, tp)
        if key not in cache:
            root = tmp_path_factory.mktemp(name)
            model, quant = FORMATS[name]
            fx = build_checkpoint(root / "src", model, quant, shards=2)
            src = read_checkpoint(resolve_source(str(root / "src")))
            plan = make_plan(src, (tp,), "vllm")
            out = src
            if plan.needs_padding:
                pad_to_directory(src, plan, root / "out", fsync=False)
                out = read_checkpoint(resolve_source(str(root / "out")))
            cache[key] = (fx, src, out)
        return cache[key]

    return get


def factory_mlp(fx, block, x):
    prefixes = [lin.prefix for lin in block.linears]
    if len(prefixes) == 2:  # fused gate_up + down
        return mlp_forward(fx.weights, prefixes[0], None, prefixes[1], x)
    return mlp_forward(fx.weights, prefixes[0], prefixes[1], prefixes[2], x)


@pytest.mark.parametrize("name", list(FORMATS))
def test_padded_sharded_equals_unpadded(built, name):
    fx, src, out = built(name)
    rng = np.random.default_rng(0)
    for s_block, o_block in zip(src.mlps, out.mlps):
        x = rng.standard_normal((3, s_block.linears[0].in_features))
        expected = factory_mlp(fx, s_block, x)  # the source, unsharded, by the factory's own math
        reader = simulate.engine_reader(o_block)
        data = load(out, o_block)
        assert o_block.width > s_block.width or name == "fp16"
        assert simulate.relative_error(simulate.mlp_reference(load(src, s_block), x, reader), expected) < 1e-12
        for t in (1, 2):
            y = simulate.mlp_sharded(data, x, t, reader)
            assert simulate.relative_error(y, expected) < 1e-12, (name, t)


def test_unpadded_source_at_tp4_reports_the_partial_group(tmp_path):
    build_checkpoint(tmp_path, Model(hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=2432), Quant("awq"), shards=1)
    ckpt = read_checkpoint(resolve_source(str(tmp_path)))
    block = ckpt.mlps[0]
    x = np.ones((1, 512))
    with pytest.raises(simulate.ShardError) as exc:
        simulate.mlp_sharded(load(ckpt, block), x, 4, "awq")
    assert exc.value.rank == 0 and exc.value.kind == "group"
    assert exc.value.message == ("rank 0: model.layers.0.mlp.down_proj inputs [0, 608) = 4.75 groups of 128: ends 96 rows "
                                 "into group 4, so its scale/zero rows would be shared with a neighbouring rank")
    problems = simulate.shard_problems(block, 4)
    assert [p.rank for p in problems] == [0, 1, 2, 3]
    assert "starts 96 rows into group 4 and ends 64 rows into group 9" in problems[1].message
    # ... which is what vLLM says when it refuses to load it:
    messages = {v.message for v in evaluate(ckpt, "vllm", 4)}
    assert ("The input size is not aligned with the quantized weight shape. This can be caused by too large tensor "
            "parallel size.") in messages
    # At TP 1 there is nothing to split and the simulation runs.
    assert simulate.shard_problems(block, 1) == []


def test_width_that_does_not_split(built):
    _, src, _ = built("fp16")
    block = src.mlps[0]
    assert simulate.split(642, 2) == [(0, 321), (321, 642)]
    with pytest.raises(simulate.ShardError, match=r"width 642 does not split over 4 ranks \(642 % 4 = 2\)"):
        simulate.split(642, 4, "layer 0 mlp")
    assert simulate.shard_problems(block, 4)[0].kind == "split"


def test_act_order_row_parallel_replicates_scales_and_shards_g_idx(built):
    _, _, out = built("gptq-act-order")
    down = next(lin for lin in out.linears if lin.role == "down")
    arrays = {p: read_array(out.source.root, i) for p, i in down.parts.items()}
    part = simulate.take(arrays, down, "in", 384, 768)  # rank 1 of 2
    assert part["scales"].shape == arrays["scales"].shape and part["qzeros"].shape == arrays["qzeros"].shape
    assert np.array_equal(part["g_idx"], arrays["g_idx"][384:768])
    assert part["qweight"].shape == (48, arrays["qweight"].shape[1])
    # Act-order: no partial-group error even off group boundaries (only whole packed words matter).
    assert simulate.slice_problem(down, "in", 0, 200) is None
    assert simulate.slice_problem(down, "in", 0, 204)[0] == "pack"


def test_grouped_row_parallel_shards_scale_rows(built):
    _, _, out = built("gptq-v1-sym")
    down = next(lin for lin in out.linears if lin.role == "down")
    arrays = {p: read_array(out.source.root, i) for p, i in down.parts.items()}
    part = simulate.take(arrays, down, "in", 384, 768)
    assert np.array_equal(part["scales"], arrays["scales"][3:6]) and "g_idx" not in part
    with pytest.raises(simulate.ShardError, match=r"inputs \[0, 320\) = 2.5 groups of 128"):
        simulate.take(arrays, down, "in", 0, 320)
    # A reader that honours g_idx keeps the whole scale table and slices g_idx instead.
    honour = simulate.take(arrays, down, "in", 0, 320, replicate=True)
    assert honour["scales"].shape == arrays["scales"].shape and honour["g_idx"].shape == (320,)


def test_merged_gate_up_is_gate_shard_then_up_shard(built):
    fx, src, out = built("awq")
    block = out.mlps[0]
    gate, up = block.linears[0], block.linears[1]
    data = load(out, block)
    w = block.width
    for start, stop in simulate.split(w, 2):
        g = simulate.take(data.arrays[gate.prefix], gate, "out", start, stop)
        u = simulate.take(data.arrays[up.prefix], up, "out", start, stop)
        merged = simulate.merge([g, u], gate)
        assert merged["qweight"].shape[1] == 2 * (stop - start) // 8
        w_merged = simulate.dequantize(merged, gate, "awq")
        padded_gate = np.vstack([fx.weights[gate.prefix], np.zeros((w - 640, 256))])
        padded_up = np.vstack([fx.weights[up.prefix], np.zeros((w - 640, 256))])
        assert np.array_equal(w_merged, np.vstack([padded_gate[start:stop], padded_up[start:stop]]))
    with pytest.raises(simulate.ShardError) as exc:
        simulate.take(data.arrays[gate.prefix], gate, "out", 0, 4)
    assert exc.value.kind == "pack" and "8 outputs per word" in exc.value.message


def test_different_g_idx_for_gate_and_up_is_noted(built):
    # The factory draws an independent act-order permutation per module; real GPTQ gives gate and up the
    # same one (same input, same Hessian). vLLM's merged parameter holds one g_idx, so simulate notes it
    # and dequantizes each with its own.
    fx, _, out = built("gptq-act-order")
    block = out.mlps[0]
    notes: list[str] = []
    x = np.random.default_rng(1).standard_normal((2, 256))
    y = simulate.mlp_sharded(load(out, block), x, 2, "marlin-sym", notes=notes)
    assert notes and "store different g_idx" in notes[0]
    src_block = next(b for b in built("gptq-act-order")[1].mlps if b.layer == block.layer)
    assert simulate.relative_error(y, factory_mlp(fx, src_block, x)) < 1e-12


def test_chunked_computation_equals_whole(built):
    fx, src, out = built("gptq-v2-asym")
    block = out.mlps[1]
    data = load(out, block)
    x = np.random.default_rng(2).standard_normal((2, 256))
    whole = simulate.mlp_reference(data, x, "v2")
    for chunk in (1 << 14, 1 << 18):
        assert simulate.relative_error(simulate.mlp_reference(data, x, "v2", chunk_bytes=chunk), whole) < 1e-14
        assert simulate.relative_error(simulate.mlp_sharded(data, x, 2, "v2", chunk_bytes=chunk), whole) < 1e-14


def test_relative_error_and_nonfinite():
    ref = np.array([[1.0, np.nan, np.inf, -2.0]])
    assert simulate.relative_error(ref.copy(), ref) == 0.0
    assert simulate.relative_error(ref + np.array([[1e-16, 0, 0, 0]]), ref) == pytest.approx(1e-16 / 2)
    assert simulate.relative_error(np.array([[1.0, 0.0, np.inf, -2.0]]), ref) == math.inf
    assert simulate.relative_error(np.array([[1.0, np.nan, -np.inf, -2.0]]), ref) == math.inf
    assert simulate.relative_error(np.zeros((1, 2)), np.zeros((1, 2))) == 0.0


def test_activation_names():
    assert simulate.activation_name({"hidden_act": "silu"}) == "silu"
    assert simulate.activation_name({"hidden_activation": "gelu_pytorch_tanh"}) == "gelu_tanh"
    assert simulate.activation_name({}) == "silu"
    x = np.linspace(-3, 3, 7)
    assert np.allclose(simulate.ACTIVATIONS["gelu"](x), simulate.ACTIVATIONS["gelu_tanh"](x), atol=1e-3)


# --- synthetic dense MLPs: any width divisible by t shards exactly -------------------------------------------


def _dense_block(rng, hidden: int, width: int, bias: bool) -> simulate.MLPData:
    def lin(prefix, role, n, k):
        parts = {"weight": TensorInfo(f"{prefix}.weight", "x", "F64", (n, k), 0, 0)}
        if bias:
            parts["bias"] = TensorInfo(f"{prefix}.bias", "x", "F64", (n,), 0, 0)
        return Linear(prefix, role, "dense", 0, None, "dense", k, n, parts)

    lins = (lin("g", "gate", width, hidden), lin("u", "up", width, hidden), lin("d", "down", hidden, width))
    arrays = {}
    for l in lins:
        arrays[l.prefix] = {"weight": rng.standard_normal((l.out_features, l.in_features))}
        if bias:
            arrays[l.prefix]["bias"] = rng.standard_normal(l.out_features)
    return simulate.MLPData(MLPBlock("dense", 0, None, width, lins), arrays)


@settings(max_examples=40, deadline=None)
@given(hidden=st.integers(1, 24), per_rank=st.integers(1, 12), t=st.sampled_from([1, 2, 3, 4, 8]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_dense_sharding_is_exact(hidden, per_rank, t, bias, seed):
    rng = np.random.default_rng(seed)
    data = _dense_block(rng, hidden, per_rank * t, bias)
    x = rng.standard_normal((3, hidden))
    w = {p: a["weight"] for p, a in data.arrays.items()}
    h = simulate.ACTIVATIONS["silu"](x @ w["g"].T + (data.arrays["g"]["bias"] if bias else 0))
    expected = (h * (x @ w["u"].T + (data.arrays["u"]["bias"] if bias else 0))) @ w["d"].T
    expected = expected + (data.arrays["d"]["bias"] if bias else 0)
    assert simulate.relative_error(simulate.mlp_sharded(data, x, t, "dense"), expected) < 1e-12
    assert simulate.shard_problems(data.block, t) == []


def test_block_unit(built):
    assert simulate.block_unit(built("awq")[2].mlps[0]) == 128  # down scale rows: whole groups of 128
    assert simulate.block_unit(built("gptq-act-order")[2].mlps[0]) == 8  # replicated scales: packed words only
    assert simulate.block_unit(built("fp16")[2].mlps[0]) == 1


def test_sampled_channels_cover_rank_edges_and_the_padded_tail(built):
    fx, src, out = built("awq")
    block = out.mlps[0]  # width 768 = 2 ranks of 384; the source had 640
    channels = simulate.sample_channels(block, 2, 640)
    assert all(a % 128 == 0 and b % 128 == 0 for a, b in channels)
    covered = {c for a, b in channels for c in range(a, b)}
    for edge in (0, 383, 384, 767):  # first and last feature of each rank
        assert edge in covered
    assert set(range(512, 768)) <= covered  # the padded tail and the group before it
    x = np.random.default_rng(3).standard_normal((2, 256))
    src_block = src.mlps[0]
    ref = simulate.mlp_reference(load(src, src_block), x, "awq", channels=channels)
    y = simulate.mlp_sharded(load(out, block), x, 2, "awq", channels=channels)
    assert simulate.relative_error(y, ref) < 1e-12
    # The channel-restricted sums add up to the whole MLP.
    whole = simulate.mlp_reference(load(src, src_block), x, "awq")
    complement = []
    cursor = 0
    for a, b in channels:
        if a > cursor:
            complement.append((cursor, a))
        cursor = b
    part = simulate.mlp_reference(load(src, src_block), x, "awq", channels=complement)
    assert simulate.relative_error(ref + part, whole) < 1e-12
