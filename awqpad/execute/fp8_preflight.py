"""Before writing: refuse FP8 weights whose bytes next to the padding are NaN codes.

The padding of a block-FP8 weight completes its trailing partial block: the new 0x00 elements share
that block's scale with the original ones. If those original bytes hold e4m3fn NaN codes (S.1111.111)
the checkpoint is damaged exactly where awqpad writes, and a padded output would carry it forward
under a fresh provenance record; so pad stops with one line instead. Only the partial blocks are read
(a few rows or columns per tensor); widths that are whole blocks read nothing.
"""

from __future__ import annotations

import numpy as np

from awqpad.checkpoint.formats import fp8
from awqpad.errors import InputError
from awqpad.execute.tensor_io import iter_row_blocks, pread_exact


def _partial(length: int, unit: int | None, at: int) -> tuple[int, int] | None:
    if not unit or unit <= 1 or at != length or length % unit == 0:
        return None
    return length - length % unit, length


def check_padding_regions(ckpt, plan) -> None:
    ops = {op.tensor: op for op in plan.ops}
    root = ckpt.source.root
    for lin in ckpt.linears:
        if lin.format != fp8.NAME or fp8.kind(lin) != "block":
            continue
        info = lin.parts["weight"]
        op = ops.get(info.name)
        if op is None:
            continue
        n, k = info.shape
        for ins in op.inserts:
            if op.axis == 0:
                span = _partial(n, lin.block_n, ins.at)
                if span is None:
                    continue
                with open(root / info.shard, "rb") as fh:
                    raw = pread_exact(fh.fileno(), (span[1] - span[0]) * k, info.begin + span[0] * k, info.name)
                bad = fp8.nan_codes(np.frombuffer(raw, np.uint8))
                where = f"rows {span[0]}..{span[1] - 1}"
            else:
                span = _partial(k, lin.group_size, ins.at)
                if span is None:
                    continue
                bad = sum(fp8.nan_codes(block[:, span[0]:span[1]]) for _, block in iter_row_blocks(root, info))
                where = f"columns {span[0]}..{span[1] - 1}"
            if bad:
                raise InputError(f"{info.name}: {bad} NaN codes in {where}, the partial FP8 block that padding would "
                                 "complete; the source weights are damaged there")
