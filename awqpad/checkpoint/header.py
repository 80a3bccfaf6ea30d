"""Read and validate one safetensors header without touching tensor data.

The checks mirror safetensors' own `SafeTensors::read_metadata` and `Metadata::validate`
(huggingface/safetensors, safetensors/src/tensor.rs), so awqpad accepts no file the library rejects:
header length <= 100,000,000 and inside the file; UTF-8 JSON (serde_json: no NaN, numbers that fit);
`__metadata__` null or string -> string; every tensor an object with a known `dtype`, a `shape` of
integers in 0..2^64-1 (serde's `Vec<usize>`: no bools, no floats, no negatives) and `data_offsets` of
exactly two such integers; numel and numel x bits computed with overflow checks in u64, left to right
as Rust's `try_fold(1, checked_mul)` does; byte span == numel x dtype size; tensors contiguous from
offset 0 with no gaps or overlaps; data ending exactly at the end of the file. Stricter than the
library in one way: a tensor name given twice is refused (serde keeps one of them silently).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from types import MappingProxyType

from awqpad.errors import InputError
from awqpad.source import bounded_json

# safetensors dtype -> size in bits (safetensors/src/tensor.rs `Dtype::bitsize`).
DTYPE_BITS = MappingProxyType(
    {
        "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
        "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
        "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
        "I32": 32, "U32": 32, "F32": 32,
        "I64": 64, "U64": 64, "F64": 64,
    }
)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own MAX_HEADER_SIZE
U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str  # file name relative to the repo root
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    filename: str
    header_len: int
    file_size: int
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo] = field(repr=False)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _u64(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


def tensor_nbytes(dtype: str, shape: tuple[int, ...], where: str = "") -> int:
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise InputError(f"{where}unknown dtype {dtype!r}")
    numel = 1
    for dim in shape:  # Rust: shape.iter().try_fold(1usize, usize::checked_mul)
        numel *= dim
        if numel > U64_MAX:
            raise InputError(f"{where}shape {list(shape)} overflows 64 bits")
    total_bits = numel * bits
    if total_bits > U64_MAX:
        raise InputError(f"{where}shape {list(shape)} x {bits} bits overflows 64 bits")
    if total_bits % 8:
        raise InputError(f"{where}{dtype} tensor of shape {list(shape)} is not a whole number of bytes")
    return total_bits // 8


def parse_header(raw: bytes, filename: str, file_size: int) -> ShardHeader:
    """Validate the JSON header `raw` (the bytes after the 8-byte length) of a file of `file_size` bytes."""
    header_len = len(raw)
    doc = bounded_json.loads(raw, f"{filename}: safetensors header", "header", strict=True)
    if not isinstance(doc, dict):
        raise InputError(f"{filename}: safetensors header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InputError(f"{filename}: __metadata__ must map strings to strings")

    data_start = 8 + header_len
    entries = []
    for name, entry in doc.items():
        where = f"{filename}: tensor {name!r}: "
        if not isinstance(entry, dict):
            raise InputError(f"{where}entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise InputError(f"{where}missing dtype")
        if dtype not in DTYPE_BITS:
            raise InputError(f"{where}unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_u64(d) for d in shape)):
            raise InputError(f"{where}shape must be a list of non-negative integers below 2^64, got {str(shape)[:80]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_u64(o) for o in offsets)):
            raise InputError(f"{where}data_offsets must be two non-negative integers below 2^64, got {str(offsets)[:80]}")
        begin, end = offsets
        if end < begin:
            raise InputError(f"{where}data_offsets {offsets} end before they begin")
        expected = tensor_nbytes(dtype, tuple(shape), where)
        if end - begin != expected:
            raise InputError(
                f"{where}byte span {end - begin} does not match {dtype} x {shape} = {expected} bytes"
            )
        entries.append(TensorInfo(name, filename, dtype, tuple(shape), data_start + begin, data_start + end))

    entries.sort(key=lambda t: (t.begin, t.end))
    cursor = data_start
    for info in entries:
        if info.begin < cursor:
            raise InputError(f"{filename}: tensor {info.name!r} overlaps the tensor before it")
        if info.begin > cursor:
            raise InputError(f"{filename}: gap of {info.begin - cursor} bytes before tensor {info.name!r}")
        cursor = info.end
    if cursor > file_size:
        raise InputError(
            f"{filename}: tensor data runs to byte {cursor} but the file has {file_size} bytes (truncated?)"
        )
    if cursor != file_size:
        raise InputError(f"{filename}: {file_size - cursor} unexpected trailing bytes after the last tensor")
    return ShardHeader(filename, header_len, file_size, metadata, {t.name: t for t in entries})


def read_header(path: str | os.PathLike, filename: str | None = None) -> ShardHeader:
    """Read and validate the header of the safetensors file at `path` (reads 8 + header bytes only)."""
    filename = filename or os.path.basename(os.fspath(path))
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{filename}: not a regular file")
        file_size = st.st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise InputError(f"{filename}: file is {file_size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise InputError(f"{filename}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + header_len > file_size:
                raise InputError(
                    f"{filename}: header length {header_len} is larger than the file ({file_size} bytes)"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise InputError(f"{filename}: cannot read ({exc.strerror or exc})")
    return parse_header(raw, filename, file_size)


def encode_header(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    """Build the 8-byte length + JSON header for tensors given as (name, dtype, shape, nbytes) in data order.

    The JSON is padded with spaces to a multiple of 8 bytes, as safetensors' writer does, so tensor
    data starts 8-aligned.
    """
    doc: dict = {}
    if metadata is not None:
        doc["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
