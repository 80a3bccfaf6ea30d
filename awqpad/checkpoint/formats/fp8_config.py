"""quantization_config of FP8 checkpoints: validation and the per-module scheme (block size / strategy).

Keys read (their owners):
* `quant_method: "fp8"`: `weight_block_size` [bn, bk], `fmt` ("e4m3" / "float8_e4m3fn"),
  `activation_scheme` ("dynamic" / "static"), `scale_fmt` ("ue8m0": scales are powers of two for
  DeepGEMM), `modules_to_not_convert` (transformers FineGrainedFP8Config, DeepSeek / MiniMax / Qwen
  configs) or `ignored_layers` (vLLM Fp8Config.from_config).
* compressed-tensors `format: "float-quantized"`: config_groups[*].weights {type "float", num_bits 8,
  strategy "block" | "channel" | "tensor", block_structure [bn, bk]} (compressed-tensors
  quantization/quant_args.py QuantizationArgs, QuantizationStrategy; presets FP8_BLOCK, FP8, FP8_DYNAMIC).
"""

from __future__ import annotations

from pathlib import Path

from awqpad.errors import InputError, UnsupportedError

E4M3_NAMES = (None, "e4m3", "e4m3fn", "float8_e4m3fn")
SCALE_FORMATS = (None, "ue8m0")
ACTIVATION_SCHEMES = (None, "dynamic", "static")
CT_STRATEGIES = ("block", "channel", "tensor")


def _block(value, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in value)):
        raise InputError(f"{where}: weight_block_size must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def check_native(q, where: Path) -> None:
    """Refuse FP8 configs whose bytes or scales awqpad cannot reproduce exactly."""
    raw = q.raw or {}
    fmt = raw.get("fmt")
    if fmt not in E4M3_NAMES:
        raise UnsupportedError(f"{where}: FP8 fmt {fmt!r} is not supported; only e4m3 (float8_e4m3fn) weights can be padded")
    scale_fmt = raw.get("scale_fmt")
    if scale_fmt not in SCALE_FORMATS:
        raise InputError(f"{where}: unknown FP8 scale_fmt {scale_fmt!r}; awqpad knows float scales and 'ue8m0'")
    scheme = raw.get("activation_scheme")
    if scheme not in ACTIVATION_SCHEMES:
        raise InputError(f"{where}: unknown FP8 activation_scheme {scheme!r}; expected 'dynamic' or 'static'")
    if "weight_block_size" in raw and raw["weight_block_size"] is not None:
        _block(raw["weight_block_size"], str(where))


def check_ct_float(group: dict, where: Path) -> None:
    w = group.get("weights") or {}
    if int(w.get("num_bits", 8)) != 8:
        raise UnsupportedError(f"{where}: compressed-tensors float group {group['_name']!r} has {w.get('num_bits')} bits; "
                               "only FP8 (8-bit e4m3) float-quantized weights can be padded")
    strategy = w.get("strategy")
    if strategy not in CT_STRATEGIES:
        raise UnsupportedError(f"{where}: compressed-tensors FP8 strategy {strategy!r} is not supported; "
                               f"only {', '.join(CT_STRATEGIES)}")
    if strategy == "block":
        _block(w.get("block_structure"), f"{where}: group {group['_name']!r} block_structure")


def module_scheme(q, prefix: str) -> dict:
    """{"block": (bn, bk) | None, "strategy": "block" | "channel" | "tensor" | None} for one module."""
    raw = q.raw or {}
    if q.method == "compressed-tensors":
        from awqpad.checkpoint.config import ct_group_for

        group = ct_group_for(q, prefix) or {}
        w = group.get("weights") or {}
        strategy = w.get("strategy")
        block = _block(w.get("block_structure"), prefix) if strategy == "block" else None
        return {"block": block, "strategy": strategy}
    value = raw.get("weight_block_size")
    return {"block": _block(value, prefix) if value is not None else None, "strategy": None}


def tensor_mismatch(ckpt) -> str | None:
    """A config that says FP8 over tensors of another format (e.g. AWQ qweight): which module, or None."""
    if ckpt.quant.method != "fp8":
        return None
    other = next((lin for lin in ckpt.linears if lin.quantized and lin.format != "fp8"), None)
    if other is None:
        return None
    return (f"quantization_config says FP8 (quant_method 'fp8') but {other.prefix} holds {other.format} tensors; "
            "the config and the weights disagree")


CT_BLOCK_REFUSAL = ("refining compressed-tensors FP8 blocks (config_groups block_structure) is not supported: only "
                    "native block-FP8 (quant_method 'fp8', weight_block_size) is; pad instead")


def block_refusal(q, r: int, min_block: int) -> str | None:
    """Why the FP8 config cannot take blocks [bn/r, bk/r] (None: it can). One weight_block_size holds for the
    whole model, so the whole model is refined by the same r."""
    if q.method == "compressed-tensors":
        return CT_BLOCK_REFUSAL
    raw = q.raw or {}
    if raw.get("weight_block_size") is None:
        return "per-tensor / per-channel FP8 (no weight_block_size) has no K-blocks to refine"
    bn, bk = _block(raw["weight_block_size"], "quantization_config")
    if bn % r or bk % r or min(bn, bk) // r < min_block:
        return f"FP8 block [{bn}, {bk}] does not split into {r} x {r} blocks of at least {min_block}"
    return None


def refined_config(q, r: int) -> dict:
    """quantization_config with weight_block_size [bn/r, bk/r] (everything else as it was)."""
    import copy

    out = copy.deepcopy(q.raw)
    bn, bk = _block(out["weight_block_size"], "quantization_config")
    out["weight_block_size"] = [bn // r, bk // r]
    return out
