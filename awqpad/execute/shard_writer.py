"""Stream one safetensors shard through the plan's TensorOps into a new shard.

The output header is computed first (shapes and offsets are known from the plan), then tensors are
written in source order: unchanged tensors are copied as bytes (copy_file_range: no decode, no trip through
user space; sha256 reads the file back on another thread), padded tensors in bounded row blocks. Memory stays at one block (<= BLOCK_BYTES) whatever the model size.
"""

from __future__ import annotations

import errno
import math
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from awqpad.errors import InputError, OutputError
from awqpad.checkpoint.formats.base import Fill, TensorOp, fill_bytes, refine_blocks, regroup_ids, regrouped_shape
from awqpad.checkpoint.header import ShardHeader, TensorInfo, encode_header, tensor_nbytes
from awqpad.source.paths import create_output
from awqpad.execute.trailing_hash import TrailingHasher
from awqpad.execute.tensor_io import ARRAY_DTYPES, RAW_DTYPES, itemsize, pread_exact

BLOCK_BYTES = 16 << 20
SCATTER_STRETCH = 16 << 10  # shorter stretches (on average) are read as a block and moved by numpy
KERNEL_STRETCH = 256 << 10  # original stretches at least this long (on average) are copied in the kernel
COPY_CHUNK = 32 << 20


def _load_sync_file_range():
    """Linux sync_file_range(2) through libc: start writeback of a range without waiting for it."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_EVERY = 64 << 20


class ShardWriter:
    """Positional writes into one output file; every byte count is checked against the plan. Unchanged
    byte ranges are copied in the kernel (copy_file_range); a TrailingHasher thread reads the file back
    just behind the writer for the sha256 awqpad.json records.

    Writeback of what is written is started every WRITEBACK_EVERY bytes, so the disk works while the
    next tensors are produced and the final fsync has little left to wait for.
    """

    def __init__(self, path: Path, expected_size: int, hash_output: bool = True):
        self.path = path
        self.expected_size = expected_size
        self.fd = create_output(path, readable=hash_output)  # a new file, never an existing one truncated
        self.pos = 0
        self._flushed = 0
        self._hasher = TrailingHasher(self.fd, path.name) if hash_output else None
        self._copy_range = hasattr(os, "copy_file_range")
        self._buffer: memoryview | None = None

    def _advanced(self) -> None:
        if _SYNC_FILE_RANGE is not None and self.pos - self._flushed >= WRITEBACK_EVERY:
            _SYNC_FILE_RANGE(self.fd, self._flushed, self.pos - self._flushed, SYNC_FILE_RANGE_WRITE)
            self._flushed = self.pos
        if self._hasher is not None:
            _io(self._hasher.advance, self.pos, path=self.path)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = _io(os.pwrite, self.fd, view, self.pos, path=self.path)
            self.pos += written
            view = view[written:]
        self._advanced()

    def copy_from(self, src_fd: int, offset: int, size: int, what: str) -> None:
        """Copy a source byte range: in the kernel where the file systems allow it, else through one
        reused buffer (a fresh bytes object per chunk would cost page faults)."""
        end = offset + size
        while offset < end:
            n = min(COPY_CHUNK, end - offset)
            got = self._copy_in_kernel(src_fd, offset, n) if self._copy_range else None
            if got is None:  # no kernel copy between these file systems: through the buffer
                if self._buffer is None:
                    self._buffer = memoryview(bytearray(COPY_CHUNK))
                got = os.preadv(src_fd, [self._buffer[:n]], offset)
                if got > 0:
                    self.write(self._buffer[:got])
            elif got > 0:
                self.pos += got
                self._advanced()
            if got <= 0:
                raise InputError(f"{what}: file ended {end - offset} bytes early (truncated?)")
            offset += got

    def _copy_in_kernel(self, src_fd: int, offset: int, n: int) -> int | None:
        """Bytes copied by copy_file_range, or None (and never again) where the kernel cannot copy."""
        try:
            return os.copy_file_range(src_fd, self.fd, n, offset, self.pos)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                self._copy_range = False
                return None
            _raise_write(exc, self.path)

    def sha256(self) -> str | None:
        return None if self._hasher is None else _io(self._hasher.hexdigest, path=self.path)

    def close(self, fsync: bool = True) -> None:
        try:
            if self.pos != self.expected_size:
                raise OutputError(f"{self.path.name}: wrote {self.pos} bytes, expected {self.expected_size} (internal error)")
            if fsync:
                _io(os.fsync, self.fd, path=self.path)
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        if self._hasher is not None:
            self._hasher.abandon()
        os.close(self.fd)


def _io(fn, *args, path: Path):
    try:
        return fn(*args)
    except OSError as exc:
        _raise_write(exc, path)


def _raise_write(exc: OSError, path: Path):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise OutputError(f"{path}: disk full or file size limit reached while writing ({exc.strerror})") from None
    raise OutputError(f"{path}: write failed ({exc.strerror or exc})") from None


def output_layout(header: ShardHeader, ops: dict[str, TensorOp]) -> list[tuple[TensorInfo, TensorOp | None, tuple, int]]:
    """(source tensor, op, new shape, new nbytes) in source data order."""
    rows = []
    for info in sorted(header.tensors.values(), key=lambda t: t.begin):
        op = ops.get(info.name)
        shape = op.new_shape if op is not None else info.shape
        rows.append((info, op, shape, tensor_nbytes(info.dtype, shape)))
    return rows


def shard_output_size(header: ShardHeader, ops: dict[str, TensorOp]) -> int:
    layout = output_layout(header, ops)
    head = encode_header([(i.name, i.dtype, s, n) for i, _, s, n in layout], header.metadata)
    return len(head) + sum(n for *_, n in layout)


class Cancelled(Exception):
    """Another shard's writer failed or the run was interrupted: stop writing."""


def write_shard(src_root: Path, header: ShardHeader, ops: dict[str, TensorOp], out_path: Path,
                advance: Callable[[int], None] = lambda n: None, fsync: bool = True,
                cancel: threading.Event | None = None, digests: dict[str, str] | None = None) -> int:
    """Write the padded version of one shard; returns its size and, if `digests` is given, stores the
    sha256 of the bytes written under the shard's file name. Checks `cancel` between tensors."""
    layout = output_layout(header, ops)
    head = encode_header([(i.name, i.dtype, s, n) for i, _, s, n in layout], header.metadata)
    size = len(head) + sum(n for *_, n in layout)
    writer = ShardWriter(out_path, size, hash_output=digests is not None)
    try:
        writer.write(head)
        try:
            src = open(src_root / header.filename, "rb")
        except OSError as exc:
            raise InputError(f"{header.filename}: cannot read ({exc.strerror or exc})") from None
        with src:
            fd = src.fileno()
            for info, op, _, nbytes in layout:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(header.filename)
                if op is None:
                    writer.copy_from(fd, info.begin, info.nbytes, f"{header.filename}: {info.name}")
                elif op.regroup > 1 and op.replace is None:
                    _write_regrouped(writer, fd, info, op)
                elif op.replace is not None:
                    writer.write(np.array(op.replace, dtype=ARRAY_DTYPES[info.dtype]).astype(np.dtype(ARRAY_DTYPES[info.dtype]).newbyteorder("<")).tobytes())
                else:
                    _write_padded(writer, fd, info, op)
                advance(nbytes)
        digest = writer.sha256()
    except BaseException:
        writer.abort()
        raise
    writer.close(fsync=fsync)
    if digest is not None:
        digests[header.filename] = digest
    return size


def _fill_array(fill: Fill, dtype: str, count: int) -> np.ndarray:
    """`count` fill elements as raw little-endian unsigned words of the tensor's item size."""
    raw = RAW_DTYPES[itemsize(dtype)]
    if fill.kind == "const":
        one = np.frombuffer(fill_bytes(dtype, fill.value), dtype=np.dtype(raw).newbyteorder("<"))
        return np.broadcast_to(one, (count,))
    if fill.kind == "group_ids":
        values = fill.value + np.arange(count, dtype=np.int64) // fill.group_size
        return values.astype(np.dtype(ARRAY_DTYPES[dtype]).newbyteorder("<")).view(np.dtype(raw).newbyteorder("<"))
    raise ValueError(f"unknown fill {fill.kind}")


IOV_MAX = 1024  # iovecs per preadv call (Linux UIO_MAXIOV)


def _write_padded(writer: ShardWriter, fd: int, info: TensorInfo, op: TensorOp) -> None:
    if tuple(info.shape) != tuple(op.old_shape) or info.dtype != op.dtype:
        raise InputError(f"{info.name}: plan expects {op.dtype}{list(op.old_shape)} but the shard has {info.dtype}{list(info.shape)}")
    size = itemsize(info.dtype)
    raw = np.dtype(RAW_DTYPES[size]).newbyteorder("<")
    outer = math.prod(info.shape[: op.axis])
    length = info.shape[op.axis]
    inner = math.prod(info.shape[op.axis + 1 :])
    row_bytes = length * inner * size
    inserts = sorted(op.inserts, key=lambda i: i.at)
    fills = [_fill_array(ins.fill, info.dtype, ins.count * inner) for ins in inserts]
    new_length = length + sum(ins.count for ins in inserts)
    what = f"{info.shard}: {info.name}"
    # (source start, source end, destination start) of each original stretch along the padded axis
    segments, cursor, shift = [], 0, 0
    for ins in inserts:
        segments.append((cursor, ins.at, cursor + shift))
        cursor, shift = ins.at, shift + ins.count
    segments.append((cursor, length, cursor + shift))
    segments = [seg for seg in segments if seg[1] > seg[0]]

    out_row_bytes = new_length * inner * size
    if out_row_bytes > BLOCK_BYTES or row_bytes >= KERNEL_STRETCH * len(segments):
        # Rows too big for one block (e.g. appending rows to a huge [K, N/8] tensor), or stretches long
        # enough (an expert's [768, 2048] FP8 weight growing rows) that copying them in the kernel beats
        # a trip through a user buffer: copy original stretches and write the fill in bounded pieces.
        for r in range(outer):
            base = info.begin + r * row_bytes
            cursor = 0
            for ins, fill in zip(inserts, fills):
                writer.copy_from(fd, base + cursor * inner * size, (ins.at - cursor) * inner * size, what)
                _write_repeated(writer, fill)
                cursor = ins.at
            writer.copy_from(fd, base + cursor * inner * size, (length - cursor) * inner * size, what)
        return
    # Small rows: a block of rows goes into a pre-filled output buffer, then out in one write. Stretches of
    # a few KB (an expert down_proj's 768-byte rows, 4 rank stretches per AWQ row) are read as one block and
    # moved by numpy, one strided copy per stretch: a preadv iovec per stretch costs more in Python than
    # the extra memcpy. Longer stretches are scattered by preadv straight into place (one copy in, one out).
    rows_per_block = max(1, min(outer, BLOCK_BYTES // out_row_bytes))
    buf = np.empty((rows_per_block, new_length, inner), dtype=raw)
    dst = 0
    for ins, fill in zip(inserts, fills):
        at = ins.at + dst
        buf[:, at : at + ins.count, :] = fill.reshape(1, ins.count, inner)
        dst += ins.count
    staging = np.empty((rows_per_block, length, inner), dtype=raw) if row_bytes < SCATTER_STRETCH * len(segments) else None
    for start in range(0, outer, rows_per_block):
        n = min(rows_per_block, outer - start)
        if staging is not None:
            _preadv_exact(fd, [memoryview(staging[:n]).cast("B")], info.begin + start * row_bytes, what)
            for s, e, d in segments:
                buf[:n, d : d + (e - s), :] = staging[:n, s:e, :]
            writer.write(buf[:n])
            continue
        views = [memoryview(buf[r, d : d + (e - s), :]).cast("B") for r in range(n) for s, e, d in segments]
        offset = info.begin + start * row_bytes
        for i in range(0, len(views), IOV_MAX):
            offset += _preadv_exact(fd, views[i : i + IOV_MAX], offset, what)
        writer.write(buf[:n])


def _preadv_exact(fd: int, views: list, offset: int, what: str) -> int:
    want = sum(v.nbytes for v in views)
    got = os.preadv(fd, views, offset)
    if got != want:
        raise InputError(f"{what}: file ended after {got} of {want} bytes (truncated?)")
    return want


def _write_repeated(writer: ShardWriter, fill: np.ndarray) -> None:
    step = max(1, BLOCK_BYTES // fill.itemsize)
    constant = fill.ndim == 1 and fill.strides == (0,)  # one value broadcast: every piece is the same bytes
    piece = np.ascontiguousarray(fill[:step]) if constant else None
    for start in range(0, fill.shape[0], step):
        n = min(step, fill.shape[0] - start)
        writer.write(piece[:n] if constant else np.ascontiguousarray(fill[start : start + n]))


def _write_regrouped(writer: ShardWriter, fd: int, info: TensorInfo, op: TensorOp) -> None:
    """A per-group tensor (scales, zeros, g_idx) with every group split into op.regroup, then padded.

    These tensors hold one row per group: a few MB at most, read whole (the weights they describe are
    copied untouched)."""
    if tuple(info.shape) != tuple(op.old_shape) or info.dtype != op.dtype:
        raise InputError(f"{info.name}: plan expects {op.dtype}{list(op.old_shape)} but the shard has {info.dtype}{list(info.shape)}")
    raw = np.dtype(RAW_DTYPES[itemsize(info.dtype)]).newbyteorder("<")
    data = pread_exact(fd, info.nbytes, info.begin, f"{info.shard}: {info.name}")
    if op.regroup_kind == "ids":
        typed = np.frombuffer(data, dtype=np.dtype(ARRAY_DTYPES[info.dtype]).newbyteorder("<"))
        arr = regroup_ids(typed, op.regroup).astype(typed.dtype).view(raw).reshape(info.shape)
    elif op.regroup_kind == "refine":  # FP8 block scales: raw words repeated, so every scale is copied bit for bit
        arr = refine_blocks(np.frombuffer(data, dtype=raw).reshape(info.shape), op.regroup, regrouped_shape(op))
    else:
        arr = np.repeat(np.frombuffer(data, dtype=raw).reshape(info.shape), op.regroup, axis=op.regroup_axis)
    moved = np.moveaxis(arr, op.axis, 0)
    inner = moved.shape[1:]
    pieces, cursor = [], 0
    for ins in sorted(op.inserts, key=lambda i: i.at):
        pieces.append(moved[cursor : ins.at])
        fill = _fill_array(ins.fill, info.dtype, ins.count * math.prod(inner))
        pieces.append(np.asarray(fill).reshape((ins.count,) + inner))
        cursor = ins.at
    pieces.append(moved[cursor:])
    out = np.moveaxis(np.concatenate(pieces, axis=0), 0, op.axis)
    if tuple(out.shape) != tuple(op.new_shape):
        raise InputError(f"{info.name}: regrouped to {list(out.shape)}, plan says {list(op.new_shape)}")
    writer.write(np.ascontiguousarray(out))
