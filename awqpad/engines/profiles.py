"""Per-rank tensor-parallel rules of inference engines, as data.

Each Rule constrains one quantity of the model at TP = t. Quantities (see `rules.quantity`):
  heads        num_attention_heads             (whole)
  kv_heads     num_key_value_heads             (special: divides t or t divides it, or plain % t)
  <kind>.K_r   per-rank input of the row-parallel down projection = W / t      kind: dense|shared|expert
  <kind>.N_r   per-rank output of the merged gate_up projection  = 2 W / t
  <kind>.W     the MLP width itself (whole)
  attn.K_r     per-rank input of o_proj = heads * head_dim / t
  attn.N_r     per-rank output of the merged qkv projection
  hidden       hidden_size (whole)
A rule's `multiple` names what the quantity must be a multiple of: "t", "group", "pack", "lcm(group,128)",
"max(64,group)" or a number. Rules sharing an `any_of` tag are alternatives (one of them must hold).
`quantized` limits a rule to quantized (True) or unquantized (False) linears; None = both.
`severity`: "error" = the engine refuses to load; "fallback" = it loads through a slower kernel.
Every rule names the engine source it mirrors (../shared/reference/engine-constraints.md has the reading).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Rule:
    id: str
    quantity: str
    multiple: str
    message: str  # the engine's own text; {value}, {t}, {m} are filled in
    source: str
    quantized: bool | None = None
    severity: str = "error"
    any_of: str | None = None


HEADS = "Total number of attention heads ({value}) must be divisible by tensor parallel size ({t})."
DIVISIBLE = "AssertionError: {value} is not divisible by {t}"
AWQ_IN = "The input size is not aligned with the quantized weight shape. This can be caused by too large tensor parallel size."
AWQ_OUT = "The output size is not aligned with the quantized weight shape. This can be caused by too large tensor parallel size."
MARLIN_K = "Weight input_size_per_partition = {value} is not divisible by min_thread_k = 128. Consider reducing tensor_parallel_size or running with --quantization gptq."
MARLIN_N = "Weight output_size_per_partition = {value} is not divisible by  min_thread_n = 64. Consider reducing tensor_parallel_size or running with --quantization gptq."
MARLIN_G = "Weight input_size_per_partition = {value} is not divisible by group_size = {m}. Consider reducing tensor_parallel_size or running with --quantization gptq."
MOE_FALLBACK = "Layer is not supported by MoeMarlin (per-rank expert width {value} % {m} != 0). Falling back to Moe WNA16 kernels."
KV_REPL = "AssertionError: {value} is not divisible by {t} (KV heads must divide TP or TP must divide them)"

VLLM_COMMON = (
    Rule("heads", "heads", "t", HEADS, "vllm/config/model.py ModelConfig.verify_with_parallel_config"),
    Rule("kv_heads", "kv_heads", "kv-replicate", KV_REPL, "vllm/model_executor/layers/linear.py QKVParallelLinear"),
    Rule("mlp-split", "dense.W", "t", DIVISIBLE, "vllm layers/linear.py RowParallelLinear divide()"),
    Rule("shared-split", "shared.W", "t", DIVISIBLE, "vllm layers/linear.py RowParallelLinear divide()"),
    Rule("moe-split", "expert.W", "t", DIVISIBLE, "vllm fused_moe/layer.py FusedMoE intermediate_size % tp"),
)

# vLLM classic (<= 0.11, awq_marlin / gptq_marlin) is the strictest: whole groups AND Marlin tiles per rank.
VLLM = VLLM_COMMON + tuple(
    rule
    for kind in ("dense", "shared")
    for rule in (
        Rule(f"{kind}-down-groups", f"{kind}.K_r", "group", AWQ_IN, "vllm quantization/awq.py AWQLinearMethod.create_weights", True),
        Rule(f"{kind}-down-marlin-k", f"{kind}.K_r", "lcm(group,128)", MARLIN_K, "vllm quantization/utils/marlin_utils.py verify_marlin_supports_shape (GPTQ_MARLIN_MIN_THREAD_K)", True),
        Rule(f"{kind}-gate-up-pack", f"{kind}.N_r", "pack", AWQ_OUT, "vllm quantization/awq.py AWQLinearMethod.create_weights", True),
        Rule(f"{kind}-gate-up-marlin-n", f"{kind}.N_r", "64", MARLIN_N, "vllm marlin_utils.py verify_marlin_supports_shape (GPTQ_MARLIN_MIN_THREAD_N)", True),
    )
) + (
    Rule("attn-o-groups", "attn.K_r", "lcm(group,128)", MARLIN_K, "vllm marlin_utils.py verify_marlin_supports_shape on o_proj", True),
    Rule("attn-qkv-marlin-n", "attn.N_r", "64", MARLIN_N, "vllm marlin_utils.py verify_marlin_supports_shape on qkv_proj", True),
    Rule("expert-marlin", "expert.K_r", "lcm(group,128)", MOE_FALLBACK, "vllm marlin_utils.py check_moe_marlin_supports_layer; moe_wna16.py", True, "fallback"),
    Rule("expert-hidden", "hidden", "128", "MoE Marlin needs hidden_size % 128 == 0 (hidden_size = {value}); falls back to Moe WNA16", "vllm marlin_utils.py check_moe_marlin_supports_layer", True, "fallback"),
)

# vLLM >= mid-2026 (0.33): Marlin pads thread tiles itself; only straddled groups are refused.
VLLM_LATEST = VLLM_COMMON + (
    Rule("dense-down-groups", "dense.K_r", "group", AWQ_IN, "vllm quantization/auto_awq.py BaseAWQLinearMethod.create_weights", True),
    Rule("shared-down-groups", "shared.K_r", "group", AWQ_IN, "vllm quantization/auto_awq.py BaseAWQLinearMethod.create_weights", True),
    Rule("dense-gate-up-pack", "dense.N_r", "pack", AWQ_OUT, "vllm quantization/auto_awq.py BaseAWQLinearMethod.create_weights", True),
    Rule("attn-o-groups", "attn.K_r", "group", AWQ_IN, "vllm quantization/auto_awq.py on o_proj", True),
    Rule("expert-groups", "expert.K_r", "group",
         "CompressedTensors WNA16 MoE with static group scales requires the MoE intermediate size per tensor-parallel partition ({value}) to be divisible by group_size ({m}).",
         "vllm compressed_tensors_moe_wna16.py create_weights; marlin_utils.py check_moe_marlin_supports_config", True),
)

SGLANG = VLLM_COMMON + tuple(
    rule
    for kind in ("dense", "shared")
    for rule in (
        Rule(f"{kind}-down-groups", f"{kind}.K_r", "group", AWQ_IN, "sglang srt/layers/quantization/awq/schemes/awq_linear.py create_weights", True),
        Rule(f"{kind}-down-marlin-k", f"{kind}.K_r", "lcm(group,128)", MARLIN_K, "sglang srt/layers/quantization/marlin_utils.py verify_marlin_supports_shape", True),
        Rule(f"{kind}-gate-up-marlin-n", f"{kind}.N_r", "64", MARLIN_N, "sglang marlin_utils.py verify_marlin_supports_shape", True),
    )
) + (
    Rule("attn-o-groups", "attn.K_r", "lcm(group,128)", MARLIN_K, "sglang marlin_utils.py verify_marlin_supports_shape on o_proj", True),
    Rule("expert-marlin", "expert.K_r", "max(64,group)", MOE_FALLBACK, "sglang awq/awq.py check_moe_marlin_supports_layer", True, "fallback"),
    Rule("expert-hidden", "hidden", "128", "MoE Marlin needs hidden_size % 128 == 0 (hidden_size = {value})", "sglang marlin_utils.py check_moe_marlin_supports_layer", True, "fallback"),
)

TGI_SHARD = "AssertionError: The choosen size {value} is not compatible with sharding on {t} shards"
TGI = (
    Rule("heads", "heads", "t", "`num_heads` must be divisible by `num_shards` (got `num_heads`: {value} and `num_shards`: {t})", "text_generation_server/models/custom_modeling/flash_qwen2_modeling.py"),
    Rule("kv_heads", "kv_heads", "t", "num_key_value_heads ({value}) must be divisible by the number of shards ({t}); TGI does not replicate KV heads", "flash_*_modeling.py num_key_value_heads // num_shards"),
    Rule("mlp-split", "dense.W", "t", TGI_SHARD, "server/text_generation_server/utils/weights.py Weights.get_sharded"),
    Rule("shared-split", "shared.W", "t", TGI_SHARD, "utils/weights.py Weights.get_sharded"),
    Rule("moe-split", "expert.W", "t", TGI_SHARD, "utils/weights.py Weights.get_sharded"),
    Rule("dense-down-groups", "dense.K_r", "group", TGI_SHARD, "utils/weights.py get_sharded on scales/qzeros rows: (K/g) % t", True),
    Rule("shared-down-groups", "shared.K_r", "group", TGI_SHARD, "utils/weights.py get_sharded on scales/qzeros rows", True),
    Rule("expert-groups", "expert.K_r", "group", TGI_SHARD, "layers/moe/gptq_marlin.py via get_sharded", True),
    Rule("dense-marlin-a", "dense.K_r", "128", "The GPTQ Marlin kernel does not have a valid thread configuration for weight matrix with shape ({value}). The shape elements must be divisible by (128, 64) or (64, 128).", "layers/marlin/gptq.py _check_valid_shape", True, any_of="tgi-marlin"),
    Rule("dense-marlin-b", "dense.N_r", "128", "The GPTQ Marlin kernel does not have a valid thread configuration for weight matrix with shape ({value}). The shape elements must be divisible by (128, 64) or (64, 128).", "layers/marlin/gptq.py _check_valid_shape", True, any_of="tgi-marlin"),
    Rule("attn-o-groups", "attn.K_r", "group", TGI_SHARD, "utils/weights.py get_sharded on o_proj scales", True),
)
# TGI's Marlin rule is (K_r%128 and N_r%64) or (K_r%64 and N_r%128); with N_r = 2 K_r for gate_up the
# second branch needs K_r % 64, the first K_r % 128. Encoded above as K_r%128 OR N_r%128 (N_r%128 <=> K_r%64).

LMDEPLOY = (
    Rule("heads", "heads", "t", "AssertionError: head_num % attn_tp == 0", "lmdeploy/turbomind/builders/attention.py"),
    Rule("kv_heads", "kv_heads", "kv-replicate", "AssertionError: target_heads % heads == 0", "lmdeploy/turbomind/builders/attention.py _repeat_kv_heads"),
    Rule("group-128", "group", "128", "TurboMind supports only group_size 128 for AWQ/GPTQ (got {value})", "lmdeploy/turbomind converter _SUPPORTED_GROUP_SIZES", True),
)
LMDEPLOY_NOTE = (
    "TurboMind pads inter_size to whole groups per rank itself when it loads the model "
    "(lmdeploy/turbomind/builders/ffn.py _pad_ffn_for_tp), so MLP and expert widths need no padding"
)

TRTLLM = (
    Rule("heads", "heads", "t", HEADS, "tensorrt_llm/_torch/model_config.py"),
    Rule("kv_heads", "kv_heads", "kv-replicate", KV_REPL, "tensorrt_llm/_torch/modules/attention.py"),
    Rule("mlp-split", "dense.W", "t", "in_features {value} must be divisible by tp_size {t}", "tensorrt_llm/_torch/modules/linear.py Linear.__init__"),
    Rule("shared-split", "shared.W", "t", "in_features {value} must be divisible by tp_size {t}", "tensorrt_llm/_torch/modules/linear.py"),
    Rule("moe-split", "expert.W", "t", "in_features {value} must be divisible by tp_size {t}", "tensorrt_llm/_torch/modules/linear.py"),
    Rule("dense-down-groups", "dense.K_r", "group", "in_features ({value}) must be divisible by group_size ({m}) for INT4 per-group quantization scale dimensions.", "tensorrt_llm/_torch/modules/linear.py W4A16_AWQ_LinearMethod.create_weights", True),
    Rule("dense-down-64", "dense.K_r", "64", "Number of bytes for rows and cols must be a multiple of 32. However, num_rows_bytes = {value}/2", "cpp cutlass_preprocessors.cpp (int4: per-rank K and N % 64)", True),
    Rule("dense-gate-up-64", "dense.N_r", "64", "Number of bytes for rows and cols must be a multiple of 32. However, num_col_bytes = {value}/2", "cpp cutlass_preprocessors.cpp", True),
    Rule("shared-down-groups", "shared.K_r", "group", "in_features ({value}) must be divisible by group_size ({m}) for INT4 per-group quantization scale dimensions.", "tensorrt_llm/_torch/modules/linear.py", True),
    Rule("expert-groups", "expert.K_r", "lcm(group,64)", "in_features ({value}) must be divisible by group_size ({m}) for INT4 per-group quantization scale dimensions.", "tensorrt_llm/_torch/modules/fused_moe", True),
)

ENGINES = MappingProxyType(
    {"vllm": VLLM, "vllm-latest": VLLM_LATEST, "sglang": SGLANG, "tgi": TGI, "lmdeploy": LMDEPLOY, "trtllm": TRTLLM}
)
ENGINE_NOTES = MappingProxyType({"lmdeploy": LMDEPLOY_NOTE})
DEFAULT_ENGINE = "vllm"
ENGINE_CHOICES = tuple(ENGINES) + ("all",)


def engines_for(selection: str) -> tuple[str, ...]:
    return tuple(ENGINES) if selection == "all" else (selection,)


def check_engine(selection: str) -> str:
    """`selection` if it names a profile (or "all"); otherwise the one-line usage error."""
    from awqpad.errors import InputError

    if selection not in ENGINE_CHOICES:
        raise InputError(f"--engine {selection!r} is not one of {', '.join(ENGINE_CHOICES)}")
    return selection
