"""GPTQ layout (AutoGPTQ, GPTQModel, optimum; checkpoint_format 'gptq' = v1 and 'gptq_v2').

qweight [K*b/32, N] int32 packed along K (inputs), sequential; qzeros [G, N*b/32] packed along N;
scales [G, N]; g_idx [K]. W^T[k, n] = s[g_idx[k], n] * (q[k, n] - z_eff[g_idx[k], n]) with
z_eff = stored + 1 in v1 and stored in v2 (AutoGPTQ qlinear_cuda_old.py, GPTQModel
nn_modules/qlinear/__init__.py `dequantize_weight`, vLLM gptq.py `use_v2_format`).
vLLM's gptq_marlin / Machete / ExLlama for sym=True ignore qzeros and use (q - 2^(b-1)) * s.

Fills (formats-and-padding.md section 12): qweight words at the midpoint (0x88888888 / 0x80808080);
qzeros stored so that z_eff is the midpoint (v1 0x77777777 / 0x7F7F7F7F, v2 = midpoint word); scales 0;
g_idx for new rows = fresh group ids G, G+1, ... with exactly group_size members each.
All-zero words would NOT be zero weight: v1 reads stored 0 as z = 1 (note section 0).
"""

from __future__ import annotations

from awqpad.lazy import numpy as np

from awqpad.errors import InputError, UnsupportedError
from awqpad.checkpoint.formats.base import (
    MID_WORD, MID_WORD_V1_ZERO, Fill, Geometry, Insert, TensorOp, make_op, scaled, to_float64, unpack_words,
)

NAME = "gptq"
PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def claims(parts: dict) -> bool:
    qw, sc = parts.get("qweight"), parts.get("scales")
    return qw is not None and sc is not None and len(qw.shape) == 2 and qw.shape[1] == sc.shape[-1]


def readers(linear) -> tuple[str, ...]:
    base = ("v2",) if linear.gptq_v2 else ("v1-masked", "v1-unmasked")
    return base + (("marlin-sym",) if linear.sym else ())


def geometry(prefix: str, parts: dict, mq, quant) -> Geometry:
    for key in ("qweight", "qzeros", "scales"):
        if key not in parts:
            raise InputError(f"{prefix}: GPTQ module has no {key} tensor")
    qw, qz, sc = parts["qweight"], parts["qzeros"], parts["scales"]
    bits = mq.bits if mq is not None else quant.bits or 4
    if bits not in (4, 8):
        raise UnsupportedError(f"{prefix}: GPTQ {bits}-bit is not supported; only 4- and 8-bit")
    per = 32 // bits
    k, n, groups = qw.shape[0] * per, qw.shape[1], sc.shape[0]
    if qz.shape != (groups, n // per) or n % per:
        raise InputError(f"{prefix}: GPTQ qzeros shape {list(qz.shape)} does not match scales {list(sc.shape)}")
    if "g_idx" in parts and parts["g_idx"].shape != (k,):
        raise InputError(f"{prefix}: GPTQ g_idx has shape {list(parts['g_idx'].shape)}, expected [{k}]")
    group = mq.group_size if mq is not None else (quant.group_size or 128)
    if group in (-1, k) or groups == 1 and group >= k:
        group = -1
        expected = 1
    else:
        expected = -(-k // group)
    if groups != expected:
        raise InputError(
            f"{prefix}: GPTQ has {groups} scale groups but {k} inputs in groups of {group} need {expected}"
        )
    return Geometry(k, n, bits, group, groups)


def pad_ops(linear, axis: str, inserts) -> list:
    p, bits, g = linear.parts, linear.bits, linear.group_size
    per = 32 // bits
    q_fill = Fill.const(MID_WORD[bits])
    z_fill = Fill.const(MID_WORD[bits] if linear.gptq_v2 else MID_WORD_V1_ZERO[bits])
    ops = []
    if axis == "out":
        feats = scaled(inserts, 1, "", linear.prefix)
        words = scaled(inserts, per, f"GPTQ qzeros packing ({per} outputs per word)", linear.prefix)
        ops.append(make_op(p["qweight"], 1, feats, q_fill))
        ops.append(make_op(p["qzeros"], 1, words, z_fill))
        ops.append(make_op(p["scales"], 1, feats, Fill.const(0.0)))
        if "bias" in p:
            ops.append(make_op(p["bias"], 0, feats, Fill.const(0.0)))
        return ops
    if g == -1:
        raise UnsupportedError(
            f"{linear.prefix}: input padding of a per-channel (group_size -1) GPTQ linear is not supported: "
            "its single group cannot take a zero scale"
        )
    if linear.in_features % g:
        raise UnsupportedError(
            f"{linear.prefix}: GPTQ input of {linear.in_features} is not whole groups of {g}; "
            "new groups could not start on a group boundary"
        )
    words = scaled(inserts, per, f"GPTQ qweight packing ({per} inputs per word)", linear.prefix)
    groups = scaled(inserts, g, f"GPTQ input padding in whole groups of {g}", linear.prefix)
    ops.append(make_op(p["qweight"], 0, words, q_fill))
    appended = all(ins.at == linear.in_features for ins in inserts)
    if linear.desc_act and not appended:
        # Act-order: g_idx maps every input to its group, so new inputs anywhere get fresh groups
        # G, G+1, ... whose scale / zero rows are appended after the existing ones.
        total = [(linear.groups, sum(count for _, count in groups))]
        ops.append(make_op(p["qzeros"], 0, total, z_fill))
        ops.append(make_op(p["scales"], 0, total, Fill.const(0.0)))
        ops.append(fresh_group_ids_op(p["g_idx"], inserts, linear.groups, g))
        return ops
    # Positional groups (kernels that ignore g_idx read group k // g): scale / zero rows go in at the
    # matching group position.
    ops.append(make_op(p["qzeros"], 0, groups, z_fill))
    ops.append(make_op(p["scales"], 0, groups, Fill.const(0.0)))
    if "g_idx" in p:
        if appended:
            fresh = Fill("group_ids", linear.groups, g)
            ops.append(make_op(p["g_idx"], 0, scaled(inserts, 1, "", linear.prefix), fresh))
        else:
            # Inputs after a middle insertion move to later groups: g_idx is rewritten whole as the
            # positional arange(K') // g (a [K'] int32 tensor, small next to the weights).
            new_k = linear.in_features + sum(ins.count for ins in inserts)
            info = p["g_idx"]
            ops.append(TensorOp(info.name, info.dtype, tuple(info.shape), (new_k,), 0, (),
                                replace=tuple(int(i) // g for i in range(new_k))))
    return ops


def fresh_group_ids_op(info, inserts, groups: int, g: int) -> TensorOp:
    """g_idx op giving each inserted block of inputs its own fresh groups: the block inserted first
    (lowest position) gets groups G, G+1, ..., the next one continues after it; each group has g members."""
    out, start = [], groups
    for ins in sorted(inserts, key=lambda i: i.at):
        if ins.count % g:
            raise UnsupportedError(f"{info.name}: {ins.count} new inputs are not whole groups of {g}")
        out.append(Insert(ins.at, ins.count, Fill("group_ids", start, g)))
        start += ins.count // g
    added = sum(i.count for i in out)
    return TensorOp(info.name, info.dtype, tuple(info.shape), (info.shape[0] + added,), 0, tuple(i for i in out if i.count))


def dequantize(arrays: dict, linear, reader: str) -> np.ndarray:
    """W [out, in] in float64 as reader `reader` computes it."""
    bits = linear.bits
    mid = 1 << (bits - 1)
    q = unpack_words(arrays["qweight"], bits, 0)
    s = to_float64(arrays["scales"], linear.parts["scales"].dtype)
    k = q.shape[0]
    if "g_idx" in arrays:
        gi = arrays["g_idx"].astype(np.int64)
    else:
        gi = np.arange(k) // (linear.group_size if linear.group_size != -1 else k)
    if reader == "marlin-sym":
        z = np.full(s.shape, mid, dtype=np.int64)
    else:
        stored = unpack_words(arrays["qzeros"], bits, 1)
        if reader == "v2":
            z = stored
        elif reader == "v1-masked":  # AutoGPTQ qlinear_cuda_old: (stored + 1) & mask
            z = (stored + 1) & ((1 << bits) - 1)
        elif reader == "v1-unmasked":  # AutoGPTQ qlinear_cuda, vLLM gptq (v1), TurboMind: stored + 1
            z = stored + 1
        else:
            raise ValueError(reader)
    wt = (q - z[gi]).astype(np.float64) * s[gi]
    return wt.T


# Regrouping: the tensors that hold one row (or column) per group, and the group-id tensor.
GROUP_AXES = {"qzeros": 0, "scales": 0}
GROUP_IDS = "g_idx"
