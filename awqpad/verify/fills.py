"""Fills and dequantized zeros: the words each inserted element must hold (read by the streamed
pad-fill scan), and the `zeros` check: every padded row / column dequantizes to exactly 0.0 under
every reader variant of its format."""

from __future__ import annotations

import time

import numpy as np

from awqpad.checkpoint import formats
from awqpad.checkpoint.formats import fp8, nvfp4
from awqpad.checkpoint.formats.base import Fill, TensorOp, bf16_to_f32, fill_bytes
from awqpad.checkpoint.model import Linear
from awqpad.execute.tensor_io import ARRAY_DTYPES, RAW_DTYPES, itemsize
from awqpad.verify import shard_slice
from awqpad.verify.context import Check, VerifyContext, make_check, map_array, not_applicable, not_compared
from awqpad.verify.structure import PROVENANCE


def decode_words(raw: np.ndarray, dtype: str):
    """Raw little-endian words -> Python values of `dtype` (for messages)."""
    if dtype == "BF16":
        return bf16_to_f32(raw.astype(np.uint16)).astype(np.float64).tolist()
    return raw.view(np.dtype(ARRAY_DTYPES[dtype]).newbyteorder("<")).tolist()


def expected_fill(fill: Fill, dtype: str, axis_start: int, axis_stop: int, inner: int) -> np.ndarray:
    """Raw words that axis positions [axis_start, axis_stop) of an insert hold, each repeated `inner` times."""
    raw = np.dtype(RAW_DTYPES[itemsize(dtype)]).newbyteorder("<")
    n = axis_stop - axis_start
    if fill.kind == "const":
        one = np.frombuffer(fill_bytes(dtype, fill.value), dtype=raw)
        return np.broadcast_to(one, (n, inner))
    if fill.kind == "group_ids":
        ids = fill.value + np.arange(axis_start, axis_stop, dtype=np.int64) // max(int(fill.group_size), 1)
        words = ids.astype(np.dtype(ARRAY_DTYPES[dtype]).newbyteorder("<")).view(raw)
        return np.broadcast_to(words[:, None], (n, inner))
    raise ValueError(f"unknown fill kind {fill.kind!r}")


def fill_label(fill: Fill, dtype: str) -> str:
    """How a fill reads in a message: fresh group ids, the hex of an integer word, or nothing."""
    if fill.kind == "group_ids":
        return f" (group ids {fill.value} + i // {fill.group_size})"
    if dtype in ("I32", "U32") and isinstance(fill.value, int):
        return f" (word 0x{fill.value & 0xFFFFFFFF:08X})"
    return ""


def uncovered(op: TensorOp) -> str | None:
    """Why some elements of a padded tensor are neither its original region nor a recorded insert, or None.
    (Regrouped ops record inserts in regrouped units: the regroup check covers them.)"""
    if op.regroup > 1 or len(op.new_shape) != len(op.old_shape) or not 0 <= op.axis < len(op.new_shape):
        return None
    grown = [op.new_shape[i] - op.old_shape[i] for i in range(len(op.new_shape))]
    inserted = sum(i.count for i in op.inserts)
    if grown[op.axis] == inserted and not any(g for i, g in enumerate(grown) if i != op.axis):
        return None
    return (f"{op.tensor}: {PROVENANCE} records it grown from {list(op.old_shape)} to {list(op.new_shape)} but inserts "
            f"{inserted} element(s) along axis {op.axis}, so the rest is neither SRC's bytes nor a recorded fill")


def check_zeros(ctx: VerifyContext) -> list[Check]:
    """Every padded row / column of every padded linear dequantizes to exactly 0.0 under every reader.

    Once pad-fill has confirmed a linear's inserted bytes, its padded region's dequantized values
    depend only on its format, geometry and recorded fills (never on the original weights: padded
    outputs have their own scale columns, padded inputs their own groups), so linears that agree on
    all of those (the experts of a MoE, the layers of a dense model) are dequantized once. A linear
    with any pad-fill problem is dequantized on its own.
    """
    started = time.monotonic()
    out = ctx.out
    claimed = [op.tensor for op in ctx.ops if op.inserts or uncovered(op)]
    in_linears = {info.name for lin in out.linears for info in lin.parts.values()}
    if not claimed or all(n in out.tensors and n not in in_linears for n in claimed):
        regrouped = sum(1 for op in ctx.ops if op.regroup > 1)
        reason = (f"no linear was padded; {len(claimed)} padded tensors are not linear weights (e.g. {claimed[0]}), "
                  "pad-fill checks them" if claimed else
                  f"nothing was padded: the {regrouped} recorded ops only regroup (see regroup)" if regrouped else
                  "nothing was padded")
        return [not_applicable("zeros", reason, {"linears": 0, "dequantized": 0, "weights": 0, "readers": []})]
    # regroup-only ops insert nothing: no padded region to check (verify/regrouped.py checks them)
    ops = {op.tensor: op for op in ctx.ops if op.inserts or op.replace is not None or op.regroup == 1}
    padded = [lin for lin in out.linears if any(info.name in ops for info in lin.parts.values())]
    problems: list[str] = []
    readers_seen: set[str] = set()
    elements = dequantized = 0
    done: dict[tuple, tuple[str, list[str]]] = {}  # signature -> (linear checked, problems found)
    what = {"out": "outputs", "in": "inputs"}
    with ctx.progress(sum(lin.nbytes for lin in padded), "checking zeros") as advance:
        for lin in padded:
            advance(lin.nbytes)
            key = _signature(lin, ops)
            clean = not any(info.name in ctx.fill_failed for info in lin.parts.values())
            if clean and key in done:
                problems += [p.replace(done[key][0], lin.prefix, 1) for p in done[key][1]]
                continue
            found: list[str] = []
            try:
                ranges = padded_ranges(lin, ops)
            except ValueError as exc:
                found.append(str(exc))
                ranges = []
            arrays = {part: map_array(ctx.root, info) for part, info in lin.parts.items()}
            fmt = formats.BY_NAME[lin.format]
            for reader in getattr(fmt, "zero_readers", fmt.readers)(lin):
                readers_seen.add(reader)
                for dim, start, stop in ranges:
                    for variant, keep in _variants(lin, dim):
                        try:
                            with np.errstate(all="ignore"):
                                w = _padded_weights(arrays, lin, dim, start, stop, keep, reader)
                        except shard_slice.ShardError as exc:
                            found.append(f"{lin.prefix}: padded {what[dim]} [{start}, {stop}) cannot be sliced: {exc.message}")
                            continue
                        elements += w.size
                        bad = np.count_nonzero(w)  # NaN counts as non-zero
                        if bad:
                            finite = np.abs(w[np.isfinite(w)])
                            worst = f"max |w| = {finite.max():.6g}" if finite.size else "all NaN/inf"
                            found.append(f"{lin.prefix}: padded {what[dim]} [{start}, {stop}) dequantize to non-zero under "
                                         f"reader {reader}{variant} ({bad} weights, {worst})")
            del arrays
            if clean:
                done.setdefault(key, (lin.prefix, found))
            dequantized += 1
            problems += found
    if not elements and not problems:  # a check that compared nothing must not pass
        first = next((n for n in claimed if n in in_linears), claimed[0])
        problems.append(not_compared(
            f"{PROVENANCE} records {len(claimed)} padded tensors but no padded row or column of a linear was "
            f"dequantized: " + (f"{len(padded)} padded linears record no inserted rows / columns in their "
                                f"{', '.join(sorted({main_tensor(lin) for lin in padded}))} (e.g. {first})" if padded
                                else f"none of them is a tensor of a linear of OUT (e.g. {first})")))
    return [make_check("zeros", problems,
                       f"{elements} padded weights of {len(padded)} linears ({dequantized} dequantized, the rest "
                       f"identical paddings) are exactly 0.0 under reader(s) {', '.join(sorted(readers_seen)) or '-'}",
                       {"linears": len(padded), "dequantized": dequantized, "weights": elements,
                        "readers": sorted(readers_seen)},
                       started)]


def _padded_weights(arrays, lin: Linear, dim: str, start: int, stop: int, keep: bool, reader: str) -> np.ndarray:
    """Dequantized padded features [start, stop). An FP8 padding that completes a partial block starts
    inside that block: slice from the block's first feature (so the block's own scale is used) and
    keep only the padded part."""
    unit = shard_slice.units(lin, dim) if lin.format == fp8.NAME else 1
    first = start // unit * unit
    if lin.format == fp8.NAME:
        w = fp8.dequantize(fp8.take(arrays, lin, dim, first, stop), lin, reader)  # zero_readers, not only readers
    else:
        w = shard_slice.dequantize(shard_slice.take(arrays, lin, dim, start, stop, replicate=keep), lin, reader)
    return w[start - first:] if dim == "out" else w[:, start - first:]


def _signature(lin: Linear, ops: dict[str, TensorOp]) -> tuple:
    """What a linear's padded region depends on: format, geometry, and each part's dtype, shape and op."""
    parts = []
    for part, info in sorted(lin.parts.items()):
        op = ops.get(info.name)
        parts.append((part, info.dtype, tuple(info.shape), None if op is None else
                      (op.axis, tuple(op.old_shape), tuple((i.at, i.count, i.fill) for i in op.inserts), op.replace)))
    # A partial FP8 block's padding is read with that block's original scale: not shared between linears.
    own = None
    if lin.format == fp8.NAME and (op := ops.get(lin.parts["weight"].name)) is not None:
        unit = shard_slice.units(lin, "out" if op.axis == 0 else "in")
        own = lin.prefix if any(i.at % unit for i in op.inserts) else None
    return (lin.format, lin.bits, lin.group_size, lin.sym, lin.desc_act, lin.gptq_v2, lin.in_features,
            lin.out_features, tuple(parts), own)


def _variants(lin: Linear, dim: str) -> list[tuple[str, bool]]:
    """How to slice padded inputs: as vLLM shards them, and (if the linear has g_idx) as a reader
    that honours g_idx with the full scale table (AutoGPTQ / GPTQModel torch path, HF decompress)."""
    if dim == "in" and any(p in lin.parts for p in shard_slice.SHARED_PARTS) and shard_slice.scales_partitioned(lin):
        return [("", False), (" with g_idx", True)]
    return [("", False)]


# The tensor that carries a linear's weights, and what one element along each axis is in features.
MAIN_TENSOR = {"awq-gemm": "qweight", "gptq": "qweight", "compressed-tensors": "weight_packed", "dense": "weight",
               fp8.NAME: "weight"}


def main_tensor(lin: Linear) -> str:
    return nvfp4.main_tensor(lin) if lin.format == "nvfp4" else MAIN_TENSOR[lin.format]


def _axis_features(lin: Linear) -> dict[int, tuple[str, int]]:
    per = 32 // (lin.bits or 4)
    return {
        "awq-gemm": {0: ("in", 1), 1: ("out", 8)},
        "gptq": {0: ("in", per), 1: ("out", 1)},
        "compressed-tensors": {0: ("out", 1), 1: ("in", per)},
        "nvfp4": {0: ("out", 1), 1: ("in", 2)},
        "dense": {0: ("out", 1), 1: ("in", 1)},
        fp8.NAME: {0: ("out", 1), 1: ("in", 1)},
    }[lin.format]


def padded_ranges(lin: Linear, ops: dict[str, TensorOp]) -> list[tuple[str, int, int]]:
    """(dim, start, stop) feature ranges of OUT's linear that the recorded ops inserted."""
    main = lin.parts.get(main_tensor(lin))
    op = ops.get(main.name) if main is not None else None
    if op is None:
        raise ValueError(f"{lin.prefix}: some of its tensors are padded but its {main_tensor(lin)} is not")
    dim, unit = _axis_features(lin)[op.axis]
    out, shift = [], 0
    for ins in sorted(op.inserts, key=lambda i: i.at):
        start = (ins.at + shift) * unit
        out.append((dim, start, start + ins.count * unit))
        shift += ins.count
    return out
