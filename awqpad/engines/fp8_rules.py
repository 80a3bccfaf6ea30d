"""Per-rank tensor-parallel rules of inference engines for FP8 checkpoints (block, channel, tensor).

Quantities beyond profiles.py: `<kind>.P_r` is the per-rank output of EACH column partition of the
merged gate_up (W / t: vLLM and SGLang check gate and up separately, not their 2W / t sum);
`linear.N_r` / `linear.K_r` are the per-rank output partitions / input of every FP8 attention-side
linear (q/k/v/o, MLA, Gated DeltaNet), which awqpad never pads: a failure there blocks the TP.
Multiples "block_n" / "block_k" are the checkpoint's weight_block_size (read from config.json).
`min_tp`: the rule only runs when tp_size >= min_tp (vLLM's row-parallel checks start at TP 2).
Quantity `block` is the checkpoint's weight_block_size itself (both dims must equal the multiple): which
blocks an engine's kernels take, what decides whether `--strategy regroup` may refine 128 x 128 blocks.

Per-channel and per-tensor FP8 have no K-groups, so tensor parallelism never splits a scale group:
only the plain splits (W % t, heads) constrain them, plus kernel tiles that engines now pad
themselves (vLLM Marlin-FP8 tile padding #45295/#45703; FlashInfer FP8 MoE #29748). Their tables
hold only the common rules and a note that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from awqpad.engines.nvfp4_rules import engine_rules
from awqpad.engines.profiles import ENGINES, Rule
from awqpad.engines.vllm import COMMON as VLLM_COMMON

# vLLM fp8_utils.py validate_fp8_block_shape (dense / merged linears; the same text in SGLang
# srt/layers/quantization/fp8.py Fp8LinearMethod.validate_block_quant_shapes).
DENSE_K = "Weight input_size_per_partition = {value} is not divisible by weight quantization block_k = {m}."
DENSE_N = "Weight output_partition_size = {value} is not divisible by weight quantization block_n = {m}."
# vLLM quantization/fp8.py Fp8MoEMethod.create_weights (classic path; SGLang fp8.py Fp8MoEMethod the same).
MOE_N = "The output_size of gate's and up's weight = {value} is not divisible by weight quantization block_n = {m}."
MOE_K = "The input_size of down's weight = {value} is not divisible by weight quantization block_k = {m}."
REFINE = ("FP8 MoE per-rank intermediate {value} is not a multiple of the checkpoint block {m}: only the Triton "
          "MoE kernel loads it, with scales refined to a finer block (>= 32) at load time")
REFINE_FAIL = ("FP8 MoE per-rank intermediate {value} is not a multiple of {m}: no finer block >= 32 divides it, so "
               "scale refinement cannot apply and the block_n check fails")
TRT_N = ("weight_scale shard shape mismatch: {value} outputs per rank are not whole 128-blocks (FP8BlockScalesLinearMethod "
         "allocates ceil(N_r / 128) scale rows and load_weight_shard splits the scale tensor by rank)")
TRT_K = ("weight_scale shard shape mismatch: {value} inputs per rank are not whole 128-blocks (FP8BlockScalesLinearMethod "
         "allocates ceil(K_r / 128) scale columns)")

# Blocks other than 128 x 128 (what refining writes):
BLOCK_TRITON = ("weight_block_size {value} is not 128 x 128: the DeepGEMM / CUTLASS / FlashInfer block-FP8 kernels "
                "implement only [1, 128] activation groups, so vLLM runs these layers on its Triton block-FP8 kernels")
BLOCK_VLLM = ("weight_block_size {value} is not 128 x 128: vLLM releases key every block-FP8 MoE layer as 128 x 128 "
              "(Fp8MoEMethod weight_key = kFp8Static128BlockSym) and pick DeepGEMM for dense layers by weight shape "
              "alone (should_use_deepgemm_for_fp8_linear), so kernels built for 128 x 128 scales would read these")
BLOCK_SGLANG = ("weight_block_size {value} is not 128 x 128: SGLang picks DeepGEMM / CUTLASS block-FP8 GEMMs by weight "
                "shape alone (weight.shape % 64 / 128), and those read 128 x 128 scales")
BLOCK_TRT = ("weight_block_size {value} is not 128 x 128: FP8BlockScalesLinearMethod allocates ceil(N / 128) x "
             "ceil(K / 128) scales whatever the config says, so a finer scale grid does not load")
BLOCK_UNREAD = "weight_block_size {value} is not 128 x 128: this engine's block-FP8 kernels were not read for other blocks"
VLLM_BLOCK_SRC = ("vllm/model_executor/kernels/linear/scaled_mm/deep_gemm.py, cutlass.py can_implement (act group (1, 128) "
                  "only), triton.py TritonFp8BlockScaledMMKernel; fused_moe/oracle/fp8.py (refined block in the weight key: "
                  "Triton only)")
VLLM_BLOCK_OLD_SRC = ("vllm/model_executor/layers/quantization/fp8.py Fp8MoEMethod.__init__; "
                      "vllm/utils/deep_gemm.py should_use_deepgemm_for_fp8_linear")
SGLANG_BLOCK_SRC = ("sglang python/sglang/srt/layers/quantization/fp8_utils.py deepgemm_w8a8_block_fp8_linear_with_fallback, "
                    "cutlass_w8a8_block_fp8_linear_with_fallback")
VLLM_FP8_SRC = "vllm/model_executor/layers/quantization/utils/fp8_utils.py validate_fp8_block_shape"
VLLM_MOE_SRC = "vllm/model_executor/layers/quantization/fp8.py Fp8MoEMethod.create_weights"
SGLANG_SRC = "sglang python/sglang/srt/layers/quantization/fp8.py Fp8LinearMethod.validate_block_quant_shapes"
SGLANG_MOE_SRC = "sglang python/sglang/srt/layers/quantization/fp8.py Fp8MoEMethod.create_weights (strict unless AMD aiter pads)"
TRT_SRC = "tensorrt_llm/_torch/modules/linear.py FP8BlockScalesLinearMethod.create_weights / load_weight_shard"


@dataclass(frozen=True)
class FP8Rule(Rule):
    min_tp: int = 1
    block_only: bool = True  # applies to block-scaled FP8 only (per-channel / per-tensor have no blocks)


def _dense(engine_src: str, kinds=("dense", "shared")) -> tuple[FP8Rule, ...]:
    out = []
    for kind in kinds:
        out.append(FP8Rule(f"{kind}-fp8-down-block-k", f"{kind}.K_r", "block_k", DENSE_K, engine_src, True, min_tp=2))
        out.append(FP8Rule(f"{kind}-fp8-gate-up-block-n", f"{kind}.P_r", "block_n", DENSE_N, engine_src, True))
    return tuple(out)


def _attention(engine_src: str) -> tuple[FP8Rule, ...]:
    return (FP8Rule("attn-fp8-block-n", "linear.N_r", "block_n", DENSE_N, engine_src + " (attention-side linears)", True),
            FP8Rule("attn-fp8-block-k", "linear.K_r", "block_k", DENSE_K, engine_src + " (attention-side linears)", True, min_tp=2))


MOE_STRICT = (
    FP8Rule("expert-fp8-block-n", "expert.P_r", "block_n", MOE_N, VLLM_MOE_SRC, True),
    FP8Rule("expert-fp8-block-k", "expert.K_r", "block_k", MOE_K, VLLM_MOE_SRC, True, min_tp=2),
)

VLLM_FP8 = VLLM_COMMON + _dense(VLLM_FP8_SRC) + MOE_STRICT + _attention(VLLM_FP8_SRC) + (
    FP8Rule("fp8-block-128", "block", "128", BLOCK_VLLM, VLLM_BLOCK_OLD_SRC, True),
)

# vLLM >= 2026-09: Fp8MoEMethod resolves a refined block shape when a finer block (>= 32) divides the
# checkpoint block and every involved dim (docs.vllm.ai fp8 API, `resolve_fp8_moe_weight_block_shape`;
# its unit test: I = 640 -> [64, 64] at TP 2, [32, 32] at TP 4, Triton only), so only I_r % 32 is an error
# and a non-block-multiple I_r is a slower-kernel fallback. FlashInfer-TRTLLM pads to whole checkpoint blocks
# (#55867) but only for global I % 128 == 0 on that backend; not modelled as a rule. Dense linears keep the
# strict check (vllm#52997 open, fix #52915 open).
VLLM_LATEST_FP8 = VLLM_COMMON + _dense(VLLM_FP8_SRC) + _attention(VLLM_FP8_SRC) + (
    FP8Rule("expert-fp8-refine", "expert.P_r", "32", REFINE_FAIL, VLLM_MOE_SRC + " resolve_fp8_moe_weight_block_shape", True),
    FP8Rule("expert-fp8-refine-k", "expert.K_r", "32", REFINE_FAIL, VLLM_MOE_SRC + " resolve_fp8_moe_weight_block_shape", True, min_tp=2),
    FP8Rule("expert-fp8-triton-only", "expert.P_r", "block_n", REFINE, VLLM_MOE_SRC + " (refined scales: Triton MoE only)",
            True, severity="fallback"),
    FP8Rule("fp8-block-triton", "block", "128", BLOCK_TRITON, VLLM_BLOCK_SRC, True, severity="fallback",
            path="deepgemm-cutlass", fallback_to="Triton block-FP8"),
)

SGLANG_FP8 = VLLM_COMMON + _dense(SGLANG_SRC) + (
    FP8Rule("expert-fp8-block-n", "expert.P_r", "block_n", MOE_N, SGLANG_MOE_SRC, True),
    FP8Rule("expert-fp8-block-k", "expert.K_r", "block_k", MOE_K, SGLANG_MOE_SRC, True, min_tp=2),
    FP8Rule("fp8-block-128", "block", "128", BLOCK_SGLANG, SGLANG_BLOCK_SRC, True),
) + _attention(SGLANG_SRC)

# TensorRT-LLM (PyTorch backend): dense FP8 block linears shard the scale tensor like the weight and size
# it for whole 128-blocks per rank; there is no explicit check, a mismatch fails in copy_weight. Its fused
# MoE FP8 method rounds the sharded intermediate up and pads (NVIDIA/TensorRT-LLM#16198), so experts need
# nothing. The splits are TRT-LLM's own (profiles.TRTLLM).
TRTLLM_FP8 = tuple(r for r in ENGINES["trtllm"] if r.id in ("heads", "kv_heads", "mlp-split", "shared-split", "moe-split")) + tuple(
    FP8Rule(f"{kind}-fp8-{part}", f"{kind}.{q}", "128", msg, TRT_SRC, True, min_tp=min_tp)
    for kind in ("dense", "shared")
    for part, q, msg, min_tp in (("down-128", "K_r", TRT_K, 2), ("gate-up-128", "P_r", TRT_N, 1))
) + (FP8Rule("fp8-block-128", "block", "128", BLOCK_TRT, TRT_SRC, True),)

# LMDeploy: TurboMind's FFN builder pads inter_size to lcm(block_in, block_out) x TP itself
# (lmdeploy/turbomind/deploy FfnBuilder design note, read via fp8-fp4-engines.md 1.3; not confirmed end to
# end here), so only its attention rules apply.
# Blocks other than 128 x 128 are refused where the kernels were not read (lmdeploy lite blocked_fp8 documents
# --block-size 128; TGI: not read): refining is never allowed on a guess.
UNREAD_BLOCK = FP8Rule("fp8-block-128", "block", "128", BLOCK_UNREAD, "not read: refused rather than guessed", True)
LMDEPLOY_FP8 = tuple(r for r in ENGINES["lmdeploy"] if r.id in ("heads", "kv_heads")) + (UNREAD_BLOCK,)

FP8_ENGINES = MappingProxyType({"vllm": VLLM_FP8, "vllm-latest": VLLM_LATEST_FP8, "sglang": SGLANG_FP8,
                                "tgi": tuple(r for r in ENGINES["tgi"] if r.quantized is None) + (UNREAD_BLOCK,),
                                "lmdeploy": LMDEPLOY_FP8,
                                "trtllm": TRTLLM_FP8})
FP8_NOTES = MappingProxyType({
    "lmdeploy": "LMDeploy TurboMind pads FP8 FFN widths to whole blocks per rank itself (design note; not verified here)",
    "trtllm": "TensorRT-LLM's fused FP8 MoE rounds the per-rank intermediate up and pads it itself (TensorRT-LLM#16198)",
    "tgi": "TGI has no block-FP8 MoE path; only its plain splits are checked",
})
PER_CHANNEL_NOTE = ("per-channel / per-tensor FP8 has no K-groups, so tensor parallelism never splits a scale group; "
                    "only plain splits (width % TP, heads) and kernel tiles constrain it, and vLLM pads FP8 kernel tiles itself")


def is_fp8(ckpt) -> bool:
    return ckpt.format == "fp8"  # the dominant decoder format (cheap: evaluate runs this for every TP tried)


def block_scaled(ckpt) -> bool:
    return is_fp8(ckpt) and ckpt.group_size not in (None, -1)


def rules_for(engine: str, ckpt) -> tuple[Rule, ...]:
    """The rule table `engine` applies to this checkpoint: the FP8 table for FP8 checkpoints."""
    if not is_fp8(ckpt):
        return engine_rules(engine, ckpt)  # int4 tables, or NVFP4 ones (nvfp4_rules.py)
    rules = FP8_ENGINES[engine]
    if not block_scaled(ckpt):
        rules = tuple(r for r in rules if not getattr(r, "block_only", False))
    return rules


def notes_for(engine: str, ckpt) -> tuple[str, ...]:
    if not is_fp8(ckpt):
        return ()
    out = [FP8_NOTES[engine]] if engine in FP8_NOTES and block_scaled(ckpt) else []
    if not block_scaled(ckpt):
        out.append(PER_CHANNEL_NOTE)
    return tuple(out)


def runs_at(rule: Rule, t: int) -> bool:
    return t >= getattr(rule, "min_tp", 1)


# --- attention-side linears (never padded) -------------------------------------------------------

REPLICATED_SUFFIXES = ("q_a_proj", "kv_a_proj_with_mqa")  # DeepSeek MLA: ReplicatedLinear in vLLM / SGLang


def _partitions(ckpt, lin, t: int) -> list[float] | None:
    """Per-rank output partition sizes of a column-parallel linear, as vLLM builds it (None: replicated)."""
    name = lin.prefix.rpartition(".")[2]
    if name in REPLICATED_SUFFIXES:
        return None
    cfg, dims = ckpt.config, ckpt.dims
    if lin.role in ("q", "k", "v") and dims.heads:
        hd = lin.out_features // (dims.heads if lin.role == "q" else (dims.kv_heads or dims.heads))
        heads = dims.heads if lin.role == "q" else (dims.kv_heads or dims.heads)
        if lin.role != "q" and heads < t:
            return [hd]  # QKVParallelLinear replicates KV heads when TP exceeds them
        return [heads / t * hd]
    if name == "in_proj_qkvz":  # vLLM qwen3_next: MergedColumnParallelLinear [key, key, value, value]
        key = (cfg.get("linear_num_key_heads") or 0) * (cfg.get("linear_key_head_dim") or 0)
        value = (cfg.get("linear_num_value_heads") or 0) * (cfg.get("linear_value_head_dim") or 0)
        if key and value and 2 * key + 2 * value == lin.out_features:
            return [key / t, key / t, value / t, value / t]
    if name == "in_proj_ba":  # [num_v_heads, num_v_heads]
        return [lin.out_features / 2 / t] * 2
    return [lin.out_features / t]


def linear_violations(ckpt, rule: Rule, t: int, multiple: int):
    """(value, linear, explanation) for the first attention-side FP8 linear that breaks `rule` at TP t."""
    part = rule.quantity.split(".")[1]
    for lin in ckpt.linears:
        if lin.format != "fp8" or lin.block_n in (None, 1) or lin.block not in ("attn",):
            continue
        m = lin.block_n if rule.multiple == "block_n" else lin.group_size if rule.multiple == "block_k" else multiple
        if part == "K_r":
            if lin.parallel != "row":
                continue
            sizes = [lin.in_features / t]
        else:
            if lin.parallel != "column":
                continue
            sizes = _partitions(ckpt, lin, t) or []
        for size in sizes:
            if size != int(size) or int(size) % m:
                what = "input" if part == "K_r" else "output partition"
                value = int(size) if size == int(size) else round(size, 3)
                return value, m, (f"{lin.prefix}: per-rank {what} {value} is not a multiple of the FP8 block {m} "
                                  "(attention-side linears are never padded)")
    return None


def block_violation(ckpt, rule: Rule):
    """(value, multiple, explanation) if the checkpoint's FP8 blocks are not rule.multiple x rule.multiple."""
    m = int(rule.multiple)
    for lin in ckpt.linears:
        if lin.format == "fp8" and lin.block_n not in (None, 1) and (lin.block_n, lin.group_size) != (m, m):
            shown = f"[{lin.block_n}, {lin.group_size}]"
            return shown, m, f"FP8 blocks {shown} are not {m} x {m}"
    return None
