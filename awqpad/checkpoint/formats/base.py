"""What every format module shares: pad operations as data, fill encoding, nibble (un)packing.

A pad is expressed per tensor as a TensorOp: along one axis, blocks of new elements are inserted at
given positions of the original axis. Formats translate a logical insertion on a linear's in/out
features (e.g. "append 128 outputs") into TensorOps on their packed tensors (e.g. "append 16 int32
columns of 0x88888888 to qweight").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from awqpad.lazy import numpy as np

from awqpad.checkpoint.formats import float8
from awqpad.errors import UnsupportedError

# Midpoint words: every nibble / byte = 2^(b-1), the code whose (q - zero) is 0 when zero is the midpoint.
# (As signed int32 values, the way int32 tensors store them: 0x88888888 - 2**32.)
MID_WORD = {4: 0x88888888 - (1 << 32), 8: 0x80808080 - (1 << 32)}
# GPTQ v1 stores zero - 1, so the effective midpoint zero is stored as 7 / 127 per value.
MID_WORD_V1_ZERO = {4: 0x77777777, 8: 0x7F7F7F7F}


@dataclass(frozen=True)
class Fill:
    """What new elements hold: a constant, or fresh GPTQ/CT group ids `start + i // group_size`."""

    kind: str  # "const" | "group_ids"
    value: float | int = 0
    group_size: int = 0

    @staticmethod
    def const(value: float | int) -> "Fill":
        return Fill("const", value.item() if hasattr(value, "item") else value)  # numpy scalars -> numbers


@dataclass(frozen=True)
class Insert:
    at: int  # position in the ORIGINAL axis before which the new elements go (== length: append)
    count: int
    fill: Fill


@dataclass(frozen=True)
class TensorOp:
    tensor: str
    dtype: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    axis: int
    inserts: tuple[Insert, ...] = ()
    replace: tuple[int, ...] | None = None  # new values of a tiny metadata tensor (CT weight_shape)
    # Regrouping (applied first, then the inserts): every group of `regroup_axis` is split into `regroup`
    # groups. "repeat": scale / zero rows repeated (np.repeat); "ids": a g_idx, each group's members split in
    # order into `regroup` fresh groups r*g + i; "refine": a 2-D FP8 block-scale grid, every cell repeated r x r
    # and the refined cells wholly past the tensor end dropped (regrouped_shape). old_shape is the source shape;
    # inserts are in regrouped units.
    regroup: int = 1
    regroup_axis: int = 0
    regroup_kind: str = "repeat"  # repeat | ids | refine


@dataclass(frozen=True)
class LogicalInsert:
    """Insert `count` new features before feature `at` of a linear's input or output dimension."""

    at: int
    count: int


def make_op(info, axis: int, inserts: list[tuple[int, int]], fill: Fill) -> TensorOp:
    """TensorOp for tensor `info` (a header TensorInfo) inserting (at, count) blocks along `axis`."""
    new_shape = list(info.shape)
    new_shape[axis] += sum(count for _, count in inserts)
    return TensorOp(
        info.name,
        info.dtype,
        tuple(info.shape),
        tuple(new_shape),
        axis,
        tuple(Insert(at, count, fill) for at, count in inserts if count),
    )


def scaled(inserts: tuple[LogicalInsert, ...], unit: int, what: str, prefix: str) -> list[tuple[int, int]]:
    """Convert feature-level inserts to tensor-level ones when `unit` features share one element."""
    out = []
    for ins in inserts:
        if ins.at % unit or ins.count % unit:
            raise UnsupportedError(
                f"{prefix}: cannot insert {ins.count} features at {ins.at}: {what} needs multiples of {unit}"
            )
        out.append((ins.at // unit, ins.count // unit))
    return out


# --- packing helpers (numpy, little-endian, value i of a word at bits i*b) ---------------------


def unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> integer codes, each word expanding to 32/bits values along `axis`."""
    per = 32 // bits
    w = np.moveaxis(words.astype(np.int64) & 0xFFFFFFFF, axis, -1)
    shifts = np.arange(per, dtype=np.int64) * bits
    vals = (w[..., None] >> shifts) & ((1 << bits) - 1)
    vals = vals.reshape(*w.shape[:-1], w.shape[-1] * per)
    return np.moveaxis(vals, -1, axis)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


NUMPY_DTYPES = {  # numpy dtype names (numpy itself is imported on first use)
    "F16": "float16", "F32": "float32", "F64": "float64",
    "I8": "int8", "U8": "uint8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64", "BOOL": "bool",
}


def to_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    """Decode raw tensor values (BF16 as uint16 bit patterns, float8 as uint8 bytes) to float64."""
    if dtype in float8.DTYPES:
        return float8.table(dtype)[array.astype(np.uint8)]
    if dtype == "BF16":
        return bf16_to_f32(array).astype(np.float64)
    return array.astype(np.float64)




def fill_bytes(dtype: str, value: float | int) -> bytes:
    """One element of `dtype` holding `value`, as raw little-endian bytes."""
    if dtype.startswith("F8_"):
        # Only values the format holds exactly; +0.0 is byte 0x00, never 0x80 (-0.0 in e4m3fn, NaN in
        # ROCm's e4m3fnuz).
        return float8.encode(dtype, value)
    if dtype == "BF16":
        return (np.array([value], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    np_type = NUMPY_DTYPES.get(dtype)
    if np_type is None:
        raise UnsupportedError(f"cannot pad a tensor of dtype {dtype}")
    return np.array([value]).astype(np.dtype(np_type).newbyteorder("<")).tobytes()


@dataclass(frozen=True)
class Geometry:
    """A quantized or dense linear's logical shape, read off its tensors."""

    in_features: int
    out_features: int
    bits: int | None = None
    group_size: int | None = None  # -1: one group over the whole input (per-channel)
    groups: int | None = None
    notes: tuple[str, ...] = field(default=())
    block_n: int | None = None  # FP8 block scales: outputs per scale row (1: per-channel)


# --- regrouping: split every quantization group into r smaller ones (weights untouched) ----------


def regroup_ids(g_idx: np.ndarray, r: int) -> np.ndarray:
    """Each group's members, in input order, split into r consecutive fresh groups: r*g + rank // (n/r).

    For positional groups (g_idx = k // g) this is k // (g/r); for act-order it splits whichever rows a
    group holds. Every group must hold a multiple of r members (the plan checks whole groups)."""
    g_idx = g_idx.astype(np.int64)
    order = np.argsort(g_idx, kind="stable")
    counts = np.bincount(g_idx)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty_like(g_idx)
    rank[order] = np.arange(g_idx.size) - starts[g_idx[order]]
    size = counts[g_idx] // r
    if np.any(counts[counts > 0] % r):
        raise UnsupportedError(f"a group's members do not split into {r} equal parts")
    return r * g_idx + rank // size


def regroup_ops(linear, r: int, axes: dict[str, int], ids: str | None) -> list[TensorOp]:
    """TensorOps splitting every group of `linear` into r: tensors in `axes` repeat rows along their group
    axis; the g_idx tensor `ids` (if present) gets fresh ids."""
    ops = []
    for part, axis in axes.items():
        info = linear.parts.get(part)
        if info is None:
            continue
        shape = list(info.shape)
        shape[axis] *= r
        ops.append(TensorOp(info.name, info.dtype, tuple(info.shape), tuple(shape), axis, (), None, r, axis, "repeat"))
    info = linear.parts.get(ids) if ids else None
    if info is not None:
        ops.append(TensorOp(info.name, info.dtype, tuple(info.shape), tuple(info.shape), 0, (), None, r, 0, "ids"))
    return ops


def regrouped_shape(op: TensorOp) -> tuple[int, ...]:
    """The shape of a regrouped tensor before its inserts (new_shape less what the inserts add)."""
    shape = list(op.new_shape)
    shape[op.axis] -= sum(ins.count for ins in op.inserts)
    return tuple(shape)


def refine_blocks(scales: np.ndarray, r: int, shape: tuple[int, ...]) -> np.ndarray:
    """Block scales [ceil(N/bn), ceil(K/bk)] refined to blocks [bn/r, bk/r]: [ceil(N/(bn/r)), ceil(K/(bk/r))].

    Every refined block lies inside one parent block, so it takes the parent's scale (np.repeat on both
    axes); a partial last parent block yields fewer than r refined ones, so the repeated grid is cut to
    `shape` (N = 576 in blocks of 128 -> 64: 9 rows, not 10). Raises if `shape` is not such a cut."""
    rows, cols = scales.shape
    if len(shape) != 2 or not all(r * (old - 1) < new <= r * old for old, new in zip((rows, cols), shape)):
        raise UnsupportedError(f"block scales {[rows, cols]} cannot be refined {r} ways to {list(shape)}")
    return np.repeat(np.repeat(scales, r, axis=0), r, axis=1)[: shape[0], : shape[1]]
