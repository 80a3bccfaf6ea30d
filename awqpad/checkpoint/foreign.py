"""Quantized checkpoints awqpad recognises but does not pad, and what is known about their TP behaviour.

Without this, such a checkpoint fails deep in format detection with "weight has dtype U8; expected a
float dtype". Instead, `inspect` names the method, says the model is ALREADY quantized (running it
through AWQ/GPTQ again to get something awqpad pads would quantize twice and lose accuracy; pad the
original model, or use the engine's own path below), and what the engines do with it at TP > 1;
`plan` and `pad` refuse with the same line.

Recognised from `quantization_config.quant_method`, or, when config.json names none, from the tensors
themselves (bitsandbytes' `absmax` / `quant_state.*` / `SCB` companions, gpt-oss `*_blocks` / `*_scales`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from awqpad.checkpoint.config import QuantConfig
from awqpad.errors import UnsupportedError

MXFP4_BLOCK = 32
ALREADY = "the model is already quantized: re-quantizing it to get a format awqpad pads would quantize it twice"


@dataclass(frozen=True)
class Foreign:
    method: str  # the config's quant_method (or what the tensors say)
    label: str  # e.g. "bitsandbytes nf4"
    tp: str  # what is known about its tensor-parallel behaviour, with sources
    engine_pads: bool = False  # True: the engines split it themselves at any TP (MXFP4), nothing to pad

    @property
    def summary(self) -> str:
        if self.engine_pads:
            return f"{self.label}: engines shard it themselves, nothing for awqpad to pad. {self.tp}"
        return f"{self.label} checkpoint: {ALREADY}; awqpad does not pad {self.label}. TP: {self.tp}"


# quant_method -> (label, TP behaviour). Each line names where it comes from.
KNOWN = {
    "bitsandbytes": ("bitsandbytes", "vLLM loads pre-quantized bitsandbytes 4-bit and 8-bit checkpoints "
                     "(docs.vllm.ai features/quantization/bnb); vLLM <= 0.6 refused any TP > 1 with 'BitAndBytes "
                     "quantization with TP or PP is not supported yet' (vllm/config.py verify_with_parallel_config)."),
    "gguf": ("GGUF", "vLLM's GGUF path (now the vllm-gguf-plugin) runs with --tensor-parallel-size "
             "(docs.vllm.ai features/quantization/gguf); K-quants group 256 values per super-block; awqpad reads "
             "safetensors only."),
    "hqq": ("HQQ", "vLLM reads HQQ through its Marlin kernel (quantization/hqq_marlin.py), so per-rank inputs must "
            "hold whole groups of the HQQ group size (64); awqpad cannot rewrite HQQ's layout."),
    "aqlm": ("AQLM", "additive codebooks, no per-group scales; engines that load AQLM shard its codes like any "
             "column/row-parallel weight."),
    "eetq": ("EETQ", "int8 weights with one scale per output channel (TGI); per-channel scales never straddle a "
             "TP shard, so TP is limited by heads and widths only."),
    "torchao": ("torchao", "torch tensor subclasses (int4/int8/float8 layouts chosen by the config); vLLM loads "
                "them with its torchao integration; no fixed on-disk group layout to pad."),
    "quanto": ("optimum-quanto", "per-channel or grouped qint weights as torch subclasses; not loaded by vLLM/SGLang."),
    "fbgemm_fp8": ("FBGEMM FP8", "per-channel FP8 weights: no K-groups, so TP never splits a group."),
    "exl2": ("EXL2", "ExLlamaV2 variable-bit format; not loaded by vLLM/SGLang; ExLlama/TabbyAPI shard it themselves."),
    "exl3": ("EXL3", "ExLlamaV3 trellis format; not loaded by vLLM/SGLang."),
    "vptq": ("VPTQ", "vector-quantized codebooks; no per-group scales to pad."),
    "higgs": ("HIGGS", "Hadamard + grid quantization (FLUTE kernels); not padded by awqpad."),
    "spqr": ("SpQR", "sparse-quantized representation with outliers; not padded by awqpad."),
    "bitnet": ("BitNet", "ternary weights; not padded by awqpad."),
    "fp_quant": ("FP-Quant", "MXFP4/NVFP4 with Hadamard rotations applied at load; not padded by awqpad."),
    "quark": ("AMD Quark", "per-layer schemes (FP8, MXFP4, int4) chosen by its config; not padded by awqpad yet."),
    "auto-round": ("AutoRound (native format)", "export it in the GPTQ or AWQ format (auto-round --format "
                   "auto_gptq / auto_awq), which awqpad pads."),
    "intel/auto-round": ("AutoRound (native format)", "export it in the GPTQ or AWQ format (auto-round --format "
                         "auto_gptq / auto_awq), which awqpad pads."),
}

MXFP4_TP = (
    "vLLM and SGLang give each rank ceil(blocks / TP) whole 32-value blocks and let the last rank hold less "
    "(vllm/model_executor/models/gpt_oss.py _load_weights_mxfp4: per_rank_intermediate_size_block = "
    "cdiv(intermediate_size // 32, tp_size)), then round per-rank sizes up to the kernel tile themselves "
    "(mxfp4_round_up_hidden_size_and_intermediate_size, vllm#34285); TensorRT-LLM pads MXFP4 MoE shards too "
    "(TensorRT-LLM#18870)."
)
BNB_PARTS = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__(nf4|fp4)|SCB)$")


def _bnb_label(raw: dict) -> str:
    if raw.get("load_in_8bit"):
        return "bitsandbytes int8"
    kind = str(raw.get("bnb_4bit_quant_type") or "nf4").lower()
    return f"bitsandbytes {kind}"


def _mxfp4_widths(tensors: dict) -> list[int]:
    """Expert widths of gpt-oss-style MXFP4 experts: down_proj_blocks [E, H, I/32, 16]."""
    widths = {info.shape[-2] * MXFP4_BLOCK for name, info in tensors.items()
              if name.endswith("down_proj_blocks") and len(info.shape) >= 3}
    return sorted(widths)


def mxfp4_tp_line(widths: list[int], tps) -> str:
    parts = []
    for width in widths:
        blocks = width // MXFP4_BLOCK
        per = ", ".join(f"TP {t}: {math.ceil(blocks / t) * MXFP4_BLOCK}/rank" for t in tps)
        parts.append(f"expert width {width} = {blocks} blocks of {MXFP4_BLOCK} ({per})")
    return "; ".join(parts)


def recognise(quant: QuantConfig, tensors: dict) -> Foreign | None:
    """The foreign quantization of this checkpoint, or None if awqpad's own formats cover it."""
    method = quant.method
    raw = quant.raw or {}
    if method == "mxfp4" or (method == "none" and any(n.endswith("_blocks") for n in tensors)
                             and any(n.endswith("_scales") for n in tensors)):
        widths = _mxfp4_widths(tensors)
        shape = f" ({mxfp4_tp_line(widths, (2, 4, 8))})" if widths else ""
        return Foreign("mxfp4", "MXFP4 (gpt-oss *_blocks / *_scales)", MXFP4_TP + shape, engine_pads=True)
    if method == "bitsandbytes":
        return Foreign(method, _bnb_label(raw), KNOWN[method][1])
    if method in KNOWN:
        return Foreign(method, *KNOWN[method])
    if method == "none" and any(BNB_PARTS.search(n) for n in tensors):
        kind = "int8" if any(n.endswith(".SCB") for n in tensors) else (
            "fp4" if any(n.endswith("bitsandbytes__fp4") for n in tensors) else "nf4")
        return Foreign("bitsandbytes", f"bitsandbytes {kind} (found by its tensors; config.json names no method)",
                       KNOWN["bitsandbytes"][1])
    return None


def refuse(foreign: Foreign) -> None:
    """Raise the one-line refusal `plan` and `pad` give for a foreign checkpoint."""
    if foreign.engine_pads:
        raise UnsupportedError(
            f"{foreign.label}: awqpad does not pad MXFP4; the engines already split whole 32-value blocks per rank "
            "with a ceil and pad the last rank themselves, so it loads at any TP the heads allow",
            hint="serve it unpadded, e.g. vllm serve SRC --tensor-parallel-size N",
        )
    raise UnsupportedError(foreign.summary, hint="pad the unquantized original and quantize that with AWQ/GPTQ/llm-compressor, "
                           "or serve this one as its engine allows")
