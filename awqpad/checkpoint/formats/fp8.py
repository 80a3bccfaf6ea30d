"""FP8 (e4m3) weights with float scales: block-FP8 and compressed-tensors `float-quantized`.

Layouts (one module, because the math is one: W[n, k] = fp8(q[n, k]) * s[scale cell of (n, k)]):
* `quant_method: "fp8"` with `weight_block_size: [bn, bk]` (DeepSeek-V3/R1, Qwen3-*-FP8, MiniMax-M2,
  GLM-4.5-FP8): `weight` F8_E4M3 [N, K], `weight_scale_inv` F32/BF16 [ceil(N/bn), ceil(K/bk)]; the
  "inv" scale is MULTIPLIED in (DeepSeek-V3 inference/kernel.py `weight_dequant_kernel`: `y = x * s`;
  transformers integrations/finegrained_fp8.py `_dequantize_fp8_weight`: `weight * scale` per block;
  vLLM fp8_utils.py `create_fp8_scale_parameter` allocates (cdiv(N_r, bn), cdiv(K_r, bk))). Trailing
  partial blocks are legal (DeepSeek kv_a_proj_with_mqa N = 576), so the block size comes from the
  config, never from the shapes.
* `quant_method: "fp8"` without a block size: per-tensor `weight_scale` [] / [1] (vLLM Fp8Config,
  `activation_scheme: static` adds a per-tensor `input_scale`).
* compressed-tensors `float-quantized` (llm-compressor FP8_BLOCK / FP8 / FP8_DYNAMIC): `weight` F8_E4M3,
  `weight_scale` [ceil(N/bn), ceil(K/bk)] (strategy block, `block_structure: [bn, bk]`), [N, 1] (channel)
  or [1] (tensor); static activations add `input_scale` (compressed-tensors
  compressors/naive_quantized `FloatQuantizationCompressor.decompress_weight` -> `dequantize(x_q, scale)`
  = x_q * scale, the scale broadcast over its block / row).

Fills (confirmed in the owners' code; fp8-fp4-engines.md section 3.2 has the leads, and what was read
agreed with it; refinements: vLLM's MoE block_n check runs at every TP, block_k only at TP > 1, and
TRT-LLM's FP8BlockScalesLinearMethod sizes scales as ceil(N/128) x ceil(K/128) whatever the config says):
* weight bytes 0x00 = +0.0. Never 0x80: -0.0 in e4m3fn but NaN in e4m3fnuz (vLLM / SGLang
  `normalize_e4m3fn_to_e4m3fnuz` rewrites 0x80 to 0 for exactly this reason; a reader that does not
  would see NaN).
* scale of a block holding only padding: 1.0. 0 * s = 0 for any finite s, and 1.0 = 2^0 is exact in
  UE8M0, where engines requantize scales to powers of two for DeepGEMM (vLLM fp8_utils
  `requant_weight_ue8m0_inplace`; SGLang fp8_utils `requant_block_scale_ue8m0_for_deepgemm`, which calls
  `requant_weight_ue8m0_inplace`); 0 is not representable there (log2 0).
  vLLM's own block-aligned TP padding for FlashInfer-TRTLLM MoE asserts padded scales == 1 (#55867).
* a partial block that gains padding elements keeps its scale; the new elements are 0x00.
* per-channel scale rows of new outputs: 1.0 (any finite value gives 0; vLLM's merged per-tensor shards
  requantize to the max scale, `_requantize_with_max_scale`, so a padded row must hold a finite one).
* per-tensor scales and input scales: unchanged. Bias: 0.
"""

from __future__ import annotations

import dataclasses

from awqpad.lazy import numpy as np

from awqpad.checkpoint.formats.base import Fill, Geometry, TensorOp, make_op, scaled, to_float64
from awqpad.checkpoint.formats.float8 import decode_e4m3fnuz_normalized, decode_e4m3fnuz_raw, e4m3fn
from awqpad.checkpoint.header import tensor_nbytes
from awqpad.errors import InputError, UnsupportedError

NAME = "fp8"
PARTS = ("weight", "weight_scale_inv", "weight_scale", "input_scale", "bias")
SCALE_DTYPES = ("F32", "BF16")
WEIGHT_ZERO = 0.0  # encoded as byte 0x00 (see float8.encode)
PAD_SCALE = 1.0


def claims(parts: dict) -> bool:
    w = parts.get("weight")
    return w is not None and w.dtype.startswith("F8_") and len(w.shape) == 2


def readers(linear) -> tuple[str, ...]:
    # e4m3fn: the bytes as stored (CUDA, CPU). e4m3fnuz: as ROCm engines read them after
    # normalize_e4m3fn_to_e4m3fnuz (bits reinterpreted as fnuz, 0x80 -> 0, scales doubled).
    return ("e4m3fn", "e4m3fnuz")


def zero_readers(linear) -> tuple[str, ...]:
    """Readers the padding must be exactly 0 under: also the bits read as e4m3fnuz with NO rewriting
    (a path that skips the normalization), where a 0x80 fill would be NaN. Original weights may hold
    0x80 (-0.0, what torch's cast gives small negatives), so this reader is for padding only."""
    return readers(linear) + ("e4m3fnuz-raw",)


def scale_part(parts: dict) -> str:
    return "weight_scale_inv" if "weight_scale_inv" in parts else "weight_scale"


def scheme(quant, prefix: str) -> dict:
    """What the config says this module's FP8 weights look like: {"block": (bn, bk) | None,
    "strategy": "block" | "channel" | "tensor" | None (tensor or block, told by the scale shape)}."""
    from awqpad.checkpoint.formats.fp8_config import module_scheme

    return module_scheme(quant, prefix)


def geometry(prefix: str, parts: dict, mq, quant) -> Geometry:
    w = parts["weight"]
    if w.dtype != "F8_E4M3":
        found = ", ".join(f"{part} {info.dtype}{list(info.shape)}" for part, info in sorted(parts.items()))
        raise UnsupportedError(f"{prefix}: FP8 {w.dtype[3:]} weights are not supported (awqpad pads FP8 E4M3 only); "
                               f"found {found}")
    name = scale_part(parts)
    if name not in parts:
        raise InputError(f"{prefix}: FP8 weight has no weight_scale_inv or weight_scale tensor")
    s = parts[name]
    if s.dtype not in SCALE_DTYPES:
        raise UnsupportedError(f"{prefix}: {name} dtype {s.dtype} is not supported; FP8 scales must be F32 or BF16")
    n, k = w.shape
    plan = scheme(quant, prefix)
    shape = tuple(s.shape)
    if plan["block"] is not None:
        bn, bk = plan["block"]
        want = (-(-n // bn), -(-k // bk))
        if shape != want:
            raise InputError(f"{prefix}: {name} shape {list(shape)} disagrees with weight {[n, k]} in blocks of "
                             f"{[bn, bk]} (expected {list(want)})")
        return Geometry(k, n, 8, bk, want[1], block_n=bn)
    if plan["strategy"] == "channel" or (plan["strategy"] is None and shape in ((n, 1), (n,)) and n > 1):
        if shape not in ((n, 1), (n,)):
            raise InputError(f"{prefix}: per-channel {name} shape {list(shape)} disagrees with weight {[n, k]} (expected [{n}, 1])")
        return Geometry(k, n, 8, -1, 1, block_n=1)
    if shape in ((), (1,)):
        return Geometry(k, n, 8, -1, 1)
    if len(shape) == 2 and plan["strategy"] is None:
        raise InputError(f"{prefix}: {name} has a block shape {list(shape)} but quantization_config has no "
                         "weight_block_size, so the block size is unknown")
    raise InputError(f"{prefix}: {name} shape {list(shape)} is neither per-tensor, per-channel [{n}, 1] nor blocks")


def block_n(linear) -> int | None:
    """Rows per scale row: bn for block scales, 1 per-channel, None per-tensor."""
    return linear.block_n


def kind(linear) -> str:
    bn = linear.block_n
    return "tensor" if bn is None else ("channel" if bn == 1 and linear.group_size == -1 else "block")


def _scale_inserts(inserts, length: int, unit: int, prefix: str, what: str) -> list[tuple[int, int]]:
    """Scale cells to insert along an axis of `length` features with `unit` features per cell.

    An insert at a cell boundary adds whole cells; an insert that appends at the end of the axis
    first completes the trailing partial cell (which keeps its scale) and adds only what overflows.
    """
    out = []
    for ins in inserts:
        if ins.at == length:
            out.append((-(-length // unit), -(-(length + ins.count) // unit) - -(-length // unit)))
        elif ins.at % unit == 0 and ins.count % unit == 0:
            out.append((ins.at // unit, ins.count // unit))
        else:
            raise UnsupportedError(f"{prefix}: cannot insert {ins.count} {what} at {ins.at}: FP8 blocks of {unit} "
                                   f"would mix real and padded values in a block that is not the last one")
    return out


def pad_ops(linear, axis: str, inserts) -> list:
    p = linear.parts
    feats = scaled(inserts, 1, "", linear.prefix)
    scale = p[scale_part(p)]
    zero, one = Fill.const(WEIGHT_ZERO), Fill.const(PAD_SCALE)
    style = kind(linear)
    if axis == "out":
        ops = [make_op(p["weight"], 0, feats, zero)]
        if style == "block":
            cells = _scale_inserts(inserts, linear.out_features, block_n(linear), linear.prefix, "outputs")
            ops.append(make_op(scale, 0, cells, one))
        elif style == "channel":
            ops.append(make_op(scale, 0, feats, one))
        if "bias" in p:
            ops.append(make_op(p["bias"], 0, feats, Fill.const(0.0)))
        return ops
    ops = [make_op(p["weight"], 1, feats, zero)]
    if style == "block":
        cells = _scale_inserts(inserts, linear.in_features, linear.group_size, linear.prefix, "inputs")
        ops.append(make_op(scale, 1, cells, one))
    return ops


def expand_scale(s: np.ndarray, n: int, k: int, bn: int | None, bk: int | None) -> np.ndarray:
    """Per-element scale [n, k] of block ([ceil(n/bn), ceil(k/bk)]), channel ([n, 1]) or tensor scales."""
    s = np.asarray(s, dtype=np.float64)
    if s.size == 1:
        return np.full((n, k), float(s.reshape(-1)[0]))
    if s.ndim == 1:
        s = s[:, None]
    rows = np.repeat(s, bn, axis=0)[:n] if bn and s.shape[0] != n else s
    return np.repeat(rows, bk, axis=1)[:, :k] if bk and rows.shape[1] != k else np.broadcast_to(rows, (n, k))


def dequantize(arrays: dict, linear, reader: str = "e4m3fn") -> np.ndarray:
    """W [out, in] in float64 as `reader` computes it; works on slices taken by `take` too."""
    codes = np.asarray(arrays["weight"]).astype(np.uint8)
    name = scale_part(arrays)
    s = to_float64(np.asarray(arrays[name]), linear.parts[name].dtype)
    if reader == "e4m3fnuz":
        q, s = decode_e4m3fnuz_normalized(codes), s * 2.0
    elif reader == "e4m3fnuz-raw":
        q, s = decode_e4m3fnuz_raw(codes), s * 2.0
    else:
        q = e4m3fn()[codes]
    n, k = codes.shape
    if kind(linear) == "tensor" and s.size > 1:  # a merged gate_up: one per-tensor scale per partition
        return q * np.repeat(s.reshape(-1), n // s.size)[:, None]
    bk = linear.group_size if linear.group_size and linear.group_size > 0 else None
    return q * expand_scale(s, n, k, block_n(linear), bk)


def take(arrays: dict, linear, dim: str, start: int, stop: int) -> dict:
    """Features [start, stop) along `dim` as a TP rank loads them: weight rows / columns and the scale
    cells they fall in (vLLM BlockQuantScaleParameter shards scale rows by cdiv; per-channel rows follow
    the weight rows; a per-tensor scale is replicated). The caller has checked block alignment."""
    name = scale_part(arrays)
    w, s = arrays["weight"], arrays[name]
    style = kind(linear)
    if dim == "out":
        out = {"weight": w[start:stop]}
        if style == "block":
            bn = block_n(linear)
            out[name] = s[start // bn : -(-stop // bn)]
        elif style == "channel":
            out[name] = s[start:stop]
        else:
            s = np.asarray(s).reshape(-1)
            # one scale, or one per partition of a merged gate_up: then one per row of the slice
            out[name] = s if s.size == 1 else np.repeat(s, w.shape[0] // s.size)[start:stop]
        return out
    out = {"weight": w[:, start:stop]}
    if style == "block":
        bk = linear.group_size
        out[name] = s[:, start // bk : -(-stop // bk)]
    else:
        out[name] = s
    return out


def shard_unit(linear, dim: str) -> int:
    """Features a TP shard boundary must be a multiple of so no rank splits a scale block."""
    if kind(linear) != "block":
        return 1
    return block_n(linear) if dim == "out" else linear.group_size


def nan_codes(codes: np.ndarray) -> int:
    """How many e4m3fn NaN bytes (S.1111.111) a weight region holds."""
    return int(np.count_nonzero((np.asarray(codes).astype(np.uint8) & 0x7F) == 0x7F))


# --- block refinement: blocks [bn, bk] -> [bn/r, bk/r], weights untouched ----------------------------
# Each refined block lies inside one parent block and repeats its scale, so every weight dequantizes to
# the same value (the engine-side counterpart: vLLM Fp8MoEMethod refines MoE scales the same way at load,
# fused_moe/oracle/fp8.py refine_fp8_moe_block_shape). Both axes are refined: vLLM quantizes activations
# per [1, weight_block_size[0]] group and its kernels check that against block_k
# (quantization/fp8.py Fp8LinearMethod activation_quant_key), so engines take square blocks only.

REFINE_KIND = "refine"
MIN_BLOCK = 32  # vLLM's own refinement goes no finer than 32 (resolve_fp8_moe_weight_block_shape)


def refined_scale_shape(linear, r: int) -> tuple[int, int]:
    n, k = linear.parts["weight"].shape
    return -(-n // (linear.block_n // r)), -(-k // (linear.group_size // r))


def refine_ops(linear, r: int) -> list:
    """The scale tensor of a block-FP8 linear refined r ways on both axes (nothing for other kinds)."""
    if kind(linear) != "block":
        return []
    info = linear.parts[scale_part(linear.parts)]
    return [TensorOp(info.name, info.dtype, tuple(info.shape), refined_scale_shape(linear, r), 0, (), None, r, 0,
                     REFINE_KIND)]


def refined_linear(linear, r: int):
    """`linear` as it reads with blocks [bn/r, bk/r] (shapes only: for the engine rules and pad planning)."""
    if kind(linear) != "block":
        return linear
    name = scale_part(linear.parts)
    info = linear.parts[name]
    shape = refined_scale_shape(linear, r)
    parts = dict(linear.parts)
    parts[name] = dataclasses.replace(info, shape=shape, end=info.begin + tensor_nbytes(info.dtype, shape))
    return dataclasses.replace(linear, parts=parts, group_size=linear.group_size // r, block_n=linear.block_n // r,
                               groups=shape[1])
