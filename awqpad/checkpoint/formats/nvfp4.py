"""NVFP4: FP4 (e2m1) weights in groups of 16 along K, one float8 e4m3 block scale per group, one fp32
global scale per tensor. Two on-disk flavours of the same math:

* compressed-tensors `nvfp4-pack-quantized` (llm-compressor NVFP4 / NVFP4A16): `weight_packed` U8 [N, K/2],
  `weight_scale` F8_E4M3 [N, K/16], `weight_global_scale` F32 [1], `input_global_scale` F32 [1] (W4A4 only).
  W = e2m1(code) * scale / global_scale (compressed-tensors 0.20 `compressors/nvfp4/base.py`
  `NVFP4PackedCompressor.decompress` -> `dequantize(..., global_scale)`; its Triton packer divides the block
  scale by the global scale, `helpers.py _quantize_and_pack_fp4_kernel`).
* NVIDIA ModelOpt NVFP4 (`quant_algo: NVFP4`, hf_quant_config.json): `weight` U8 [N, K/2], `weight_scale`
  F8_E4M3 [N, K/16], `weight_scale_2` F32 [] (or [1]), `input_scale` F32. W = e2m1(code) * scale * scale_2
  (vLLM/SGLang `modelopt.py ModelOptNvFp4LinearMethod.create_weights`: weight [N_r, K_r // 2] uint8,
  weight_scale [N_r, K_r // group_size] float8_e4m3fn, alpha = input_scale * weight_scale_2).

Packing (compressed-tensors `helpers.py pack_fp4_to_uint8` / `unpack_fp4_from_uint8`): value 2i of a row is
the LOW nibble of byte i, value 2i+1 the HIGH nibble; a nibble is sign (0x8) | magnitude index into
[0, 0.5, 1, 1.5, 2, 3, 4, 6]. Code 0x0 is +0.0 (0x8 would be -0.0).

Fills:
* weight nibbles 0 (byte 0x00): +0.0.
* block scale of a group that holds only padding: byte 0x00 (+0.0 in e4m3fn). Every reader multiplies the
  decoded nibble by the block scale (compressed-tensors dequantize; vLLM/SGLang CUTLASS and FlashInfer FP4
  GEMMs; vLLM's emulation `dequantize_to_dtype`: `tensor_f32 * (tensor_sf / global_scale)`), so 0 * 0 = 0
  exactly. The engines' own NVFP4 tile padding writes the same byte: SGLang
  `srt/layers/quantization/modelopt_quant.py ModelOptFp4LinearMethod.process_weights_after_loading` pads
  scales with `torch.zeros(...)` / `F.pad(scale, ...)` (value 0), and so does tokenspeed#1322 for expert
  shards. The Marlin fallback (vLLM `marlin_utils_fp4.py nvfp4_marlin_process_scales`) rewrites
  scale * 2^7 into an "S0E5M3" byte by a bit shift: 0 stays the all-zero byte, i.e. 0.0, and it only
  warns for NEGATIVE scales, which 0x00 is not. 1.0 (0x38) would also give 0 * 1 = 0, but 0x00 is what
  the engines themselves pad with, and keeps a padding group at zero even under a reader that mis-decodes
  the codes. Never 0x80: -0.0 in e4m3fn and NaN in e4m3fnuz (ROCm).
* A group that mixes real values and padding (a width not a multiple of 16) keeps its original scale.
* global scales, input scales: unchanged (per tensor). Bias: 0.
"""

from __future__ import annotations

from awqpad.lazy import numpy as np

from awqpad.checkpoint.formats import float8
from awqpad.checkpoint.formats.base import Fill, Geometry, TensorOp, make_op, to_float64
from awqpad.errors import InputError, UnsupportedError

NAME = "nvfp4"
GROUP = 16
PARTS = ("weight_packed", "weight", "weight_scale", "weight_global_scale", "input_global_scale",
         "weight_scale_2", "input_scale", "weight_shape", "bias")
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # code -> value
ZERO_CODE = 0x00  # two +0.0 nibbles
ZERO_SCALE = 0.0  # encoded as byte 0x00 (see above)


def flavour(parts: dict) -> str | None:
    """"ct" (compressed-tensors), "modelopt", or None if these tensors are not NVFP4."""
    scale = parts.get("weight_scale")
    if scale is None or scale.dtype != "F8_E4M3":
        return None
    packed = parts.get("weight_packed")
    if packed is not None and packed.dtype == "U8" and "weight_global_scale" in parts:
        return "ct"
    weight = parts.get("weight")
    if weight is not None and weight.dtype == "U8" and "weight_scale_2" in parts:
        return "modelopt"
    return None


def claims(parts: dict) -> bool:
    return flavour(parts) is not None


def main_tensor(linear) -> str:
    return "weight_packed" if "weight_packed" in linear.parts else "weight"


def global_tensor(linear) -> str:
    return "weight_global_scale" if "weight_packed" in linear.parts else "weight_scale_2"


def readers(linear) -> tuple[str, ...]:
    # "nvfp4": e4m3fn block scales as stored (compressed-tensors, CUTLASS/FlashInfer, emulation);
    # "nvfp4-marlin": the scales as vLLM's Marlin fallback rewrites them (sign dropped, see marlin_scales).
    return ("nvfp4", "nvfp4-marlin")


def geometry(prefix: str, parts: dict, mq, quant) -> Geometry:
    kind = flavour(parts)
    w = parts["weight_packed" if kind == "ct" else "weight"]
    s = parts["weight_scale"]
    if "weight_zero_point" in parts:
        raise UnsupportedError(f"{prefix}: asymmetric NVFP4 (weight_zero_point) is not supported; engines read symmetric NVFP4 only")
    if len(w.shape) != 2 or len(s.shape) != 2:
        raise InputError(f"{prefix}: NVFP4 weight {list(w.shape)} and weight_scale {list(s.shape)} must be 2-D")
    n, k = w.shape[0], 2 * w.shape[1]
    if s.shape != (n, -(-k // GROUP)):
        raise InputError(
            f"{prefix}: NVFP4 weight_scale shape {list(s.shape)} does not match weight {list(w.shape)} "
            f"({n} outputs, {k} inputs in groups of {GROUP} need [{n}, {-(-k // GROUP)}])"
        )
    g = parts[global_tensor_of(parts)]
    if g.dtype not in ("F32", "BF16", "F16") or len(g.shape) > 1 or (g.shape and g.shape[0] != 1):
        raise InputError(f"{prefix}: NVFP4 global scale {g.name} must be one float, got {g.dtype}{list(g.shape)}")
    group = mq.group_size if mq is not None and mq.group_size not in (None, -1) else GROUP
    if group != GROUP:
        raise UnsupportedError(f"{prefix}: NVFP4 with group size {group} is not supported; NVFP4 is group 16")
    return Geometry(k, n, 4, GROUP, s.shape[1])


def global_tensor_of(parts: dict) -> str:
    return "weight_global_scale" if "weight_packed" in parts else "weight_scale_2"


def pad_ops(linear, axis: str, inserts) -> list[TensorOp]:
    p = linear.parts
    main = p[main_tensor(linear)]
    zero_code, zero_scale = Fill.const(ZERO_CODE), Fill.const(ZERO_SCALE)
    ops: list[TensorOp] = []
    if axis == "out":
        rows = [(ins.at, ins.count) for ins in inserts]
        ops.append(make_op(main, 0, rows, zero_code))
        ops.append(make_op(p["weight_scale"], 0, rows, zero_scale))
        if "bias" in p:
            ops.append(make_op(p["bias"], 0, rows, Fill.const(0.0)))
    else:
        k = linear.in_features
        byte_ins, group_ins = [], []
        for ins in inserts:
            if ins.at % 2 or ins.count % 2:
                raise UnsupportedError(f"{linear.prefix}: cannot insert {ins.count} inputs at {ins.at}: NVFP4 packs 2 per byte")
            byte_ins.append((ins.at // 2, ins.count // 2))
            if ins.at % GROUP == 0 and ins.count % GROUP == 0:
                group_ins.append((ins.at // GROUP, ins.count // GROUP))
            elif ins.at == k:
                # Appending after a partial last group: it absorbs the first new inputs (keeping its
                # scale); only groups that hold nothing but padding get the zero scale.
                group_ins.append((-(-k // GROUP), -(-(k + ins.count) // GROUP) - -(-k // GROUP)))
            else:
                raise UnsupportedError(
                    f"{linear.prefix}: cannot insert {ins.count} inputs at {ins.at}: NVFP4 needs whole groups of {GROUP}"
                )
        ops.append(make_op(main, 1, byte_ins, zero_code))
        ops.append(make_op(p["weight_scale"], 1, group_ins, zero_scale))
    info = p.get("weight_shape")
    if info is not None:
        added = sum(i.count for i in inserts)
        n, k = linear.out_features, linear.in_features
        new = (n + added, k) if axis == "out" else (n, k + added)
        ops.append(TensorOp(info.name, info.dtype, info.shape, info.shape, 0, (), replace=new))
    return ops


# --- decoding ---------------------------------------------------------------------------------------


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """U8 [N, K/2] -> nibble codes [N, K]: low nibble first."""
    packed = packed.astype(np.uint8)
    codes = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def marlin_scales(scale_bytes: np.ndarray) -> np.ndarray:
    """Block scales as vLLM's NVFP4 Marlin path reads them, as float64 values.

    `nvfp4_marlin_process_scales` (vllm/model_executor/layers/quantization/utils/marlin_utils_fp4.py):
    scale -> half, * 2^7, bits << 1, keep the high byte ("S0E5M3", no sign bit); the kernel
    (`dequant_fp8_scales`) puts that byte at bits 14..7 of a half, which rebuilds |scale| * 2^7 exactly
    (3 mantissa bits fit); the 2^-7 is folded into the global scale. Net effect: |scale| (the sign is
    dropped, which vLLM warns about), NaN stays NaN.
    """
    values = float8.e4m3fn()[scale_bytes.astype(np.uint8)]
    half = (np.abs(values) * 2.0**7).astype(np.float16)
    byte = ((half.view(np.uint16).astype(np.uint32) << 1) >> 8) & 0xFF
    back = (byte.astype(np.uint16) << 7).view(np.float16).astype(np.float64)
    return np.where(np.isnan(values), np.nan, back * 2.0**-7)


def dequantize(arrays: dict, linear, reader: str = "nvfp4") -> np.ndarray:
    codes = unpack_codes(arrays[main_tensor(linear)])
    scale_info = linear.parts["weight_scale"]
    raw = arrays["weight_scale"]
    scales = marlin_scales(raw) if reader == "nvfp4-marlin" else to_float64(raw, scale_info.dtype)
    g_name = global_tensor(linear)
    g = float(to_float64(np.asarray(arrays[g_name]).reshape(-1), linear.parts[g_name].dtype)[0])
    k = codes.shape[1]
    per_input = np.repeat(scales, GROUP, axis=1)[:, :k]
    w = np.asarray(E2M1)[codes] * per_input
    return w / g if g_name == "weight_global_scale" else w * g
