"""Regrouping: split every quantization group into r smaller ones, exactly.

A group of g inputs shares one scale (and zero point). Splitting it into r groups of g/r that each repeat
the parent's scale and zero leaves every weight's dequantized value, and so the function, unchanged; only
the scale / zero tensors grow (g128 -> g64 at 4 bits: about +3 % of the weight bytes). What it buys: a
per-rank width that holds whole groups of g/r but not of g (768 at TP 4 = 192 per rank = 3 groups of 64).

Every quantized linear is regrouped by the same factor (AWQ has one group_size for the whole model; one
factor keeps GPTQModel `dynamic` overrides and compressed-tensors config_groups consistent). Pure: this
module turns a checkpoint into (a) the checkpoint as it will look regrouped, for the engine rules and the
pad planner, and (b) the TensorOps and config.json changes that write it.

Block-FP8 (quant_method "fp8", weight_block_size [bn, bk]) is refined the same way: blocks [bn/r, bk/r]
whose scales repeat the parent block's (formats/fp8.py refine_ops; the last refined blocks past a partial
parent block are dropped). Whether an engine's kernels take the finer block is its rule rows (quantity
"block", engines/fp8_rules.py).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from awqpad.checkpoint import formats
from awqpad.checkpoint.formats import fp8, fp8_config
from awqpad.checkpoint.formats.base import TensorOp, regroup_ops
from awqpad.checkpoint.header import tensor_nbytes
from awqpad.checkpoint.model import Checkpoint, Linear

FACTORS = (2, 4)
MIN_GROUP = 32  # the smallest group any engine kernel takes (vLLM Marlin, MoeWNA16: `assert group_size >= 32`)


@dataclass(frozen=True)
class RegroupChange:
    factor: int
    group_size: int  # before (the checkpoint's dominant group size)
    new_group_size: int
    modules: int  # linears regrouped
    added_bytes: int
    config_key: str  # where config.json holds the quantization config
    block: tuple[int, int] | None = None  # block-FP8: weight_block_size before and after
    new_block: tuple[int, int] | None = None


def describe(change: dict) -> str:
    """One phrase for a RegroupChange (as plan_summary serialises it): what got smaller."""
    if change.get("block"):
        return f"FP8 blocks {list(change['block'])} -> {list(change.get('new_block') or [])}"
    return f"group_size {change.get('group_size')} -> {change.get('new_group_size')}"


def is_fp8_blocks(ckpt: Checkpoint) -> bool:
    """Regrouping this checkpoint means refining FP8 blocks (its decoder linears are FP8)."""
    return ckpt.format == fp8.NAME


def block_size(ckpt: Checkpoint) -> tuple[int, int] | None:
    lin = next((lin for lin in ckpt.linears if lin.format == fp8.NAME and fp8.kind(lin) == "block"), None)
    return None if lin is None else (lin.block_n, lin.group_size)


def _fp8_refusal(ckpt: Checkpoint, r: int) -> str | None:
    why = fp8_config.block_refusal(ckpt.quant, r, fp8.MIN_BLOCK)
    if why:
        return why
    block = block_size(ckpt)
    if block is None:
        return "no block-FP8 linear to refine"
    for lin in ckpt.linears:
        if lin.quantized and lin.format == fp8.NAME and (fp8.kind(lin) != "block" or (lin.block_n, lin.group_size) != block):
            return f"{lin.prefix}: FP8 scales are not blocks of {list(block)} like the rest of the model"
    return None


def refusal(ckpt: Checkpoint, r: int) -> str | None:
    """Why the checkpoint cannot be regrouped by r exactly (None: it can)."""
    mismatch = fp8_config.tensor_mismatch(ckpt)  # the config and the tensors disagree: nothing is exact
    if mismatch:
        return mismatch
    if is_fp8_blocks(ckpt):
        return _fp8_refusal(ckpt, r)
    quantized = [lin for lin in ckpt.linears if lin.quantized]
    if not quantized:
        return "the checkpoint is not group-quantized"
    for lin in quantized:
        fmt = formats.BY_NAME[lin.format]
        if not getattr(fmt, "GROUP_AXES", None):
            return f"{lin.prefix}: regrouping {lin.format} is not supported"
        g = lin.group_size
        if g is None or g <= 0:
            continue  # per-channel: one group over the whole input, left as it is
        if g % r or g // r < MIN_GROUP:
            return f"group size {g} does not split into {r} groups of at least {MIN_GROUP}"
        if lin.in_features % g:
            return f"{lin.prefix}: {lin.in_features} inputs are not whole groups of {g}"
    if not any(lin.group_size and lin.group_size > 0 for lin in quantized):
        return "every linear is per-channel (group_size -1): nothing to split"
    return None


def _regrouped_linear(lin: Linear, r: int) -> Linear:
    if lin.format == fp8.NAME:
        return fp8.refined_linear(lin, r)
    if not lin.quantized or not lin.group_size or lin.group_size <= 0:
        return lin
    axes = formats.BY_NAME[lin.format].GROUP_AXES
    parts = dict(lin.parts)
    for name, axis in axes.items():
        info = parts.get(name)
        if info is not None:
            shape = list(info.shape)
            shape[axis] *= r
            parts[name] = dataclasses.replace(info, shape=tuple(shape),
                                              end=info.begin + tensor_nbytes(info.dtype, tuple(shape)))
    return dataclasses.replace(lin, parts=parts, group_size=lin.group_size // r, groups=lin.groups * r)


def regrouped(ckpt: Checkpoint, r: int) -> Checkpoint:
    """`ckpt` as it reads after regrouping by r (shapes and group sizes; for rules and pad planning)."""
    new = {lin.prefix: _regrouped_linear(lin, r) for lin in ckpt.linears}
    mlps = tuple(dataclasses.replace(b, linears=tuple(new[lin.prefix] for lin in b.linears)) for b in ckpt.mlps)
    tensors = dict(ckpt.tensors)
    for lin in new.values():
        for info in lin.parts.values():
            tensors[info.name] = info
    return dataclasses.replace(ckpt, linears=tuple(new.values()), mlps=mlps, tensors=tensors)


def ops(ckpt: Checkpoint, r: int) -> list[TensorOp]:
    out = []
    for lin in ckpt.linears:
        if lin.format == fp8.NAME:
            out += fp8.refine_ops(lin, r)
        elif lin.quantized and lin.group_size and lin.group_size > 0:
            fmt = formats.BY_NAME[lin.format]
            out += regroup_ops(lin, r, fmt.GROUP_AXES, fmt.GROUP_IDS)
    return out


def merge(regroup: list[TensorOp], pad: list[TensorOp]) -> list[TensorOp]:
    """One op per tensor: a padded per-group tensor is regrouped first, then padded (pad ops were planned
    on the regrouped shapes). A rewritten g_idx (`replace`, positional groups of the new size) already holds
    the regrouped ids."""
    by_name = {op.tensor: op for op in regroup}
    out = []
    for op in pad:
        rg = by_name.pop(op.tensor, None)
        if rg is not None and op.replace is None:
            op = dataclasses.replace(op, old_shape=rg.old_shape, regroup=rg.regroup, regroup_axis=rg.regroup_axis,
                                     regroup_kind=rg.regroup_kind)
        out.append(op)
    return list(by_name.values()) + out


def added_bytes(ops_: list[TensorOp]) -> int:
    return sum(tensor_nbytes(op.dtype, op.new_shape) - tensor_nbytes(op.dtype, op.old_shape) for op in ops_)


def config_key(ckpt: Checkpoint) -> str:
    if "quantization_config" in ckpt.config.raw or not ckpt.config.text_path:
        return "quantization_config"
    return ".".join(ckpt.config.text_path + ("quantization_config",))


def quant_config(ckpt: Checkpoint, r: int) -> dict:
    """quantization_config with every group size divided by r: the top-level one (AWQ `group_size` /
    `q_group_size`, GPTQ `group_size`), GPTQModel `dynamic` overrides, compressed-tensors config_groups;
    block-FP8: weight_block_size [bn/r, bk/r]."""
    if is_fp8_blocks(ckpt):
        return fp8_config.refined_config(ckpt.quant, r)
    q = copy.deepcopy(ckpt.quant.raw)

    def split(node: dict, key: str) -> None:
        value = node.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            node[key] = value // r

    for key in ("group_size", "q_group_size"):
        split(q, key)
    for override in (q.get("dynamic") or {}).values():
        if isinstance(override, dict):
            split(override, "group_size")
    for group in (q.get("config_groups") or {}).values():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict) and weights.get("strategy", "group") == "group":
            split(weights, "group_size")
    return q


def change(ckpt: Checkpoint, r: int, regroup_ops_: list[TensorOp]) -> RegroupChange:
    g = ckpt.group_size or 0
    modules = sum(1 for lin in ckpt.linears if lin.quantized and lin.group_size and lin.group_size > 0)
    block = block_size(ckpt) if is_fp8_blocks(ckpt) else None
    new_block = None if block is None else (block[0] // r, block[1] // r)
    return RegroupChange(r, g, g // r if g > 0 else g, modules, added_bytes(regroup_ops_), config_key(ckpt), block, new_block)


def label(ckpt: Checkpoint, r: int) -> str:
    """The candidate's name: "regroup g64" (groups of 64), "regroup 64x64" (FP8 blocks of 64 x 64)."""
    block = block_size(ckpt) if is_fp8_blocks(ckpt) else None
    if block is not None and not (block[0] % r or block[1] % r):
        return f"regroup {block[0] // r}x{block[1] // r}"
    g = ckpt.group_size or 0
    return f"regroup g{g // r}" if g > 0 else f"regroup /{r}"
