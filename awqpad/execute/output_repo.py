"""Write a complete padded repo atomically: temp sibling of OUT, fsync, then rename (see execute/atomic).

An interrupted or failed run leaves no directory at OUT (only a hidden `.OUT.awqpad-partial-*`
sibling that the next run removes), so nothing half-written ever looks complete. Every file is created
new (O_EXCL) inside that temp sibling (source/paths), and only after SRC's side files passed the checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from awqpad import __version__
from awqpad.checkpoint.model import Checkpoint
from awqpad.checkpoint.header import tensor_nbytes
from awqpad.errors import InputError
from awqpad.execute.build import build_atomically, check_destination, fsync_file
from awqpad.execute.fp8_preflight import check_padding_regions
from awqpad.execute.shard_writer import shard_output_size, write_shard
from awqpad.plan.pad_plan import PadPlan
from awqpad.plan.summary import plan_summary
from awqpad.serialize import to_data
from awqpad.source import bounded_json
from awqpad.source.paths import create_output, inside_source, output_file, source_file, write_output

PROVENANCE = "awqpad.json"
MAX_CARD_BYTES = 16 << 20
COPY_BUFFER = 1 << 20
# Weights in other formats would be stale (unpadded) copies next to the padded safetensors.
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".safetensors")
SKIP_DIRS = {".git", ".cache", "original", "__pycache__"}
WRITERS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class PadResult:
    out: str
    shards: tuple[str, ...]
    bytes_written: int
    seconds: float
    padded_tensors: int
    copied_files: tuple[str, ...]
    skipped_files: tuple[str, ...]
    external_files: tuple[str, ...] = ()  # copied from outside SRC because of --follow-symlinks


def source_fingerprint(ckpt: Checkpoint) -> str:
    """sha256 over config.json, the index and every shard header (not the tensor bytes, which verify compares
    directly): cheap, and changes with any change of config or tensor layout."""
    h = hashlib.sha256()
    root = ckpt.source.root
    for name in ("config.json", ckpt.index_file):
        if name:
            h.update((root / name).read_bytes())
    for shard in ckpt.shards:
        with open(root / shard.filename, "rb") as fh:
            h.update(fh.read(shard.data_start))
        h.update(str(shard.file_size).encode())
    return h.hexdigest()


def _set_path(config: dict, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value


@dataclass(frozen=True)
class SideFiles:
    """The non-weight files of SRC that OUT carries along, as (relative name, resolved path)."""

    keep: tuple[tuple[str, Path], ...]
    skipped: tuple[str, ...]  # stale weights in other formats, symlinked directories
    external: tuple[str, ...]  # symlinks out of SRC, copied because the caller allowed it


def side_files(root: Path, follow_symlinks: bool = False) -> SideFiles:
    """Walk SRC (never through symlinked directories) for the files OUT carries along. Every one must be a
    regular file inside SRC: a FIFO or device is a bad input, and a symlink out of SRC is refused unless
    `follow_symlinks` (it would put a file from elsewhere on the machine into OUT, and on the Hub)."""
    keep, skipped, external = [], [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        rel_dir = base.relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        for d in sorted(dirnames):
            if d in SKIP_DIRS:
                dirnames.remove(d)
            elif os.path.islink(base / d):
                dirnames.remove(d)
                skipped.append(rel_dir + d + "/")
        dirnames.sort()
        for fname in sorted(filenames):
            name = rel_dir + fname
            if name in ("config.json", PROVENANCE) or name.endswith(".safetensors.index.json"):
                continue
            if name.endswith(SKIP_SUFFIXES):
                if not name.endswith(".safetensors"):
                    skipped.append(name)
                continue
            real = source_file(root, name, f"{root}: side file", allow_outside=True)
            if not inside_source(root, real):
                if not follow_symlinks:
                    raise InputError(
                        f"{root / name}: a symlink to {real}, outside SRC; refusing to copy it into OUT",
                        hint="pass --follow-symlinks to copy it anyway (with --push-to-hub it is uploaded too)",
                    )
                external.append(name)
            keep.append((name, real))
    return SideFiles(tuple(keep), tuple(skipped), tuple(external))


def card_source(ckpt: Checkpoint) -> str:
    """How the card names the source: the repo id, or only a local directory's name (never a local path)."""
    return ckpt.source.source_id if ckpt.source.is_hub else Path(ckpt.source.source_id).name


def model_card_section(plan: PadPlan, ckpt: Checkpoint, model: str) -> str:
    """The card's awqpad section; `model` is what the launch lines serve (the pushed repo id once known,
    else `./OUT-name`; `awqpad push` rewrites it to the repo id)."""
    from awqpad.engines.launch import launch_lines

    lines = ["", "## Padded for tensor parallelism with awqpad", ""]
    lines.append(
        f"This repository is `{card_source(ckpt)}`"
        + (f" (revision `{ckpt.source.revision}`)" if ckpt.source.revision else "")
        + f" with exact zero padding appended by awqpad {__version__}, so that it loads at "
        f"tensor-parallel size {', '.join(map(str, plan.tp))} under the `{plan.engine}` engine rules."
    )
    lines.append("The padded model computes exactly the same function: every added weight dequantizes to 0.")
    lines.append("")
    for d in plan.changed_dims:
        lines.append(f"- `{d.config_key or d.kind + ' width'}`: {d.original} → {d.padded} ({d.modules} MLP blocks, +{100 * d.added_fraction:.2f} %)")
    if plan.heads is not None:
        from awqpad.plan.heads import caveat_markdown

        lines += [f"- {plan.heads.summary}", "", caveat_markdown(plan.heads)]
    lines += ["", "Serve it with:", "", "```", *launch_lines(plan.engines, model, max(plan.tp), plan.expert_parallel), "```",
              "", "Details of every changed tensor are in `awqpad.json`.", ""]
    return "\n".join(lines)


def expected_output_bytes(ckpt: Checkpoint, plan: PadPlan, follow_symlinks: bool = False) -> int:
    ops = {op.tensor: op for op in plan.ops}
    shards = sum(shard_output_size(s, {n: ops[n] for n in s.tensors if n in ops}) for s in ckpt.shards)
    others = sum(real.stat().st_size for _, real in side_files(ckpt.source.root, follow_symlinks).keep)
    return shards + others


def pad_to_directory(ckpt: Checkpoint, plan: PadPlan, out: Path, *, force: bool = False, follow_symlinks: bool = False,
                     progress: Callable[[int], None] = lambda n: None, notify: Callable[[str], None] = lambda m: None,
                     fsync: bool = True, model: str | None = None) -> PadResult:
    """`model`: what the model card's launch lines serve (default `./OUT-name`)."""
    started = time.monotonic()
    src = ckpt.source.root
    sides = side_files(src, follow_symlinks)  # every input is validated before anything is written
    check_destination(src, out, force)
    check_padding_regions(ckpt, plan)

    def build(tmp: Path) -> tuple[int, list[str]]:
        digests: dict[str, str] = {}  # file -> sha256 of the bytes written, filled in as they go out
        written = _write_shards(ckpt, plan_ops(plan), tmp, progress, fsync, digests)
        _write_index(ckpt, plan, tmp, digests)
        _write_config(ckpt, plan, tmp, digests)
        copied = _copy_side_files(ckpt, plan, tmp, sides, model or f"./{out.name}", digests)
        _write_provenance(ckpt, plan, tmp, digests)
        if fsync:
            shard_names = {s.filename for s in ckpt.shards}  # the shard writer fsyncs its own files
            for path in tmp.rglob("*"):
                if path.is_file() and path.relative_to(tmp).as_posix() not in shard_names:
                    fsync_file(path)
        return written, copied

    written, copied = build_atomically(src, out, force, lambda: expected_output_bytes(ckpt, plan, follow_symlinks),
                                       build, notify, fsync)
    return PadResult(str(out), tuple(s.filename for s in ckpt.shards), written, time.monotonic() - started,
                     len([op for op in plan.ops if op.replace is None]), tuple(copied), tuple(sides.skipped),
                     tuple(sides.external))


def plan_ops(plan: PadPlan) -> dict:
    return {op.tensor: op for op in plan.ops}


def _write_shards(ckpt: Checkpoint, ops: dict, tmp: Path, progress, fsync: bool, digests: dict | None = None) -> int:
    """Write (and fsync) every shard, WRITERS at a time: the copies are kernel memcpy-bound, so two cores
    finish sooner than one. The first failure (or Ctrl-C) stops the other writers before it propagates."""
    cancel = threading.Event()
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            progress(n)

    def one(shard) -> int:
        shard_ops = {n: ops[n] for n in shard.tensors if n in ops}
        path = output_file(tmp, shard.filename)
        size = write_shard(ckpt.source.root, shard, shard_ops, path, advance, fsync=False, cancel=cancel,
                           digests=digests)
        if fsync:
            fsync_file(path)
        return size

    pool = ThreadPoolExecutor(max_workers=max(1, min(WRITERS, len(ckpt.shards))))
    jobs = []
    try:  # submitting starts threads: a Ctrl-C while submitting must still stop and join them
        jobs.extend(pool.submit(one, shard) for shard in ckpt.shards)
        wait(jobs, return_when=FIRST_EXCEPTION)
        failed = [job for job in jobs if job.done() and job.exception() is not None]
        if failed:
            cancel.set()
            raise failed[0].exception()
        return sum(job.result() for job in jobs)
    except BaseException:
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_json(tmp: Path, name: str, data, digests: dict | None = None) -> None:
    _write_hashed(tmp, name, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), digests)


def _write_hashed(tmp: Path, name: str, raw: bytes, digests: dict | None) -> None:
    write_output(tmp, name, raw)
    if digests is not None:
        digests[name] = hashlib.sha256(raw).hexdigest()


def _write_index(ckpt: Checkpoint, plan: PadPlan, tmp: Path, digests: dict | None = None) -> None:
    if ckpt.index_file is None:
        return
    root = ckpt.source.root
    index = bounded_json.read(source_file(root, ckpt.index_file, f"{root}:"), "index", str(root / ckpt.index_file),
                              strict=True)
    ops = plan_ops(plan)
    total = sum(tensor_nbytes(t.dtype, ops[n].new_shape if n in ops else t.shape) for n, t in ckpt.tensors.items())
    if not isinstance(index.get("metadata"), dict):
        index["metadata"] = {}
    index["metadata"]["total_size"] = total
    _write_json(tmp, ckpt.index_file, index, digests)


def _write_config(ckpt: Checkpoint, plan: PadPlan, tmp: Path, digests: dict | None = None) -> None:
    config = json.loads(json.dumps(ckpt.config.raw))
    for path, value in plan.config_updates.items():
        _set_path(config, path, value)
    _write_json(tmp, "config.json", config, digests)


def copy_file(src: Path, dest: Path) -> str:
    """Copy `src` (an HF-cache symlink's blob: its bytes) to the new file `dest`; returns the sha256 of the
    bytes written, hashed on the way out (no second read)."""
    try:
        fin = open(src, "rb")
    except OSError as exc:
        raise InputError(f"{src}: cannot read ({exc.strerror or exc})") from None
    h = hashlib.sha256()
    with fin, os.fdopen(create_output(dest), "wb") as fout:
        while data := fin.read(COPY_BUFFER):
            h.update(data)
            fout.write(data)
    return h.hexdigest()


def _copy_side_files(ckpt: Checkpoint, plan: PadPlan, tmp: Path, sides: SideFiles, model: str,
                     digests: dict | None = None) -> list[str]:
    copied, card = [], None
    for name, real in sides.keep:
        if name == "README.md":
            card = real
            continue
        sha = copy_file(real, output_file(tmp, name))  # HF-cache symlinks: the blob's bytes
        if digests is not None:
            digests[name] = sha
        copied.append(name)
    if card is not None and card.stat().st_size > MAX_CARD_BYTES:
        raise InputError(f"{ckpt.source.root / 'README.md'}: over the {MAX_CARD_BYTES:,}-byte limit for a model card")
    text = card.read_text(encoding="utf-8", errors="replace") if card is not None else f"# {card_source(ckpt)} (padded)\n"
    _write_hashed(tmp, "README.md", (text.rstrip("\n") + "\n" + model_card_section(plan, ckpt, model)).encode("utf-8"),
                  digests)
    copied.append("README.md")
    return copied


def provenance(ckpt: Checkpoint, plan: PadPlan, out_dir: Path | None = None, digests: dict | None = None) -> dict:
    """awqpad.json. `files`: every shard's size, and with `digests` the sha256 of every file written
    (shards and the small files; not awqpad.json itself), computed as the bytes went out."""
    data = {
        "awqpad_version": __version__,
        "schema_version": plan.schema_version,
        "source": {"id": ckpt.source.source_id, "revision": ckpt.source.revision, "hub": ckpt.source.is_hub,
                   "layout_sha256": source_fingerprint(ckpt)},
        "tp": list(plan.tp),
        "engine": plan.engine,
        "skip_experts": plan.skip_experts,
        "expert_parallel": plan.expert_parallel,
        "pad_heads": plan.pad_heads,
        "strategy": plan.strategy,
        "plan": plan_summary(plan),
        "ops": to_data(plan.ops),
    }
    if out_dir is not None:
        data["files"] = {s.filename: {"size": (out_dir / s.filename).stat().st_size} for s in ckpt.shards}
        for name, sha in sorted((digests or {}).items()):
            data["files"].setdefault(name, {"size": (out_dir / name).stat().st_size})["sha256"] = sha
    return data


def _write_provenance(ckpt: Checkpoint, plan: PadPlan, tmp: Path, digests: dict | None = None) -> None:
    _write_json(tmp, PROVENANCE, provenance(ckpt, plan, tmp, digests))
