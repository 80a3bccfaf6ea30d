"""regroup: a regrouped OUT splits SRC's groups exactly.

For every per-group tensor awqpad.json says was regrouped (scales, zeros, g_idx), OUT's original region
equals SRC's groups split as recorded: each new group's scale and zero are its parent's (np.repeat), and
every input row's new group id is a child of its old one (g_idx); a refined FP8 block-scale grid holds, in each
new [bn/r, bk/r] block, its parent [bn, bk] block's scale bit for bit, with exactly the refined blocks that
hold real weights (ceil(N / (bn/r)) rows, not r * ceil(N / bn)). Then, for the linears of the first
and the last decoder layer (and their experts), every reader variant of the format dequantizes SRC and
OUT to the same float64 weights, bit for bit, over the original rows and columns. The packed weights
themselves are covered by bytes-unchanged / bytes-original; the TP-simulated function by `function`.
"""

from __future__ import annotations

import time

import numpy as np

from awqpad.checkpoint import formats
from awqpad.checkpoint.formats.base import refine_blocks, regroup_ids, regrouped_shape
from awqpad.errors import UnsupportedError
from awqpad.execute.tensor_io import read_array
from awqpad.verify.context import Check, VerifyContext, make_check, not_applicable, not_compared

MAX_LISTED = 8


def _original_region(arr: np.ndarray, op) -> np.ndarray:
    """OUT's elements that come from SRC (inserted blocks along op.axis removed)."""
    keep = np.ones(arr.shape[op.axis], dtype=bool)
    shift = 0
    for ins in sorted(op.inserts, key=lambda i: i.at):
        keep[ins.at + shift : ins.at + shift + ins.count] = False
        shift += ins.count
    return np.compress(keep, arr, axis=op.axis)


def _expected(src_arr: np.ndarray, op) -> np.ndarray:
    if op.regroup_kind == "ids":
        return regroup_ids(src_arr, op.regroup).astype(src_arr.dtype)
    if op.regroup_kind == "refine":
        return refine_blocks(src_arr, op.regroup, regrouped_shape(op))
    return np.repeat(src_arr, op.regroup, axis=op.regroup_axis)


def check_regroup(ctx: VerifyContext) -> list[Check]:
    started = time.monotonic()
    ops = [op for op in ctx.ops or () if op.regroup > 1]
    if not ops:
        return []
    out, src = ctx.out, ctx.src
    problems: list[str] = []
    if src is None:
        return [not_applicable("regroup", f"no SRC to compare {len(ops)} regrouped tensors with (verify SRC OUT does)",
                               {"tensors": len(ops)})]
    tensors_compared = 0
    for op in ops:
        s_info, o_info = src.tensors.get(op.tensor), out.tensors.get(op.tensor)
        if s_info is None or o_info is None or tuple(o_info.shape) != tuple(op.new_shape):
            continue  # reported by tensors / provenance; counted as not compared below
        tensors_compared += 1
        try:
            want = _expected(read_array(src.source.root, s_info), op)
        except UnsupportedError as exc:
            problems.append(f"{op.tensor}: SRC cannot be split as recorded: {exc.message}")
            continue
        got = _original_region(read_array(ctx.root, o_info), op)
        if got.shape != want.shape or not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            what = {"ids": "group ids", "refine": "FP8 block scales"}.get(op.regroup_kind, "scale / zero rows")
            problems.append(f"{op.tensor}: OUT's {what} are not SRC's split {op.regroup} ways")
    # every reader: SRC and OUT dequantize to the same weights over the original region
    regrouped = {op.tensor for op in ops}
    # first and last of the layers that hold regrouped tensors (not of all layers: a model regrouped
    # only in some layers would otherwise have nothing chosen to compare)
    layers = sorted({lin.layer for lin in out.linears
                     if lin.layer is not None and any(i.name in regrouped for i in lin.parts.values())})
    chosen = {layers[0], layers[-1]} if layers else set()
    by_prefix = {lin.prefix: lin for lin in src.linears}
    readers_seen: set[str] = set()
    compared = 0
    for lin in out.linears:
        s_lin = by_prefix.get(lin.prefix)
        if s_lin is None or lin.layer not in chosen or not any(i.name in regrouped for i in lin.parts.values()):
            continue
        fmt = formats.BY_NAME[lin.format]
        s_arr = {p: read_array(src.source.root, i) for p, i in s_lin.parts.items()}
        o_arr = {p: read_array(ctx.root, i) for p, i in lin.parts.items()}
        for reader in fmt.readers(lin):
            readers_seen.add(reader)
            with np.errstate(all="ignore"):
                w_src = fmt.dequantize(s_arr, s_lin, reader)
                w_out = fmt.dequantize(o_arr, lin, reader)[: w_src.shape[0], : w_src.shape[1]]
            if w_src.shape != w_out.shape or not np.array_equal(w_src, w_out, equal_nan=True):
                problems.append(f"{lin.prefix}: reader {reader} dequantizes OUT differently from SRC "
                                f"({int(np.sum(w_src != w_out))} weights)")
        compared += 1
    if tensors_compared == 0:
        problems.append(not_compared(f"none of the {len(ops)} regrouped tensors awqpad.json records is in both SRC "
                                     "and OUT with the recorded shape"))
    elif compared == 0:
        problems.append(not_compared(f"no linear in SRC and OUT holds any of the {len(ops)} regrouped tensors, so no "
                                     "reader dequantized them"))
    extra = f"; ... (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    return [make_check("regroup", problems[:MAX_LISTED] + ([extra] if extra else []),
                       f"{tensors_compared} of {len(ops)} regrouped tensors hold SRC's groups split exactly (each new group's scale and zero "
                       f"= its parent's); {compared} linears dequantize bit-identically under reader(s) "
                       f"{', '.join(sorted(readers_seen)) or '-'}",
                       {"tensors": len(ops), "tensors_compared": tensors_compared, "linears_compared": compared, "readers": sorted(readers_seen)}, started)]
