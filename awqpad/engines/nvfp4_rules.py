"""NVFP4 per-rank rules (format "nvfp4": compressed-tensors nvfp4-pack-quantized and ModelOpt NVFP4).

One block scale covers 16 inputs, so every row-parallel linear (down_proj of MLPs, shared and routed experts,
o_proj) needs whole groups of 16 per rank. Column-parallel gate/up/qkv shard by output rows, each with its own
scales: no rule beyond the even split. Kernel tiles are NOT rules here, because the engines pad them
themselves: vLLM pads the FP4 GEMM to N, K % 32 (vllm#31099), FlashInfer-TRTLLM's gated intermediate to 64
(vllm#46880) and its MoE hidden size (vllm#39510), Marlin's FP4 tiles (vllm#45295); SGLang pads weights and
block scales for CUTLASS/FlashInfer (`modelopt_quant.py ModelOptFp4LinearMethod.process_weights_after_loading`:
pad_nvfp4_weight, `torch.zeros` scales; sglang#17300) and for W4A16 Marlin (sglang#33543); TensorRT-LLM pads
NVFP4 MoE shards after keeping whole scaling groups (TensorRT-LLM#18870), so its experts need nothing.

Where the reference note was wrong or incomplete (../shared/reference/fp8-fp4-engines.md §1.1e/§3.5): it lists
"CUTLASS FP4 GEMM N,K % 32" and "TRTLLM gated MoE I_rank % 64" as TP constraints; in the code read both are
padded by the engine at load, so they are not padded for here. vLLM's compressed-tensors NVFP4 linear
(`compressed_tensors/schemes/compressed_tensors_w4a4_nvfp4.py CompressedTensorsW4A4Fp4.create_weights`) has
no check at all: it allocates weight_scale [N, K_r // 16] and the loader narrows scale columns per rank, so a
straddled group would read a neighbour's scales; the rule below is the same multiple with ModelOpt's message.
"""

from __future__ import annotations

from awqpad.engines.profiles import ENGINES, Rule

GROUP = "16"

VLLM_LINEAR = "Unsupported model when in features size is not multiple of 16"
VLLM_LINEAR_SRC = ("layers/quantization/modelopt.py ModelOptNvFp4LinearMethod.create_weights "
                   "(input_size_per_partition % 16); compressed-tensors CompressedTensorsW4A4Fp4 has no check and "
                   "would read misaligned scale columns")
# vllm#49949 (open): Nemotron-3-Nano-30B-A3B-NVFP4 at TP 8, expert width 1856 -> 232 per rank.
VLLM_MOE = ("RuntimeError: moe_wna16_marlin_gemm, size_k = <per-rank {value} rounded up to the Marlin tile>, is not "
            "divisible by b_scales.size(1) = <{value} // 16 + tile padding> (the loader allocates only whole groups "
            "of 16 per rank)")
VLLM_MOE_SRC = ("layers/quantization/modelopt.py ModelOptNvFp4FusedMoE.create_weights (w2_weight_scale "
                "[E, H, I_r // 16]); csrc/moe/marlin_moe_wna16/ops.cu; vllm-project/vllm#49949 (open)")


def _rows(linear_msg: str, linear_src: str, moe: tuple[str, str] | None) -> tuple[Rule, ...]:
    rows = tuple(
        Rule(f"{kind}-down-nvfp4-groups", f"{kind}.K_r", GROUP, linear_msg, linear_src, True)
        for kind in ("dense", "shared")
    ) + (Rule("attn-o-nvfp4-groups", "attn.K_r", GROUP, linear_msg, linear_src + " on o_proj", True),)
    if moe is not None:
        rows += (Rule("expert-nvfp4-groups", "expert.K_r", GROUP, moe[0], moe[1], True),)
    return rows


VLLM = _rows(VLLM_LINEAR, VLLM_LINEAR_SRC, (VLLM_MOE, VLLM_MOE_SRC))
SGLANG = _rows(
    VLLM_LINEAR, "python/sglang/srt/layers/quantization/modelopt_quant.py ModelOptFp4LinearMethod.create_weights",
    ("RuntimeError: size_k = <per-rank {value} padded to the tile>, is not divisible by b_scales.size(1) (NVFP4 Marlin "
     "MoE; its scale tensor holds {value} // 16 whole groups per rank)",
     "python/sglang/srt/layers/quantization/modelopt_quant.py ModelOptNvFp4FusedMoEMethod.create_weights "
     "(w2 scales [E, H, I_r // 16]); marlin MoE kernel size_k % num_groups check"),
)
TRTLLM = _rows(
    "AssertionError: in_features {value} must be divisible by scaling_vector_size 16",
    "tensorrt_llm/_torch/modules/linear.py Linear (NVFP4: assert in_features % scaling_vector_size == 0)",
    None,  # fused MoE keeps complete scaling groups per rank and pads (TensorRT-LLM#18870)
)
RULES = {"vllm": VLLM, "vllm-latest": VLLM, "sglang": SGLANG, "trtllm": TRTLLM}

# Engines with no NVFP4 loader: refused at every TP, so no padding can help (padding for them would only
# promise a load that never happens).
UNLOADABLE = {
    # TGI (huggingface/text-generation-inference db931fc, 2026-01-08): compressed-tensors groups are FP8, INT8 or
    # INT4/8 pack-quantized only; a ModelOpt config's quant_method is "Unknown quantization method" and the
    # packed uint8 weights are then read as unquantized ones.
    "tgi": Rule("nvfp4-no-loader", "format", "-",
                "ValueError: Group 'group_0' has unsupported compressed-tensors configurtion (ModelOpt NVFP4: "
                "\"Unknown quantization method modelopt\", then an unquantized weight-shape error)",
                "server/text_generation_server/layers/compressed_tensors/loader.py "
                "CompressedTensorsLoader._create_loader_for_group; models/__init__.py get_model", True),
    # LMDeploy (InternLM/lmdeploy 1263d5c, 2026-08-21): TurboMind accepts awq, gptq, fp8, mxfp4 and 4-bit int
    # compressed-tensors; the PyTorch engine has no NVFP4 / ModelOpt path either.
    "lmdeploy": Rule("nvfp4-no-loader", "format", "-",
                     "AssertionError: compressed-tensors only supports pack-quantized format, but got "
                     "nvfp4-pack-quantized (ModelOpt NVFP4: \"unsupported quant_config\")",
                     "lmdeploy/turbomind/converter.py (quant_method checks before conversion)", True),
}


def engine_rules(engine: str, ckpt) -> tuple[Rule, ...]:
    """The rules of `engine` for this checkpoint: for NVFP4 ones, the engine's format-independent rows
    (heads, KV heads, even splits) plus the NVFP4 rows above, instead of its int4 (AWQ/GPTQ/Marlin) rows.
    An engine with no NVFP4 loader (TGI, LMDeploy) gets the refusal row instead."""
    if ckpt.format != "nvfp4":
        return ENGINES[engine]
    if engine in UNLOADABLE:
        return (UNLOADABLE[engine],)
    return tuple(rule for rule in ENGINES[engine] if rule.quantized is not True) + RULES.get(engine, ())
