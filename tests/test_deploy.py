"""`awqpad plan SRC --gpus N`: the deployment planner on real model shapes (header-only sparse checkpoints).

Per-GPU bytes are computed here by hand from the published dimensions and the AWQ tensor layout
(qweight K x N/8 int32, qzeros K/g x N/8 int32, scales K/g x N fp16), not with awqpad's code.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awqpad.checkpoint.model import read_checkpoint
from awqpad.cli import main
from awqpad.plan.deploy import Layout, candidate_layouts, parse_memory, plan_deployment, rank_key, stage_layers
from awqpad.plan.strategy import plan_with_strategy
from awqpad.source import resolve_source
from tests.factory import Model, Quant, build_checkpoint

AWQ = Quant("awq", sym=False)
GB = 10**9


def awq_bytes(k: int, n: int, g: int = 128) -> int:
    return k * n // 2 + (k // g) * (n // 8) * 4 + (k // g) * n * 2


def qwen2_72b_per_gpu(tp: int, inter: int) -> int:
    """Qwen2.5-72B-Instruct-AWQ on TP ranks: 80 layers, q/k/v with fp16 biases, 8 KV heads."""
    h, kv, layers, vocab = 8192, 1024, 80, 152064
    layer = (awq_bytes(h, h) + 2 * h + 2 * (awq_bytes(h, kv) + 2 * kv) + awq_bytes(h, h)
             + 2 * awq_bytes(h, inter) + awq_bytes(inter, h))
    split = layers * layer / tp + 2 * vocab * h * 2 / tp  # every linear and both vocab matrices split over TP
    replicated = layers * 2 * h * 2 + h * 2  # two RMSNorm weights per layer + the final norm
    return round(split + replicated)


@pytest.fixture(scope="module")
def q72(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy") / "Qwen2.5-72B-Instruct-AWQ"
    build_checkpoint(path, Model("qwen2", hidden=8192, intermediate=29568, layers=80, heads=64, kv_heads=8, head_dim=128,
                                 vocab=152064), AWQ, data=False, shards=4)
    return read_checkpoint(resolve_source(str(path), headers_only=True))


@pytest.fixture(scope="module")
def q30(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy") / "Qwen3-30B-A3B-AWQ"
    build_checkpoint(path, Model("qwen3_moe", hidden=2048, intermediate=6144, layers=48, heads=32, kv_heads=4,
                                 head_dim=128, vocab=151936, experts=128, moe_intermediate=768), AWQ, data=False, shards=4)
    return read_checkpoint(resolve_source(str(path), headers_only=True))


def run_cli(monkeypatch, *argv) -> int:
    """The real entry point in this process, as a shell would call it: the exit code."""
    monkeypatch.setattr("sys.argv", ["awqpad", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def _row(plan, label, engine="vllm"):
    return next(r for r in plan.layouts if r.layout.label == label and r.engine == engine)


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_qwen2_72b_awq_on_80gb_gpus(q72, gpus):
    plan = plan_deployment(q72, gpus, gpu_memory=parse_memory("80GB"))
    top = plan.layouts[0]
    assert top.layout == Layout(gpus), plan.why  # TP = N inside one node beats pipeline stages
    assert top.needs == "pad" and top.reason == "intermediate_size 29568 -> 29696"
    assert top.weight_bytes_per_gpu == qwen2_72b_per_gpu(gpus, 29696)
    unpadded = qwen2_72b_per_gpu(gpus, 29568)
    assert top.added_bytes_per_gpu == top.weight_bytes_per_gpu - unpadded
    # +128 columns of gate/up and rows of down in 80 layers: 3 x 128 / 29568 of the MLP work
    assert 0.3 < top.added_flops_percent < 0.4
    # KV cache: 80 layers x K and V x max(1, 8 / TP) heads x 128 x fp16
    assert top.kv_bytes_per_token == 80 * 2 * (8 // gpus) * 128 * 2
    room = int(80 * GB * 0.9) - top.weight_bytes_per_gpu - (2 << 30)
    assert top.kv_room_bytes == room and top.kv_tokens == room // top.kv_bytes_per_token
    assert top.fits is (room > 0)
    assert top.pad_command == f"awqpad pad {q72.source.source_id} Qwen2.5-72B-Instruct-AWQ-tp{gpus} --tp {gpus}"
    assert top.launch == f"vllm serve Qwen2.5-72B-Instruct-AWQ-tp{gpus} --tensor-parallel-size {gpus}"
    assert plan.why == f"TP {gpus} on vllm wins: it needs fewer pipeline stages than TP {gpus // 2} x PP 2 (lower latency)."


def test_qwen2_72b_does_not_fit_two_24gb_gpus(q72):
    plan = plan_deployment(q72, 2, gpu_memory=parse_memory("24GB"))
    assert all(r.fits is False for r in plan.layouts)
    assert plan.why.startswith("No layout both loads exactly and fits")


def test_qwen3_30b_a3b_awq_on_four_24gb_gpus(q30):
    plan = plan_deployment(q30, 4, gpu_memory=parse_memory("24GB"), engine="vllm")
    tp4 = _row(plan, "TP 4")
    ep = _row(plan, "TP 4 + EP")
    # TP 4 splits 768-wide experts into 192 = 1.5 groups of 128 = 3 groups of 64: regrouping to g64 (+scales
    # only) beats padding to 1024 (+33 % of expert weights); the pad-only layout is what --strategy pad prices
    assert tp4.needs == "regroup" and tp4.reason == "group size 128 -> 64" and tp4.added_flops_percent == 0
    # with expert parallelism the experts stay whole: nothing to do
    assert ep.needs == "nothing" and ep.pad_command is None
    assert ep.launch.endswith("--tensor-parallel-size 4 --enable-expert-parallel")
    # regrouping adds only qzeros/scales rows: every AWQ linear of the 48 layers (q 2048x4096, k/v 2048x512,
    # o 4096x2048, 128 experts of gate/up 2048x768 and down 768x2048) at g64 instead of g128, a quarter per GPU
    shapes = [(2048, 4096), (2048, 512), (2048, 512), (4096, 2048)] + 128 * [(2048, 768), (2048, 768), (768, 2048)]
    extra = 48 * sum(awq_bytes(k, n, 64) - awq_bytes(k, n) for k, n in shapes) // 4
    assert tp4.added_bytes_per_gpu == extra
    # EP puts 32 whole experts on each GPU, TP a quarter of every expert: the same bytes, so they differ by the regroup
    assert tp4.weight_bytes_per_gpu - ep.weight_bytes_per_gpu == extra
    order = [r.layout.label for r in plan.layouts]
    assert order.index("TP 4 + EP") < order.index("TP 4")  # equal FLOPs; no added bytes beats +3 %
    assert plan.layouts[0].added_flops_percent == 0
    assert "wins" in plan.why


def test_stage_layers_follow_vllm():
    # vllm/distributed/utils.py get_pp_indices: 10 layers on 4 stages -> 3, 3, 2, 2 ... remainder before the last
    assert [len(r) for r in stage_layers(10, 4)] == [2, 3, 3, 2]
    assert [len(r) for r in stage_layers(80, 2)] == [40, 40]
    assert stage_layers(7, 1) == [range(0, 7)]


def test_layouts_cover_every_split(q30):
    labels = {r.label for r in candidate_layouts(q30, 8)}
    assert labels == {"TP 8", "TP 8 + EP", "TP 4 x PP 2", "TP 4 x PP 2 + EP", "TP 2 x PP 4", "TP 2 x PP 4 + EP",
                      "TP 1 x PP 8"}


def test_multi_node_marks_tp_across_nodes(q72):
    plan = plan_deployment(q72, 16, nodes=2, engine="sglang")
    tp16 = _row(plan, "TP 16", "sglang")
    tp8 = _row(plan, "TP 8 x PP 2", "sglang")
    assert tp16.spans_nodes and not tp8.spans_nodes
    assert "--nnodes 2" in tp8.launch and "--pp-size 2" in tp8.launch


def test_engines_without_pipeline_parallelism_are_not_offered_pp(q72):
    plan = plan_deployment(q72, 4, engine="all")
    unsupported = {(r.layout.label, r.engine) for r in plan.layouts if r.needs == "unsupported"}
    assert ("TP 2 x PP 2", "tgi") in unsupported and ("TP 2 x PP 2", "lmdeploy") in unsupported
    assert all(r.needs == "unsupported" for r in plan.layouts[len(plan.layouts) - len(unsupported):])


@pytest.mark.parametrize("text,expected", [("80GB", 80 * GB), ("80GiB", 80 << 30), ("24g", 24 * GB), ("24", 24 * GB),
                                           ("81920MiB", 81920 << 20), ("1.5TB", 1500 * GB)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_cli_json_schema_and_first_pad_command_reproduces_the_layout(q30, monkeypatch, capsys):
    src = str(q30.source.root)
    assert run_cli(monkeypatch, "plan", src, "--gpus", "4", "--gpu-memory", "24GB", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema_version"] == 1 and data["gpus"] == 4 and data["gpu_memory_bytes"] == 24 * GB
    first = data["layouts"][0]
    assert set(first) >= {"rank", "layout", "tp", "pp", "ep", "engine", "needs", "weight_bytes_per_gpu",
                          "added_bytes_per_gpu", "added_flops_percent", "kernel_path", "kv_tokens", "fits", "launch",
                          "pad_command"}
    tp4 = next(r for r in data["layouts"] if r["layout"] == "TP 4")
    # the pad command of a padded layout gives exactly the plan the planner priced
    argv = tp4["pad_command"].split()[1:]
    assert argv[:3] == ["pad", src, "Qwen3-30B-A3B-AWQ-tp4"]
    priced = plan_with_strategy(q30, (4,), "vllm")  # pad's default --strategy auto
    assert priced.regroup is not None and priced.regroup.new_group_size == 64 and not priced.changed_dims
    assert tp4["needs"] == "regroup" and tp4["added_bytes_per_gpu"] > 0


@pytest.mark.parametrize("argv,needle", [
    (["--gpus", "4", "--tp", "4"], "--gpus plans every layout itself"),
    (["--gpu-memory", "80GB", "--tp", "4"], "go with --gpus"),
    (["--gpus", "6", "--nodes", "4"], "does not split evenly"),
    (["--gpus", "4", "--gpu-memory", "lots"], "expected a size"),
    ([], "give --tp N"),
])
def test_cli_usage_errors_are_one_line(q72, argv, needle, monkeypatch, capsys):
    assert run_cli(monkeypatch, "plan", str(q72.source.root), *argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) <= 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inter_groups=st.integers(2, 40).map(lambda n: 2 * n), experts=st.sampled_from([0, 8]), gpus=st.sampled_from([2, 4, 8]),
       engine=st.sampled_from(["vllm", "vllm-latest", "sglang"]))
def test_properties(tmp_path_factory, inter_groups, experts, gpus, engine):
    """Every exact layout satisfies every error rule of its engine after its own plan, the ranking is the
    documented order, and no layout N GPUs allow is missing."""
    path = tmp_path_factory.mktemp("prop")
    model = Model("qwen3_moe" if experts else "qwen2", hidden=1024, intermediate=128 * inter_groups, layers=4, heads=16,
                  kv_heads=8, head_dim=64, vocab=512, experts=experts, moe_intermediate=64 * inter_groups if experts else 0)
    build_checkpoint(path, model, AWQ, data=False, shards=1)
    ckpt = read_checkpoint(resolve_source(str(path), headers_only=True))
    plan = plan_deployment(ckpt, gpus, engine=engine)
    keys = [rank_key(r) for r in plan.layouts if r.needs != "unsupported"]
    assert keys == sorted(keys)
    seen = {(r.layout.tp, r.layout.pp, r.layout.ep) for r in plan.layouts}
    for pp in range(1, gpus + 1):
        if gpus % pp == 0 and pp <= 4:
            assert (gpus // pp, pp, False) in seen
    for r in plan.layouts:
        if not r.exact:
            continue
        priced = plan_with_strategy(ckpt, (r.layout.tp,), engine, pad_heads=r.needs == "pad-heads",
                                    expert_parallel=r.layout.ep)
        errors = [v for v in priced.violations_after if v.severity == "error"]
        assert not errors, (r.layout.label, errors)
        assert (r.added_bytes_per_gpu > 0) == priced.needs_padding


def test_pad_with_expert_parallel_leaves_experts_whole_and_verifies(tmp_path, monkeypatch, capsys):
    """The shared expert 2432 (19 groups, TP-split even under EP) is padded for TP 4; 384-wide experts (96 per
    rank at TP 4) stay as they are because --expert-parallel never splits them; verify re-derives the same
    plan from awqpad.json."""
    src, out = tmp_path / "moe", tmp_path / "moe-tp4-ep"
    build_checkpoint(src, Model("qwen2_moe", hidden=512, intermediate=2432, layers=2, heads=8, kv_heads=4, head_dim=128,
                                experts=4, moe_intermediate=384, shared_intermediate=2432), AWQ, seed=3)
    assert run_cli(monkeypatch, "plan", str(src), "--tp", "4", "--json") == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["dims"]["moe_intermediate_size"]["padded"] == 512  # without EP the experts are padded
    assert run_cli(monkeypatch, "pad", str(src), str(out), "--tp", "4", "--expert-parallel", "--json") == 0
    padded = json.loads(capsys.readouterr().out)["plan"]
    assert padded["expert_parallel"] is True
    assert padded["dims"]["shared_expert_intermediate_size"]["padded"] == 2560
    assert padded["dims"]["moe_intermediate_size"]["padded"] == 384
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == 384 and config["shared_expert_intermediate_size"] == 2560
    assert json.loads((out / "awqpad.json").read_text())["expert_parallel"] is True
    assert run_cli(monkeypatch, "verify", str(src), str(out), "--json") == 0
    checks = {c["name"]: c["ok"] for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["provenance"] and all(checks.values())


def test_qwen3_235b_fp8_on_eight_80gb_gpus(tmp_path):
    """The issue's case: TP 8 needs expert padding 1536 -> 2048; TP 8 + EP and TP 4 x PP 2 need nothing."""
    from tests.fp8_factory import Spec, build_fp8

    path = tmp_path / "Qwen3-235B-A22B-FP8"
    build_fp8(path, Spec(arch="qwen3_moe", hidden=4096, layers=94, heads=64, kv_heads=4, head_dim=128, experts=128,
                         moe_intermediate=1536, vocab=151936), data=False, shards=4)
    ckpt = read_checkpoint(resolve_source(str(path), headers_only=True))
    plan = plan_deployment(ckpt, 8, gpu_memory=parse_memory("80GB"))
    tp8, ep, pp = _row(plan, "TP 8"), _row(plan, "TP 8 + EP"), _row(plan, "TP 4 x PP 2")
    assert tp8.needs == "pad" and tp8.reason == "moe_intermediate_size 1536 -> 2048"
    assert ep.needs == "nothing" and pp.needs == "nothing"
    # block-FP8 expert: e4m3 weight (1 byte each) + F32 scale_inv per 128 x 128 block. 1536 -> 2048 adds 512 rows
    # to gate and up ([I, 4096]) and 512 columns to down ([4096, I]): 3 x 512 x 4096 bytes + 3 x 4 x 32 x 4 scales
    per_expert = 3 * 512 * 4096 + 3 * (4 * 32 * 4)
    assert tp8.added_bytes_per_gpu == 94 * 128 * per_expert // 8  # 9.46 GB
    assert tp8.weight_bytes_per_gpu - ep.weight_bytes_per_gpu == tp8.added_bytes_per_gpu
    assert tp8.pad_command.endswith("--tp 8") and tp8.launch.endswith("--tensor-parallel-size 8")
    assert ep.launch.endswith("--tensor-parallel-size 8 --enable-expert-parallel")
    assert pp.launch.endswith("--tensor-parallel-size 4 --pipeline-parallel-size 2")
    assert plan.layouts[0].layout == Layout(8, 1, True), plan.why  # no padding, one pipeline stage
    assert [r.layout.label for r in plan.layouts][-1] == "TP 8"  # +11 % FLOPs: last of the exact layouts
    # KV: 94 layers x K and V x one KV head per rank (4 KV heads replicated over 8) x 128 x bf16
    assert ep.kv_bytes_per_token == 94 * 2 * 1 * 128 * 2


# --- DeepSeek-V3 (block FP8, MLA, 256 routed experts + 1 shared, 3 dense layers) on 2 and 4 nodes of 8 x 80 GB ------

DSV3_H, DSV3_LAYERS, DSV3_DENSE, DSV3_EXPERTS, DSV3_VOCAB = 7168, 61, 3, 256, 129280
MLA_LATENT = 512 + 64  # kv_lora_rank + qk_rope_head_dim: what every MLA rank caches per token and layer


def fp8_block(n: int, k: int) -> int:
    """One block-FP8 linear [n, k]: e4m3 weight (1 byte each) + F32 weight_scale_inv per 128 x 128 block."""
    return n * k + -(-n // 128) * -(-k // 128) * 4


def dsv3_stage_bytes(tp: int, ep: bool, layers: list[int], dense: int = 18432, shared: int = 2048,
                     expert: int = 2048) -> list[int]:
    """Weight bytes on one GPU of each pipeline stage (`layers`: decoder layers per stage, in order)."""
    H = DSV3_H
    # MLA attention. vLLM replicates q_a_proj [1536, H] and kv_a_proj_with_mqa [512 + 64, H] on every rank
    # (ReplicatedLinear); q_b_proj [128 x (128 + 64), 1536], kv_b_proj [128 x (128 + 128), 512] and o_proj
    # [H, 128 x 128] split over TP. Norms (q_a, kv_a: bf16 [1536], [512]; input / post-attention: [H]) replicated.
    attn_replicated = fp8_block(1536, H) + fp8_block(576, H) + 2 * (1536 + 512 + 2 * H)
    attn_split = fp8_block(128 * 192, 1536) + fp8_block(128 * 256, 512) + fp8_block(H, 128 * 128)
    dense_layer = attn_replicated + (attn_split + 2 * fp8_block(dense, H) + fp8_block(H, dense)) / tp
    # MoE layer: router gate bf16 [256, H] + F32 e_score_correction_bias [256] replicated; the shared expert
    # TP-split (also under EP); 256 experts: 1 / tp of each (TP) or 256 / tp whole ones (EP): the same bytes here
    per_expert = 2 * fp8_block(expert, H) + fp8_block(H, expert)
    experts = DSV3_EXPERTS * per_expert * (-(-DSV3_EXPERTS // tp) / DSV3_EXPERTS if ep else 1 / tp)
    moe_layer = (attn_replicated + 2 * DSV3_EXPERTS * H + 4 * DSV3_EXPERTS
                 + (attn_split + 2 * fp8_block(shared, H) + fp8_block(H, shared)) / tp + experts)
    vocab = DSV3_VOCAB * H * 2 / tp  # bf16 embed_tokens (first stage) and lm_head (last stage), vocab-parallel
    out, first = [], 0
    for s, count in enumerate(layers):
        n_dense = max(0, min(first + count, DSV3_DENSE) - first)
        total = n_dense * dense_layer + (count - n_dense) * moe_layer
        total += (vocab if s == 0 else 0) + (vocab + 2 * H if s == len(layers) - 1 else 0)  # + final norm
        out.append(round(total))
        first += count
    return out


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory):
    from tests.fp8_factory import Spec, build_fp8

    path = tmp_path_factory.mktemp("deploy") / "DeepSeek-V3"
    build_fp8(path, Spec(arch="deepseek_v3", hidden=DSV3_H, layers=DSV3_LAYERS, heads=128, kv_heads=128,
                         intermediate=18432, moe_intermediate=2048, experts=DSV3_EXPERTS, n_shared=1,
                         first_k_dense=DSV3_DENSE, vocab=DSV3_VOCAB, mla=(1536, 512, 64, 128, 128),
                         extra_config={"num_experts_per_tok": 8, "max_position_embeddings": 163840}),
              data=False, shards=8)
    return read_checkpoint(resolve_source(str(path), headers_only=True))


# Decoder layers per stage, as vLLM's get_pp_indices splits 61: 61 // pp each, the remainder one each to the
# stages before the last (pp 2: 30 + 30, +1 to stage 0; pp 8: 7 each, +1 to stages 2..6; ...).
DSV3_STAGES = {1: [61], 2: [31, 30], 4: [15, 15, 16, 15], 8: [7, 7, 8, 8, 8, 8, 8, 7],
               16: [3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3], 32: [1, 1] + [2] * 29 + [1]}
# Matmul work per token (in x out; a routed expert weighted by the 8 of 256 a token visits), and what TP 32's
# padding adds: dense gate / up / down x 2048 / 18432 in 3 layers, shared and routed experts doubled in 58.
_H = DSV3_H
_ATTN = 1536 * _H + 24576 * 1536 + 576 * _H + 32768 * 512 + _H * 16384  # q_a, q_b, kv_a, kv_b, o
_DENSE, _SHARED, _ROUTED = 3 * 18432 * _H, 3 * 2048 * _H, 8 * 3 * 2048 * _H
_TOTAL = 61 * _ATTN + 3 * _DENSE + 58 * (256 * _H + _SHARED + _ROUTED)  # + the router [256, H]
DSV3_TP32_FLOPS = 100 * (3 * _DENSE * 2048 / 18432 + 58 * (_SHARED + _ROUTED)) / _TOTAL  # 64.77 %
DSV3_CASES = {  # (GPUs, nodes) -> the ranking: exact, no added FLOPs and TP inside a node first, then fewer stages
    (16, 2): ["TP 8 x PP 2", "TP 8 x PP 2 + EP", "TP 4 x PP 4", "TP 4 x PP 4 + EP", "TP 2 x PP 8", "TP 2 x PP 8 + EP",
              "TP 1 x PP 16", "TP 16", "TP 16 + EP"],
    (32, 4): ["TP 8 x PP 4", "TP 8 x PP 4 + EP", "TP 4 x PP 8", "TP 4 x PP 8 + EP", "TP 2 x PP 16", "TP 2 x PP 16 + EP",
              "TP 1 x PP 32", "TP 16 x PP 2", "TP 16 x PP 2 + EP", "TP 32", "TP 32 + EP"],
}


@pytest.mark.parametrize("gpus,nodes", sorted(DSV3_CASES))
def test_deepseek_v3_fp8_on_multi_node_80gb_gpus(dsv3, gpus, nodes):
    plan = plan_deployment(dsv3, gpus, nodes=nodes, gpu_memory=parse_memory("80GB"))
    assert [r.layout.label for r in plan.layouts] == DSV3_CASES[gpus, nodes]
    per_node = gpus // nodes
    for r in plan.layouts:
        tp, pp, ep = r.layout.tp, r.layout.pp, r.layout.ep
        assert r.spans_nodes is (tp > per_node), r.layout.label
        if tp <= 16:  # 2048 / 16 = 128: one whole FP8 block of every expert per rank; 18432 / 16 = 9 blocks
            assert r.needs == "nothing" and r.added_bytes_per_gpu == 0 and r.pad_command is None, r.layout.label
            stages = dsv3_stage_bytes(tp, ep, DSV3_STAGES[pp])
        else:  # TP 32: 64 rows per rank split a 128-row block: dense 18432 -> 20480 (5 blocks per rank) and the
            # experts (routed and the shared one, tied by n_shared_experts x moe_intermediate_size) 2048 -> 4096
            assert r.needs == "pad" and r.exact and r.pad_command.startswith("awqpad pad "), r.layout.label
            stages = dsv3_stage_bytes(tp, ep, DSV3_STAGES[pp], 20480, 4096, 4096)
            assert r.added_bytes_per_gpu == r.weight_bytes_per_gpu - max(dsv3_stage_bytes(tp, ep, DSV3_STAGES[pp]))
            assert r.added_flops_percent == pytest.approx(DSV3_TP32_FLOPS, abs=1e-3)
            if not ep:
                assert r.reason == "intermediate_size 18432 -> 20480, shared 2048 -> 4096, moe_intermediate_size 2048 -> 4096"
        fullest = max(range(pp), key=lambda s: stages[s])
        assert r.weight_bytes_per_gpu == stages[fullest], r.layout.label
        # MLA: the latent + RoPE key (576 bf16 values) of every layer of the stage, on every TP rank alike
        assert r.kv_bytes_per_token == DSV3_STAGES[pp][fullest] * MLA_LATENT * 2, r.layout.label
        rooms = [int(80 * GB * 0.9) - w - (2 << 30) for w in stages]
        assert r.kv_tokens == min(room // (n * MLA_LATENT * 2) for room, n in zip(rooms, DSV3_STAGES[pp]))
        assert r.fits is True and r.kv_tokens >= 163840, r.layout.label  # max_position_embeddings
    top = plan.layouts[0]
    assert top.layout == Layout(8, gpus // 8) and top.kernel_path == "fast"
    assert top.launch.endswith(f"--tensor-parallel-size 8 --pipeline-parallel-size {gpus // 8}")
    assert plan.why == (f"TP 8 x PP {gpus // 8} on vllm wins: it ties with TP 8 x PP {gpus // 8} + EP on every count "
                        "and needs no expert parallelism.")
    # the numbers behind the ranking: of the 673 GB of weights, the fullest of 16 GPUs holds 43.9 GB, of 32 23.3 GB
    assert round(top.weight_bytes_per_gpu / GB, 1) == {16: 43.9, 32: 23.3}[gpus]
