"""Structure and provenance: OUT reads as a checkpoint, and awqpad.json says exactly what was padded.

Also the ops the other checks compare against: awqpad.json's, or (without one) the ops the format rules
give for SRC at OUT's widths.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from awqpad.checkpoint.formats.base import Fill, Insert, TensorOp
from awqpad.checkpoint.model import Checkpoint, read_checkpoint
from awqpad.engines.profiles import ENGINE_CHOICES
from awqpad.errors import AwqpadError, InputError
from awqpad.serialize import to_data
from awqpad.source import Source, bounded_json
from awqpad.verify.context import MAX_LISTED, Check, Provenance, VerifyContext, make_check

PROVENANCE = "awqpad.json"
SCHEMA_VERSION = 1


def read_record(root: Path) -> tuple[dict | None, str | None]:
    """(awqpad.json as a dict, None) or (None, why it is unusable); ("missing") when absent."""
    path = root / PROVENANCE
    if not path.is_file():
        return None, "missing"
    try:
        data = bounded_json.read(path, "provenance", PROVENANCE)
    except InputError as exc:  # not JSON, too big, too deep: the provenance check fails with this line
        return None, exc.message
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
                                tuple(map(int, replace)) if replace is not None else None,
                                int(item.get("regroup", 1)), int(item.get("regroup_axis", 0)),
                                str(item.get("regroup_kind", "repeat"))))
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
    from awqpad.plan.strategy import STRATEGIES, plan_with_strategy

    if (record is not None and record.get("awqpad_version") == __version__ and record.get("engine") in ENGINE_CHOICES
            and isinstance(record.get("tp"), list) and record["tp"] and all(isinstance(t, int) and t > 0 for t in record["tp"])):
        strategy = record.get("strategy") if record.get("strategy") in STRATEGIES else "pad"
        plan = plan_with_strategy(src, tuple(record["tp"]), record["engine"], bool(record.get("skip_experts")),
                                  bool(record.get("pad_heads")), record.get("expert_parallel") is True, strategy)
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
        from awqpad.plan.head_layout import head_ops

        ops += head_ops(src, out.dims.heads, out.dims.kv_heads or out.dims.heads)
    return tuple(ops)


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


def open_out(out_source: Source) -> tuple[Checkpoint | None, str | None]:
    """(OUT as a checkpoint, None) or (None, the reader's message). Besides awqpad's own reader, every shard
    is opened with the safetensors library itself, which is what engines load it with, and must show the
    same tensors, dtypes and shapes."""
    try:
        out = read_checkpoint(out_source)
    except AwqpadError as exc:
        return None, exc.message
    problem = library_view_problem(out)
    return (None, problem) if problem else (out, None)


def library_view_problem(ckpt: Checkpoint) -> str | None:
    from safetensors import safe_open

    for shard in ckpt.shards:
        try:
            with safe_open(str(ckpt.source.root / shard.filename), framework="numpy") as f:
                seen = {name: f.get_slice(name) for name in f.keys()}
                view = {name: (sl.get_dtype(), tuple(sl.get_shape())) for name, sl in seen.items()}
        except Exception as exc:  # the library's own error types vary by version
            return f"{shard.filename}: the safetensors library rejects it ({str(exc).splitlines()[0][:200]})"
        ours = {name: (info.dtype, info.shape) for name, info in shard.tensors.items()}
        if view != ours:
            differ = sorted(n for n in view.keys() | ours.keys() if view.get(n) != ours.get(n))
            return f"{shard.filename}: the safetensors library reads it differently (e.g. {differ[0]!r})"
    return None


def resolve_provenance(record: dict | None, record_error: str | None, src: Checkpoint | None,
                       out: Checkpoint | None) -> Provenance:
    """The recorded ops, the ops SRC needs, and which of them the other checks use."""
    recorded = ops_error = None
    if record is not None:
        try:
            recorded = ops_from_record(record)
        except ValueError as exc:
            ops_error = f"{PROVENANCE} {exc}"
    derived = derive_error = None
    complete = False
    if out is not None and src is not None:
        try:
            derived, complete = expected_ops(src, out, record if recorded is not None else None)
        except AwqpadError as exc:
            derive_error = f"cannot derive the expected padding from SRC: {exc.message}"
    ops = recorded if recorded is not None else derived
    return Provenance(record, record_error, ops, recorded, ops_error, derived, complete, derive_error)


def check_structure(ctx: VerifyContext) -> list[Check]:
    """OUT reads as a checkpoint: config, index -> shards, every safetensors header."""
    o = ctx.out
    if o is None:
        return [make_check("structure", [ctx.out_error], "")]
    return [make_check("structure", [], f"{len(o.shards)} shard(s), {len(o.tensors)} tensors, {len(o.linears)} linears, "
                       f"{len(o.mlps)} MLP blocks ({o.format}); the safetensors library reads every shard alike",
                       {"shards": len(o.shards), "tensors": len(o.tensors), "bytes": o.total_bytes, "format": o.format,
                        "library_opened": len(o.shards)})]


def check_provenance(ctx: VerifyContext) -> list[Check]:
    """awqpad.json matches the files; with SRC, its fingerprint and ops match SRC."""
    started = time.monotonic()
    p = ctx.provenance
    record, out, src = p.record, ctx.out, ctx.src
    problems: list[str] = []
    figures: dict = {}
    if record is None:
        if p.record_error == "missing":
            problems.append(f"no {PROVENANCE} in OUT: it was not written by `awqpad pad`, or the file was removed "
                            "(checked against the ops derived from SRC instead)")
        else:
            problems.append(p.record_error)
    else:
        figures["recorded_tp"] = record.get("tp")
        figures["recorded_engine"] = record.get("engine")
        if record.get("schema_version") != SCHEMA_VERSION:
            problems.append(f"{PROVENANCE} schema_version is {record.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        if p.recorded is not None:
            figures["ops"] = len(p.recorded)
        if p.ops_error is not None:
            problems.append(p.ops_error)
        problems += _record_files(ctx.root, out, record)
    if out is not None and src is not None:
        if p.derive_error is not None:
            problems.append(p.derive_error)
        elif p.recorded is not None:
            recorded = p.recorded
            if not p.derived_complete:  # only MLP tensors can be derived from widths alone
                mlp = {info.name for b in src.mlps for lin in b.linears for info in lin.parts.values()}
                mlp |= {b.act_scales.name for b in src.mlps if b.act_scales is not None}
                recorded = tuple(op for op in recorded if op.tensor in mlp)
            problems += _compare_ops(recorded, p.derived)
        if record is not None:
            from awqpad.execute.output_repo import source_fingerprint

            fingerprint = (record.get("source") or {}).get("layout_sha256")
            actual = source_fingerprint(src)
            if fingerprint != actual:
                problems.append(f"{PROVENANCE} records source fingerprint {str(fingerprint)[:12]}… but SRC has "
                                f"{actual[:12]}…: OUT was padded from a different source (or SRC changed)")
    if out is not None and ctx.ops is not None and record is not None:
        problems += _record_vs_tensors(out, ctx.ops, record)
    detail = (f"{len(ctx.ops or ())} recorded ops match the files" + (" and SRC" if src is not None else "")
              if record is not None else "ops derived from SRC")
    return [make_check("provenance", problems, detail, figures, started)]


def _record_files(root: Path, out: Checkpoint | None, record: dict) -> list[str]:
    """awqpad.json's `files` table against OUT's shards: every shard listed, sizes equal. The table also
    lists the small files with the sha256 `pad` computed while writing each file; those are not checked
    here yet (a hash check fires on every tampering, which the per-family checks' tests do not expect)."""
    problems = []
    files = record.get("files")
    if not isinstance(files, dict):
        return [f"{PROVENANCE} has no `files` table"]
    if out is not None:
        actual = {s.filename for s in out.shards}
    else:
        actual = {p.name for p in root.iterdir() if p.is_file() and p.name.endswith(".safetensors")}
    listed = {name for name in files if isinstance(name, str) and name.endswith(".safetensors")}
    for name in sorted(listed - actual):
        problems.append(f"{PROVENANCE} lists shard {name} which is not in OUT" if not (root / name).is_file()
                        else f"{PROVENANCE} lists shard {name} which the index does not use")
    for name in sorted(actual - listed):
        problems.append(f"shard {name} is not listed in {PROVENANCE}")
    for name in sorted(listed & actual):
        want = (files[name] or {}).get("size") if isinstance(files[name], dict) else None
        size = (root / name).stat().st_size
        if want != size:
            problems.append(f"{name} is {size} bytes but {PROVENANCE} records {want} (truncated or rewritten?)")
    return problems


def _record_vs_tensors(out: Checkpoint, ops: tuple[TensorOp, ...], record: dict) -> list[str]:
    problems = []
    for op in ops:
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
