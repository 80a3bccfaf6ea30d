"""Tiny real Hugging Face checkpoints for tests, built by an independent reference implementation.

`build_checkpoint(path, Model(...), Quant(...))` writes a sharded safetensors checkpoint the way real
producers do (AutoAWQ GEMM, AutoGPTQ/GPTQModel, llm-compressor "pack-quantized", plain fp16/bf16/fp32),
plus config.json and the usual tagalong files, and returns, for every linear module, the float64 weight
the stored tensors dequantize to. Nothing here imports awqpad: the packers and dequantizers below are
re-written from the layouts in /work/shared/reference/formats-and-padding.md (cited as "fmt §N") so that
tests can use them as an oracle on awqpad's output.

Decisions other tests rely on:

* AWQ with `sym=True` (config `zero_point: false`): AutoAWQ's GEMM packer cannot write it
  (`WQLinear_GEMM.from_linear` asserts `zeros is not None`; only its Marlin format is symmetric), and every
  GEMM reader (AutoAWQ torch/Triton, vLLM `awq`, TurboMind) always reads `qzeros`. We therefore write the
  normal GEMM layout with `qzeros` = 8 in every nibble (word 0x88888888), scale = absmax/7 (AutoAWQ's
  symmetric pseudo-quantizer), codes = round(w/s) + 8. `dequant_awq` needs no special case.
* GPTQ v1 asymmetric: zero points are clamped to 1..2^b-1 so the stored z-1 never wraps to 0xF (fmt §3).
  GPTQ v2 asymmetric may store z = 0.
* Model dtype: fp16 for awq/gptq (scale_dtype F16); for ct (and awq/gptq with scale_dtype BF16) the
  unquantized tensors use the scale dtype, as llm-compressor does; "bf16"/"fp32" methods use that dtype.
* `shards == 1` writes `model.safetensors` and no index, as `save_pretrained` does.
* Tensors are split across shards in state-dict (module) order, balanced by bytes, so one module's
  qweight/qzeros/scales can straddle two shards -- as in real checkpoints.
* MoE archs with `experts == 0` get small defaults (4 experts, moe_intermediate 640, qwen2_moe shared 1152,
  deepseek n_shared 2 / first_k_dense 1); `Fixture.model` is the model actually built.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ARCHS", "METHODS", "Quant", "Model", "Fixture", "Linear",
    "build_checkpoint", "arch_linears", "effective_model",
    "dequantize", "dequantize_module", "dequantize_all", "DequantError", "dequant_awq", "dequant_gptq", "dequant_ct",
    "pack", "unpack", "awq_pack", "awq_unpack", "quantize_rtn",
    "load_tensors", "read_index", "shard_files", "write_safetensors", "encode_header",
    "mlp_forward", "linear_forward", "silu",
    "AWQ_ORDER", "AWQ_INV", "W8", "W7", "rel_err",
]

ARCHS = ("qwen2", "llama", "mixtral", "qwen2_moe", "qwen3_moe", "qwen2_vl", "qwen2_5_vl_nested", "internvl",
         "phi3", "chatglm", "deepseek_v2")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")
METHODS = ("awq", "gptq", "ct", "fp16", "bf16", "fp32")
QUANTIZED = ("awq", "gptq", "ct")

# fmt §1: AWQ GEMM slot i (bits 4i..4i+3) of word c holds output 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_INV = tuple(AWQ_ORDER.index(j) for j in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)
W8 = -2004318072  # 0x88888888 as int32 (fmt §0)
W7 = 2004318071   # 0x77777777

# Storage arrays are numpy; numpy has no bfloat16, so BF16 tensors are kept as their uint16 bit patterns.
_ST_DTYPE = {"F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F32": np.dtype("<f4"), "I32": np.dtype("<i4"),
             "I64": np.dtype("<i8")}
# safetensors' Dtype enum order: `serialize` lays tensors out by dtype, this order descending, then by name.
_ST_RANK = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
            "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_NBYTES = {"F8_E4M3": 1, "U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8}
_TORCH_DTYPE_NAME = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


# --------------------------------------------------------------------------------------------------
# Public dataclasses
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quant:
    method: str            # "awq" | "gptq" | "ct" | "fp16" | "bf16" | "fp32"
    bits: int = 4          # 4 or 8 (awq: 4 only)
    group_size: int = 128  # -1 = per-channel
    sym: bool = True       # awq: zero_point = not sym ; gptq: sym ; ct: symmetric
    desc_act: bool = False  # gptq: random g_idx with exactly group_size members per group; ct: weight_g_idx
    checkpoint_format: str = "gptq"  # gptq only: "gptq" (v1, stored z-1) or "gptq_v2" (stored z)
    scale_dtype: str = "F16"         # "F16" or "BF16"
    dynamic: dict | None = None      # gptq only: GPTQModel per-module overrides ("-:regex": {} = not quantized)

    def __hash__(self):  # dict field: hash by its JSON text
        return hash((self.method, self.bits, self.group_size, self.sym, self.desc_act, self.checkpoint_format,
                     self.scale_dtype, json.dumps(self.dynamic, sort_keys=True)))

    @property
    def v2(self) -> bool:
        return self.checkpoint_format == "gptq_v2"


@dataclass(frozen=True)
class Model:
    arch: str = "qwen2"
    hidden: int = 256
    intermediate: int = 2432        # 19 groups of 128: not whole groups per rank at TP 2 or 4
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    vocab: int = 320
    experts: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    n_shared_experts: int = 0
    first_k_dense: int = 0


@dataclass(frozen=True)
class Linear:
    """One linear module as it appears in the checkpoint."""
    prefix: str        # e.g. "model.layers.0.mlp.down_proj"
    out: int           # N
    inp: int           # K
    bias: bool
    quantizable: bool  # a decoder-layer linear that the quantizer converts
    role: str          # q k v qkv o gate up gate_up down mla router lm_head vision


@dataclass
class Fixture:
    path: Path
    model: Model
    quant: Quant
    weights: dict[str, np.ndarray]   # module prefix -> float64 W [out, in], what the stored tensors dequantize to
    biases: dict[str, np.ndarray]    # module prefix -> float64 bias [out]
    config: dict
    linears: dict[str, Linear] = field(default_factory=dict)          # every linear module, in state-dict order
    module_quant: dict[str, Quant | None] = field(default_factory=dict)  # prefix -> resolved Quant, None = plain
    original: dict[str, np.ndarray] = field(default_factory=dict)     # prefix -> float64 W before quantization
    # prefix -> (q [N, K], z [N, G]) unsigned integer codes and zero points (quantized modules only)
    codes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    g_idx: dict[str, np.ndarray] = field(default_factory=dict)        # prefix -> [K] group of each input
    others: dict[str, np.ndarray] = field(default_factory=dict)       # norms, embeddings... as float64
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)
    weight_map: dict[str, str] = field(default_factory=dict)          # name -> shard file
    shard_names: list[str] = field(default_factory=list)
    dtype: str = "F16"                                                # dtype of unquantized tensors

    @property
    def quantized(self) -> list[str]:
        return [p for p, q in self.module_quant.items() if q is not None]


# --------------------------------------------------------------------------------------------------
# Packing (fmt §1, §3, §4, §10) -- numpy, int64 arithmetic, int32 words
# --------------------------------------------------------------------------------------------------

def _pack_last(c: np.ndarray, bits: int, order) -> np.ndarray:
    pf = 32 // bits
    if c.shape[-1] % pf:
        raise ValueError(f"cannot pack {c.shape[-1]} values {pf} per word")
    if c.size and (c.min() < 0 or c.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    words = np.zeros((*c.shape[:-1], c.shape[-1] // pf), np.uint32)
    for slot, src in enumerate(order):  # slot i (bits b*i..) of word w <- value pf*w + order[i]
        words |= c[..., src::pf].astype(np.uint32) << np.uint32(bits * slot)
    return words.view(np.int32)


def pack(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned codes (0..2^b-1) -> int32 words; 32/b consecutive values along `axis` per word, value i at
    bits b*i (sequential order: GPTQ qweight/qzeros, compressed-tensors weight_packed / zero_point)."""
    c = np.moveaxis(np.asarray(codes), axis, -1)
    return np.ascontiguousarray(np.moveaxis(_pack_last(c, bits, range(32 // bits)), -1, axis))


def unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Inverse of `pack`: int32 words -> int64 unsigned codes (32/b per word along `axis`)."""
    pf = 32 // bits
    w = np.moveaxis(np.asarray(words).astype(np.int64) & 0xFFFFFFFF, axis, -1)
    v = (w[..., None] >> (np.arange(pf, dtype=np.int64) * bits)) & ((1 << bits) - 1)
    return np.moveaxis(v.reshape(*w.shape[:-1], w.shape[-1] * pf), -1, axis)


def awq_pack(codes: np.ndarray) -> np.ndarray:
    """AWQ GEMM (fmt §1): codes [R, N] -> int32 [R, N/8], packed along N with slot order AWQ_ORDER."""
    return np.ascontiguousarray(_pack_last(np.asarray(codes), 4, AWQ_ORDER))


def awq_unpack(words: np.ndarray) -> np.ndarray:
    v = unpack(words, 4, 1)
    r, n = v.shape
    return v.reshape(r, n // 8, 8)[:, :, list(AWQ_INV)].reshape(r, n)


# --------------------------------------------------------------------------------------------------
# Reference dequantizers (float64, return W [out, in])
# --------------------------------------------------------------------------------------------------

def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), round-to-nearest-even via float32, as torch does."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _np(a) -> np.ndarray:
    """numpy view of an array, or of a torch tensor that an oracle test passes in (torch itself is never
    imported here: the default test suite runs without it); bf16 tensors become float32 (exact)."""
    if type(a).__module__.split(".")[0] == "torch":
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()  # every bfloat16 is a float32
        return a.numpy()
    return np.asarray(a)


def _f64(a) -> np.ndarray:
    return _np(a).astype(np.float64)


class DequantError(ValueError):
    """The tensors of one module are inconsistent (shapes, group counts, g_idx): a bug in whoever wrote them."""


def _group_of(K: int, G: int, group_size, g_idx=None) -> np.ndarray:
    if g_idx is not None:
        gi = _np(g_idx).astype(np.int64)
        if gi.shape != (K,):
            raise DequantError(f"g_idx has shape {gi.shape}, expected ({K},)")
        if K and (gi.min() < 0 or gi.max() >= G):
            raise DequantError(f"g_idx values {gi.min()}..{gi.max()} outside 0..{G - 1}")
        return gi
    g = K // G if group_size in (-1, None) else int(group_size)
    if G * g != K:
        raise DequantError(f"{K} inputs do not form {G} groups of {g}")
    return np.arange(K) // g


def dequant_awq(qweight, qzeros, scales, group_size: int = 128) -> np.ndarray:
    """AutoAWQ GEMM (fmt §1): W^T[k, n] = (q[k, n] - z[k//g, n]) * s[k//g, n]; returns W [N, K] float64.
    group_size -1 = per-channel (one group). qzeros None reads as zero 8 (our AWQ zero_point=false layout
    writes qzeros 0x88888888, so both readings agree)."""
    q = awq_unpack(_np(qweight))                      # [K, N]
    s = _f64(scales)                                  # [G, N]
    z = awq_unpack(_np(qzeros)) if qzeros is not None else np.full(s.shape, 8, np.int64)
    K, N = q.shape
    if s.shape[1] != N or z.shape != s.shape:
        raise DequantError(f"qweight {q.shape} (unpacked), qzeros {z.shape}, scales {s.shape} disagree")
    k = _group_of(K, s.shape[0], group_size)
    return ((q - z[k]) * s[k]).T


def dequant_gptq(qweight, qzeros, scales, g_idx=None, bits: int = 4, v2: bool = False,
                 marlin_sym: bool = False) -> np.ndarray:
    """GPTQ (fmt §3): W^T[k, n] = s[g_idx[k], n] * (q[k, n] - z_eff[g_idx[k], n]); returns W [N, K] float64.
    z_eff = stored + 1 (v1, the unmasked reading: a stored 0xF would mean 16) or stored (v2).
    marlin_sym: vLLM gptq_marlin / Machete / ExLlama symmetric path -- qzeros ignored, z = 2^(b-1).
    g_idx None = trivial k // (K/G)."""
    q = unpack(_np(qweight), bits, 0)                 # [K, N]
    s = _f64(scales)                                  # [G, N]
    K, N = q.shape
    G = s.shape[0]
    if s.shape[1] != N:
        raise DequantError(f"qweight {q.shape} (unpacked) and scales {s.shape} disagree")
    gi = _group_of(K, G, None, g_idx)
    if marlin_sym:
        z = np.full(s.shape, 1 << (bits - 1), np.int64)
    else:
        z = unpack(_np(qzeros), bits, 1) + (0 if v2 else 1)
        if z.shape != s.shape:
            raise DequantError(f"qzeros {z.shape} (unpacked) and scales {s.shape} disagree")
    return ((q - z[gi]) * s[gi]).T


def dequant_ct(weight_packed, weight_scale, weight_zero_point=None, g_idx=None, group_size: int = 128,
               bits: int = 4, shape=None) -> np.ndarray:
    """compressed-tensors pack-quantized (fmt §4): W[n, k] = (q_signed - zp_signed[n, g(k)]) * s[n, g(k)];
    returns W [N, K] float64. Stored = signed + 2^(b-1); weight packed along K, zero point packed along N.
    g(k) = g_idx[k] or k // (K/G). `shape` (weight_shape) must agree with the packed tensor when given: a stale
    weight_shape is an error, not something to truncate silently."""
    mid = 1 << (bits - 1)
    pf = 32 // bits
    q = unpack(_np(weight_packed), bits, 1) - mid     # [N, K]
    s = _f64(weight_scale)                            # [N, G]
    if shape is not None:
        n, k = (int(x) for x in _np(shape))
        if n != q.shape[0] or -(-k // pf) != _np(weight_packed).shape[1]:
            raise DequantError(f"weight_shape {[n, k]} does not match weight_packed {tuple(_np(weight_packed).shape)}")
        q = q[:, :k]
    N, K = q.shape
    if s.shape[0] != N:
        raise DequantError(f"weight_scale {s.shape} does not match {N} outputs")
    gi = _group_of(K, s.shape[1], group_size, g_idx)
    w = q.astype(np.float64)
    if weight_zero_point is not None:
        zp = unpack(_np(weight_zero_point), bits, 0) - mid  # [ceil(N/pf)*pf, G]
        if zp.shape[0] < N or zp.shape[0] - N >= pf or zp.shape[1] != s.shape[1]:
            raise DequantError(f"weight_zero_point {tuple(_np(weight_zero_point).shape)} does not match {s.shape}")
        w = w - zp[:N][:, gi]
    return w * s[:, gi]


def dequantize(method_info, tensors: dict) -> np.ndarray:
    """Dispatch on `method_info` (a Quant, or a dict with keys method/bits/group_size/checkpoint_format or v2,
    and optionally marlin_sym) over one module's tensors, keyed by local name (`qweight`, `weight_packed`,
    `weight`...; full names are accepted too, only the last component is used)."""
    if isinstance(method_info, Quant):
        info = dataclasses.asdict(method_info)
    else:
        info = dict(method_info)
    t = {k.rsplit(".", 1)[-1]: v for k, v in tensors.items()}
    method = info.get("method") or info.get("quant_method")
    method = {"compressed-tensors": "ct"}.get(method, method)
    bits, g = int(info.get("bits", 4)), info.get("group_size", 128)
    if "weight" in t and "qweight" not in t and "weight_packed" not in t:
        return _f64(t["weight"])
    if method == "awq":
        return dequant_awq(t["qweight"], t.get("qzeros"), t["scales"], g)
    if method == "gptq":
        v2 = info.get("v2", info.get("checkpoint_format") == "gptq_v2")
        return dequant_gptq(t["qweight"], t.get("qzeros"), t["scales"], t.get("g_idx"), bits, v2=bool(v2),
                            marlin_sym=bool(info.get("marlin_sym", False)))
    if method == "ct":
        return dequant_ct(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), t.get("weight_g_idx"),
                          g, bits, shape=t.get("weight_shape"))
    raise ValueError(f"no quantized tensors for method {method!r}: {sorted(t)}")


def dequantize_module(all_tensors: dict, prefix: str, method_info) -> np.ndarray:
    """Dequantize the module `prefix` out of a whole-checkpoint tensor dict (e.g. from `load_tensors`)."""
    sub = {k[len(prefix) + 1:]: v for k, v in all_tensors.items()
           if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1:]}
    if not sub:
        raise KeyError(prefix)
    return dequantize(method_info, sub)


def dequantize_all(all_tensors: dict, fx: "Fixture", prefixes=None) -> dict[str, np.ndarray]:
    """Dequantize every linear module of `fx` (or `prefixes`) out of a loaded checkpoint, e.g. awqpad's padded
    output, using each module's own quantization (GPTQ `dynamic` included); plain `.weight` modules as stored."""
    return {p: dequantize_module(all_tensors, p, fx.module_quant.get(p) or fx.quant)
            for p in (fx.linears if prefixes is None else prefixes)}


# --------------------------------------------------------------------------------------------------
# Round-to-nearest quantizer
# --------------------------------------------------------------------------------------------------

def _to_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 array -> the stored array of the safetensors dtype (BF16: uint16 bit patterns)."""
    if dtype == "BF16":
        return _bf16_bits(a)
    return np.ascontiguousarray(a, dtype=_ST_DTYPE[dtype])


def _stored_f64(t: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 values of a stored array (`_to_storage` output) of the safetensors dtype."""
    return (_bf16_to_f32(t) if dtype == "BF16" else t).astype(np.float64)


def quantize_rtn(W: np.ndarray, g_idx: np.ndarray, G: int, bits: int, sym: bool, style: str,
                 scale_dtype: str = "F16", zmin: int = 0):
    """RTN-quantize W [N, K] with groups given by g_idx [K] (each group the same size).
    Returns (q [N, K] unsigned codes, z [N, G] unsigned zero points, scales as stored ([N, G], BF16 as bits),
    s [N, G] float64 of the stored scales, Wd [N, K] float64 = (q - z[:, g_idx]) * s[:, g_idx]).
    style: "awq" (AutoAWQ's quantizer), "gptq" / "ct" (min/max range always including 0)."""
    N, K = W.shape
    maxq, mid = (1 << bits) - 1, 1 << (bits - 1)
    gi = np.asarray(g_idx, np.int64)
    trivial = bool(np.all(gi[1:] >= gi[:-1]))
    order = None if trivial else np.argsort(gi, kind="stable")
    Wg = (W if trivial else W[:, order]).reshape(N, G, K // G)
    if sym:
        amax = np.abs(Wg).max(-1)
        s = amax / (mid - 1) if style == "awq" else 2 * amax / maxq
        s_t = _to_storage(np.maximum(s, 1e-4), scale_dtype)
        s64 = _stored_f64(s_t, scale_dtype)
        z = np.full((N, G), mid, np.int64)
    else:
        mx, mn = Wg.max(-1), Wg.min(-1)
        if style != "awq":  # GPTQ and compressed-tensors observers include 0 in the range
            mx, mn = np.maximum(mx, 0), np.minimum(mn, 0)
        s_t = _to_storage(np.maximum((mx - mn) / maxq, 1e-4), scale_dtype)
        s64 = _stored_f64(s_t, scale_dtype)
        z = np.clip(np.round(-mn / s64), zmin, maxq).astype(np.int64)
    qg = np.round(Wg / s64[..., None])
    qg += z[..., None]
    np.clip(qg, 0, maxq, out=qg)
    Wdg = (qg - z[..., None]) * s64[..., None]
    qg = qg.astype(np.int64).reshape(N, K)
    Wdg = Wdg.reshape(N, K)
    if trivial:
        return qg, z, s_t, s64, Wdg
    q, Wd = np.empty_like(qg), np.empty_like(Wdg)
    q[:, order], Wd[:, order] = qg, Wdg
    return q, z, s_t, s64, Wd


def _g_idx(K: int, g: int, desc_act: bool, rng) -> np.ndarray:
    base = np.arange(K, dtype=np.int64) // g
    if desc_act:  # act-order: a permutation of the trivial assignment, exactly g members per group (fmt §3)
        base = base[rng.permutation(K)]
    return base


def _module_tensors_spec(lin: Linear, mq: Quant | None, dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of the tensors a module stores, in the order its producer registers them."""
    p, N, K = lin.prefix, lin.out, lin.inp
    bias = [(f"{p}.bias", dtype, (N,))] if lin.bias else []
    if mq is None:
        return [(f"{p}.weight", dtype, (N, K))] + bias
    pf = 32 // mq.bits
    g = K if mq.group_size == -1 else mq.group_size
    G = K // g
    sd = mq.scale_dtype
    if mq.method == "awq":   # fmt §1
        return [(f"{p}.qweight", "I32", (K, N // 8)), (f"{p}.qzeros", "I32", (G, N // 8)),
                (f"{p}.scales", sd, (G, N))] + bias
    if mq.method == "gptq":  # fmt §3
        return [(f"{p}.qweight", "I32", (K // pf, N)), (f"{p}.qzeros", "I32", (G, N // pf)),
                (f"{p}.scales", sd, (G, N)), (f"{p}.g_idx", "I32", (K,))] + bias
    if mq.method == "ct":    # fmt §4
        out = [(f"{p}.weight_packed", "I32", (N, K // pf)), (f"{p}.weight_scale", sd, (N, G))]
        if not mq.sym:
            out.append((f"{p}.weight_zero_point", "I32", (N // pf, G)))
        out.append((f"{p}.weight_shape", "I64", (2,)))
        if mq.desc_act:
            out.append((f"{p}.weight_g_idx", "I32", (K,)))
        return out + bias
    raise ValueError(mq.method)


def _check_module(lin: Linear, mq: Quant):
    N, K = lin.out, lin.inp
    g = K if mq.group_size == -1 else mq.group_size
    pf = 32 // mq.bits
    if g <= 0 or K % g:
        raise ValueError(f"{lin.prefix}: in_features {K} is not a multiple of group_size {g}")
    if mq.method == "awq" and N % 8:
        raise ValueError(f"{lin.prefix}: AWQ needs out_features % 8 == 0, got {N}")
    if mq.method == "gptq" and (K % pf or N % pf):
        raise ValueError(f"{lin.prefix}: GPTQ packing needs K, N % {pf} == 0, got {K}, {N}")
    if mq.method == "ct" and (K % pf or (not mq.sym and N % pf)):
        raise ValueError(f"{lin.prefix}: CT packing needs K (and N if asym) % {pf} == 0, got {K}, {N}")


def _quantize_module(lin: Linear, mq: Quant, W: np.ndarray, rng):
    """-> (tensors {name: stored array}, W_deq float64, q, z, g_idx)."""
    p, N, K = lin.prefix, lin.out, lin.inp
    b = mq.bits
    g = K if mq.group_size == -1 else mq.group_size
    G = K // g
    gi = _g_idx(K, g, mq.desc_act and mq.method in ("gptq", "ct"), rng)
    style = {"awq": "awq", "gptq": "gptq", "ct": "ct"}[mq.method]
    zmin = 1 if (mq.method == "gptq" and not mq.sym and not mq.v2) else 0  # v1 cannot store z = 0 (fmt §3)
    q, z, s_t, s64, Wd = quantize_rtn(W, gi, G, b, mq.sym, style, mq.scale_dtype, zmin)
    t: dict[str, np.ndarray] = {}
    if mq.method == "awq":
        t[f"{p}.qweight"] = awq_pack(q.T)
        t[f"{p}.qzeros"] = awq_pack(z.T)
        t[f"{p}.scales"] = np.ascontiguousarray(s_t.T)
    elif mq.method == "gptq":
        t[f"{p}.qweight"] = pack(q.T, b, 0)
        t[f"{p}.qzeros"] = pack((z if mq.v2 else z - 1).T, b, 1)
        t[f"{p}.scales"] = np.ascontiguousarray(s_t.T)
        t[f"{p}.g_idx"] = gi.astype(np.int32)
    else:
        t[f"{p}.weight_packed"] = pack(q, b, 1)
        t[f"{p}.weight_scale"] = np.ascontiguousarray(s_t)
        if not mq.sym:
            t[f"{p}.weight_zero_point"] = pack(z, b, 0)
        t[f"{p}.weight_shape"] = np.array([N, K], dtype=np.int64)
        if mq.desc_act:
            t[f"{p}.weight_g_idx"] = gi.astype(np.int32)
    return t, Wd, q, z, gi


# --------------------------------------------------------------------------------------------------
# Architectures: the state-dict layout, module by module
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plain:
    name: str
    shape: tuple[int, ...]
    kind: str  # "norm" | "embed" | "bias_norm" | "rand" | "inv_freq"


def effective_model(model: Model) -> Model:
    """Fill MoE defaults when `experts == 0` for an MoE arch (see module docstring)."""
    if model.arch not in ARCHS:
        raise ValueError(f"unknown arch {model.arch!r}; one of {ARCHS}")
    if model.arch not in MOE_ARCHS:
        return model
    r = {}
    if model.experts == 0:
        r["experts"] = 4
        if model.arch == "deepseek_v2":
            r["n_shared_experts"] = model.n_shared_experts or 2
            r["first_k_dense"] = model.first_k_dense or 1
    if model.arch != "mixtral" and model.moe_intermediate == 0:
        r["moe_intermediate"] = 640
    if model.arch == "qwen2_moe" and model.shared_intermediate == 0:
        r["shared_intermediate"] = 1152
    m = dataclasses.replace(model, **r)
    if m.arch == "deepseek_v2":
        m = dataclasses.replace(m, shared_intermediate=m.n_shared_experts * m.moe_intermediate)
    return m


def _mla_dims(m: Model) -> dict:
    # Tiny DeepSeek-V2 MLA: all dims multiples of 8 and kv_lora_rank a multiple of 128 (kv_b_proj input).
    return {"qk_nope_head_dim": m.head_dim // 2, "qk_rope_head_dim": m.head_dim // 2, "v_head_dim": m.head_dim,
            "kv_lora_rank": max(128, m.hidden // 2)}


def _vision_dims(m: Model) -> dict:
    return {"D": 64, "depth": 2, "mlp": 256, "merge_in": 256, "patch": 14, "temporal": 2}


def _attn(m: Model, p: str, arch: str) -> list:
    H, nh, nkv, hd = m.hidden, m.heads, m.kv_heads, m.head_dim
    if arch == "phi3":
        return [Linear(f"{p}.self_attn.qkv_proj", (nh + 2 * nkv) * hd, H, False, True, "qkv"),
                Linear(f"{p}.self_attn.o_proj", H, nh * hd, False, True, "o")]
    if arch == "chatglm":
        return [Linear(f"{p}.self_attention.query_key_value", (nh + 2 * nkv) * hd, H, True, True, "qkv"),
                Linear(f"{p}.self_attention.dense", H, nh * hd, False, True, "o")]
    if arch == "deepseek_v2":
        d = _mla_dims(m)
        qk = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
        return [Linear(f"{p}.self_attn.q_proj", nh * qk, H, False, True, "mla"),
                Linear(f"{p}.self_attn.kv_a_proj_with_mqa", d["kv_lora_rank"] + d["qk_rope_head_dim"], H, False, True,
                       "mla"),
                _Plain(f"{p}.self_attn.kv_a_layernorm.weight", (d["kv_lora_rank"],), "norm"),
                Linear(f"{p}.self_attn.kv_b_proj", nh * (d["qk_nope_head_dim"] + d["v_head_dim"]), d["kv_lora_rank"],
                       False, True, "mla"),
                Linear(f"{p}.self_attn.o_proj", H, nh * d["v_head_dim"], False, True, "o")]
    bias = arch in ("qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl_nested", "internvl")
    out = [Linear(f"{p}.self_attn.q_proj", nh * hd, H, bias, True, "q"),
           Linear(f"{p}.self_attn.k_proj", nkv * hd, H, bias, True, "k"),
           Linear(f"{p}.self_attn.v_proj", nkv * hd, H, bias, True, "v"),
           Linear(f"{p}.self_attn.o_proj", H, nh * hd, False, True, "o")]
    if arch == "qwen3_moe":
        out += [_Plain(f"{p}.self_attn.q_norm.weight", (hd,), "norm"),
                _Plain(f"{p}.self_attn.k_norm.weight", (hd,), "norm")]
    return out


def _gated(p: str, H: int, I: int) -> list:
    return [Linear(f"{p}.gate_proj", I, H, False, True, "gate"),
            Linear(f"{p}.up_proj", I, H, False, True, "up"),
            Linear(f"{p}.down_proj", H, I, False, True, "down")]


def _mlp(m: Model, p: str, L: int, arch: str) -> list:
    H, I = m.hidden, m.intermediate
    if arch == "phi3":
        return [Linear(f"{p}.mlp.gate_up_proj", 2 * I, H, False, True, "gate_up"),
                Linear(f"{p}.mlp.down_proj", H, I, False, True, "down")]
    if arch == "chatglm":
        return [Linear(f"{p}.mlp.dense_h_to_4h", 2 * I, H, False, True, "gate_up"),
                Linear(f"{p}.mlp.dense_4h_to_h", H, I, False, True, "down")]
    if arch == "mixtral":
        out = [Linear(f"{p}.block_sparse_moe.gate", m.experts, H, False, False, "router")]
        for e in range(m.experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            out += [Linear(f"{q}.w1", I, H, False, True, "gate"), Linear(f"{q}.w2", H, I, False, True, "down"),
                    Linear(f"{q}.w3", I, H, False, True, "up")]
        return out
    if arch in ("qwen2_moe", "qwen3_moe", "deepseek_v2"):
        dense = L < m.first_k_dense
        if dense:
            return _gated(f"{p}.mlp", H, I)
        out = [Linear(f"{p}.mlp.gate", m.experts, H, False, False, "router")]
        for e in range(m.experts):
            out += _gated(f"{p}.mlp.experts.{e}", H, m.moe_intermediate)
        if arch == "qwen2_moe":
            out += _gated(f"{p}.mlp.shared_expert", H, m.shared_intermediate)
            out.append(Linear(f"{p}.mlp.shared_expert_gate", 1, H, False, False, "router"))
        if arch == "deepseek_v2" and m.n_shared_experts:
            out += _gated(f"{p}.mlp.shared_experts", H, m.n_shared_experts * m.moe_intermediate)
        return out
    return _gated(f"{p}.mlp", H, I)


def _decoder(m: Model, arch: str, layers_prefix: str) -> list:
    out = []
    for L in range(m.layers):
        p = f"{layers_prefix}.{L}"
        if arch == "chatglm":
            out.append(_Plain(f"{p}.input_layernorm.weight", (m.hidden,), "norm"))
            out += _attn(m, p, arch)
            out.append(_Plain(f"{p}.post_attention_layernorm.weight", (m.hidden,), "norm"))
            out += _mlp(m, p, L, arch)
        else:  # HF decoder layers register self_attn, mlp, then the two norms
            out += _attn(m, p, arch)
            out += _mlp(m, p, L, arch)
            out.append(_Plain(f"{p}.input_layernorm.weight", (m.hidden,), "norm"))
            out.append(_Plain(f"{p}.post_attention_layernorm.weight", (m.hidden,), "norm"))
    return out


def _vision(m: Model, arch: str) -> list:
    """Tiny unquantized vision towers with the real tensor names."""
    v = _vision_dims(m)
    D = v["D"]
    out: list = []
    if arch in ("qwen2_vl", "qwen2_5_vl_nested"):
        vp = "visual" if arch == "qwen2_vl" else "model.visual"
        out.append(_Plain(f"{vp}.patch_embed.proj.weight", (D, 3, v["temporal"], v["patch"], v["patch"]), "rand"))
        for i in range(v["depth"]):
            b = f"{vp}.blocks.{i}"
            if arch == "qwen2_vl":  # LayerNorm + fc1/fc2 (QuickGELU)
                out += [_Plain(f"{b}.norm1.weight", (D,), "norm"), _Plain(f"{b}.norm1.bias", (D,), "bias_norm"),
                        _Plain(f"{b}.norm2.weight", (D,), "norm"), _Plain(f"{b}.norm2.bias", (D,), "bias_norm"),
                        Linear(f"{b}.attn.qkv", 3 * D, D, True, False, "vision"),
                        Linear(f"{b}.attn.proj", D, D, True, False, "vision"),
                        Linear(f"{b}.mlp.fc1", v["mlp"], D, True, False, "vision"),
                        Linear(f"{b}.mlp.fc2", D, v["mlp"], True, False, "vision")]
            else:  # Qwen2.5-VL: RMSNorm + gated SiLU MLP with biases
                out += [_Plain(f"{b}.norm1.weight", (D,), "norm"), _Plain(f"{b}.norm2.weight", (D,), "norm"),
                        Linear(f"{b}.attn.qkv", 3 * D, D, True, False, "vision"),
                        Linear(f"{b}.attn.proj", D, D, True, False, "vision"),
                        Linear(f"{b}.mlp.gate_proj", v["mlp"], D, True, False, "vision"),
                        Linear(f"{b}.mlp.up_proj", v["mlp"], D, True, False, "vision"),
                        Linear(f"{b}.mlp.down_proj", D, v["mlp"], True, False, "vision")]
        out.append(_Plain(f"{vp}.merger.ln_q.weight", (D,), "norm"))
        if arch == "qwen2_vl":
            out.append(_Plain(f"{vp}.merger.ln_q.bias", (D,), "bias_norm"))
        out += [Linear(f"{vp}.merger.mlp.0", v["merge_in"], v["merge_in"], True, False, "vision"),
                Linear(f"{vp}.merger.mlp.2", m.hidden, v["merge_in"], True, False, "vision")]
    elif arch == "internvl":
        vp = "vision_model"
        n_pos = (56 // v["patch"]) ** 2 + 1
        out += [_Plain(f"{vp}.embeddings.class_embedding", (1, 1, D), "rand"),
                _Plain(f"{vp}.embeddings.patch_embedding.weight", (D, 3, v["patch"], v["patch"]), "rand"),
                _Plain(f"{vp}.embeddings.patch_embedding.bias", (D,), "bias_norm"),
                _Plain(f"{vp}.embeddings.position_embedding", (1, n_pos, D), "rand")]
        for i in range(v["depth"]):
            b = f"{vp}.encoder.layers.{i}"
            out += [_Plain(f"{b}.ls1", (D,), "norm"), _Plain(f"{b}.ls2", (D,), "norm"),
                    Linear(f"{b}.attn.qkv", 3 * D, D, True, False, "vision"),
                    Linear(f"{b}.attn.proj", D, D, True, False, "vision"),
                    Linear(f"{b}.mlp.fc1", v["mlp"], D, True, False, "vision"),
                    Linear(f"{b}.mlp.fc2", D, v["mlp"], True, False, "vision"),
                    _Plain(f"{b}.norm1.weight", (D,), "norm"), _Plain(f"{b}.norm1.bias", (D,), "bias_norm"),
                    _Plain(f"{b}.norm2.weight", (D,), "norm"), _Plain(f"{b}.norm2.bias", (D,), "bias_norm")]
        out += [_Plain("mlp1.0.weight", (4 * D,), "norm"), _Plain("mlp1.0.bias", (4 * D,), "bias_norm"),
                Linear("mlp1.1", m.hidden, 4 * D, True, False, "vision"),
                Linear("mlp1.3", m.hidden, m.hidden, True, False, "vision")]
    return out


def _layout(m: Model) -> list:
    """State-dict order of the whole checkpoint: Linear modules and plain tensors."""
    a, H, V = m.arch, m.hidden, m.vocab
    if a == "chatglm":
        return ([_Plain("transformer.embedding.word_embeddings.weight", (V, H), "embed"),
                 _Plain("transformer.rotary_pos_emb.inv_freq", (m.head_dim // 4,), "inv_freq")]
                + _decoder(m, a, "transformer.encoder.layers")
                + [_Plain("transformer.encoder.final_layernorm.weight", (H,), "norm"),
                   Linear("transformer.output_layer", V, H, False, False, "lm_head")])
    if a == "internvl":
        return (_vision(m, a)
                + [_Plain("language_model.model.embed_tokens.weight", (V, H), "embed")]
                + _decoder(m, a, "language_model.model.layers")
                + [_Plain("language_model.model.norm.weight", (H,), "norm"),
                   Linear("language_model.lm_head", V, H, False, False, "lm_head")])
    if a == "qwen2_5_vl_nested":
        return (_vision(m, a)
                + [_Plain("model.language_model.embed_tokens.weight", (V, H), "embed")]
                + _decoder(m, a, "model.language_model.layers")
                + [_Plain("model.language_model.norm.weight", (H,), "norm"),
                   Linear("lm_head", V, H, False, False, "lm_head")])
    body = ([_Plain("model.embed_tokens.weight", (V, H), "embed")] + _decoder(m, a, "model.layers")
            + [_Plain("model.norm.weight", (H,), "norm"), Linear("lm_head", V, H, False, False, "lm_head")])
    if a == "qwen2_vl":
        return _vision(m, a) + body
    return body


def arch_linears(model: Model) -> list[Linear]:
    """Every linear module of the (effective) model, in state-dict order."""
    return [e for e in _layout(effective_model(model)) if isinstance(e, Linear)]


# --------------------------------------------------------------------------------------------------
# config.json per architecture
# --------------------------------------------------------------------------------------------------

def _llm_common(m: Model, dtype_name: str) -> dict:
    return {"hidden_size": m.hidden, "intermediate_size": m.intermediate, "num_hidden_layers": m.layers,
            "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads, "vocab_size": m.vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
            "initializer_range": 0.02, "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True,
            "bos_token_id": m.vocab - 3, "eos_token_id": m.vocab - 2, "torch_dtype": dtype_name}


def _qwen2_keys(m: Model) -> dict:
    d = {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": m.layers}
    if m.hidden // m.heads != m.head_dim:  # Qwen2 derives head_dim; write it only when it differs
        d["head_dim"] = m.head_dim
    return d


def _mrope(m: Model) -> dict:
    half = m.head_dim // 2
    t = half // 4
    return {"type": "mrope", "mrope_section": [t, (half - t) // 2, half - t - (half - t) // 2]}


def _arch_config(m: Model, dtype_name: str) -> dict:
    a = m.arch
    base = _llm_common(m, dtype_name)
    v = _vision_dims(m)
    if a == "qwen2":
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **base, **_qwen2_keys(m)}
    if a == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **base, "head_dim": m.head_dim,
                "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "rope_scaling": None,
                "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
    if a == "mixtral":
        c = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **base, "num_local_experts": m.experts,
             "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "output_router_logits": False,
             "sliding_window": None, "rms_norm_eps": 1e-5}
        if m.hidden // m.heads != m.head_dim:
            c["head_dim"] = m.head_dim
        return c
    if a == "qwen2_moe":
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **base, **_qwen2_keys(m),
                "moe_intermediate_size": m.moe_intermediate, "shared_expert_intermediate_size": m.shared_intermediate,
                "num_experts": m.experts, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                "mlp_only_layers": list(range(m.first_k_dense)), "norm_topk_prob": False,
                "output_router_logits": False, "router_aux_loss_coef": 0.001}
    if a == "qwen3_moe":
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **base, "head_dim": m.head_dim,
                "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": m.layers, "moe_intermediate_size": m.moe_intermediate, "num_experts": m.experts,
                "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": list(range(m.first_k_dense)),
                "norm_topk_prob": True, "output_router_logits": False, "router_aux_loss_coef": 0.001,
                "rope_scaling": None}
    if a == "qwen2_vl":
        return {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", **base,
                **_qwen2_keys(m), "rope_scaling": _mrope(m), "vision_start_token_id": m.vocab - 8,
                "vision_end_token_id": m.vocab - 7, "vision_token_id": m.vocab - 6, "image_token_id": m.vocab - 5,
                "video_token_id": m.vocab - 4,
                "vision_config": {"depth": v["depth"], "embed_dim": v["D"], "mlp_ratio": v["mlp"] // v["D"],
                                  "num_heads": 4, "in_chans": 3, "hidden_size": m.hidden, "patch_size": v["patch"],
                                  "spatial_merge_size": 2, "temporal_patch_size": v["temporal"]}}
    if a == "qwen2_5_vl_nested":
        text = {"model_type": "qwen2_5_vl_text", **base, **_qwen2_keys(m), "rope_scaling": _mrope(m),
                "layer_types": ["full_attention"] * m.layers}
        text["dtype"] = text.pop("torch_dtype")
        return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                "dtype": dtype_name, "image_token_id": m.vocab - 5, "video_token_id": m.vocab - 4,
                "vision_start_token_id": m.vocab - 8, "vision_end_token_id": m.vocab - 7,
                "tie_word_embeddings": False, "text_config": text,
                "vision_config": {"model_type": "qwen2_5_vl", "depth": v["depth"], "hidden_size": v["D"],
                                  "intermediate_size": v["mlp"], "num_heads": 4, "out_hidden_size": m.hidden,
                                  "fullatt_block_indexes": [v["depth"] - 1], "window_size": 112,
                                  "patch_size": v["patch"], "spatial_merge_size": 2,
                                  "temporal_patch_size": v["temporal"], "tokens_per_second": 2,
                                  "in_channels": 3, "hidden_act": "silu", "dtype": dtype_name},
                "transformers_version": "4.57.1"}
    if a == "internvl":
        llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **base, **_qwen2_keys(m)}
        return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "torch_dtype": dtype_name,
                "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                             "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                             "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
                "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 56, "max_dynamic_patch": 12,
                "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1, "template": "internvl2_5",
                "use_thumbnail": True, "llm_config": llm,
                "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                                  "hidden_size": v["D"], "intermediate_size": v["mlp"], "num_attention_heads": 4,
                                  "num_hidden_layers": v["depth"], "image_size": 56, "patch_size": v["patch"],
                                  "qkv_bias": True, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
                                  "hidden_act": "gelu", "torch_dtype": dtype_name}}
    if a == "phi3":
        return {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **base,
                "original_max_position_embeddings": 4096, "rope_scaling": None, "rope_theta": 250000.0,
                "sliding_window": None, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "rms_norm_eps": 1e-5,
                "pad_token_id": m.vocab - 1, **({"head_dim": m.head_dim} if m.hidden // m.heads != m.head_dim else {})}
    if a == "chatglm":
        return {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
                "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                             "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                             "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
                "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
                "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
                "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "classifier_dropout": None,
                "eos_token_id": [m.vocab - 2, m.vocab - 1], "pad_token_id": m.vocab - 3,
                "ffn_hidden_size": m.intermediate, "fp32_residual_connection": False, "hidden_dropout": 0.0,
                "hidden_size": m.hidden, "kv_channels": m.head_dim, "layernorm_epsilon": 1.5625e-07,
                "multi_query_attention": True, "multi_query_group_num": m.kv_heads,
                "num_attention_heads": m.heads, "num_layers": m.layers, "original_rope": True,
                "padded_vocab_size": m.vocab, "post_layer_norm": True, "rmsnorm": True, "rope_ratio": 500,
                "seq_length": 4096, "use_cache": True, "torch_dtype": dtype_name, "tie_word_embeddings": False,
                "transformers_version": "4.44.0"}
    if a == "deepseek_v2":
        d = _mla_dims(m)
        return {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", **base,
                "num_key_value_heads": m.heads, "moe_intermediate_size": m.moe_intermediate,
                "n_routed_experts": m.experts, "n_shared_experts": m.n_shared_experts, "num_experts_per_tok": 2,
                "first_k_dense_replace": m.first_k_dense, "moe_layer_freq": 1, "kv_lora_rank": d["kv_lora_rank"],
                "q_lora_rank": None, "qk_nope_head_dim": d["qk_nope_head_dim"],
                "qk_rope_head_dim": d["qk_rope_head_dim"], "v_head_dim": d["v_head_dim"], "topk_method": "greedy",
                "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
                "norm_topk_prob": False, "aux_loss_alpha": 0.001, "seq_aux": True, "rope_scaling": None,
                "attention_bias": False}
    raise ValueError(a)


def _unquantized_names(lins: list[Linear]) -> list[str]:
    return [x.prefix for x in lins if x.role == "router"]


def _vision_roots(arch: str) -> list[str]:
    return {"qwen2_vl": ["visual"], "qwen2_5_vl_nested": ["model.visual"],
            "internvl": ["vision_model", "mlp1"]}.get(arch, [])


def _quant_config(m: Model, qt: Quant, lins: list[Linear]) -> dict | None:
    if qt.method == "awq":  # fmt §1, AutoAWQ to_transformers_dict
        skip = ["gate"] if m.arch == "mixtral" else _unquantized_names(lins)  # hugging-quants Mixtral: ["gate"]
        skip += ["visual"] if m.arch in ("qwen2_vl", "qwen2_5_vl_nested") else _vision_roots(m.arch)
        return {"quant_method": "awq", "bits": qt.bits, "group_size": qt.group_size, "zero_point": not qt.sym,
                "version": "gemm", "modules_to_not_convert": skip or None}
    if qt.method == "gptq":  # fmt §3
        c = {"quant_method": "gptq", "bits": qt.bits, "group_size": qt.group_size, "desc_act": qt.desc_act,
             "sym": qt.sym, "true_sequential": True, "damp_percent": 0.01, "static_groups": False,
             "checkpoint_format": qt.checkpoint_format, "pack_dtype": "int32", "lm_head": False}
        if qt.v2:  # GPTQModel writes these aliases
            c["format"] = qt.checkpoint_format
            c["meta"] = {"quantizer": ["gptqmodel:4.0.0"]}
        if qt.dynamic is not None:
            c["dynamic"] = qt.dynamic
        return c
    if qt.method == "ct":  # fmt §4
        lm_head = [x.prefix for x in lins if x.role == "lm_head"]
        ignore = lm_head + _unquantized_names(lins) + [f"re:{r}.*" for r in _vision_roots(m.arch)]
        w = {"num_bits": qt.bits, "type": "int", "symmetric": qt.sym,
             "strategy": "channel" if qt.group_size == -1 else "group",
             "group_size": None if qt.group_size == -1 else qt.group_size,
             "actorder": "group" if qt.desc_act else None, "dynamic": False, "observer": "minmax",
             "block_structure": None, "observer_kwargs": {}}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "global_compression_ratio": None,
                "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": w,
                                              "input_activations": None, "output_activations": None}},
                "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
                "version": "0.11.0"}
    return None


def _resolve(qt: Quant, lin: Linear) -> Quant | None:
    """Per-module quantization: None = stored as plain `.weight`. GPTQModel `dynamic` (fmt §3): first matching
    rule wins, "-:" = skip, "+:" or bare = overrides (re.match on the module name, as GPTQModel does)."""
    if qt.method not in QUANTIZED or not lin.quantizable:
        return None
    if qt.method == "gptq" and qt.dynamic:
        for pat, over in qt.dynamic.items():
            if pat.startswith("-:"):
                if re.match(pat[2:], lin.prefix):
                    return None
            elif re.match(pat[2:] if pat.startswith("+:") else pat, lin.prefix):
                allowed = {k: over[k] for k in ("bits", "group_size", "sym", "desc_act") if k in over}
                return dataclasses.replace(qt, dynamic=None, **allowed)
    return dataclasses.replace(qt, dynamic=None)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None) -> tuple[bytes, int]:
    """safetensors header for tensors laid out contiguously from offset 0 in the given order.
    -> (8-byte LE length + JSON padded with spaces to a multiple of 8, total data bytes)."""
    h: dict = {"__metadata__": metadata} if metadata else {}
    off = 0
    for name, dt, shape in entries:
        n = _NBYTES[dt] * math.prod(shape)
        h[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    body = json.dumps(h, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, off


def write_safetensors(file, entries: list[tuple[str, str, np.ndarray]], metadata: dict | None = None) -> None:
    """Write (name, safetensors dtype, array) entries as one safetensors file, laid out as safetensors'
    `serialize` lays them out (dtype order descending, then name): the files match `save_file`'s byte for byte.
    BF16 arrays are uint16 bit patterns."""
    order = sorted(entries, key=lambda e: (-_ST_RANK.index(e[1]), e[0]))
    head, _ = encode_header([(n, dt, tuple(a.shape)) for n, dt, a in order], metadata)
    with open(file, "wb") as fh:
        fh.write(head)
        for _, dt, a in order:
            fh.write(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())


def _split(specs: list, shards: int) -> list[list]:
    sizes = [_NBYTES[dt] * math.prod(sh) for _, dt, sh in specs]
    total = max(sum(sizes), 1)
    out: list[list] = [[] for _ in range(max(1, shards))]
    before = 0
    for spec, n in zip(specs, sizes):
        out[min(len(out) - 1, before * len(out) // total)].append(spec)
        before += n
    return [s for s in out if s]


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _init_plain(e: _Plain, rng, dtype: str) -> np.ndarray:
    if e.kind == "norm":
        a = 1.0 + 0.1 * rng.standard_normal(e.shape)
    elif e.kind == "inv_freq":
        a = 1.0 / (10000 ** (np.arange(0, 2 * e.shape[0], 2) / (4 * e.shape[0])))
    elif e.kind == "bias_norm":
        a = 0.02 * rng.standard_normal(e.shape)
    else:
        a = 0.02 * rng.standard_normal(e.shape)
    return _to_storage(a, dtype)


def _random_weight(rng, N: int, K: int) -> np.ndarray:
    # Uniform values with per-row and per-input-column magnitudes: groups get distinct scales, so a wrong
    # group index or transposed scale shows up in the dequantized weight.
    return (rng.uniform(-1, 1, (N, K)) * rng.uniform(0.5, 1.5, (N, 1)) * rng.uniform(0.5, 1.5, (1, K))
            * (0.5 / math.sqrt(K)))


_TOKENIZER_CONFIG = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
                     "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 32768,
                     "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                     "errors": "replace", "split_special_tokens": False}
_CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
                  " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                  "{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")


def _write_tagalongs(path: Path, m: Model, qt: Quant, config: dict):
    vocab = {f"t{i}": i for i in range(16)}
    vocab.update({"<|endoftext|>": 16, "<|im_start|>": 17, "<|im_end|>": 18})
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}
                            for c, i in vocab.items() if c.startswith("<|")],
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
    (path / "tokenizer.json").write_text(json.dumps(tok, indent=2) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": m.vocab - 3, "eos_token_id": [m.vocab - 2, m.vocab - 1], "do_sample": True,
         "temperature": 0.7, "top_p": 0.8, "transformers_version": "4.51.3"}, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(_CHAT_TEMPLATE)
    (path / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n\n"
                                  "(test fixture stub)\n")
    tag = {"awq": "awq", "gptq": "gptq", "ct": "compressed-tensors"}.get(qt.method, qt.method)
    (path / "README.md").write_text(
        f"---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        f"base_model: test/tiny-{m.arch}\ntags:\n- {tag}\n- test-fixture\n---\n\n"
        f"# tiny-{m.arch}-{tag}\n\nRandom {m.layers}-layer `{config['architectures'][0]}` checkpoint "
        f"({qt.method}, {qt.bits}-bit, group size {qt.group_size}) written by tests/factory.py.\n")
    for name in config.get("auto_map", {}).values():  # remote-code files named by auto_map
        mod = name.split(".")[0]
        (path / f"{mod}.py").write_text(f'"""{mod}: remote-code stub written by tests/factory.py."""\n')


def build_checkpoint(path, model: Model = Model(), quant: Quant = Quant("awq"), *, shards: int = 3, seed: int = 0,
                     data: bool = True) -> Fixture:
    """Write a tiny checkpoint for `model` in format `quant` under `path` and describe it.
    data=False: sparse header-only shards (right headers, files truncated to full size, no tensor bytes,
    `weights` empty) -- for modelling huge real configs in milliseconds."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a rebuild with fewer shards must not leave old shards behind
    m = effective_model(model)
    qt = quant
    if qt.method not in METHODS:
        raise ValueError(f"unknown method {qt.method!r}")
    if qt.method in QUANTIZED:
        if qt.bits not in (4, 8) or (qt.method == "awq" and qt.bits != 4):
            raise ValueError(f"{qt.method}: unsupported bits {qt.bits}")
        if qt.scale_dtype not in ("F16", "BF16"):
            raise ValueError(f"scale_dtype {qt.scale_dtype!r}")
        if qt.checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"checkpoint_format {qt.checkpoint_format!r}")
    dtype = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}.get(qt.method, qt.scale_dtype)

    layout = _layout(m)
    lins = [e for e in layout if isinstance(e, Linear)]
    mquant = {x.prefix: _resolve(qt, x) for x in lins}
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    for e in layout:
        if isinstance(e, Linear):
            if mquant[e.prefix] is not None:
                _check_module(e, mquant[e.prefix])
            specs += _module_tensors_spec(e, mquant[e.prefix], dtype)
        else:
            specs.append((e.name, dtype, e.shape))
    groups = _split(specs, shards)
    names = [_shard_name(i, len(groups)) for i in range(len(groups))]
    weight_map = {s[0]: names[i] for i, grp in enumerate(groups) for s in grp}

    fx = Fixture(path=path, model=m, quant=qt, weights={}, biases={}, config={},
                 linears={x.prefix: x for x in lins}, module_quant=mquant,
                 tensors={n: (dt, tuple(sh)) for n, dt, sh in specs}, weight_map=weight_map, shard_names=names,
                 dtype=dtype)

    if data:
        rng = np.random.default_rng(seed)
        store: dict[str, np.ndarray] = {}
        for e in layout:
            if isinstance(e, _Plain):
                store[e.name] = _init_plain(e, rng, dtype)
                fx.others[e.name] = _stored_f64(store[e.name], dtype)
                continue
            W = _random_weight(rng, e.out, e.inp)
            mq = mquant[e.prefix]
            fx.original[e.prefix] = W
            if mq is None:
                t = _to_storage(W, dtype)
                store[f"{e.prefix}.weight"] = t
                fx.weights[e.prefix] = _stored_f64(t, dtype)
            else:
                ts, Wd, q, z, gi = _quantize_module(e, mq, W, rng)
                store.update(ts)
                fx.weights[e.prefix] = Wd
                fx.codes[e.prefix] = (q, z)
                fx.g_idx[e.prefix] = gi
            if e.bias:
                b = _to_storage(0.05 * rng.standard_normal(e.out), dtype)
                store[f"{e.prefix}.bias"] = b
                fx.biases[e.prefix] = _stored_f64(b, dtype)
        for name, grp in zip(names, groups):
            for n, dt, sh in grp:
                t = store[n]
                assert t.dtype == _ST_DTYPE[dt] and tuple(t.shape) == sh, (n, t.dtype, t.shape, dt, sh)
            write_safetensors(path / name, [(n, dt, store[n]) for n, dt, _ in grp], {"format": "pt"})
    else:
        for name, grp in zip(names, groups):
            head, nbytes = encode_header(grp, {"format": "pt"})
            f = path / name
            with open(f, "wb") as fh:
                fh.write(head)
            os.truncate(f, len(head) + nbytes)

    if len(names) > 1:
        total = sum(_NBYTES[dt] * math.prod(sh) for _, dt, sh in specs)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config = _arch_config(m, _TORCH_DTYPE_NAME[dtype])
    qc = _quant_config(m, qt, lins)
    if qc is not None:
        config["quantization_config"] = qc
    config.setdefault("transformers_version", "4.51.3")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    fx.config = config
    _write_tagalongs(path, m, qt, config)
    return fx


# --------------------------------------------------------------------------------------------------
# Reading and reference math
# --------------------------------------------------------------------------------------------------

def shard_files(path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def read_index(path) -> dict | None:
    f = Path(path) / "model.safetensors.index.json"
    return json.loads(f.read_text()) if f.exists() else None


def _header(file) -> tuple[dict, int]:
    """-> (the JSON header of one safetensors file, offset of its data). No validation: `load_tensors`
    leaves that to safetensors."""
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


def load_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of every shard in a checkpoint dir (or of one file), as numpy; bf16 -> float32.
    safetensors' own reader opens (and so validates) every file and returns every tensor numpy has a dtype
    for; BF16 bytes are read at the offsets its header gives and widened exactly."""
    from safetensors import safe_open
    p = Path(path)
    files = [p] if p.is_file() else shard_files(p)
    out: dict[str, np.ndarray] = {}
    for f in files:
        header, start = _header(f)
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                info = header[k]
                if info["dtype"] != "BF16":
                    out[k] = st.get_tensor(k)
                    continue
                a, b = info["data_offsets"]
                raw = np.fromfile(f, dtype="<u2", count=(b - a) // 2, offset=start + a)
                out[k] = _bf16_to_f32(raw).reshape(info["shape"])
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def linear_forward(weights: dict, prefix: str, x: np.ndarray, biases: dict | None = None) -> np.ndarray:
    y = np.asarray(x, np.float64) @ np.asarray(weights[prefix], np.float64).T
    if biases and prefix in biases:
        y = y + biases[prefix]
    return y


def mlp_forward(weights: dict, prefix_gate: str, prefix_up: str | None, prefix_down: str, x: np.ndarray) -> np.ndarray:
    """float64 SiLU-gated MLP: y = down(silu(gate x) * up x). prefix_up=None: prefix_gate is a fused
    gate||up tensor [2I, H] (Phi-3 gate_up_proj, ChatGLM dense_h_to_4h), gate first half."""
    x = np.asarray(x, np.float64)
    if prefix_up is None:
        gu = np.asarray(weights[prefix_gate], np.float64)
        g, u = np.split(gu, 2, axis=0)
    else:
        g, u = np.asarray(weights[prefix_gate], np.float64), np.asarray(weights[prefix_up], np.float64)
    h = silu(x @ g.T) * (x @ u.T)
    return h @ np.asarray(weights[prefix_down], np.float64).T


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (Frobenius; plain numpy sums, no BLAS threads)."""
    d = np.asarray(a, np.float64) - b
    return float(np.sqrt(np.square(d).sum()) / max(np.sqrt(np.square(np.asarray(b, np.float64)).sum()), 1e-300))
