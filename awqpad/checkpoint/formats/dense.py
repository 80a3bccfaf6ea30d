"""Unquantized linears: weight [N, K] (fp16 / bf16 / fp32) and bias [N]. Padding appends zeros."""

from __future__ import annotations

import numpy as np

from awqpad.errors import InputError
from awqpad.checkpoint.formats.base import Fill, Geometry, make_op, scaled, to_float64

NAME = "dense"
PARTS = ("weight", "bias")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def claims(parts: dict) -> bool:
    return "weight" in parts and len(parts["weight"].shape) == 2


def readers(linear) -> tuple[str, ...]:
    return ("dense",)


def geometry(prefix: str, parts: dict, mq, quant) -> Geometry:
    w = parts["weight"]
    if w.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"{prefix}: weight has dtype {w.dtype}; expected a float dtype (or this is a quantization format "
            "awqpad does not know)"
        )
    return Geometry(w.shape[1], w.shape[0])


def pad_ops(linear, axis: str, inserts) -> list:
    p = linear.parts
    feats = scaled(inserts, 1, "", linear.prefix)
    if axis == "out":
        ops = [make_op(p["weight"], 0, feats, Fill.const(0.0))]
        if "bias" in p:
            ops.append(make_op(p["bias"], 0, feats, Fill.const(0.0)))
        return ops
    return [make_op(p["weight"], 1, feats, Fill.const(0.0))]


def dequantize(arrays: dict, linear, reader: str = "dense") -> np.ndarray:
    return to_float64(arrays["weight"], linear.parts["weight"].dtype)
