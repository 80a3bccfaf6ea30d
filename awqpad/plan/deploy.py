"""`awqpad plan SRC --gpus N`: every layout N GPUs allow, what the checkpoint needs for it, and what it costs.

Layouts: TP = N; TP x PP for every PP dividing N; for MoE models each of those with expert parallelism
(vLLM `--enable-expert-parallel`, SGLang `--ep-size`: experts are spread whole over the TP ranks of a stage,
so they are not split and need no padding). Per layout and engine: what awqpad must do (nothing / pad /
pad heads / blocked, via `make_plan`), the weight bytes of the fullest GPU including padding, the added
matmul FLOPs per token, the kernel path, and with `--gpu-memory` the KV-cache room and the tokens it holds.

Memory model (stated, not measured): an engine may use `GPU_MEMORY_UTILIZATION` of each GPU (vLLM's default
`--gpu-memory-utilization`); from that come the GPU's weights and `RESERVE_BYTES` for activations, CUDA graphs
and communication buffers; the rest is KV cache. A layout fits when that cache holds one sequence of
`max_model_len` tokens, the check vLLM makes at start-up (vllm/v1/core/kv_cache_utils.py
check_enough_kv_cache_memory).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from awqpad.checkpoint.model import Checkpoint, Linear
from awqpad.engines.launch import launch_command
from awqpad.engines.profiles import engines_for
from awqpad.plan.pad_plan import PadPlan
from awqpad.plan.strategy import plan_with_strategy

GPU_MEMORY_UTILIZATION = 0.90
RESERVE_BYTES = 2 << 30
KV_DTYPE_BYTES = {"auto": None, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bfloat16": 2, "float16": 2, "float32": 4}
MODEL_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
EMBED = re.compile(r"(embed_tokens|wte|tok_embeddings|word_embeddings|embedding)\.weight$")
HEAD = re.compile(r"(^|\.)(lm_head|output)\.weight$")
REPLICATED_MLA = ("q_a_proj", "kv_a_proj_with_mqa")  # vLLM DeepSeek: ReplicatedLinear (models/deepseek_v2.py)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int = 1
    ep: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        return f"TP {self.tp}" + (f" x PP {self.pp}" if self.pp > 1 else "") + (" + EP" if self.ep else "")


@dataclass(frozen=True)
class LayoutReport:
    layout: Layout
    engine: str
    needs: str  # nothing | regroup | pad | regroup+pad | pad-heads | blocked | unsupported
    reason: str
    exact: bool  # loads at this layout and computes the source's function
    weight_bytes_per_gpu: int  # the fullest GPU, padding included
    added_bytes_per_gpu: int
    added_flops_percent: float  # extra matmul work per token
    kernel_path: str  # fast | fallback | -
    kv_bytes_per_token: int  # on the fullest GPU's stage
    kv_room_bytes: int | None
    kv_tokens: int | None
    fits: bool | None  # None: no --gpu-memory given
    spans_nodes: bool
    launch: str | None
    pad_command: str | None


@dataclass(frozen=True)
class DeployPlan:
    source_id: str
    gpus: int
    nodes: int
    gpu_memory: int | None
    max_model_len: int | None
    kv_cache_dtype: str
    layouts: tuple[LayoutReport, ...]  # ranked, best first
    why: str


# --- layouts ---------------------------------------------------------------------------------------


def candidate_layouts(ckpt: Checkpoint, gpus: int) -> list[Layout]:
    moe = any(b.kind == "expert" for b in ckpt.mlps)
    out = []
    for pp in (d for d in range(1, gpus + 1) if gpus % d == 0):
        if pp > max(ckpt.dims.layers, 1):
            break
        out.append(Layout(gpus // pp, pp))
        if moe and gpus // pp > 1:
            out.append(Layout(gpus // pp, pp, ep=True))
    return out


def stage_layers(layers: int, pp: int) -> list[range]:
    """Decoder layers per pipeline stage, as vLLM splits them (vllm/distributed/utils.py get_pp_indices:
    an even split, the remainder going one layer each to the stages before the last)."""
    counts = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        counts[-i] += 1
    starts = [sum(counts[:i]) for i in range(pp)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


# --- bytes per GPU ----------------------------------------------------------------------------------


def _linear_share(lin: Linear, ckpt: Checkpoint, layout: Layout, kv_heads: int, heads: int) -> float:
    """Fraction of this linear's bytes that one TP rank holds."""
    tp = layout.tp
    kv_split = min(tp, kv_heads) if kv_heads else tp  # KV heads are replicated beyond TP = kv_heads
    if lin.block == "expert":
        experts = max(ckpt.dims.num_experts, 1)
        return math.ceil(experts / tp) / experts if layout.ep else 1 / tp
    if lin.role == "router" or (lin.role == "mla" and lin.prefix.endswith(REPLICATED_MLA)):
        return 1.0
    if lin.role in ("k", "v"):
        return 1 / kv_split
    if lin.role == "qkv" and heads and kv_heads:
        q = heads / (heads + 2 * kv_heads)
        return q / tp + (1 - q) / kv_split
    return 1 / tp


def _added_bytes(plan: PadPlan) -> dict[str, int]:
    from awqpad.checkpoint.header import tensor_nbytes

    return {op.tensor: tensor_nbytes(op.dtype, op.new_shape) - tensor_nbytes(op.dtype, op.old_shape)
            for op in plan.ops if op.replace is None}


def stage_bytes(ckpt: Checkpoint, layout: Layout, plan: PadPlan | None) -> list[tuple[int, int]]:
    """(weight bytes, of which padding) on one GPU of each pipeline stage."""
    heads = (plan.heads.new_heads if plan and plan.heads else ckpt.dims.heads) or 0
    kv_heads = (plan.heads.new_kv_heads if plan and plan.heads else ckpt.dims.kv_heads) or heads
    added = _added_bytes(plan) if plan else {}
    owner = {info.name: lin for lin in ckpt.linears for info in lin.parts.values()}
    stages = stage_layers(ckpt.dims.layers, layout.pp)
    stage_of_layer = {layer: s for s, r in enumerate(stages) for layer in r}
    totals = [[0.0, 0.0] for _ in stages]
    for name, info in ckpt.tensors.items():
        lin = owner.get(name)
        if lin is not None:
            share = _linear_share(lin, ckpt, layout, kv_heads, heads)
            layer = lin.layer
        else:
            vocab = EMBED.search(name) or HEAD.search(name)
            share = 1 / layout.tp if vocab else 1.0  # vocab-parallel embeddings; norms etc. replicated
            match = LAYER.search(name)
            layer = int(match[1]) if match else None
        if layer is not None:
            stage = stage_of_layer.get(layer, len(stages) - 1)
        else:
            stage = len(stages) - 1 if HEAD.search(name) or name.endswith("norm.weight") else 0
        totals[stage][0] += (info.nbytes + added.get(name, 0)) * share
        totals[stage][1] += added.get(name, 0) * share
    return [(round(a), round(b)) for a, b in totals]


# --- FLOPs and KV cache ---------------------------------------------------------------------------


def added_flops_percent(ckpt: Checkpoint, plan: PadPlan) -> float:
    """Extra matmul multiply-adds per token: every linear counts in_features x out_features, a routed
    expert weighted by the share of experts a token visits (num_experts_per_tok / num_experts)."""
    experts = max(ckpt.dims.num_experts, 1)
    top_k = int(ckpt.config.get("num_experts_per_tok") or ckpt.config.get("moe_topk") or 1)
    growth = {d.kind: d.added_fraction for d in plan.changed_dims}
    head_growth = {}
    if plan.heads is not None:
        hp = plan.heads
        head_growth = {"q": hp.new_heads / hp.heads - 1, "o": hp.new_heads / hp.heads - 1,
                       "k": hp.new_kv_heads / hp.kv_heads - 1, "v": hp.new_kv_heads / hp.kv_heads - 1,
                       "qkv": (hp.new_heads + 2 * hp.new_kv_heads) / (hp.heads + 2 * hp.kv_heads) - 1}
    total = extra = 0.0
    for lin in ckpt.linears:
        work = lin.in_features * lin.out_features * (top_k / experts if lin.block == "expert" else 1)
        total += work
        extra += work * (growth.get(lin.block, 0.0) if lin.block in growth else head_growth.get(lin.role, 0.0))
    return round(100 * extra / total, 3) if total else 0.0


def kv_bytes_per_token(ckpt: Checkpoint, layout: Layout, layers: int, kv_cache_dtype: str, plan: PadPlan | None) -> int:
    """KV-cache bytes one token costs on one GPU holding `layers` attention layers.
    GQA/MHA: K and V of this rank's KV heads (at least one: replicated beyond TP = kv_heads).
    MLA: the compressed latent plus the RoPE key, the same on every TP rank (vLLM MLA backends)."""
    dtype_bytes = KV_DTYPE_BYTES.get(kv_cache_dtype) or MODEL_DTYPE_BYTES.get(str(ckpt.config.get("torch_dtype")), 2)
    if ckpt.family.mla:
        latent = int(ckpt.config.get("kv_lora_rank") or 0) + int(ckpt.config.get("qk_rope_head_dim") or 0)
        return layers * latent * dtype_bytes
    d = ckpt.dims
    heads = (plan.heads.new_heads if plan and plan.heads else d.heads) or 1
    kv = (plan.heads.new_kv_heads if plan and plan.heads else d.kv_heads) or heads
    head_dim = d.head_dim or ((d.hidden or 0) // (d.heads or 1))
    return layers * 2 * max(1, math.ceil(kv / layout.tp)) * head_dim * dtype_bytes


def attention_layers(ckpt: Checkpoint, stage: range) -> int:
    """Layers of this stage that keep a KV cache (hybrid models list `layer_types`; linear-attention
    layers keep a fixed-size state instead)."""
    types = ckpt.config.get("layer_types")
    if isinstance(types, list) and len(types) == ckpt.dims.layers:
        return sum(1 for i in stage if "linear" not in str(types[i]) and "mamba" not in str(types[i]))
    return len(stage)


# --- one layout on one engine ----------------------------------------------------------------------


def _layout_plan(ckpt: Checkpoint, layout: Layout, engine: str) -> tuple[PadPlan, bool]:
    """The plan `awqpad pad` would make for this layout (its default --strategy auto: the cheapest of padding,
    regrouping or both; with --pad-heads when only that unblocks it)."""
    plan = plan_with_strategy(ckpt, (layout.tp,), engine, expert_parallel=layout.ep)
    if plan.blocked:
        with_heads = plan_with_strategy(ckpt, (layout.tp,), engine, pad_heads=True, expert_parallel=layout.ep)
        if not with_heads.blocked:
            return with_heads, True
    return plan, False


def _needs(plan: PadPlan, heads: bool) -> tuple[str, str]:
    if plan.blocked:
        b = plan.blockers[0]
        return "blocked", b.explanation or b.message
    if heads:
        return "pad-heads", plan.heads.summary if plan.heads else "attention-head padding"
    if plan.needs_padding:
        parts = [f"{d.config_key or d.kind} {d.original} -> {d.padded}" for d in plan.changed_dims]
        if plan.regroup is not None:
            parts.insert(0, f"group size {plan.regroup.group_size} -> {plan.regroup.new_group_size}")
            return ("regroup+pad" if plan.changed_dims else "regroup"), ", ".join(parts)
        return "pad", ", ".join(parts) or "padding"
    return "nothing", "the checkpoint already satisfies every rule at this layout"


def pad_command(src: str, out: str, layout: Layout, engine: str, heads: bool) -> str:
    flags = [f"--tp {layout.tp}"] + ([f"--engine {engine}"] if engine != "vllm" else [])
    flags += (["--pad-heads"] if heads else []) + (["--expert-parallel"] if layout.ep else [])
    return f"awqpad pad {src} {out} " + " ".join(flags)


def evaluate_layout(ckpt: Checkpoint, layout: Layout, engine: str, *, src: str, out: str, nodes: int,
                    gpu_memory: int | None, max_model_len: int | None, kv_cache_dtype: str) -> LayoutReport:
    spans = nodes > 1 and layout.tp > (layout.gpus // nodes)
    if launch_command(engine, out, layout.tp, layout.pp, layout.ep) is None:
        what = "pipeline" if layout.pp > 1 else "expert"
        return LayoutReport(layout, engine, "unsupported", f"{engine} has no {what} parallelism", False, 0, 0, 0.0,
                            "-", 0, None, None, None, spans, None, None)
    plan, heads = _layout_plan(ckpt, layout, engine)
    needs, reason = _needs(plan, heads)
    stages = stage_bytes(ckpt, layout, None if plan.blocked else plan)
    kv = [kv_bytes_per_token(ckpt, layout, attention_layers(ckpt, r), kv_cache_dtype, None if plan.blocked else plan)
          for r in stage_layers(ckpt.dims.layers, layout.pp)]
    fullest = max(range(len(stages)), key=lambda s: stages[s][0])
    room = tokens = fits = None
    if gpu_memory is not None:
        rooms = [int(gpu_memory * GPU_MEMORY_UTILIZATION) - w - RESERVE_BYTES for w, _ in stages]
        per_stage = [r // k if k else 0 for r, k in zip(rooms, kv)]
        worst = min(range(len(rooms)), key=lambda s: per_stage[s])
        room, tokens = rooms[worst], max(per_stage[worst], 0)
        fits = room > 0 and (max_model_len is None or tokens >= max_model_len)
    fallback = any(v.severity == "fallback" for v in plan.violations_after)
    exact = not plan.blocked
    pad = pad_command(src, out, layout, engine, heads) if exact and plan.needs_padding else None
    model = out if pad else src
    return LayoutReport(layout, engine, needs, reason, exact, stages[fullest][0], stages[fullest][1],
                        0.0 if plan.blocked else added_flops_percent(ckpt, plan),
                        ("fallback" if fallback else "fast") if exact else "-", kv[fullest], room, tokens, fits, spans,
                        launch_command(engine, model, layout.tp, layout.pp, layout.ep, nodes) if exact else None, pad)


# --- ranking ---------------------------------------------------------------------------------------


def rank_key(r: LayoutReport) -> tuple:
    """Fits and exact first, then fewest added FLOPs (in whole percent: a dense pad's +0.4 % does not
    outweigh a pipeline stage), then the fast kernel path; then TP inside a node, fewer pipeline stages
    (less latency), and fewer padded bytes."""
    usable = r.exact and r.fits is not False
    return (not usable, not r.exact, math.floor(r.added_flops_percent), r.kernel_path != "fast", r.spans_nodes,
            r.layout.pp, r.added_bytes_per_gpu, r.layout.ep)


def why_first(ranked: list[LayoutReport]) -> str:
    top = ranked[0]
    if not (top.exact and top.fits is not False):
        return "No layout both loads exactly and fits; the least bad one is listed first."
    runner = next((r for r in ranked[1:] if r.engine == top.engine), None)
    what = f"{top.layout.label} on {top.engine}"
    if runner is None:
        return f"{what} is the only layout that works."
    rk, tk = rank_key(runner), rank_key(top)
    if rk[0] or rk[1]:
        reason = f"the next one ({runner.layout.label}) " + ("is blocked" if not runner.exact else "does not fit")
    elif rk[2] != tk[2]:  # noqa: SIM114
        reason = f"it adds {top.added_flops_percent:g} % FLOPs where {runner.layout.label} adds {runner.added_flops_percent:g} %"
    elif rk[3] != tk[3]:
        reason = f"it takes the fast kernel path where {runner.layout.label} falls back"
    elif rk[4] != tk[4]:
        reason = f"its tensor parallelism stays inside a node, unlike {runner.layout.label}"
    elif rk[5] != tk[5]:
        reason = f"it needs fewer pipeline stages than {runner.layout.label} (lower latency)"
    elif rk[6] != tk[6]:
        reason = f"it adds fewer bytes per GPU than {runner.layout.label}"
    else:  # only the last key differs (DeepSeek-V3 on 16 GPUs: TP 8 x PP 2 with and without EP)
        reason = f"it ties with {runner.layout.label} on every count and needs no expert parallelism"
    return f"{what} wins: {reason}."


def plan_deployment(ckpt: Checkpoint, gpus: int, *, engine: str = "vllm", nodes: int = 1, src: str | None = None,
                    out: str | None = None, gpu_memory: int | None = None, max_model_len: int | None = None,
                    kv_cache_dtype: str = "auto") -> DeployPlan:
    src = src or ckpt.source.source_id
    if max_model_len is None:
        max_model_len = ckpt.config.get("max_position_embeddings")
    reports = []
    for layout in candidate_layouts(ckpt, gpus):
        name = out or f"{src.rstrip('/').split('/')[-1]}-tp{layout.tp}" + ("-ep" if layout.ep else "")
        for e in engines_for(engine):
            reports.append(evaluate_layout(ckpt, layout, e, src=src, out=name, nodes=nodes, gpu_memory=gpu_memory,
                                           max_model_len=max_model_len, kv_cache_dtype=kv_cache_dtype))
    reports = [r for r in reports if r.needs != "unsupported"] + [r for r in reports if r.needs == "unsupported"]
    ranked = sorted(reports, key=lambda r: (r.needs == "unsupported", rank_key(r)))
    return DeployPlan(src, gpus, nodes, gpu_memory, max_model_len, kv_cache_dtype, tuple(ranked), why_first(ranked))


def parse_memory(text: str) -> int:
    """'80GB' (decimal) / '80GiB' (binary) / '24g' / '81920MiB' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if m is None:
        raise ValueError(f"--gpu-memory {text!r}: expected a size like 80GB, 80GiB or 24G")
    power = "kmgt".index(m[2]) + 1 if m[2] else 3  # a bare number is GB
    return int(float(m[1]) * ((1024 if m[3] else 1000) ** power))
