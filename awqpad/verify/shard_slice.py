"""One rank's slice of one linear's packed tensors, as the engine forms it, and its float64 dequantization.

Outputs are column-parallel, inputs row-parallel with the scale / zero-point rows of exactly those
inputs; a slice that would split a packed word or a group raises ShardError (what the engine refuses).
With act-order and per-channel scales the scales are replicated on every rank and only g_idx is
sharded (vLLM's marlin_repeat_scales_on_all_ranks). Used by the MLP and attention simulations and
the zeros check.
"""

from __future__ import annotations

import numpy as np

from awqpad.checkpoint import formats
from awqpad.checkpoint.formats import fp8, nvfp4
from awqpad.checkpoint.model import Linear


class ShardError(ValueError):
    """A rank's shard cannot be formed the way the engine forms it (what the engine refuses)."""

    def __init__(self, message: str, *, kind: str = "split", rank: int | None = None, prefix: str | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind  # split | group | pack | merge
        self.rank = rank
        self.prefix = prefix


def _per(linear: Linear) -> int:
    return 32 // (linear.bits or 4)


def units(linear: Linear, dim: str) -> int:
    """Features per packed element along `dim` that a slice must not split."""
    fmt = linear.format
    if fmt == fp8.NAME:
        return fp8.shard_unit(linear, dim)  # whole scale blocks
    if fmt == "awq-gemm":
        return 8 if dim == "out" else 1
    if fmt == "gptq":
        return _per(linear)  # out: qzeros words; in: qweight words
    if fmt == "compressed-tensors":
        if dim == "in":
            return _per(linear)
        return _per(linear) if "weight_zero_point" in linear.parts else 1
    if fmt == "nvfp4":
        return 2 if dim == "in" else 1  # two e2m1 codes per byte along K
    return 1


def scales_partitioned(linear: Linear) -> bool:
    """Row-parallel scales are split by rank (else replicated: act-order, per-channel, unquantized)."""
    return linear.quantized and linear.group_size not in (None, -1) and not linear.desc_act


def slice_problem(linear: Linear, dim: str, start: int, stop: int, replicate: bool = False) -> tuple[str, str] | None:
    """(kind, text) if features [start, stop) of `dim` cannot be one rank's shard, else None."""
    n = linear.out_features if dim == "out" else linear.in_features
    what = "outputs" if dim == "out" else "inputs"
    unit = units(linear, dim)
    if linear.format == fp8.NAME:
        edge = next((e for e in (start, stop) if 0 < e < n and e % unit), None)
        if edge is None:
            return None
        return "group", (f"{linear.prefix} {what} [{start}, {stop}) split an FP8 scale block of {unit} ({edge} is not a "
                         f"multiple of {unit}), so a rank would share that block's scale with its neighbour")
    for edge in (start, stop):
        if 0 < edge < n and edge % unit:
            return "pack", (f"{what} [{start}, {stop}) of {linear.prefix} split a packed int32 word "
                            f"({unit} {what} per word; {edge} is not a multiple of {unit})")
    if dim == "in" and scales_partitioned(linear) and not replicate:
        g = linear.group_size
        if any(0 < edge < n and edge % g for edge in (start, stop)):
            parts = []
            if start % g:
                parts.append(f"starts {start % g} rows into group {start // g}")
            if stop % g and stop != n:
                parts.append(f"ends {stop % g} rows into group {stop // g}")
            return "group", (f"{linear.prefix} inputs [{start}, {stop}) = {_num((stop - start) / g)} groups of {g}: "
                             f"{' and '.join(parts)}, so its scale/zero rows would be shared with a neighbouring rank")
    return None


def take(arrays: dict, linear: Linear, dim: str, start: int, stop: int, replicate: bool = False) -> dict:
    """The packed tensors of features [start, stop) along `dim` ("out" | "in"), as vLLM shards them.

    Raises ShardError if the slice would split a packed word or (row-parallel, partitioned
    scales) a quantization group. The full range returns the arrays unchanged. `replicate`: slice
    inputs as a reader that honours g_idx does (full scale table, g_idx sliced) instead of vLLM's
    partitioned scale rows; only meaningful for linears that store g_idx.
    """
    n = linear.out_features if dim == "out" else linear.in_features
    if (start, stop) == (0, n):
        return {k: v for k, v in arrays.items() if k != "bias"}
    problem = slice_problem(linear, dim, start, stop, replicate)
    if problem is not None:
        raise ShardError(problem[1], kind=problem[0], prefix=linear.prefix)
    a, fmt = arrays, linear.format
    if fmt == fp8.NAME:
        return fp8.take(a, linear, dim, start, stop)
    g = linear.group_size if linear.group_size and linear.group_size > 0 else None
    rows = (start // g, -(-stop // g)) if (g and scales_partitioned(linear) and not replicate) else None
    per = _per(linear)
    if fmt == "awq-gemm":
        if dim == "out":
            return {"qweight": a["qweight"][:, start // 8 : stop // 8], "qzeros": a["qzeros"][:, start // 8 : stop // 8],
                    "scales": a["scales"][:, start:stop]}
        sel = slice(*rows) if rows else slice(None)
        return {"qweight": a["qweight"][start:stop], "qzeros": a["qzeros"][sel], "scales": a["scales"][sel]}
    if fmt == "gptq":
        if dim == "out":
            out = {"qweight": a["qweight"][:, start:stop], "qzeros": a["qzeros"][:, start // per : -(-stop // per)],
                   "scales": a["scales"][:, start:stop]}
            if "g_idx" in a and linear.desc_act:
                out["g_idx"] = a["g_idx"]  # column-parallel: g_idx is replicated
            return out
        out = {"qweight": a["qweight"][start // per : -(-stop // per)]}
        if rows:  # no act-order: vLLM drops g_idx and reads group k // g of the rank's own rows
            out.update(qzeros=a["qzeros"][slice(*rows)], scales=a["scales"][slice(*rows)])
        else:  # act-order / per-channel: scales and qzeros replicated, g_idx sharded
            out.update(qzeros=a["qzeros"], scales=a["scales"])
            if "g_idx" in a and (linear.desc_act or replicate):
                out["g_idx"] = a["g_idx"][start:stop]
        return out
    if fmt == "compressed-tensors":
        if dim == "out":
            out = {"weight_packed": a["weight_packed"][start:stop], "weight_scale": a["weight_scale"][start:stop]}
            if "weight_zero_point" in a:
                out["weight_zero_point"] = a["weight_zero_point"][start // per : -(-stop // per)]
            if "weight_g_idx" in a:
                out["weight_g_idx"] = a["weight_g_idx"]
            return out
        out = {"weight_packed": a["weight_packed"][:, start // per : -(-stop // per)]}
        sel = slice(*rows) if rows else slice(None)
        out["weight_scale"] = a["weight_scale"][:, sel]
        if "weight_zero_point" in a:
            out["weight_zero_point"] = a["weight_zero_point"][:, sel]
        if "weight_g_idx" in a:
            out["weight_g_idx"] = a["weight_g_idx"][start:stop]
        return out
    if fmt == "nvfp4":
        return _take_nvfp4(a, linear, dim, start, stop, rows)
    if dim == "out":
        return {"weight": a["weight"][start:stop]}
    return {"weight": a["weight"][:, start:stop]}


def _take_nvfp4(a: dict, linear: Linear, dim: str, start: int, stop: int, rows) -> dict:
    """NVFP4 shard: rows (or byte columns) of the packed weight and block scales; the per-tensor global
    scales are replicated to every rank (vLLM PerTensorScaleParameter)."""
    main, glob = nvfp4.main_tensor(linear), nvfp4.global_tensor(linear)
    out = {glob: a[glob]}
    if dim == "out":
        out.update({main: a[main][start:stop], "weight_scale": a["weight_scale"][start:stop]})
    else:
        out.update({main: a[main][:, start // 2 : -(-stop // 2)], "weight_scale": a["weight_scale"][:, slice(*rows)]})
    return out


OUT_AXIS = {
    "awq-gemm": {"qweight": 1, "qzeros": 1, "scales": 1},
    "gptq": {"qweight": 1, "qzeros": 1, "scales": 1},
    "compressed-tensors": {"weight_packed": 0, "weight_scale": 0, "weight_zero_point": 0},
    "nvfp4": {"weight_packed": 0, "weight": 0, "weight_scale": 0},
    "dense": {"weight": 0},
    fp8.NAME: {"weight": 0, "weight_scale_inv": 0, "weight_scale": 0},  # per-tensor: one scale per merged partition
}
SHARED_PARTS = ("g_idx", "weight_g_idx")
GLOBAL_PARTS = ("weight_global_scale", "weight_scale_2")  # NVFP4 per-tensor scales


def merge(pieces: list[dict], linear: Linear) -> dict:
    """vLLM's merged column-parallel parameter of one rank: the pieces' outputs stacked in order."""
    axes = OUT_AXIS[linear.format]
    out = {}
    for key in pieces[0]:
        if key in SHARED_PARTS:
            # One g_idx per merged parameter: each shard's load overwrites it (the last one wins).
            if any(not np.array_equal(p[key], pieces[0][key]) for p in pieces[1:]):
                raise ShardError(f"{linear.prefix}: gate and up store different {key}; vLLM's merged gate_up holds "
                                 "one (the last loaded), so it would read the wrong groups for the other "
                                 "(a property of the checkpoint, not of the padding)", kind="merge")
            out[key] = pieces[-1][key]
        elif key in GLOBAL_PARTS:
            # vLLM keeps one global scale per merged partition: compressed-tensors rescales each
            # partition's output, ModelOpt uses the max of them. Equal ones merge into one.
            if any(not np.array_equal(p[key], pieces[0][key]) for p in pieces[1:]):
                raise ShardError(f"{linear.prefix}: gate and up carry different NVFP4 global scales ({key}); vLLM's "
                                 "compressed-tensors path rescales each partition, ModelOpt's takes the max (a property "
                                 "of the checkpoint, not of the padding), so each is simulated with its own", kind="merge")
            out[key] = pieces[0][key]
        elif key in axes:  # (weight_shape, a full-range slice's metadata, is not part of the parameter)
            out[key] = np.concatenate([p[key] for p in pieces], axis=axes[key])
    return out


def dequantize(arrays: dict, linear: Linear, reader: str) -> np.ndarray:
    """W [out, in] float64 of (a slice of) a linear, as reader `reader` computes it."""
    fmt = formats.BY_NAME[linear.format]
    if reader not in fmt.readers(linear):
        reader = fmt.readers(linear)[0]
    return fmt.dequantize(arrays, linear, reader)


def _num(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 3)
