"""AWQ "GEMM" layout (AutoAWQ version='gemm', llm-awq v1, LMDeploy export).

qweight [K, N/8] int32 packed along N (outputs) with slot order [0,2,4,6,1,3,5,7]; qzeros [G, N/8]
packed the same way; scales [G, N]. W^T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]
(AutoAWQ awq/utils/packing_utils.py `dequantize_gemm`; vLLM awq_triton.py; LMDeploy AWQFormat).

Fills (formats-and-padding.md section 12): qweight and qzeros words 0x88888888 (q = z = 8, so
q - z = 0 even in readers that drop zeros or repack with borrows, e.g. the ExLlama conversion), scales 0.
"""

from __future__ import annotations

from awqpad.lazy import numpy as np

from awqpad.errors import InputError, UnsupportedError
from awqpad.checkpoint.formats.base import MID_WORD, Fill, Geometry, make_op, scaled, to_float64, unpack_words

NAME = "awq-gemm"
PARTS = ("qweight", "qzeros", "scales", "bias")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # slot i of a word holds output 8c + AWQ_ORDER[i]


def claims(parts: dict) -> bool:
    # AWQ packs along N: qweight columns * 8 == scales columns. (GPTQ packs along K instead.)
    qw, sc = parts.get("qweight"), parts.get("scales")
    return qw is not None and sc is not None and len(qw.shape) == 2 and qw.shape[1] * 8 == sc.shape[-1]


def readers(linear) -> tuple[str, ...]:
    return ("awq",)


def geometry(prefix: str, parts: dict, mq, quant) -> Geometry:
    for key in ("qweight", "qzeros", "scales"):
        if key not in parts:
            raise InputError(f"{prefix}: AWQ module has no {key} tensor")
    qw, qz, sc = parts["qweight"], parts["qzeros"], parts["scales"]
    if qw.dtype != "I32" or qz.dtype != "I32":
        raise InputError(f"{prefix}: AWQ qweight/qzeros must be I32, got {qw.dtype}/{qz.dtype}")
    k, n = qw.shape[0], sc.shape[1]
    groups = sc.shape[0]
    if qz.shape != (groups, n // 8):
        raise InputError(f"{prefix}: AWQ qzeros shape {list(qz.shape)} does not match scales {list(sc.shape)}")
    if groups == 0 or k % groups:
        raise InputError(f"{prefix}: AWQ has {k} input rows but {groups} scale groups")
    group = k // groups
    if groups == 1 and (mq is None or mq.group_size in (-1, k)):
        group = -1
    elif mq is not None and mq.group_size != group:  # incl. -1 (per-channel) against tensors with several groups
        raise InputError(
            f"{prefix}: tensors give group size {group} but quantization_config says {mq.group_size}"
        )
    return Geometry(k, n, 4, group, groups)


def pad_ops(linear, axis: str, inserts) -> list:
    p, g = linear.parts, linear.group_size
    ops = []
    if axis == "out":
        words = scaled(inserts, 8, "AWQ output padding (8 outputs per int32 word)", linear.prefix)
        feats = scaled(inserts, 1, "", linear.prefix)
        ops += [make_op(p["qweight"], 1, words, Fill.const(MID_WORD[4]))]
        ops += [make_op(p["qzeros"], 1, words, Fill.const(MID_WORD[4]))]
        ops += [make_op(p["scales"], 1, feats, Fill.const(0.0))]
        if "bias" in p:
            ops.append(make_op(p["bias"], 0, feats, Fill.const(0.0)))
        return ops
    if g == -1:
        raise UnsupportedError(
            f"{linear.prefix}: input padding of a per-channel (group_size -1) AWQ linear is not supported: "
            "its single group cannot take a zero scale"
        )
    rows = scaled(inserts, 1, "", linear.prefix)
    groups = scaled(inserts, g, f"AWQ input padding in whole groups of {g}", linear.prefix)
    ops.append(make_op(p["qweight"], 0, rows, Fill.const(MID_WORD[4])))
    ops.append(make_op(p["qzeros"], 0, groups, Fill.const(MID_WORD[4])))
    ops.append(make_op(p["scales"], 0, groups, Fill.const(0.0)))
    return ops


def unpack_awq(words: np.ndarray) -> np.ndarray:
    """[R, C] words -> [R, 8C] codes in logical output order."""
    vals = unpack_words(words, 4, 1)
    r, n = vals.shape
    inverse = np.argsort(AWQ_ORDER)  # logical j lives in slot inverse[j]
    return vals.reshape(r, n // 8, 8)[:, :, inverse].reshape(r, n)


def dequantize(arrays: dict, linear, reader: str = "awq") -> np.ndarray:
    """W [out, in] in float64."""
    q = unpack_awq(arrays["qweight"])
    z = unpack_awq(arrays["qzeros"])
    s = to_float64(arrays["scales"], linear.parts["scales"].dtype)
    k = q.shape[0]
    group_of_row = np.arange(k) // (k // s.shape[0])
    wt = (q - z[group_of_row]).astype(np.float64) * s[group_of_row]
    return wt.T


# Regrouping: the tensors that hold one row (or column) per group, and the group-id tensor.
GROUP_AXES = {"qzeros": 0, "scales": 0}
GROUP_IDS = None
