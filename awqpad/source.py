"""SRC (local directory | Hugging Face repo id | HF cache) -> a local directory of files.

A repo id `org/name[@revision]` resolves through huggingface_hub, so the normal cache layout,
HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE are honoured exactly as the hub library does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from awqpad.errors import InputError

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s]+))?$")


@dataclass(frozen=True)
class Source:
    root: Path  # local directory holding config.json and the shards
    source_id: str  # what the user typed, minus the revision
    revision: str | None  # resolved commit for hub sources, None for plain directories
    is_hub: bool = False
    fetched_bytes: int = 0  # bytes transferred from the Hub to describe this source


def resolve_source(spec: str, *, headers_only: bool = False, allow_patterns: list[str] | None = None) -> Source:
    """Resolve SRC. `headers_only`: the caller reads config, index and safetensors headers only
    (inspect, plan), so a Hub source need not download weights."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{spec}: not a directory (SRC must be a checkpoint directory or a repo id)")
        return Source(path.resolve(), str(path), None)
    match = REPO_ID.match(spec)
    if match is None or spec.startswith((".", "/", "~")):
        raise InputError(f"{spec}: no such directory")
    return _resolve_cached_repo(match["repo"], match["revision"], allow_patterns)


def _resolve_cached_repo(repo_id: str, revision: str | None, allow_patterns: list[str] | None) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            local_files_only=True,
            allow_patterns=allow_patterns,
        )
    except LocalEntryNotFoundError:
        where = f"{repo_id}@{revision}" if revision else repo_id
        reason = "HF_HUB_OFFLINE is set" if offline else "downloading from the Hub is not supported by this command"
        raise InputError(f"{where}: not a local directory and not in the Hugging Face cache ({reason})")
    except Exception as exc:  # huggingface_hub raises many types; all mean "cannot resolve"
        raise InputError(f"{repo_id}: cannot resolve from the Hugging Face cache ({exc.__class__.__name__}: {exc})")
    root = Path(snapshot)
    return Source(root, repo_id, root.name, is_hub=True)
