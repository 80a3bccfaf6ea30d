"""SRC (local directory | Hugging Face repo id `org/name[@revision]`) -> a local directory of files.

A repo id resolves through huggingface_hub, so HF_TOKEN, HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and
HF_HUB_OFFLINE are honoured exactly as the hub library honours them:

* `headers_only=True` (inspect, plan): config.json, the safetensors index and the quantization side
  files are downloaded into the normal HF cache; of each shard only the 8-byte length and the JSON
  header are fetched, with HTTP Range requests through huggingface_hub's own HTTP session. They are
  materialised as *sparse* files of the remote size in the repo's Hub-cache folder
  (`models--ORG--NAME/awqpad-headers/COMMIT/`, see header_cache.py), so
  `read_checkpoint` reads them like a local directory. Planning a 40 GB repo costs kilobytes.
* `headers_only=False` (pad, verify): `snapshot_download` into the normal HF cache (resumable),
  skipping files the output never needs (`*.bin`, `*.pth`, `original/`, ...).
"""

from __future__ import annotations

from pathlib import Path

from awqpad.errors import InputError
from awqpad.source.spec import Source, parse_repo_spec



def resolve_source(
    spec: str,
    *,
    headers_only: bool = False,
    allow_patterns: list[str] | None = None,
    progress: bool | None = None,
) -> Source:
    """Resolve SRC. `headers_only`: the caller reads config, index and safetensors headers only
    (inspect, plan), so a Hub source need not download weights. `allow_patterns` replaces the default
    download filter of a Hub snapshot. `progress`: show huggingface_hub's download bars (None: the
    awqpad's rule, only when stderr is a terminal; pass False in --json / --quiet mode)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{spec}: not a directory (SRC must be a checkpoint directory or a repo id)")
        return Source(path.resolve(), str(path), None)
    parsed = parse_repo_spec(spec)
    if parsed is None:
        raise InputError(f"{spec}: no such directory")
    repo_id, revision = parsed
    from awqpad.source.hub_common import hub_error
    from awqpad.source.hub_download import resolve_headers, resolve_snapshot

    try:
        if headers_only:
            return resolve_headers(repo_id, revision)
        return resolve_snapshot(repo_id, revision, allow_patterns, progress)
    except InputError:
        raise
    except Exception as exc:  # huggingface_hub / httpx errors -> one line naming the repo
        raise hub_error(exc, repo_id, revision) from None

