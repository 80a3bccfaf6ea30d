"""OUT when nothing needs padding ("nothing to do", "already padded"): SRC's files as hard links (copies
when OUT is on another filesystem), plus an awqpad.json that says no padding was needed.

So `awqpad pad A B && vllm serve B` works whatever A is. Same atomic protocol as a padded OUT: built in
a hidden sibling, fsynced, renamed into place; `--force` swaps the old OUT out only at the end.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Callable

from awqpad.checkpoint.model import Checkpoint
from awqpad.errors import InputError, OutputError
from awqpad.execute.build import build_atomically, check_destination, fsync_file
from awqpad.execute.output_repo import PROVENANCE, PadResult, _write_json, copy_file, provenance, side_files
from awqpad.plan.pad_plan import PadPlan
from awqpad.source import bounded_json
from awqpad.source.paths import output_file, source_file

# Linking fails with these when OUT's filesystem cannot hold a link to SRC: copy instead.
COPY_INSTEAD = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


def _link_or_copy(src: Path, dest: Path) -> str | None:
    """Hard link `src` (already resolved: an HF-cache symlink's blob) at `dest`; copy if the filesystem
    cannot hold the link. Returns None when linked, else the sha256 of the copy (hashed as it was written)."""
    try:
        os.link(src, dest, follow_symlinks=True)
        return None
    except OSError as exc:
        if exc.errno not in COPY_INSTEAD:
            raise OutputError(f"{dest}: cannot link to {src} ({exc.strerror or exc})") from None
    return copy_file(src, dest)


def _record(ckpt: Checkpoint, plan: PadPlan, tmp: Path, status: str, digests: dict) -> dict:
    """awqpad.json of an unpadded OUT. "already padded": SRC's own record (its ops and file hashes describe
    these very bytes, so `verify OUT` still checks them), marked as passed through; otherwise a fresh record
    (sha256 only of the files copied: a hard link was never written, so never hashed)."""
    src_record = ckpt.source.root / PROVENANCE
    data = None
    if status == "already padded":
        try:
            data = bounded_json.read(src_record, "provenance")
        except InputError:
            data = None
    if not isinstance(data, dict):
        data = provenance(ckpt, plan, tmp, digests)
    data["padding_needed"] = False
    data["status"] = status
    return data


def link_to_directory(ckpt: Checkpoint, plan: PadPlan, out: Path, *, status: str, force: bool = False,
                      follow_symlinks: bool = False, notify: Callable[[str], None] = lambda m: None,
                      fsync: bool = True) -> tuple[PadResult, list[str]]:
    """Write OUT as links/copies of SRC; returns (PadResult, names of the hard-linked files)."""
    started = time.monotonic()
    src = ckpt.source.root
    sides = side_files(src, follow_symlinks)  # every input is validated before anything is written
    check_destination(src, out, force)
    files = {s.filename: source_file(src, s.filename, f"{src}: shard") for s in ckpt.shards}
    for name in ("config.json", ckpt.index_file):
        if name:
            files[name] = source_file(src, name, f"{src}: {name}")
    files.update(dict(sides.keep))
    linked, copied, digests = [], [], {}

    def build(tmp: Path) -> int:
        written = 0
        for name, real in files.items():
            dest = output_file(tmp, name)
            sha = _link_or_copy(real, dest)
            if sha is None:
                linked.append(name)
            else:
                copied.append(name)
                digests[name] = sha
                written += dest.stat().st_size
                if fsync:
                    fsync_file(dest)
        _write_json(tmp, PROVENANCE, _record(ckpt, plan, tmp, status, digests))
        if fsync:
            fsync_file(tmp / PROVENANCE)
        return written

    # Links take no room, so no free-space check; a copy across filesystems is not pre-checked either (ENOSPC is exit 4).
    written = build_atomically(src, out, force, lambda: 0, build, notify, fsync)
    result = PadResult(str(out), tuple(s.filename for s in ckpt.shards), written, time.monotonic() - started, 0,
                       tuple(copied), tuple(sides.skipped), tuple(sides.external))
    return result, linked
