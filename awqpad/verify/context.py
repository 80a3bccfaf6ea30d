"""What every check receives (VerifyContext) and returns (Check), and the report the runner builds."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from awqpad.checkpoint.formats.base import TensorOp
from awqpad.checkpoint.model import Checkpoint, MLPBlock
from awqpad.execute.tensor_io import ARRAY_DTYPES, read_array

MAX_LISTED = 5  # names listed in one problem message

# progress(total_bytes, description) -> context manager yielding advance(nbytes) (cli.output.Output.progress)
Progress = Callable[[int, str], object]


def null_progress(total: int, description: str):
    return nullcontext(lambda n: None)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    figures: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyReport:
    checks: tuple[Check, ...]
    passed: bool
    out: str
    src: str | None
    tp: tuple[int, ...]
    engine: str
    layers: str
    seconds: float

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)


def make_check(name: str, problems: list[str], ok_detail: str, figures: dict | None = None,
               started: float | None = None) -> Check:
    """A failed Check naming the first problem (all of them, up to 50, in figures), or a passed one."""
    figures = dict(figures or {})
    if started is not None:
        figures["seconds"] = round(time.monotonic() - started, 3)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        figures.setdefault("problems", problems[:50])
        return Check(name, False, problems[0] + more, figures)
    return Check(name, True, ok_detail, figures)


def not_compared(reason: str) -> str:
    """The problem of a check that had something to compare but compared nothing: it must not pass."""
    return f"not compared: {reason}"


def not_applicable(name: str, reason: str, figures: dict | None = None) -> Check:
    """A check with nothing to compare because OUT legitimately has none of it (nothing padded, only
    regrouped; --layers none): not a pass over 0 items but a statement that it does not apply, marked
    informational like `before` (the CLI shows it as i, JSON keeps name / ok / detail / figures)."""
    return Check(name, True, f"does not apply: {reason}", {**(figures or {}), "informational": True, "applies": False})


@dataclass(frozen=True)
class Provenance:
    """What awqpad.json and SRC say was padded, worked out once before the checks run."""

    record: dict | None  # awqpad.json, or None
    record_error: str | None  # why there is no usable record ("missing" when absent)
    ops: tuple[TensorOp, ...] | None  # the recorded ops, else the ops derived from SRC, else None
    recorded: tuple[TensorOp, ...] | None  # the ops awqpad.json records, None if absent or malformed
    ops_error: str | None  # why awqpad.json's ops are unusable
    derived: tuple[TensorOp, ...] | None  # the ops SRC at OUT's widths needs (with SRC and OUT)
    derived_complete: bool  # whether `derived` covers every tensor, not only MLP ones
    derive_error: str | None  # why the expected ops could not be derived from SRC


@dataclass(frozen=True)
class VerifyContext:
    """Everything a check reads. Checks run in the runner's order and return their Checks."""

    root: Path  # OUT's directory
    out: Checkpoint | None  # None when OUT does not read as a checkpoint (see out_error)
    out_error: str | None
    src: Checkpoint | None
    provenance: Provenance
    tps: tuple[int, ...]
    engines: tuple[str, ...]
    layers: str | tuple[int, ...]  # "sample", "all", "none" or layer numbers
    seed: int
    blocks: tuple[MLPBlock, ...]  # OUT's MLP blocks the function check simulates
    progress: Progress
    # The one thing a check hands on: padded tensors whose inserted bytes are not the recorded fill
    # (written by pad-fill, read by zeros, which then dequantizes those linears on their own).
    fill_failed: set[str] = field(default_factory=set)
    expert_parallel: bool = False  # awqpad.json: experts run whole on each rank (not TP-split)

    @property
    def ops(self) -> tuple[TensorOp, ...] | None:
        return self.provenance.ops

    def split(self, block: MLPBlock, t: int) -> int:
        """How many ranks share this block's width at TP t: experts under expert parallelism are not split."""
        return 1 if self.expert_parallel and block.kind == "expert" else t


def map_array(root: Path, info) -> np.ndarray:
    """A read-only memory map of one tensor: slicing it reads only the pages the slice touches (the
    zero check looks at a few padded columns / rows of tensors that may be hundreds of MB)."""
    if info.nbytes == 0:
        return read_array(root, info)
    dtype = np.dtype(ARRAY_DTYPES[info.dtype]).newbyteorder("<")
    return np.memmap(root / info.shard, dtype=dtype, mode="r", offset=info.begin, shape=tuple(info.shape))
