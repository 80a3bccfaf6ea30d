"""The header cache of `inspect` / `plan` on repo ids: per repo and commit, config + index + each shard's
safetensors header, as sparse files of the remote size, so `read_checkpoint` reads them like a checkout.

It lives inside the repo's own folder of the Hub cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub):
`models--ORG--NAME/awqpad-headers/COMMIT/`. So `hf cache ls` lists the repo, `hf cache rm` removes the
headers with it, and --cache-dir / HF_HUB_CACHE move it. Its real size (allocated blocks; the sparse holes
take none) is bounded by AWQPAD_HEADER_CACHE_MB (default 256 MB): after each new entry the oldest entries
are pruned until the rest fit. `awqpad cache ls|clear` shows and empties it.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

DIR_NAME = "awqpad-headers"
COMPLETE = ".awqpad-headers.json"  # marker written last into a finished entry
DEFAULT_LIMIT_MB = 256


@dataclass(frozen=True)
class CacheEntry:
    repo_id: str
    commit: str
    path: str
    bytes_on_disk: int  # allocated blocks
    apparent_bytes: int  # what the sparse files claim (the remote shard sizes)
    last_used: float  # seconds since the epoch


def cache_root() -> Path:
    from awqpad.source.hub_settings import hub_cache_root

    return hub_cache_root()


def headers_root(repo_id: str, commit: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_root() / repo_folder_name(repo_id=repo_id, repo_type="model") / DIR_NAME / commit


def limit_bytes() -> int:
    try:
        return max(0, int(float(os.environ.get("AWQPAD_HEADER_CACHE_MB", DEFAULT_LIMIT_MB)) * 1e6))
    except ValueError:
        return DEFAULT_LIMIT_MB * 10**6


def _sizes(path: Path) -> tuple[int, int]:
    real = apparent = 0
    for f in path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            st = f.stat()
            real += st.st_blocks * 512
            apparent += st.st_size
    return real, apparent


def entries(root: Path | None = None) -> list[CacheEntry]:
    """Every complete entry, least recently used first."""
    root = cache_root() if root is None else root
    found = []
    for commit_dir in root.glob(f"models--*/{DIR_NAME}/*"):
        marker = commit_dir / COMPLETE
        if not commit_dir.is_dir() or commit_dir.name.startswith(".") or not marker.is_file():
            continue
        repo_id = commit_dir.parent.parent.name.removeprefix("models--").replace("--", "/")
        real, apparent = _sizes(commit_dir)
        found.append(CacheEntry(repo_id, commit_dir.name, str(commit_dir), real, apparent, marker.stat().st_mtime))
    return sorted(found, key=lambda e: e.last_used)


def touch(path: Path) -> None:
    """Mark an entry as used now (pruning removes the least recently used first)."""
    try:
        os.utime(path / COMPLETE)
    except OSError:
        pass


def prune(limit: int | None = None, keep: Path | None = None) -> list[CacheEntry]:
    """Remove the least recently used entries until the rest fit in `limit` bytes; never `keep`."""
    limit = limit_bytes() if limit is None else limit
    all_entries = entries()
    total = sum(e.bytes_on_disk for e in all_entries)
    removed = []
    for entry in all_entries:
        if total <= limit:
            break
        if keep is not None and Path(entry.path) == keep:
            continue
        _remove(Path(entry.path))
        total -= entry.bytes_on_disk
        removed.append(entry)
    return removed


def clear(repo_id: str | None = None) -> list[CacheEntry]:
    """Remove every entry (of `repo_id` only, if given)."""
    removed = [e for e in entries() if repo_id is None or e.repo_id == repo_id]
    for entry in removed:
        _remove(Path(entry.path))
    return removed


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    parent = path.parent
    try:
        parent.rmdir()  # the awqpad-headers folder, once empty
    except OSError:
        pass


def age(seconds: float) -> str:
    delta = max(0, time.time() - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            return f"{delta / size:.0f} {unit} ago"
    return "just now"
