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
