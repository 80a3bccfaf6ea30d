"""Unquantized linears: weight [N, K] (fp16 / bf16 / fp32) and bias [N]. Padding appends zeros."""

from __future__ import annotations

from awqpad.lazy import numpy as np

from awqpad.errors import UnsupportedError
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
        raise unknown_layout(prefix, parts)
    return Geometry(w.shape[1], w.shape[0])


def unknown_layout(prefix: str, parts: dict) -> UnsupportedError:
    """A well-formed tensor in a layout no format module claims: the refusal names what was found."""
    w = parts["weight"]
    found = ", ".join(f"{part} {info.dtype}{list(info.shape)}" for part, info in sorted(parts.items()))
    what = {"F8_E5M2": "FP8 E5M2 weights (awqpad pads FP8 e4m3 layouts only)",
            "F8_E4M3": "FP8 e4m3 weights without a block / channel / tensor scale layout awqpad knows",
            "F8_E8M0": "E8M0 (exponent-only) values as weights"}.get(w.dtype, f"{w.dtype} weights with no known quantization layout")
    return UnsupportedError(f"{prefix}: {what}; found {found}")


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


GROUP_AXES: dict = {}
GROUP_IDS = None
