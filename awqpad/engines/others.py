"""TGI, LMDeploy (TurboMind) and TensorRT-LLM per-rank rules (the int4 formats they read)."""

from __future__ import annotations

from awqpad.engines.rules import AWQ, GPTQ, HEADS, INT_FORMATS, KV_REPL, Rule

TGI_SHARD = "AssertionError: The choosen size {value} is not compatible with sharding on {t} shards"
TGI_MARLIN = ("The GPTQ Marlin kernel does not have a valid thread configuration for weight matrix with shape ({value}). "
              "The shape elements must be divisible by (128, 64) or (64, 128).")
TGI = (
    Rule("heads", "heads", "t", "`num_heads` must be divisible by `num_shards` (got `num_heads`: {value} and `num_shards`: {t})", "text_generation_server/models/custom_modeling/flash_qwen2_modeling.py"),
    Rule("kv_heads", "kv_heads", "t", "num_key_value_heads ({value}) must be divisible by the number of shards ({t}); TGI does not replicate KV heads", "flash_*_modeling.py num_key_value_heads // num_shards"),
    Rule("mlp-split", "dense.W", "t", TGI_SHARD, "server/text_generation_server/utils/weights.py Weights.get_sharded"),
    Rule("shared-split", "shared.W", "t", TGI_SHARD, "utils/weights.py Weights.get_sharded"),
    Rule("moe-split", "expert.W", "t", TGI_SHARD, "utils/weights.py Weights.get_sharded"),
    Rule("dense-down-groups", "dense.K_r", "group", TGI_SHARD, "utils/weights.py get_sharded on scales/qzeros rows: (K/g) % t", True, formats=INT_FORMATS, path="marlin"),
    Rule("shared-down-groups", "shared.K_r", "group", TGI_SHARD, "utils/weights.py get_sharded on scales/qzeros rows", True, formats=INT_FORMATS, path="marlin"),
    Rule("expert-groups", "expert.K_r", "group", TGI_SHARD, "layers/moe/gptq_marlin.py via get_sharded", True, formats=INT_FORMATS, path="moe-marlin"),
    Rule("dense-marlin-a", "dense.K_r", "128", TGI_MARLIN, "layers/marlin/gptq.py _check_valid_shape", True, any_of="tgi-marlin", formats=INT_FORMATS, path="marlin"),
    Rule("dense-marlin-b", "dense.N_r", "128", TGI_MARLIN, "layers/marlin/gptq.py _check_valid_shape", True, any_of="tgi-marlin", formats=INT_FORMATS, path="marlin"),
    Rule("attn-o-groups", "attn.K_r", "group", TGI_SHARD, "utils/weights.py get_sharded on o_proj scales", True, formats=INT_FORMATS, path="marlin"),
    Rule("marlin-group", "group", "one-of(-1,32,64,128)", "GPTQ Marlin does not take group size {value} (GPTQ_MARLIN_GROUP_SIZES = {m}); using the ExLlama kernels",
         "layers/marlin/gptq.py GPTQ_MARLIN_GROUP_SIZES, can_use_gptq_marlin", True, "fallback", formats=INT_FORMATS, path="marlin",
         fallback_to="exllama"),
)
# TGI's Marlin rule is (K_r%128 and N_r%64) or (K_r%64 and N_r%128); with N_r = 2 K_r for gate_up the
# second branch needs K_r % 64, the first K_r % 128. Encoded above as K_r%128 OR N_r%128 (N_r%128 <=> K_r%64).

LMDEPLOY = (
    Rule("heads", "heads", "t", "AssertionError: head_num % attn_tp == 0", "lmdeploy/turbomind/builders/attention.py"),
    Rule("kv_heads", "kv_heads", "kv-replicate", "AssertionError: target_heads % heads == 0", "lmdeploy/turbomind/builders/attention.py _repeat_kv_heads"),
    Rule("group-128", "group", "128", "TurboMind supports only group_size 128 for AWQ/GPTQ (got {value})", "lmdeploy/turbomind converter _SUPPORTED_GROUP_SIZES", True,
         formats=(AWQ, GPTQ), path="turbomind"),
)
LMDEPLOY_NOTE = (
    "TurboMind pads inter_size to whole groups per rank itself when it loads the model "
    "(lmdeploy/turbomind/builders/ffn.py _pad_ffn_for_tp), so MLP and expert widths need no padding"
)

TRT_GROUPS = "in_features ({value}) must be divisible by group_size ({m}) for INT4 per-group quantization scale dimensions."
TRTLLM = (
    Rule("heads", "heads", "t", HEADS, "tensorrt_llm/_torch/model_config.py"),
    Rule("kv_heads", "kv_heads", "kv-replicate", KV_REPL, "tensorrt_llm/_torch/modules/attention.py"),
    Rule("mlp-split", "dense.W", "t", "in_features {value} must be divisible by tp_size {t}", "tensorrt_llm/_torch/modules/linear.py Linear.__init__"),
    Rule("shared-split", "shared.W", "t", "in_features {value} must be divisible by tp_size {t}", "tensorrt_llm/_torch/modules/linear.py"),
    Rule("moe-split", "expert.W", "t", "in_features {value} must be divisible by tp_size {t}", "tensorrt_llm/_torch/modules/linear.py"),
    Rule("dense-down-groups", "dense.K_r", "group", TRT_GROUPS, "tensorrt_llm/_torch/modules/linear.py W4A16_AWQ_LinearMethod.create_weights", True, formats=INT_FORMATS, path="cutlass-w4a16"),
    Rule("dense-down-64", "dense.K_r", "64", "Number of bytes for rows and cols must be a multiple of 32. However, num_rows_bytes = {value}/2", "cpp cutlass_preprocessors.cpp (int4: per-rank K and N % 64)", True, formats=INT_FORMATS, path="cutlass-w4a16"),
    Rule("dense-gate-up-64", "dense.N_r", "64", "Number of bytes for rows and cols must be a multiple of 32. However, num_col_bytes = {value}/2", "cpp cutlass_preprocessors.cpp", True, formats=INT_FORMATS, path="cutlass-w4a16"),
    Rule("shared-down-groups", "shared.K_r", "group", TRT_GROUPS, "tensorrt_llm/_torch/modules/linear.py", True, formats=INT_FORMATS, path="cutlass-w4a16"),
    Rule("expert-groups", "expert.K_r", "lcm(group,64)", TRT_GROUPS, "tensorrt_llm/_torch/modules/fused_moe", True, formats=INT_FORMATS, path="cutlass-moe-w4a16"),
    # Read in NVIDIA/TensorRT-LLM: the pre-Hopper launcher throws for any other group (generic_mixed_gemm_kernelLauncher);
    # the Hopper one asks group % CTA_K == 0 (fpA_intB_launcher_sm90.inl: "The group size must a multiple of {cta_shape_k}";
    # its tiles are 128 bytes of K, 64 FP16/BF16 activations), which takes 64 and 128 (and 256) and refuses 32, so
    # {64, 128} holds on every architecture for AWQ's group sizes.
    Rule("cutlass-group", "group", "one-of(64,128)", "Only group size 64 and 128 supported for fine grained kernels.",
         "cpp/tensorrt_llm/kernels/cutlass_kernels/fpA_intB_gemm/fpA_intB_gemm_template.h generic_mixed_gemm_kernelLauncher; "
         "launchers/fpA_intB_launcher_sm90.inl (group % CTA_K)", True, formats=INT_FORMATS, path="cutlass-w4a16"),
)
