"""`awqpad verify`: check that a padded repo is exactly what `awqpad pad` claims, and that it works at TP.

verify_output(OUT [, SRC]) runs a list of named checks and returns a VerifyReport; it never prints
or exits. Checks (in report order; "SRC" = only when the source is given):

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
  rules E TP=t      the engine's per-rank rules (rules.evaluate, as `plan` uses them) hold at TP t
  shards TP=t       every rank's shard of every MLP linear is whole packed words and whole groups
  pad-fill          every inserted element holds exactly the fill awqpad.json records
  bytes-unchanged SRC  every tensor pad did not touch is byte-identical to SRC (streamed compare)
  bytes-original SRC   in every padded tensor the original region is byte-identical to SRC
  zeros             every padded row / column of every padded linear dequantizes to exactly 0.0
                    under every reader variant of its format
  function TP=t SRC    selected MLP blocks (first, middle, last layer; for MoE three experts per layer
                    and the shared expert): OUT sharded per rank as vLLM shards it, run in float64 and
                    all-reduced, vs the unpadded unsharded SRC block (fails above 1e-9 relative).
                    Blocks over SIM_BUDGET weights run on a sample of whole groups of the width (the
                    first and last groups of three ranks and the padded tail).
  before TP=t   SRC    informational (always ok): what the unpadded SRC would do at TP t

Memory: the byte checks read through two 4 MB buffers per thread; `zeros` and `function` memory-map
one linear / one MLP block (SRC and OUT) at a time and dequantize bounded float64 slices.
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from awqpad.checkpoint import formats
from awqpad.verify import simulate_mlp as simulate
from awqpad.checkpoint.model import Checkpoint, Linear, MLPBlock, read_checkpoint
from awqpad.engines.profiles import ENGINE_CHOICES, engines_for
from awqpad.errors import AwqpadError, InputError
from awqpad.checkpoint.formats.base import Fill, Insert, TensorOp, bf16_to_f32, fill_bytes
from awqpad.engines.evaluate import evaluate
from awqpad.serialize import to_data
from awqpad.source import Source
from awqpad.execute.tensor_io import ARRAY_DTYPES, RAW_DTYPES, itemsize, read_array

PROVENANCE = "awqpad.json"
SCHEMA_VERSION = 1
REL_TOL = 1e-9
CHUNK = 4 << 20  # bytes per read in the streaming checks (two reused buffers)
BIG_ROW = 4 << 20  # padded tensors with rows larger than this are compared as byte ranges
BATCH = 4  # random input vectors per simulated block
MAX_LISTED = 5
THREADS = max(1, min(4, os.cpu_count() or 1))  # streaming jobs in parallel (pread releases the GIL)
JOB_BYTES = 64 << 20  # bytes of unchanged tensors per job
SIM_BUDGET = 1 << 25  # weights per simulated block (gate + up + down) before the width is sampled

# progress(total_bytes, description) -> context manager yielding advance(nbytes) (cli.output.Output.progress)
Progress = Callable[[int, str], object]


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


def _null_progress(total: int, description: str):
    return nullcontext(lambda n: None)


# --- inputs ----------------------------------------------------------------------------------


def read_record(root: Path) -> tuple[dict | None, str | None]:
    """(awqpad.json as a dict, None) or (None, why it is unusable); ("missing") when absent."""
    path = root / PROVENANCE
    if not path.is_file():
        return None, "missing"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{PROVENANCE} is not valid JSON ({exc})"
    if not isinstance(data, dict):
        return None, f"{PROVENANCE} is not a JSON object"
    return data, None


def ops_from_record(data: dict) -> tuple[TensorOp, ...]:
    """TensorOps from awqpad.json `ops` (the inverse of serialize.to_data); ValueError if malformed."""
    raw = data.get("ops")
    if not isinstance(raw, list):
        raise ValueError("has no `ops` list")
    ops = []
    try:
        for item in raw:
            inserts = tuple(
                Insert(int(i["at"]), int(i["count"]),
                       Fill(str(i["fill"]["kind"]), i["fill"]["value"], int(i["fill"].get("group_size", 0))))
                for i in item.get("inserts") or ()
            )
            replace = item.get("replace")
            ops.append(TensorOp(str(item["tensor"]), str(item["dtype"]), tuple(map(int, item["old_shape"])),
                                tuple(map(int, item["new_shape"])), int(item["axis"]), inserts,
                                tuple(map(int, replace)) if replace is not None else None))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"has a malformed op ({exc.__class__.__name__}: {exc})")
    return tuple(ops)


def expected_ops(src: Checkpoint, out: Checkpoint, record: dict | None) -> tuple[tuple[TensorOp, ...], bool]:
    """(the ops `pad` must have written, whether they cover every tensor) for SRC.

    With an awqpad.json from this awqpad version: the plan for its recorded TP sizes, engine and
    --skip-experts (so every kind of padding the planner does is covered). Otherwise (no record, or
    another version whose planner may differ): the format rules' ops for SRC's MLP blocks padded to
    OUT's widths, which speak for MLP tensors only.
    """
    from awqpad import __version__
    from awqpad.plan.pad_plan import make_plan

    if (record is not None and record.get("awqpad_version") == __version__ and record.get("engine") in ENGINE_CHOICES
            and isinstance(record.get("tp"), list) and record["tp"] and all(isinstance(t, int) and t > 0 for t in record["tp"])):
        plan = make_plan(src, tuple(record["tp"]), record["engine"], bool(record.get("skip_experts")),
                         bool(record.get("pad_heads")))
        return plan.ops, True
    return derive_ops(src, out), False


def derive_ops(src: Checkpoint, out: Checkpoint) -> tuple[TensorOp, ...]:
    """The ops the format rules give for SRC padded to OUT's MLP widths (what `pad` must have done)."""
    from awqpad.plan.pad_plan import block_ops

    ops: list[TensorOp] = []
    for kind, widths in src.dims.widths.items():
        new = max(out.dims.widths.get(kind, widths))
        for block in src.mlps:
            if block.kind == kind and block.width != new:
                ops += block_ops(block, new)
    if (out.dims.heads, out.dims.kv_heads) != (src.dims.heads, src.dims.kv_heads) and out.dims.heads:
        from awqpad.plan.heads import head_ops

        ops += head_ops(src, out.dims.heads, out.dims.kv_heads or out.dims.heads)
    return tuple(ops)


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


def select_blocks(ckpt: Checkpoint, layers: str | tuple[int, ...], seed: int = 0) -> list[MLPBlock]:
    """MLP blocks to simulate: first, middle and last layer (all dense/shared blocks, a sample of
    experts: first, last and one chosen by `seed`); every block for 'all'; all blocks of listed layers."""
    if layers == "all":
        return list(ckpt.mlps)
    if layers == "none":
        return []
    present = sorted({b.layer for b in ckpt.mlps})
    if isinstance(layers, tuple):
        missing = sorted(set(layers) - set(present))
        if missing:
            raise InputError(f"--layers: layer(s) {missing} have no MLP in this checkpoint (layers {present[0]}..{present[-1]})"
                             if present else "--layers: this checkpoint has no MLP blocks")
        return [b for b in ckpt.mlps if b.layer in layers]
    if not present:
        return []
    chosen = sorted({present[0], present[len(present) // 2], present[-1]})
    rng = np.random.default_rng(seed)
    picked = []
    for layer in chosen:
        blocks = [b for b in ckpt.mlps if b.layer == layer]
        experts = sorted((b for b in blocks if b.kind == "expert"), key=lambda b: b.expert)
        keep = set()
        if experts:
            keep = {0, len(experts) - 1}
            if len(experts) > 2:
                keep.add(int(rng.integers(1, len(experts) - 1)))
        picked += [b for b in blocks if b.kind != "expert"] + [experts[i] for i in sorted(keep)]
    return picked


# --- the entry point -------------------------------------------------------------------------


def verify_output(out_source: Source, tps, engine: str = "vllm", src_source: Source | None = None,
                  layers: str = "sample", seed: int = 0, progress: Progress | None = None) -> VerifyReport:
    """Run every check on OUT (and against SRC when given). Raises InputError only for unusable
    arguments: an unknown engine, a bad --layers, an unreadable SRC, OUT with no awqpad.json and no SRC."""
    started = time.monotonic()
    progress = progress or _null_progress
    tps = tuple(sorted(set(int(t) for t in tps)))
    if not tps or min(tps) < 1:
        raise InputError("--tp: give at least one tensor-parallel size >= 1")
    if engine not in ENGINE_CHOICES:
        raise InputError(f"--engine {engine!r} is not one of {', '.join(ENGINE_CHOICES)}")
    layer_spec = parse_layers(layers)
    root = out_source.root
    record, record_error = read_record(root)
    if record is None and record_error == "missing" and src_source is None:
        raise InputError(f"{root}: no {PROVENANCE}, so nothing records what was padded; "
                         "give the source too: awqpad verify SRC OUT --tp N",
                         hint="OUT must be a directory written by `awqpad pad`")
    src = read_checkpoint(src_source) if src_source is not None else None

    v = _Verifier(root, src, tps, engines_for(engine), layer_spec, seed, progress)
    v.run(out_source, record, record_error)
    return VerifyReport(tuple(v.checks), all(c.ok for c in v.checks), str(root),
                        str(src.source.root) if src is not None else None, tps, engine,
                        layers if isinstance(layer_spec, str) else ",".join(map(str, layer_spec)),
                        round(time.monotonic() - started, 3))


class _Verifier:
    def __init__(self, root: Path, src: Checkpoint | None, tps, engines, layers, seed: int, progress):
        self.root, self.src, self.tps, self.engines, self.layers, self.seed = root, src, tps, engines, layers, seed
        self.progress = progress
        self.checks: list[Check] = []
        self.out: Checkpoint | None = None
        self.ops: tuple[TensorOp, ...] | None = None
        self.blocks: list[MLPBlock] = []
        self.fill_failed: set[str] = set()  # padded tensors whose inserted bytes are not the recorded fill

    def add(self, name: str, problems: list[str], ok_detail: str, figures: dict | None = None, started: float | None = None):
        figures = dict(figures or {})
        if started is not None:
            figures["seconds"] = round(time.monotonic() - started, 3)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            figures.setdefault("problems", problems[:50])
            self.checks.append(Check(name, False, problems[0] + more, figures))
        else:
            self.checks.append(Check(name, True, ok_detail, figures))

    def run(self, out_source: Source, record: dict | None, record_error: str | None) -> None:
        self.check_structure(out_source)
        if self.out is not None and self.src is not None:
            self.blocks = select_blocks(self.out, self.layers, self.seed)  # bad --layers: InputError before any work
        self.check_provenance(record, record_error)
        if self.out is None:
            return
        self.check_config(record)
        self.check_index()
        if self.src is not None:
            self.check_tensors()
        for t in self.tps:
            for engine in self.engines:
                self.check_rules(engine, t)
            self.check_shards(t)
        if self.ops is not None:
            self.check_bytes()
            self.check_zeros()
        if self.src is not None:
            self.check_function()
        self.check_attention()

    # -- structure, provenance, config, index, tensors ----------------------------------------

    def check_structure(self, out_source: Source) -> None:
        try:
            self.out = read_checkpoint(out_source)
        except AwqpadError as exc:
            self.add("structure", [exc.message], "")
            return
        o = self.out
        self.add("structure", [], f"{len(o.shards)} shard(s), {len(o.tensors)} tensors, {len(o.linears)} linears, "
                 f"{len(o.mlps)} MLP blocks ({o.format})",
                 {"shards": len(o.shards), "tensors": len(o.tensors), "bytes": o.total_bytes, "format": o.format})

    def check_provenance(self, record: dict | None, record_error: str | None) -> None:
        started = time.monotonic()
        problems: list[str] = []
        figures: dict = {}
        out, src = self.out, self.src
        if record is None:
            if record_error == "missing":
                problems.append(f"no {PROVENANCE} in OUT: it was not written by `awqpad pad`, or the file was removed "
                                "(checked against the ops derived from SRC instead)")
            else:
                problems.append(record_error)
        else:
            figures["recorded_tp"] = record.get("tp")
            figures["recorded_engine"] = record.get("engine")
            if record.get("schema_version") != SCHEMA_VERSION:
                problems.append(f"{PROVENANCE} schema_version is {record.get('schema_version')!r}, expected {SCHEMA_VERSION}")
            try:
                self.ops = ops_from_record(record)
                figures["ops"] = len(self.ops)
            except ValueError as exc:
                problems.append(f"{PROVENANCE} {exc}")
            problems += self._record_files(record)
        if out is not None and src is not None:
            try:
                derived, complete = expected_ops(src, out, record if self.ops is not None else None)
            except AwqpadError as exc:
                derived = None
                problems.append(f"cannot derive the expected padding from SRC: {exc.message}")
            if derived is not None and self.ops is None:
                self.ops = derived
            elif derived is not None:
                recorded = self.ops
                if not complete:  # only MLP tensors can be derived from widths alone
                    mlp = {info.name for b in src.mlps for lin in b.linears for info in lin.parts.values()}
                    mlp |= {b.act_scales.name for b in src.mlps if b.act_scales is not None}
                    recorded = tuple(op for op in recorded if op.tensor in mlp)
                problems += _compare_ops(recorded, derived)
            if record is not None:
                from awqpad.execute.output_repo import source_fingerprint

                recorded = (record.get("source") or {}).get("layout_sha256")
                actual = source_fingerprint(src)
                if recorded != actual:
                    problems.append(f"{PROVENANCE} records source fingerprint {str(recorded)[:12]}… but SRC has "
                                    f"{actual[:12]}…: OUT was padded from a different source (or SRC changed)")
        if out is not None and self.ops is not None and record is not None:
            problems += self._record_vs_tensors(record)
        where = "awqpad.json" if record is not None else "SRC"
        self.add("provenance", problems, f"{len(self.ops or ())} recorded ops match the files"
                 + (" and SRC" if src is not None else "") if record is not None else f"ops derived from {where}",
                 figures, started)

    def _record_files(self, record: dict) -> list[str]:
        problems = []
        files = record.get("files")
        if not isinstance(files, dict):
            return [f"{PROVENANCE} has no `files` table"]
        if self.out is not None:
            actual = {s.filename for s in self.out.shards}
        else:
            actual = {p.name for p in self.root.iterdir() if p.is_file() and p.name.endswith(".safetensors")}
        for name in sorted(set(files) - actual):
            problems.append(f"{PROVENANCE} lists shard {name} which is not in OUT" if not (self.root / name).is_file()
                            else f"{PROVENANCE} lists shard {name} which the index does not use")
        for name in sorted(actual - set(files)):
            problems.append(f"shard {name} is not listed in {PROVENANCE}")
        for name in sorted(set(files) & actual):
            want = (files[name] or {}).get("size") if isinstance(files[name], dict) else None
            size = (self.root / name).stat().st_size
            if want != size:
                problems.append(f"{name} is {size} bytes but {PROVENANCE} records {want} (truncated or rewritten?)")
        return problems

    def _record_vs_tensors(self, record: dict) -> list[str]:
        problems = []
        out = self.out
        for op in self.ops:
            info = out.tensors.get(op.tensor)
            if info is None:
                problems.append(f"{op.tensor}: padded according to {PROVENANCE} but missing from OUT")
                continue
            if info.dtype != op.dtype:
                problems.append(f"{op.tensor}: OUT has dtype {info.dtype}, {PROVENANCE} records {op.dtype}")
            if tuple(info.shape) != tuple(op.new_shape):
                problems.append(f"{op.tensor}: OUT shape {list(info.shape)}, {PROVENANCE} records {list(op.new_shape)}")
        dims = (record.get("plan") or {}).get("dims") or {}
        for key, d in dims.items():
            if not isinstance(d, dict) or d.get("kind") not in out.dims.widths:
                continue
            widths = out.dims.widths[d["kind"]]
            if list(widths) != [d.get("padded")]:
                problems.append(f"{PROVENANCE} records {key} padded to {d.get('padded')} but OUT's "
                                f"{d['kind']} MLP tensors are {', '.join(map(str, widths))} wide")
        return problems

    def check_config(self, record: dict | None) -> None:
        out = self.out
        problems = [f.message for f in out.findings if f.level == "error" and "config" in f.message]
        problems += [f"{f.message}: config.json has one value for all of them" for f in out.findings
                     if "widths differ between layers" in f.message]
        updates = ((record or {}).get("plan") or {}).get("config_updates") or {}
        for path, value in updates.items():
            got = _get_path(out.config.raw, path)
            if got != value:
                problems.append(f"config.json {path} = {got!r} but {PROVENANCE} says pad set it to {value!r}")
        figures = {key: out.config.get(key) for kind, key in out.family.keys.items()
                   if kind in out.dims.widths and key}
        if self.src is not None and record is not None:
            expected = copy.deepcopy(self.src.config.raw)
            for path, value in updates.items():
                _set_path(expected, path, value)
            for path in _diff(expected, out.config.raw):
                problems.append(f"config.json {path} = {_get_path(out.config.raw, path)!r}, expected "
                                f"{_get_path(expected, path)!r} (SRC's value plus the updates {PROVENANCE} records)")
        keys = ", ".join(f"{k} {v}" for k, v in figures.items()) or "no MLP width keys"
        self.add("config", problems, f"config.json agrees with the tensors ({keys})", figures)

    def check_index(self) -> None:
        out, src = self.out, self.src
        problems = [f.message for f in out.findings if "index" in f.message]
        figures: dict = {"index": out.index_file}
        if out.index_file is not None:
            index = json.loads((self.root / out.index_file).read_text(encoding="utf-8"))
            weight_map = index.get("weight_map", {})
            total = (index.get("metadata") or {}).get("total_size")
            actual = sum(t.nbytes for t in out.tensors.values())
            figures["total_size"] = total
            if total is not None and total != actual:
                problems.append(f"{out.index_file} metadata.total_size is {total} but the tensors hold {actual} bytes")
            if src is not None and src.index_file is not None:
                src_map = json.loads((src.source.root / src.index_file).read_text(encoding="utf-8")).get("weight_map", {})
                for name in sorted(set(src_map) - set(weight_map))[:MAX_LISTED]:
                    problems.append(f"{out.index_file} does not list {name} (SRC's index does)")
                for name in sorted(n for n in set(src_map) & set(weight_map) if src_map[n] != weight_map[n])[:MAX_LISTED]:
                    problems.append(f"{out.index_file} puts {name} in {weight_map[name]}, SRC in {src_map[name]}")
        elif src is not None and src.index_file is not None:
            problems.append(f"OUT has no {src.index_file} but SRC has one")
        self.add("index", problems, f"{out.index_file or 'single shard, no index'} lists every tensor in its shard", figures)

    def check_tensors(self) -> None:
        src, out = self.src, self.out
        ops = {op.tensor: op for op in self.ops or ()}
        problems = []
        missing = sorted(set(src.tensors) - set(out.tensors))
        extra = sorted(set(out.tensors) - set(src.tensors))
        if missing:
            problems.append(f"{len(missing)} SRC tensor(s) missing from OUT: {', '.join(missing[:MAX_LISTED])}")
        if extra:
            problems.append(f"{len(extra)} tensor(s) in OUT that SRC does not have: {', '.join(extra[:MAX_LISTED])}")
        for name in sorted(set(src.tensors) & set(out.tensors)):
            s, o = src.tensors[name], out.tensors[name]
            op = ops.get(name)
            want = tuple(op.new_shape) if op is not None else tuple(s.shape)
            if o.dtype != s.dtype:
                problems.append(f"{name}: dtype {o.dtype} in OUT, {s.dtype} in SRC")
            elif op is not None and tuple(op.old_shape) != tuple(s.shape):
                problems.append(f"{name}: the op pads a {list(op.old_shape)} tensor but SRC's is {list(s.shape)}")
            elif tuple(o.shape) != want:
                problems.append(f"{name}: shape {list(o.shape)} in OUT, expected {list(want)}"
                                + (" (unchanged from SRC)" if op is None else ""))
        self.add("tensors", problems, f"all {len(src.tensors)} SRC tensors present; {len(ops)} padded as recorded",
                 {"tensors": len(src.tensors), "padded": len(ops)})

    # -- engine rules and per-rank shard geometry ----------------------------------------------

    def check_rules(self, engine: str, t: int) -> None:
        out = self.out
        found = {}
        variants = [None] + [{kind: w} for kind, ws in out.dims.widths.items() if len(ws) > 1 for w in ws]
        for widths in variants:
            for v in evaluate(out, engine, t, widths):
                found.setdefault((v.rule, str(v.value)), v)
        errors = [v for v in found.values() if v.severity == "error"]
        slower = [v for v in found.values() if v.severity != "error"]
        problems = [f"{v.explanation} [{v.rule}] — {engine}: {v.message}" for v in errors]
        note = f"; {len(slower)} fallback warning(s): {slower[0].explanation}" if slower else ""
        self.add(f"rules {engine} TP={t}", problems, f"every {engine} rule holds at TP {t}{note}",
                 {"engine": engine, "tp": t, "violations": to_data(list(found.values()))})

    def check_shards(self, t: int) -> None:
        problems = []
        for block in self.out.mlps:
            problems += [f"{block.label}: {p.message}" for p in simulate.shard_problems(block, t)]
        linears = sum(len(b.linears) for b in self.out.mlps)
        self.add(f"shards TP={t}", problems,
                 f"all {t} ranks get whole words and whole groups of all {linears} MLP linears",
                 {"tp": t, "blocks": len(self.out.mlps), "linears": linears})

    # -- bytes ---------------------------------------------------------------------------------

    def check_bytes(self) -> None:
        """pad-fill (+ bytes-original, bytes-unchanged with SRC): every byte streamed once from each side,
        in jobs (one padded tensor, or up to JOB_BYTES of a run of unchanged tensors) over THREADS threads."""
        started = time.monotonic()
        out, src = self.out, self.src
        ops = {op.tensor: op for op in self.ops if op.tensor in out.tensors}
        padded_bytes = sum(out.tensors[n].nbytes for n in ops)
        fill_problems, orig_problems = [], []
        jobs = []  # (kind, payload)
        for name, op in ops.items():
            info = out.tensors[name]
            if op.replace is not None:
                values = read_array(self.root, info).tolist()
                if values != list(op.replace):
                    fill_problems.append(f"{name} = {values}, {PROVENANCE} records {list(op.replace)}")
                    self.fill_failed.add(name)
                continue
            if tuple(info.shape) != tuple(op.new_shape) or info.dtype != op.dtype:
                continue  # reported by provenance
            s_info = src.tensors.get(name) if src is not None else None
            if s_info is not None and (tuple(s_info.shape) != tuple(op.old_shape) or s_info.dtype != op.dtype):
                s_info = None  # reported by tensors
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
        with ExitStack() as stack, self.progress(total, "verifying bytes") as advance:
            fds = _FdCache(stack, [self.root / s.filename for s in out.shards]
                           + ([src.source.root / s.filename for s in src.shards] if src is not None else []))
            local = threading.local()

            def work(job):
                t0 = time.monotonic()
                bufs = getattr(local, "bufs", None) or Buffers()
                local.bufs = bufs
                kind, payload = job
                if kind == "padded":
                    info, op, s_info = payload
                    result = scan_padded(fds, bufs, self.root, info, op,
                                         src.source.root if s_info is not None else None, s_info, advance) + (info.name,)
                else:
                    result = compare_run(fds, bufs, src.source.root, self.root, *payload, advance)
                return kind, result, time.monotonic() - t0

            with ThreadPoolExecutor(max_workers=THREADS) as pool:
                for kind, result, spent in pool.map(work, jobs):
                    seconds[kind] += spent
                    if kind == "padded":
                        fill_problems += result[0]
                        orig_problems += result[1]
                        if result[0]:
                            self.fill_failed.add(result[2])
                    else:
                        for name, (first, count, length) in result.items():
                            entry = bad.setdefault(name, [first, 0, length])
                            entry[0] = min(entry[0], first)
                            entry[1] += count
        figures = {"tensors": len(ops), "bytes": padded_bytes, "threads": THREADS}
        self.add("pad-fill", fill_problems, f"all inserted elements of {len(ops)} padded tensors hold the recorded fill",
                 figures, started)
        if src is None:
            return
        self.add("bytes-original", orig_problems,
                 f"the original region of all {len(ops)} padded tensors is byte-identical to SRC", {"tensors": len(ops)})
        nbytes = sum(src.tensors[n].nbytes for n in unchanged)
        diffs = [f"{name} differs from SRC at byte {first} of {length} ({count} byte(s) differ); pad should have "
                 "copied it unchanged" for name, (first, count, length) in sorted(bad.items())]
        wall = time.monotonic() - started
        self.add("bytes-unchanged", diffs, f"{len(unchanged)} unchanged tensors ({nbytes / 1e6:.1f} MB) byte-identical to SRC",
                 {"tensors": len(unchanged), "bytes": nbytes, "seconds": round(wall, 3),
                  "mb_per_s": round((2 * nbytes + 2 * padded_bytes) / 1e6 / wall, 1) if wall > 0 else None})

    # -- zeros ---------------------------------------------------------------------------------

    def check_zeros(self) -> None:
        """Every padded row / column of every padded linear dequantizes to exactly 0.0 under every reader.

        Once pad-fill has confirmed a linear's inserted bytes, its padded region's dequantized values
        depend only on its format, geometry and recorded fills (never on the original weights: padded
        outputs have their own scale columns, padded inputs their own groups), so linears that agree on
        all of those (the experts of a MoE, the layers of a dense model) are dequantized once. A linear
        with any pad-fill problem is dequantized on its own.
        """
        started = time.monotonic()
        out = self.out
        ops = {op.tensor: op for op in self.ops}
        padded = [lin for lin in out.linears if any(info.name in ops for info in lin.parts.values())]
        problems: list[str] = []
        readers_seen: set[str] = set()
        elements = dequantized = 0
        done: dict[tuple, tuple[str, list[str]]] = {}  # signature -> (linear checked, problems found)
        what = {"out": "outputs", "in": "inputs"}
        with self.progress(sum(lin.nbytes for lin in padded), "checking zeros") as advance:
            for lin in padded:
                advance(lin.nbytes)
                key = _signature(lin, ops)
                clean = not any(info.name in self.fill_failed for info in lin.parts.values())
                if clean and key in done:
                    problems += [p.replace(done[key][0], lin.prefix, 1) for p in done[key][1]]
                    continue
                found: list[str] = []
                try:
                    ranges = padded_ranges(lin, ops)
                except ValueError as exc:
                    found.append(str(exc))
                    ranges = []
                arrays = {part: map_array(self.root, info) for part, info in lin.parts.items()}
                for reader in formats.BY_NAME[lin.format].readers(lin):
                    readers_seen.add(reader)
                    for dim, start, stop in ranges:
                        for variant, keep in _variants(lin, dim):
                            try:
                                with np.errstate(all="ignore"):
                                    w = simulate.dequantize(simulate.take(arrays, lin, dim, start, stop, replicate=keep), lin, reader)
                            except simulate.ShardError as exc:
                                found.append(f"{lin.prefix}: padded {what[dim]} [{start}, {stop}) cannot be sliced: {exc.message}")
                                continue
                            elements += w.size
                            bad = np.count_nonzero(w)  # NaN counts as non-zero
                            if bad:
                                finite = np.abs(w[np.isfinite(w)])
                                worst = f"max |w| = {finite.max():.6g}" if finite.size else "all NaN/inf"
                                found.append(f"{lin.prefix}: padded {what[dim]} [{start}, {stop}) dequantize to non-zero under "
                                             f"reader {reader}{variant} ({bad} weights, {worst})")
                del arrays
                if clean:
                    done.setdefault(key, (lin.prefix, found))
                dequantized += 1
                problems += found
        self.add("zeros", problems,
                 f"{elements} padded weights of {len(padded)} linears ({dequantized} dequantized, the rest identical "
                 f"paddings) are exactly 0.0 under reader(s) {', '.join(sorted(readers_seen)) or '-'}",
                 {"linears": len(padded), "dequantized": dequantized, "weights": elements, "readers": sorted(readers_seen)},
                 started)

    # -- function (simulated TP) and the before story -----------------------------------------

    def check_function(self) -> None:
        started = time.monotonic()
        src = self.src
        blocks = self.blocks
        by_key = {(b.kind, b.layer, b.expert): b for b in src.mlps}
        act = simulate.activation_name(src.config.text)
        per_t = {t: {"max_rel_error": 0.0, "worst": None, "problems": []} for t in self.tps}
        before = {t: {"problems": [], "max_rel_error": 0.0, "blocks": 0} for t in self.tps}
        readers_seen: set[str] = set()
        notes: list[str] = []
        nonfinite = outputs = 0
        sampled: list[float] = []
        total = sum(lin.nbytes for b in blocks for lin in b.linears)
        with self.progress(2 * total, "simulating TP") as advance:
            for n, block in enumerate(blocks):
                s_block = by_key.get((block.kind, block.layer, block.expert))
                if s_block is None:
                    for t in self.tps:
                        per_t[t]["problems"].append(f"{block.label}: not in SRC")
                    continue
                rng = np.random.default_rng([self.seed, n])
                x = rng.standard_normal((BATCH, s_block.linears[0].in_features))
                reader = simulate.engine_reader(s_block)
                readers_seen.add(reader)
                # Tensors are memory-mapped, one block at a time: SRC (reference, before), then OUT.
                s_data = _load(src.source.root, s_block)
                o_data = _load(self.root, block)
                for t in self.tps:
                    self._before_block(before[t], s_data, x, t, reader, act)
                refs: dict = {}
                for t in self.tps:
                    channels = None
                    if 3 * block.width * hidden(block) > SIM_BUDGET and not simulate.shard_problems(block, t):
                        channels = simulate.sample_channels(block, t, s_block.width, seed=self.seed + n)
                        sampled.append(sum(b - a for a, b in channels) / block.width)
                    key = tuple(channels or ())
                    if key not in refs:
                        refs[key] = simulate.mlp_reference(s_data, x, reader, act, channels=channels)
                        nonfinite += int(np.size(refs[key]) - np.count_nonzero(np.isfinite(refs[key])))
                        outputs += int(np.size(refs[key]))
                    ref = refs[key]
                    try:
                        y = simulate.mlp_sharded(o_data, x, t, reader, act, notes, channels=channels)
                    except simulate.ShardError as exc:
                        per_t[t]["problems"].append(f"{block.label}: {exc.message}")
                        continue
                    err = simulate.relative_error(y, ref)
                    if per_t[t]["worst"] is None or err > per_t[t]["max_rel_error"]:
                        per_t[t]["max_rel_error"] = err
                        per_t[t]["worst"] = block.label
                    if not err <= REL_TOL:
                        per_t[t]["problems"].append(f"{block.label}: sharded OUT differs from SRC by {err:.3g} "
                                                    f"(max relative error; reader {reader}; limit {REL_TOL:g})")
                del s_data, o_data, refs
                advance(sum(lin.nbytes for lin in s_block.linears) + sum(lin.nbytes for lin in block.linears))
        seconds = round(time.monotonic() - started, 3)
        if nonfinite and nonfinite < outputs:
            notes.append(f"SRC itself gives {nonfinite} of {outputs} outputs non-finite (NaN/inf weights); OUT "
                         "reproduces them at the same positions" + ("; nothing finite to compare" if nonfinite == outputs else ""))
        if sampled:
            notes.append(f"blocks over {SIM_BUDGET / 1e6:.1f}M weights simulate a sample of whole groups: rank edges and "
                         f"the padded tail ({100 * min(sampled):.1f}-{100 * max(sampled):.1f}% of the width)")
        for t in self.tps:
            r = per_t[t]
            detail = (f"{len(blocks)} MLP blocks sharded over {t} ranks match SRC: max relative error "
                      f"{r['max_rel_error']:.2g} (limit {REL_TOL:g}; {seconds:.2f} s)")
            if outputs and nonfinite == outputs:
                detail = (f"{len(blocks)} MLP blocks sharded over {t} ranks reproduce SRC's outputs, but every one of "
                          f"them is NaN/inf (SRC's weights hold NaN/inf), so no finite values were compared ({seconds:.2f} s)")
            if not blocks:
                detail = "no MLP blocks selected (--layers none)" if self.layers == "none" else "no MLP blocks to simulate"
            if notes:
                detail += f"; note: {notes[0]}" + (f" (+{len(notes) - 1} more)" if len(notes) > 1 else "")
            self.add(f"function TP={t}", r["problems"], detail,
                     {"tp": t, "blocks": len(blocks), "layers": sorted({b.layer for b in blocks}),
                      "readers": sorted(readers_seen), "max_rel_error": r["max_rel_error"], "worst": r["worst"],
                      "threshold": REL_TOL, "activation": act, "nonfinite_outputs": nonfinite, "notes": notes,
                      "sampled_blocks": len(sampled),
                      "seconds": seconds})
            self.checks.append(self._before_check(t, before[t]))

    def check_attention(self) -> None:
        """Only when heads were padded: every rank's attention shard can be formed (shapes), and, with SRC,
        the fp64 attention block (RoPE, GQA mapping, causal softmax, q/k norms, biases), unsharded and
        sharded by heads, equals the unpadded SRC block."""
        from awqpad.verify import simulate_attention as attention_sim

        out, src = self.out, self.src
        padded = src is not None and (out.dims.heads, out.dims.kv_heads) != (src.dims.heads, src.dims.kv_heads)
        recorded = any(op.tensor.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value",
                                                      "W_pack", "wqkv", "c_attn") for op in (self.ops or ()))
        if not (padded or recorded):
            return
        for t in self.tps:
            problems = [p.message for p in attention_sim.shard_problems(out, t)]
            self.add(f"attn-shards TP={t}", problems,
                     f"all {t} ranks get whole heads ({out.dims.heads} query / {out.dims.kv_heads} KV) and whole groups")
        if src is None:
            return
        started = time.monotonic()
        all_layers = attention_sim.attention_layers(src)
        if self.layers == "all":
            chosen = all_layers
        elif self.layers == "none":
            chosen = ()
        elif isinstance(self.layers, tuple):
            chosen = tuple(layer for layer in self.layers if layer in all_layers)
        else:
            chosen = tuple(sorted({all_layers[0], all_layers[len(all_layers) // 2], all_layers[-1]})) if all_layers else ()
        if not chosen:
            return
        result = attention_sim.compare_attention(src, out, self.tps, layers=chosen, seed=self.seed)
        problems = [f"layer {r.layer} reader {r.reader} TP={r.tp or 1}: "
                    + (r.detail or f"padded attention differs from SRC by {r.error:.3g} (limit {result.tolerance:g})")
                    for r in result.failures]
        self.add("attention", problems,
                 f"attention of layers {list(chosen)} ({src.dims.heads} -> {out.dims.heads} heads) unsharded and sharded over "
                 f"{', '.join(map(str, self.tps))} ranks match SRC: max relative error {result.max_error:.2g} "
                 f"(limit {result.tolerance:g})",
                 {"layers": list(chosen), "max_rel_error": result.max_error, "heads": [src.dims.heads, out.dims.heads]},
                 started)

    def _before_block(self, acc: dict, s_data: simulate.MLPData, x, t: int, reader: str, act: str) -> None:
        """The unpadded SRC block at TP t: which rank's shard cannot be formed; else how it computes."""
        acc["blocks"] += 1
        block = s_data.block
        problems = simulate.shard_problems(block, t)
        if problems:
            acc["problems"].append((block, problems))
            return
        channels = None
        if 3 * block.width * hidden(block) > SIM_BUDGET:
            channels = simulate.sample_channels(block, t, seed=self.seed)
        try:
            y = simulate.mlp_sharded(s_data, x, t, reader, act, channels=channels)
        except simulate.ShardError as exc:
            acc["problems"].append((block, [exc]))
            return
        ref = simulate.mlp_reference(s_data, x, reader, act, channels=channels)
        acc["max_rel_error"] = max(acc["max_rel_error"], simulate.relative_error(y, ref))

    def _before_check(self, t: int, acc: dict) -> Check:
        src = self.src
        violations = [v for e in self.engines for v in evaluate(src, e, t)]
        errors = [v for v in violations if v.severity == "error"]
        # Shapes alone say which rank of which block cannot be formed: check every SRC block, not just
        # the simulated ones (so --layers none still tells the story).
        static = [(b, ps) for b in src.mlps for ps in [simulate.shard_problems(b, t)] if ps]
        found = static or acc["problems"]
        figures = {"tp": t, "informational": True, "blocks": len(src.mlps), "simulated_blocks": acc["blocks"],
                   "blocks_with_problems": len(found),
                   "engine_errors": [{"engine": v.engine, "rule": v.rule, "message": v.message} for v in errors]}
        if found:
            block, problems = found[0]
            first = problems[0]
            ranks = sorted({p.rank for p in problems if p.rank is not None})
            figures.update(first_rank=first.rank, partial_ranks=ranks, first_problem=first.message)
            where = first.message if first.message.startswith(block.label) else f"{block.label}: {first.message}"
            if ranks:
                where += f" ({len(ranks)} of {t} ranks affected)"
        elif errors:
            replicated = any(lin.desc_act for b in src.mlps for lin in b.linears)
            where = ("every rank's shard can be formed" + (" (act-order: every rank holds all scale rows)" if replicated else "")
                     + f", but the engine checks more: {errors[0].explanation}")
        else:
            figures["max_rel_error"] = acc["max_rel_error"]
            how = (f"max relative error {acc['max_rel_error']:.2g} over {acc['blocks']} simulated blocks" if acc["blocks"]
                   else "from shapes; not simulated")
            return Check(f"before TP={t}", True, f"the unpadded SRC already shards cleanly at TP {t} ({how}); "
                         "padding was not needed for it", figures)
        engine_msg = f"; {errors[0].engine}: \"{errors[0].message}\"" if errors else ""
        return Check(f"before TP={t}", True, f"unpadded SRC at TP {t}: {where}{engine_msg}", figures)


# --- helpers ---------------------------------------------------------------------------------


def map_array(root: Path, info) -> np.ndarray:
    """A read-only memory map of one tensor: slicing it reads only the pages the slice touches (the
    zero check looks at a few padded columns / rows of tensors that may be hundreds of MB)."""
    if info.nbytes == 0:
        return read_array(root, info)
    dtype = np.dtype(ARRAY_DTYPES[info.dtype]).newbyteorder("<")
    return np.memmap(root / info.shard, dtype=dtype, mode="r", offset=info.begin, shape=tuple(info.shape))


def _load(root: Path, block: MLPBlock) -> simulate.MLPData:
    return simulate.MLPData(block, {lin.prefix: {p: map_array(root, i) for p, i in lin.parts.items()} for lin in block.linears})


def hidden(block: MLPBlock) -> int:
    """The hidden size an MLP block maps from and to (gate/up input = down output)."""
    return block.linears[0].in_features


def _signature(lin: Linear, ops: dict[str, TensorOp]) -> tuple:
    """What a linear's padded region depends on: format, geometry, and each part's dtype, shape and op."""
    parts = []
    for part, info in sorted(lin.parts.items()):
        op = ops.get(info.name)
        parts.append((part, info.dtype, tuple(info.shape), None if op is None else
                      (op.axis, tuple(op.old_shape), tuple((i.at, i.count, i.fill) for i in op.inserts), op.replace)))
    return (lin.format, lin.bits, lin.group_size, lin.sym, lin.desc_act, lin.gptq_v2, lin.in_features,
            lin.out_features, tuple(parts))


def _variants(lin: Linear, dim: str) -> list[tuple[str, bool]]:
    """How to slice padded inputs: as vLLM shards them, and (if the linear has g_idx) as a reader
    that honours g_idx with the full scale table (AutoGPTQ / GPTQModel torch path, HF decompress)."""
    if dim == "in" and any(p in lin.parts for p in simulate.SHARED_PARTS) and simulate.scales_partitioned(lin):
        return [("", False), (" with g_idx", True)]
    return [("", False)]


# The tensor that carries a linear's weights, and what one element along each axis is in features.
MAIN_TENSOR = {"awq-gemm": "qweight", "gptq": "qweight", "compressed-tensors": "weight_packed", "dense": "weight"}


def _axis_features(lin: Linear) -> dict[int, tuple[str, int]]:
    per = 32 // (lin.bits or 4)
    return {
        "awq-gemm": {0: ("in", 1), 1: ("out", 8)},
        "gptq": {0: ("in", per), 1: ("out", 1)},
        "compressed-tensors": {0: ("out", 1), 1: ("in", per)},
        "dense": {0: ("out", 1), 1: ("in", 1)},
    }[lin.format]


def padded_ranges(lin: Linear, ops: dict[str, TensorOp]) -> list[tuple[str, int, int]]:
    """(dim, start, stop) feature ranges of OUT's linear that the recorded ops inserted."""
    main = lin.parts.get(MAIN_TENSOR[lin.format])
    op = ops.get(main.name) if main is not None else None
    if op is None:
        raise ValueError(f"{lin.prefix}: some of its tensors are padded but its {MAIN_TENSOR[lin.format]} is not")
    dim, unit = _axis_features(lin)[op.axis]
    out, shift = [], 0
    for ins in sorted(op.inserts, key=lambda i: i.at):
        start = (ins.at + shift) * unit
        out.append((dim, start, start + ins.count * unit))
        shift += ins.count
    return out


def _compare_ops(recorded, derived) -> list[str]:
    rec = {op.tensor: to_data(op) for op in recorded}
    der = {op.tensor: to_data(op) for op in derived}
    problems = []
    for name in sorted(set(der) - set(rec))[:MAX_LISTED]:
        problems.append(f"{name}: SRC at OUT's widths needs padding here but {PROVENANCE} records no op")
    for name in sorted(set(rec) - set(der))[:MAX_LISTED]:
        problems.append(f"{name}: {PROVENANCE} records an op the format rules do not give for SRC")
    for name in sorted(set(rec) & set(der)):
        if rec[name] != der[name]:
            problems.append(f"{name}: {PROVENANCE} records {json.dumps(rec[name]['inserts'] or rec[name]['replace'])}, "
                            f"the format rules give {json.dumps(der[name]['inserts'] or der[name]['replace'])}")
    return problems


def _get_path(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set_path(config: dict, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(path)
            else:
                out += _diff(a[key], b[key], path)
        return out
    return [] if a == b else [prefix or "(root)"]


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


def _decode(raw: np.ndarray, dtype: str):
    """Raw little-endian words -> Python values of `dtype` (for messages)."""
    if dtype == "BF16":
        return bf16_to_f32(raw.astype(np.uint16)).astype(np.float64).tolist()
    return raw.view(np.dtype(ARRAY_DTYPES[dtype]).newbyteorder("<")).tolist()


def expected_fill(fill: Fill, dtype: str, axis_start: int, axis_stop: int, inner: int) -> np.ndarray:
    """Raw words that axis positions [axis_start, axis_stop) of an insert hold, each repeated `inner` times."""
    raw = np.dtype(RAW_DTYPES[itemsize(dtype)]).newbyteorder("<")
    n = axis_stop - axis_start
    if fill.kind == "const":
        one = np.frombuffer(fill_bytes(dtype, fill.value), dtype=raw)
        return np.broadcast_to(one, (n, inner))
    if fill.kind == "group_ids":
        ids = fill.value + np.arange(axis_start, axis_stop, dtype=np.int64) // max(int(fill.group_size), 1)
        words = ids.astype(np.dtype(ARRAY_DTYPES[dtype]).newbyteorder("<")).view(raw)
        return np.broadcast_to(words[:, None], (n, inner))
    raise ValueError(f"unknown fill kind {fill.kind!r}")


def _fill_label(fill: Fill, dtype: str) -> str:
    """How a fill reads in a message: fresh group ids, the hex of an integer word, or nothing."""
    if fill.kind == "group_ids":
        return f" (group ids {fill.value} + i // {fill.group_size})"
    if dtype in ("I32", "U32") and isinstance(fill.value, int):
        return f" (word 0x{fill.value & 0xFFFFFFFF:08X})"
    return ""


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
                            _decode(np.asarray(got[tuple(idx)]).reshape(1), op.dtype)[0],
                            _decode(np.asarray(w).reshape(1), op.dtype)[0])

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
        labels = {_fill_label(f, op.dtype) for f in fills}
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
