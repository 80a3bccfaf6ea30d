"""compressed-tensors `pack-quantized` (llm-compressor W4A16/W8A16, its AWQ and GPTQ recipes).

weight_packed [N, K*b/32] int32 packed along K, stored = signed + 2^(b-1); weight_scale [N, G];
weight_zero_point [N*b/32, G] packed along N (asymmetric only); weight_shape [2] = [N, K];
weight_g_idx [K] (act-order "group"). W[n, k] = (q[n, k] - zp[n, g(k)]) * s[n, g(k)]
(compressed-tensors compressors/pack_quantized, vLLM compressed_tensors_wNa16.py).

Fills (formats-and-padding.md section 12): packed words at the midpoint (signed 0), zero-point words
at the midpoint (signed 0), scales 0, weight_shape rewritten, fresh group ids for new input rows.
"""

from __future__ import annotations

from awqpad.lazy import numpy as np

from awqpad.errors import InputError, UnsupportedError
from awqpad.checkpoint.formats.base import MID_WORD, Fill, Geometry, TensorOp, make_op, scaled, to_float64, unpack_words
from awqpad.checkpoint.formats.gptq import fresh_group_ids_op

NAME = "compressed-tensors"
PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "bias")


def claims(parts: dict) -> bool:
    return "weight_packed" in parts


def readers(linear) -> tuple[str, ...]:
    return ("ct",)


def geometry(prefix: str, parts: dict, mq, quant) -> Geometry:
    if "weight_scale" not in parts:
        raise InputError(f"{prefix}: compressed-tensors module has no weight_scale tensor")
    wp, ws = parts["weight_packed"], parts["weight_scale"]
    bits = mq.bits if mq is not None else 4
    if bits not in (4, 8):
        raise UnsupportedError(f"{prefix}: compressed-tensors {bits}-bit is not supported; only 4- and 8-bit")
    per = 32 // bits
    n, k, groups = wp.shape[0], wp.shape[1] * per, ws.shape[1]
    if ws.shape[0] != n:
        raise InputError(f"{prefix}: weight_scale shape {list(ws.shape)} does not match weight_packed {list(wp.shape)}")
    zp = parts.get("weight_zero_point")
    if zp is not None and zp.shape != (-(-n // per), groups):
        raise InputError(f"{prefix}: weight_zero_point shape {list(zp.shape)} does not match {n} outputs, {groups} groups")
    group = mq.group_size if mq is not None else -1
    if group in (-1, k) or groups == 1:
        group, expected = -1, 1
    else:
        expected = -(-k // group)
    if groups != expected:
        raise InputError(f"{prefix}: {groups} scale groups but {k} inputs in groups of {group} need {expected}")
    return Geometry(k, n, bits, group, groups)


def _shape_op(linear, axis: str, inserts) -> TensorOp | None:
    info = linear.parts.get("weight_shape")
    if info is None:
        return None
    added = sum(i.count for i in inserts)
    n, k = linear.out_features, linear.in_features
    new = (n + added, k) if axis == "out" else (n, k + added)
    return TensorOp(info.name, info.dtype, info.shape, info.shape, 0, (), replace=new)


def pad_ops(linear, axis: str, inserts) -> list:
    p, bits, g = linear.parts, linear.bits, linear.group_size
    per = 32 // bits
    mid = Fill.const(MID_WORD[bits])
    ops = []
    feats = scaled(inserts, 1, "", linear.prefix)
    if axis == "out":
        ops.append(make_op(p["weight_packed"], 0, feats, mid))
        ops.append(make_op(p["weight_scale"], 0, feats, Fill.const(0.0)))
        if "weight_zero_point" in p:
            words = scaled(inserts, per, f"zero-point packing ({per} outputs per word)", linear.prefix)
            ops.append(make_op(p["weight_zero_point"], 0, words, mid))
        if "bias" in p:
            ops.append(make_op(p["bias"], 0, feats, Fill.const(0.0)))
    else:
        if g == -1:
            raise UnsupportedError(
                f"{linear.prefix}: input padding of a per-channel compressed-tensors linear is not supported: "
                "its single group cannot take a zero scale"
            )
        words = scaled(inserts, per, f"weight packing ({per} inputs per word)", linear.prefix)
        groups = scaled(inserts, g, f"input padding in whole groups of {g}", linear.prefix)
        ops.append(make_op(p["weight_packed"], 1, words, mid))
        if "weight_g_idx" in p:
            # Act-order (actorder=group): new inputs, wherever they go, get fresh groups G, G+1, ...
            # whose scale / zero-point columns are appended after the existing ones.
            total = [(linear.groups, sum(count for _, count in groups))]
            ops.append(make_op(p["weight_scale"], 1, total, Fill.const(0.0)))
            if "weight_zero_point" in p:
                ops.append(make_op(p["weight_zero_point"], 1, total, mid))
            ops.append(fresh_group_ids_op(p["weight_g_idx"], inserts, linear.groups, g))
        else:
            # Positional groups: scale / zero-point columns go in at the matching group position.
            ops.append(make_op(p["weight_scale"], 1, groups, Fill.const(0.0)))
            if "weight_zero_point" in p:
                ops.append(make_op(p["weight_zero_point"], 1, groups, mid))
    shape_op = _shape_op(linear, axis, inserts)
    if shape_op is not None:
        ops.append(shape_op)
    return ops


def dequantize(arrays: dict, linear, reader: str = "ct") -> np.ndarray:
    bits = linear.bits
    mid = 1 << (bits - 1)
    q = unpack_words(arrays["weight_packed"], bits, 1) - mid  # [N, K] signed
    s = to_float64(arrays["weight_scale"], linear.parts["weight_scale"].dtype)
    k = q.shape[1]
    if "weight_g_idx" in arrays:
        gi = arrays["weight_g_idx"].astype(np.int64)
    else:
        gi = np.arange(k) // (k // s.shape[1] if linear.group_size == -1 else linear.group_size)
    w = q.astype(np.float64)
    if "weight_zero_point" in arrays:
        zp = unpack_words(arrays["weight_zero_point"], bits, 0)[: q.shape[0]] - mid  # [N, G]
        w = w - zp[:, gi]
    return w * s[:, gi]


# Regrouping: the tensors that hold one row (or column) per group, and the group-id tensor.
GROUP_AXES = {"weight_scale": 1, "weight_zero_point": 1}
GROUP_IDS = "weight_g_idx"
