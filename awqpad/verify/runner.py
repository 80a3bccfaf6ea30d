"""`awqpad verify`: check that a padded repo is exactly what `awqpad pad` claims, and that it works at TP.

verify_output(OUT [, SRC]) runs the checks in CHECKS and returns a VerifyReport; it never prints or
exits. Checks (in report order; "SRC" = only when the source is given):

  structure         OUT reads as a checkpoint: config, index -> shards, every safetensors header
                    (a truncated shard, an index naming the wrong shard, a tensor missing from its
                    shard fail here, with the reader's message)
  provenance        awqpad.json parses; its shard sizes, tensor shapes and recorded widths match the
                    files; SRC: its source fingerprint matches SRC and its ops are exactly the ops the
                    format rules give for SRC at OUT's widths
  config            config.json agrees with the tensors (and with awqpad.json's config updates);
                    SRC: it is SRC's config plus exactly those updates
  index             model.safetensors.index.json lists every tensor in its shard, total_size is right;
                    SRC: same names in the same shards as SRC
  tensors       SRC every SRC tensor is in OUT with its dtype; shapes change only where an op says
  rules E TP=t      the engine's per-rank rules (engines.evaluate, as `plan` uses them) hold at TP t
  shards TP=t       every rank's shard of every MLP linear is whole packed words and whole groups
  pad-fill          every inserted element holds exactly the fill awqpad.json records
  bytes-original SRC   in every padded tensor the original region is byte-identical to SRC
  bytes-unchanged SRC  every tensor pad did not touch is byte-identical to SRC (streamed compare)
  zeros             every padded row / column of every padded linear dequantizes to exactly 0.0
                    under every reader variant of its format
  regroup           regrouped checkpoints: every new group's scale / zero is its parent's, g_idx children of
                    the old groups (SRC); first and last layer dequantize bit-identically under every reader
  function TP=t SRC    selected MLP blocks (first, middle, last layer; for MoE three experts per layer
                    and the shared expert): OUT sharded per rank as vLLM shards it, run in float64 and
                    all-reduced, vs the unpadded unsharded SRC block (fails above 1e-9 relative).
                    Blocks over SIM_BUDGET weights run on a sample of whole groups of the width (the
                    first and last groups of three ranks and the padded tail).
  before TP=t   SRC    informational (always ok): what the unpadded SRC would do at TP t
  attn-shards TP=t  head-padded models: every rank gets whole query / KV heads and whole groups
  attention     SRC    head-padded models: the fp64 attention block of the first, middle and last
                    layer, unsharded and sharded by heads, equals the unpadded SRC block
  checksums         every file awqpad.json records a sha256 for (pad hashed each as it wrote it) still
                    has it: catches any change after writing, in bytes no other check samples

Nothing compared is never a pass: a check that had something to compare but read none of it fails with
"not compared: <why>"; one that OUT legitimately gives nothing to (no padding, only regrouping, --layers
none) passes as informational with "does not apply: <why>" (context.not_compared / not_applicable).

Memory: the byte checks read through two 4 MB buffers per thread; `zeros` and `function` memory-map
one linear / one MLP block (SRC and OUT) at a time and dequantize bounded float64 slices.

To add a check: write `check_x(ctx: VerifyContext) -> list[Check]` in the module of its family and
add one entry to CHECKS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from awqpad.checkpoint.model import read_checkpoint
from awqpad.engines.profiles import ENGINE_CHOICES, engines_for
from awqpad.errors import InputError
from awqpad.source import Source
from awqpad.verify import bytewise, checksums, consistency, fills, function, regrouped, sharding, structure
from awqpad.verify.context import Check, Progress, VerifyContext, VerifyReport, null_progress
from awqpad.verify.structure import PROVENANCE


@dataclass(frozen=True)
class Entry:
    """One step of the run: `check` runs when every context field named in `needs` is present."""

    check: Callable[[VerifyContext], list[Check]]
    needs: tuple[str, ...] = ()


def per_tp(*checks: Callable[[VerifyContext, int], list[Check]]) -> Callable[[VerifyContext], list[Check]]:
    """Run checks(ctx, t) for each TP size in turn (all checks for TP 2, then all for TP 4, ...)."""
    def run(ctx: VerifyContext) -> list[Check]:
        return [c for t in ctx.tps for check in checks for c in check(ctx, t)]
    return run


CHECKS: tuple[Entry, ...] = (
    Entry(structure.check_structure),
    Entry(structure.check_provenance),
    Entry(consistency.check_config, ("out",)),
    Entry(consistency.check_index, ("out",)),
    Entry(consistency.check_tensors, ("out", "src")),
    Entry(per_tp(sharding.check_rules, sharding.check_shards), ("out",)),
    Entry(bytewise.check_bytes, ("out", "ops")),  # pad-fill, bytes-original, bytes-unchanged
    Entry(fills.check_zeros, ("out", "ops")),
    Entry(regrouped.check_regroup, ("out", "ops")),  # regrouped scales / zeros / g_idx = SRC's groups split
    Entry(function.check_function, ("out", "src")),  # function TP=t, before TP=t
    Entry(function.check_attention, ("out",)),  # attn-shards TP=t, attention
    Entry(checksums.check_checksums),  # every file's sha256 as pad wrote it
)


def parse_layers(spec: str) -> str | tuple[int, ...]:
    spec = (spec or "sample").strip().lower()
    if spec in ("sample", "all", "none"):
        return spec
    try:
        layers = tuple(sorted({int(part) for part in spec.split(",") if part.strip()}))
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0:
        raise InputError(f"--layers {spec!r}: expected sample, all, none or comma-separated layer numbers like 0,5,11")
    return layers


def verify_output(out_source: Source, tps, engine: str = "vllm", src_source: Source | None = None,
                  layers: str = "sample", seed: int = 0, progress: Progress | None = None) -> VerifyReport:
    """Run every check on OUT (and against SRC when given). Raises InputError only for unusable
    arguments: an unknown engine, a bad --layers, an unreadable SRC, OUT with no awqpad.json and no SRC."""
    started = time.monotonic()
    tps = tuple(sorted(set(int(t) for t in tps)))
    if not tps or min(tps) < 1:
        raise InputError("--tp: give at least one tensor-parallel size >= 1")
    if engine not in ENGINE_CHOICES:
        raise InputError(f"--engine {engine!r} is not one of {', '.join(ENGINE_CHOICES)}")
    layer_spec = parse_layers(layers)
    root = out_source.root
    record, record_error = structure.read_record(root)
    if record is None and record_error == "missing" and src_source is None:
        raise InputError(f"{root}: no {PROVENANCE}, so nothing records what was padded; "
                         "give the source too: awqpad verify SRC OUT --tp N",
                         hint="OUT must be a directory written by `awqpad pad`")
    src = read_checkpoint(src_source) if src_source is not None else None
    out, out_error = structure.open_out(out_source)
    blocks = ()
    if out is not None and src is not None:
        blocks = tuple(function.select_blocks(out, layer_spec, seed))  # bad --layers: InputError before any work
    ctx = VerifyContext(root, out, out_error, src, structure.resolve_provenance(record, record_error, src, out),
                        tps, engines_for(engine), layer_spec, seed, blocks, progress or null_progress,
                        expert_parallel=bool(record and record.get("expert_parallel") is True))
    checks = [c for entry in CHECKS if all(getattr(ctx, need) is not None for need in entry.needs)
              for c in entry.check(ctx)]
    return VerifyReport(tuple(checks), all(c.ok for c in checks), str(root),
                        str(src.source.root) if src is not None else None, tps, engine,
                        layers if isinstance(layer_spec, str) else ",".join(map(str, layer_spec)),
                        round(time.monotonic() - started, 3))
