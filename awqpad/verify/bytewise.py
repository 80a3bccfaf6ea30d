"""Bytes: pad-fill, bytes-original and bytes-unchanged, in one streamed pass over OUT (and SRC).

Every byte is read once from each side through two reused 4 MB buffers per thread (Buffers), in jobs
of one padded tensor (scan_padded) or up to JOB_BYTES of a run of unchanged tensors (compare_run).
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from awqpad.checkpoint.formats.base import TensorOp
from awqpad.checkpoint.model import Checkpoint
from awqpad.errors import InputError
from awqpad.execute.tensor_io import RAW_DTYPES, itemsize, read_array
from awqpad.verify.context import Check, VerifyContext, make_check, not_applicable, not_compared
from awqpad.verify.fills import decode_words, expected_fill, fill_label, uncovered
from awqpad.verify.structure import PROVENANCE

CHUNK = 4 << 20  # bytes per read in the streaming checks (two reused buffers)
BIG_ROW = 4 << 20  # padded tensors with rows larger than this are compared as byte ranges
THREADS = max(1, min(4, os.cpu_count() or 1))  # streaming jobs in parallel (pread releases the GIL)
JOB_BYTES = 64 << 20  # bytes of unchanged tensors per job


def check_bytes(ctx: VerifyContext) -> list[Check]:
    """pad-fill (+ bytes-original, bytes-unchanged with SRC): every byte streamed once from each side,
    in jobs (one padded tensor, or up to JOB_BYTES of a run of unchanged tensors) over THREADS threads."""
    started = time.monotonic()
    out, src = ctx.out, ctx.src
    ops = {op.tensor: op for op in ctx.ops if op.tensor in out.tensors}
    padded_bytes = sum(out.tensors[n].nbytes for n in ops)
    fill_problems, orig_problems = [], []
    jobs = []  # (kind, payload)
    replaced = 0  # metadata tensors compared with their recorded values
    for name, op in ops.items():
        info = out.tensors[name]
        if op.replace is not None:
            values = read_array(ctx.root, info).tolist()
            replaced += 1
            if values != list(op.replace):
                fill_problems.append(f"{name} = {values}, {PROVENANCE} records {list(op.replace)}")
                ctx.fill_failed.add(name)
            continue
        if tuple(info.shape) != tuple(op.new_shape) or info.dtype != op.dtype:
            continue  # reported by provenance
        if (gap := uncovered(op)) is not None:
            fill_problems.append(gap)  # elements neither original nor a recorded fill: nothing checks them
            ctx.fill_failed.add(name)
        s_info = src.tensors.get(name) if src is not None else None
        if s_info is not None and (tuple(s_info.shape) != tuple(op.old_shape) or s_info.dtype != op.dtype):
            s_info = None  # reported by tensors
        if op.regroup > 1:
            s_info = None  # not SRC's bytes but SRC's groups split: the `regroup` check compares them
            if not op.inserts:
                continue
        jobs.append(("padded", (info, op, s_info)))
    unchanged = []
    if src is not None:
        unchanged = [n for n in src.tensors if n not in ops and n in out.tensors
                     and src.tensors[n].dtype == out.tensors[n].dtype and src.tensors[n].shape == out.tensors[n].shape]
        for run in unchanged_runs(src, out, unchanged):
            for off in range(0, run.length, JOB_BYTES):
                jobs.append(("run", (run, off, min(run.length, off + JOB_BYTES))))
    total = sum(2 * p[0].nbytes if p[2] is not None else p[0].nbytes for k, p in jobs if k == "padded")
    total += sum(2 * (p[2] - p[1]) for k, p in jobs if k == "run")
    bad: dict[str, list] = {}
    seconds = {"padded": 0.0, "run": 0.0}
    with ExitStack() as stack, ctx.progress(total, "verifying bytes") as advance:
        fds = _FdCache(stack, [ctx.root / s.filename for s in out.shards]
                       + ([src.source.root / s.filename for s in src.shards] if src is not None else []))
        local = threading.local()

        def work(job):
            t0 = time.monotonic()
            bufs = getattr(local, "bufs", None) or Buffers()
            local.bufs = bufs
            kind, payload = job
            if kind == "padded":
                info, op, s_info = payload
                result = scan_padded(fds, bufs, ctx.root, info, op,
                                     src.source.root if s_info is not None else None, s_info, advance) + (info.name,)
            else:
                result = compare_run(fds, bufs, src.source.root, ctx.root, *payload, advance)
            return kind, result, time.monotonic() - t0

        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            for kind, result, spent in pool.map(work, jobs):
                seconds[kind] += spent
                if kind == "padded":
                    fill_problems += result[0]
                    orig_problems += result[1]
                    if result[0]:
                        ctx.fill_failed.add(result[2])
                else:
                    for name, (first, count, length) in result.items():
                        entry = bad.setdefault(name, [first, 0, length])
                        entry[0] = min(entry[0], first)
                        entry[1] += count
    figures = {"tensors": len(ops), "bytes": padded_bytes, "threads": THREADS}
    regrouped = sum(1 for op in ops.values() if op.regroup > 1)
    scanned = [p for k, p in jobs if k == "padded" and p[1].inserts]
    filled = replaced + len(scanned)
    figures["compared"] = filled
    checks = [_fill_check(ctx, fill_problems, filled, figures, started)]
    if src is None:
        return checks
    originals = [n for n, op in ops.items() if op.regroup == 1 and op.replace is None]
    compared = sum(1 for k, p in jobs if k == "padded" and p[2] is not None)
    split = f" ({regrouped} regrouped tensors: see regroup)" if regrouped else ""
    if not originals:
        checks.append(not_applicable("bytes-original", ("nothing was padded" if not regrouped else
                                     f"no padded tensor keeps an original region of SRC's bytes{split}"),
                                     {"tensors": len(ops), "compared": 0}))
    else:
        if not compared:
            orig_problems.append(not_compared(
                f"none of the {len(originals)} padded tensors is in SRC with the dtype and shape {PROVENANCE} records as "
                f"its original (e.g. {originals[0]}), so no original region was read: is SRC really OUT's source?"))
        checks.append(make_check("bytes-original", orig_problems,
                                 f"the original region of all {compared} padded tensors is byte-identical to SRC{split}",
                                 {"tensors": len(ops), "compared": compared}))
    nbytes = sum(src.tensors[n].nbytes for n in unchanged)
    diffs = [f"{name} differs from SRC at byte {first} of {length} ({count} byte(s) differ); pad should have "
             "copied it unchanged" for name, (first, count, length) in sorted(bad.items())]
    untouched = [n for n in src.tensors if n not in ops]
    wall = time.monotonic() - started
    if not untouched:
        checks.append(not_applicable("bytes-unchanged", f"pad changed every one of SRC's {len(src.tensors)} tensors",
                                     {"tensors": 0, "bytes": 0}))
        return checks
    if not unchanged:
        diffs.append(not_compared(f"none of the {len(untouched)} SRC tensors pad did not touch is in OUT with SRC's dtype "
                                  f"and shape (e.g. {untouched[0]}), so no byte was compared"))
    checks.append(make_check("bytes-unchanged", diffs,
                             f"{len(unchanged)} unchanged tensors ({nbytes / 1e6:.1f} MB) byte-identical to SRC",
                             {"tensors": len(unchanged), "bytes": nbytes, "seconds": round(wall, 3),
                              "mb_per_s": round((2 * nbytes + 2 * padded_bytes) / 1e6 / wall, 1) if wall > 0 else None}))
    return checks


def _fill_check(ctx: VerifyContext, problems: list[str], filled: int, figures: dict, started: float) -> Check:
    """pad-fill: passes only having compared some inserted elements; does not apply where nothing was inserted."""
    ops = ctx.ops or ()
    inserting = [op for op in ops if op.inserts or op.replace is not None or uncovered(op)]
    if not inserting:
        regrouped = sum(1 for op in ops if op.regroup > 1)
        reason = (f"nothing was padded: the {regrouped} recorded ops only regroup (see regroup)" if regrouped else
                  f"nothing was padded: the {len(ops)} recorded ops insert nothing" if ops else "nothing was padded")
        return not_applicable("pad-fill", reason, figures)
    if not filled:
        grown = [op.tensor for op in inserting if uncovered(op)]
        missing = sum(1 for op in inserting if op.tensor not in ctx.out.tensors)
        why = (f"{len(grown)} of them grew but record no insert covering the growth (e.g. {grown[0]})" if grown else
               f"none is in OUT with its recorded dtype and shape ({missing} missing)")
        problems = [not_compared(f"{PROVENANCE} records {len(inserting)} padded tensors but no inserted element was "
                                 f"read: {why}")] + problems
    return make_check("pad-fill", problems, f"all inserted elements of {filled} padded tensors hold the recorded fill",
                      figures, started)


class _FdCache:
    """Read-only descriptors, opened up front (threads share them: pread needs no file position)."""

    def __init__(self, stack: ExitStack, paths=()):
        self.stack, self.fds = stack, {}
        self.lock = threading.Lock()
        for path in paths:
            self(path)

    def __call__(self, path: Path) -> int:
        with self.lock:
            fd = self.fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self.stack.callback(os.close, fd)
                self.fds[path] = fd
            return fd


class Buffers:
    """Two reusable read buffers and a scratch mask: streaming reads never allocate (no page faults)."""

    def __init__(self, size: int = CHUNK):
        self.size = size
        self.a, self.b = bytearray(size), bytearray(size)
        self.mask = np.empty(size, dtype=bool)

    def read(self, which: str, fd: int, nbytes: int, offset: int, what: str) -> memoryview:
        view = memoryview(self.a if which == "a" else self.b)[:nbytes]
        got = 0
        while got < nbytes:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k == 0:
                raise InputError(f"{what}: file ended after {got} of {nbytes} bytes at offset {offset} (truncated?)")
            got += k
        return view

    def same(self, nbytes: int) -> bool:
        """Are the first nbytes of the two buffers equal (memcmp; a copy only for a short tail)?"""
        if nbytes == self.size:
            return self.a == self.b
        return memoryview(self.a)[:nbytes].tobytes() == memoryview(self.b)[:nbytes].tobytes()

    def differs(self, x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        """Boolean mask of x != y (broadcast), or None when equal; the mask lives in scratch memory."""
        shape = np.broadcast_shapes(x.shape, y.shape)
        out = self.mask[: math.prod(shape)].reshape(shape)
        np.not_equal(x, y, out=out)
        return out if out.any() else None


def scan_padded(fds, bufs: Buffers, out_root: Path, info, op: TensorOp, src_root: Path | None, s_info,
                advance: Callable[[int], None] = lambda n: None) -> tuple[list[str], list[str]]:
    """Compare one padded tensor: inserted elements == fill; with SRC, original elements == SRC.

    Rows (the dims before the padded axis) are read in blocks of <= CHUNK bytes; a tensor whose single
    row is bigger than BIG_ROW (row padding of a big [K, N/8] tensor) is compared as byte ranges.
    Returns (fill problems, original-region problems), at most one message each.
    """
    size = itemsize(op.dtype)
    raw = np.dtype(RAW_DTYPES[size]).newbyteorder("<")
    shape = tuple(op.new_shape)
    axis = op.axis
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    len_new, len_old = shape[axis], op.old_shape[axis]
    segs = []  # (kind, new_start, count, old_start or Insert)
    cursor = shift = 0
    for ins in sorted(op.inserts, key=lambda i: i.at):
        if ins.at > cursor:
            segs.append(("orig", cursor + shift, ins.at - cursor, cursor))
        segs.append(("fill", ins.at + shift, ins.count, ins))
        shift += ins.count
        cursor = ins.at
    if cursor < len_old:
        segs.append(("orig", cursor + shift, len_old - cursor, cursor))
    out_fd = fds(out_root / info.shard)
    src_fd = fds(src_root / s_info.shard) if src_root is not None else None
    what = f"{info.shard}: {info.name}"
    bad = {"fill": {"count": 0, "first": None}, "orig": {"count": 0, "first": None}}

    def note(kind, mism, got, want, flat_of):
        idx = np.argwhere(mism)[0]
        acc = bad[kind]
        acc["count"] += int(np.count_nonzero(mism))
        if acc["first"] is None:
            w = np.broadcast_to(want, got.shape)[tuple(idx)]
            acc["first"] = (tuple(int(i) for i in np.unravel_index(flat_of(idx), shape)),
                            decode_words(np.asarray(got[tuple(idx)]).reshape(1), op.dtype)[0],
                            decode_words(np.asarray(w).reshape(1), op.dtype)[0])

    row_new = len_new * inner * size
    row_old = len_old * inner * size
    if row_new <= BIG_ROW:
        per_block = max(1, bufs.size // max(row_new, 1))
        for r0 in range(0, max(outer, 1), per_block):
            n = min(per_block, outer - r0)
            block = np.frombuffer(bufs.read("a", out_fd, n * row_new, info.begin + r0 * row_new, what),
                                  dtype=raw).reshape(n, len_new, inner)
            sblock = None
            if src_fd is not None:
                sblock = np.frombuffer(bufs.read("b", src_fd, n * row_old, s_info.begin + r0 * row_old, f"SRC {what}"),
                                       dtype=raw).reshape(n, len_old, inner)
            for kind, start, count, ref in segs:
                region = block[:, start : start + count, :]
                if kind == "fill":
                    want = expected_fill(ref.fill, op.dtype, 0, count, inner)[None]
                elif sblock is not None:
                    want = sblock[:, ref : ref + count, :]
                else:
                    continue
                mism = bufs.differs(region, want)
                if mism is not None:
                    note(kind, mism, region, want, lambda i, r0=r0, start=start: ((r0 + i[0]) * len_new + start + i[1]) * inner + i[2])
            advance(n * row_new + (n * row_old if sblock is not None else 0))
    else:
        step = max(1, bufs.size // (inner * size))  # axis positions per read
        for r in range(outer):
            base_new = info.begin + r * row_new
            base_old = s_info.begin + r * row_old if src_fd is not None else 0
            for kind, start, count, ref in segs:
                if kind == "orig" and src_fd is None:
                    advance(count * inner * size)
                    continue
                for a in range(0, count, step):
                    b = min(count, a + step)
                    nbytes = (b - a) * inner * size
                    got_view = bufs.read("a", out_fd, nbytes, base_new + (start + a) * inner * size, what)
                    if kind == "orig":
                        want_view = bufs.read("b", src_fd, nbytes, base_old + (ref + a) * inner * size, f"SRC {what}")
                        if bufs.same(nbytes):
                            advance(2 * nbytes)
                            continue
                        want = np.frombuffer(want_view, dtype=raw).reshape(b - a, inner)
                    else:
                        want = expected_fill(ref.fill, op.dtype, a, b, inner)
                    got = np.frombuffer(got_view, dtype=raw).reshape(b - a, inner)
                    mism = bufs.differs(got, want)
                    if mism is not None:
                        note(kind, mism, got, want, lambda i, r=r, start=start, a=a: (r * len_new + start + a + i[0]) * inner + i[1])
                    advance(nbytes * (2 if kind == "orig" else 1))
    fills = [i.fill for i in op.inserts]
    fill_msgs, orig_msgs = [], []
    if bad["fill"]["count"]:
        index, got, want = bad["fill"]["first"]
        labels = {fill_label(f, op.dtype) for f in fills}
        label = labels.pop() if len(labels) == 1 else ""
        fill_msgs.append(f"{info.name}{list(index)} = {got!r} in the padded region, expected {want!r}{label}; "
                         f"{bad['fill']['count']} padded element(s) differ")
    if bad["orig"]["count"]:
        index, got, want = bad["orig"]["first"]
        orig_msgs.append(f"{info.name}{list(index)} = {got!r} in OUT but {want!r} in SRC: the original region "
                         f"changed ({bad['orig']['count']} element(s) differ)")
    return fill_msgs, orig_msgs


@dataclass
class Run:
    """Unchanged tensors adjacent in both SRC and OUT: one sequential byte range on each side."""

    src_shard: str
    src_begin: int
    out_shard: str
    out_begin: int
    length: int
    members: list  # (name, offset in run, nbytes)


def unchanged_runs(src: Checkpoint, out: Checkpoint, names: list[str]) -> list[Run]:
    """Group tensors that pad copied into runs, so a shard of many small tensors is a few large reads."""
    wanted = set(names)
    runs: list[Run] = []
    for shard in src.shards:
        for info in sorted(shard.tensors.values(), key=lambda i: i.begin):
            if info.name not in wanted:
                continue
            o = out.tensors[info.name]
            last = runs[-1] if runs else None
            if (last is not None and last.src_shard == shard.filename and last.out_shard == o.shard
                    and last.src_begin + last.length == info.begin and last.out_begin + last.length == o.begin):
                last.members.append((info.name, last.length, info.nbytes))
                last.length += info.nbytes
            else:
                runs.append(Run(shard.filename, info.begin, o.shard, o.begin, info.nbytes, [(info.name, 0, info.nbytes)]))
    return runs


def compare_run(fds, bufs: Buffers, src_root: Path, out_root: Path, run: Run, start: int, stop: int,
                advance: Callable[[int], None] = lambda n: None) -> dict[str, list]:
    """Bytes [start, stop) of a run, SRC vs OUT, through two reused buffers (memcmp per read).
    Returns {tensor: [first differing byte in the tensor, differing bytes, tensor bytes]}."""
    s_fd, o_fd = fds(src_root / run.src_shard), fds(out_root / run.out_shard)
    bad: dict[str, list] = {}
    for off in range(start, stop, bufs.size):
        n = min(bufs.size, stop - off)
        a = bufs.read("a", s_fd, n, run.src_begin + off, f"SRC {run.src_shard}")
        b = bufs.read("b", o_fd, n, run.out_begin + off, run.out_shard)
        if not bufs.same(n):
            diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8)) + off
            for name, t_off, t_len in run.members:
                hit = diff[(diff >= t_off) & (diff < t_off + t_len)]
                if hit.size:
                    entry = bad.setdefault(name, [int(hit[0] - t_off), 0, t_len])
                    entry[1] += int(hit.size)
        advance(2 * n)
    return bad
