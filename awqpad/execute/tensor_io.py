"""Bounded reads of tensor data: whole small tensors as numpy arrays, big ones in row blocks.

Reads go through os.pread on a plain file descriptor (no mmap), so what a read costs in memory is
exactly the buffer asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from awqpad.errors import InputError
from awqpad.checkpoint.header import DTYPE_BITS, TensorInfo

RAW_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
ARRAY_DTYPES = {
    "F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16,  # BF16 stays raw bits
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32, "U32": np.uint32,
    "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "F8_E8M0": np.uint8,  # float8 stays raw bytes
}


def itemsize(dtype: str) -> int:
    bits = DTYPE_BITS[dtype]
    if bits % 8:
        raise InputError(f"sub-byte dtype {dtype} cannot be padded element-wise")
    return bits // 8


def pread_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    chunks, done = [], 0
    while done < size:
        chunk = os.pread(fd, min(size - done, 1 << 26), offset + done)
        if not chunk:
            raise InputError(f"{what}: file ended after {done} of {size} bytes (truncated?)")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def read_array(root: Path, info: TensorInfo) -> np.ndarray:
    """The whole tensor as a numpy array of its dtype (BF16 as uint16 bit patterns)."""
    with open(root / info.shard, "rb") as fh:
        raw = pread_exact(fh.fileno(), info.nbytes, info.begin, f"{info.shard}: {info.name}")
    return np.frombuffer(raw, dtype=np.dtype(ARRAY_DTYPES[info.dtype]).newbyteorder("<")).reshape(info.shape)


def iter_row_blocks(root: Path, info: TensorInfo, max_bytes: int = 16 << 20) -> Iterator[tuple[int, np.ndarray]]:
    """(first_row, block) over dim 0 of a tensor, each block at most ~max_bytes."""
    rows = info.shape[0] if info.shape else 1
    row_bytes = info.nbytes // rows if rows else 0
    step = max(1, max_bytes // row_bytes) if row_bytes else rows or 1
    dtype = np.dtype(ARRAY_DTYPES[info.dtype]).newbyteorder("<")
    with open(root / info.shard, "rb") as fh:
        for start in range(0, rows, step):
            n = min(step, rows - start)
            raw = pread_exact(fh.fileno(), n * row_bytes, info.begin + start * row_bytes, f"{info.shard}: {info.name}")
            yield start, np.frombuffer(raw, dtype=dtype).reshape((n,) + tuple(info.shape[1:]))
