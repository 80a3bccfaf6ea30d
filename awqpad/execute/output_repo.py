"""Write a complete padded repo atomically: temp sibling of OUT, fsync, then rename.

An interrupted or failed run leaves no directory at OUT (only a hidden `.OUT.awqpad-partial-*`
sibling that the next run removes), so nothing half-written ever looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from awqpad import __version__
from awqpad.checkpoint.model import Checkpoint
from awqpad.errors import InputError, OutputError
from awqpad.execute.shard_writer import shard_output_size, write_shard
from awqpad.plan.pad_plan import PadPlan, plan_summary
from awqpad.serialize import to_data

PROVENANCE = "awqpad.json"
PARTIAL_TAG = ".awqpad-partial-"
# Weights in other formats would be stale (unpadded) copies next to the padded safetensors.
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".safetensors")
SKIP_DIRS = {".git", ".cache", "original", "__pycache__"}
SPACE_MARGIN = 64 << 20
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


def _tagalong_files(root: Path) -> tuple[list[Path], list[str]]:
    keep, skipped = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or path.is_dir():
            continue
        name = rel.as_posix()
        if name in ("config.json", PROVENANCE) or name.endswith(".safetensors.index.json"):
            continue
        if name.endswith(SKIP_SUFFIXES):
            if not name.endswith(".safetensors"):
                skipped.append(name)
            continue
        keep.append(rel)
    return keep, skipped


def model_card_section(plan: PadPlan, ckpt: Checkpoint) -> str:
    lines = ["", "## Padded for tensor parallelism with awqpad", ""]
    lines.append(
        f"This repository is `{ckpt.source.source_id}`"
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
    lines += ["", "Serve it with:", "", "```", f"vllm serve <this repo> --tensor-parallel-size {max(plan.tp)}", "```",
              "", "Details of every changed tensor are in `awqpad.json`.", ""]
    return "\n".join(lines)


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (e.g. `timeout`, a killed make job) cleans up like Ctrl-C; SIGXFSZ becomes an EFBIG error."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, handler)
    old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGXFSZ, old_xfsz)


def _remove_stale_partials(out: Path, notify: Callable[[str], None]) -> None:
    for stale in out.parent.glob(f".{out.name}{PARTIAL_TAG}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)
        notify(f"removed {stale.name}: partial output of an interrupted run")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OutputError(f"{path}: flushing to disk failed ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(src: Path, out: Path, force: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise OutputError(f"{out}: OUT must not be SRC, inside it, or contain it (awqpad never writes into the source)")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if not out_r.parent.is_dir():
        raise OutputError(f"{out.parent}: parent directory does not exist")


def expected_output_bytes(ckpt: Checkpoint, plan: PadPlan) -> int:
    ops = {op.tensor: op for op in plan.ops}
    shards = sum(shard_output_size(s, {n: ops[n] for n in s.tensors if n in ops}) for s in ckpt.shards)
    others = sum((ckpt.source.root / rel).stat().st_size for rel in _tagalong_files(ckpt.source.root)[0])
    return shards + others


def pad_to_directory(ckpt: Checkpoint, plan: PadPlan, out: Path, *, force: bool = False,
                     progress: Callable[[int], None] = lambda n: None, notify: Callable[[str], None] = lambda m: None,
                     fsync: bool = True) -> PadResult:
    started = time.monotonic()
    src = ckpt.source.root
    check_destination(src, out, force)
    _remove_stale_partials(out, notify)
    needed = expected_output_bytes(ckpt, plan)
    free = shutil.disk_usage(out.resolve().parent).free
    if free < needed + SPACE_MARGIN:
        raise OutputError(
            f"{out.parent}: not enough free space: the padded repo needs {needed / 1e9:.2f} GB (+{SPACE_MARGIN >> 20} MB margin), "
            f"{free / 1e9:.2f} GB free"
        )
    tmp = out.parent / f".{out.name}{PARTIAL_TAG}{os.getpid()}"
    ops = {op.tensor: op for op in plan.ops}
    written = 0
    with _terminate_as_interrupt():
        try:
            tmp.mkdir()
            written = _write_shards(ckpt, ops, tmp, progress, fsync)
            _write_index(ckpt, plan, tmp)
            _write_config(ckpt, plan, tmp)
            copied, skipped = _copy_tagalong(ckpt, plan, tmp, fsync)
            _write_provenance(ckpt, plan, tmp)
            if fsync:
                shard_names = {s.filename for s in ckpt.shards}
                for path in tmp.rglob("*"):
                    if path.is_file() and path.name not in shard_names:
                        _fsync_file(path)
                _fsync_dir(tmp)
            if out.exists():  # --force: swap the old directory out only once the new one is complete
                old = out.parent / f".{out.name}{PARTIAL_TAG}old-{os.getpid()}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
            if fsync:
                _fsync_dir(out.resolve().parent)
        except KeyboardInterrupt:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"{out}: interrupted; the partial output was removed and {out} was not written") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return PadResult(str(out), tuple(s.filename for s in ckpt.shards), written, time.monotonic() - started,
                     len([op for op in plan.ops if op.replace is None]), tuple(copied), tuple(skipped))


def _write_shards(ckpt: Checkpoint, ops: dict, tmp: Path, progress, fsync: bool) -> int:
    """Write (and fsync) every shard, WRITERS at a time: the copies are kernel memcpy-bound, so two cores
    finish sooner than one. The first failure (or Ctrl-C) stops the other writers before it propagates."""
    cancel = threading.Event()
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            progress(n)

    def one(shard) -> int:
        shard_ops = {n: ops[n] for n in shard.tensors if n in ops}
        size = write_shard(ckpt.source.root, shard, shard_ops, tmp / shard.filename, advance, fsync=False, cancel=cancel)
        if fsync:
            _fsync_file(tmp / shard.filename)
        return size

    pool = ThreadPoolExecutor(max_workers=max(1, min(WRITERS, len(ckpt.shards))))
    jobs = [pool.submit(one, shard) for shard in ckpt.shards]
    try:
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


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_index(ckpt: Checkpoint, plan: PadPlan, tmp: Path) -> None:
    if ckpt.index_file is None:
        return
    src = ckpt.source.root / ckpt.index_file
    try:
        index = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{src}: cannot re-read the index ({exc})")
    from awqpad.checkpoint.header import tensor_nbytes

    ops = {op.tensor: op for op in plan.ops}
    total = sum(tensor_nbytes(t.dtype, ops[n].new_shape if n in ops else t.shape) for n, t in ckpt.tensors.items())
    index.setdefault("metadata", {})["total_size"] = total
    _write_json(tmp / ckpt.index_file, index)


def _write_config(ckpt: Checkpoint, plan: PadPlan, tmp: Path) -> None:
    config = json.loads(json.dumps(ckpt.config.raw))
    for path, value in plan.config_updates.items():
        _set_path(config, path, value)
    _write_json(tmp / "config.json", config)


def _copy_tagalong(ckpt: Checkpoint, plan: PadPlan, tmp: Path, fsync: bool) -> tuple[list[str], list[str]]:
    keep, skipped = _tagalong_files(ckpt.source.root)
    copied = []
    for rel in keep:
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() == "README.md":
            continue
        try:
            shutil.copyfile(ckpt.source.root / rel, dest)  # follows HF-cache symlinks to their blobs
        except OSError as exc:
            raise OutputError(f"{dest}: cannot copy ({exc.strerror or exc})") from None
        copied.append(rel.as_posix())
    card = ckpt.source.root / "README.md"
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else f"# {ckpt.source.source_id} (padded)\n"
    (tmp / "README.md").write_text(text.rstrip("\n") + "\n" + model_card_section(plan, ckpt), encoding="utf-8")
    copied.append("README.md")
    return copied, skipped


def provenance(ckpt: Checkpoint, plan: PadPlan, out_dir: Path | None = None) -> dict:
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
    return data


def _write_provenance(ckpt: Checkpoint, plan: PadPlan, tmp: Path) -> None:
    _write_json(tmp / PROVENANCE, provenance(ckpt, plan, tmp))
