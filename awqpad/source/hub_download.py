"""Hub repo -> local files: a `snapshot_download` into the HF cache (pad, verify), or config + index +
safetensors headers only, materialised as sparse files (inspect, plan)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from awqpad.errors import InputError
from awqpad.source import header_cache
from awqpad.source.hub_common import library_version as _version
from awqpad.source.hub_common import progress_bars as _progress_bars
from awqpad.source import bounded_json
from awqpad.source.paths import check_name
from awqpad.source.spec import INDEX_NAME, PICKLE_SUFFIXES, SIDE_FILES, Source
from awqpad.source.spec import where as _where

# What `pad` / `verify` download from a repo: the shards, every small file the output carries along
# (tokenizer, chat template, generation config, model card, licence, code for trust_remote_code), and
# nothing the padded output would drop anyway (pickled duplicates, original/ consolidated weights, ...).
DOWNLOAD_ALLOW = [
    "*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja", "*.md", "*.yaml", "*.yml",
    "tokenizer*", "vocab*", "merges*", "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "COPYING*",
    "*.png", "*.jpg", "*.jpeg", "*.gif", "*.svg", "*.webp",
]
DOWNLOAD_IGNORE = [
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot",
    "*.tflite", "*.mlmodel", "*.pb", "*.npz", "*.tar", "*.tar.gz", "*.zip",
    "original/*", "*/original/*", "onnx/*", "openvino/*", "coreml/*", "consolidated*.safetensors",
    "*/*.safetensors",  # shards live at the root; nested weights are never read nor carried into OUT
    ".git/*", ".cache/*",
]

HEADER_PROBE = 16 * 1024  # first Range request for a shard the index says nothing about; longer headers take a second
MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap
COMPLETE = header_cache.COMPLETE  # marker written last into a finished headers directory



def _check_weights(root: Path, repo_id: str, commit: str, offline: bool) -> None:
    """The snapshot must hold the shards (an offline cache may hold only what inspect/plan fetched)."""
    index = root / INDEX_NAME
    if index.is_file():
        wanted = _index_shards(index)
        if wanted is None:
            return  # read_checkpoint reports a malformed index (or a name outside SRC) with the file name
        missing = sorted(name for name in wanted if not (root / name).is_file())
    else:
        missing = [] if any(root.glob("*.safetensors")) else ["*.safetensors"]
    if not missing:
        return
    if missing == ["*.safetensors"]:
        pickled = _cached_tree_pickles(repo_id, commit)
        if pickled:
            raise InputError(
                f"{repo_id}@{commit[:12]}: only pickled weights ({pickled[0]}{', ...' if len(pickled) > 1 else ''}); "
                "awqpad reads safetensors only, because pickle files can run code when loaded",
                hint="use a safetensors revision of the repo, or convert the weights to safetensors first",
            )
        if not offline:
            raise InputError(f"{repo_id}@{commit[:12]}: the repo has no *.safetensors weights")
    if not offline:
        return  # downloaded online, so the repo itself lacks them: read_checkpoint names the missing shard
    raise InputError(
        f"{repo_id}@{commit[:12]}: the weights are not in the Hugging Face cache (HF_HUB_OFFLINE is set; missing {missing[0]}"
        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''})",
        hint="run once online (inspect/plan fetch headers only; pad downloads the weights)",
    )


def _cached_tree_pickles(repo_id: str, commit: str) -> list[str]:
    from huggingface_hub import get_cached_repo_tree

    try:
        files = get_cached_repo_tree(repo_id, revision=commit)
    except Exception:
        return []
    return sorted(f.path for f in files if "/" not in f.path and f.path.endswith(PICKLE_SUFFIXES))


# --- pad / verify: the snapshot in the normal HF cache ---------------------------------------------


def resolve_snapshot(repo_id: str, revision: str | None, allow_patterns: list[str] | None, progress: bool | None) -> Source:
    from huggingface_hub import is_offline_mode, snapshot_download

    offline = is_offline_mode()
    if not offline:
        _check_online(repo_id, revision)
    with _progress_bars(progress):
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=allow_patterns if allow_patterns is not None else DOWNLOAD_ALLOW,
                ignore_patterns=DOWNLOAD_IGNORE,
                library_name="awqpad",
                library_version=_version(),
            )
        )
    commit = snapshot.name
    _check_weights(snapshot, repo_id, commit, offline)
    return Source(snapshot, repo_id, commit, is_hub=True, fetched_bytes=0)


def _check_online(repo_id: str, revision: str | None) -> None:
    """One API call before any download: a missing repo / revision, denied access, rate limiting or an
    unreachable Hub fail here at once with a typed error, instead of after the download helpers' retries
    (or a silent fall back to a stale cache)."""
    from huggingface_hub import HfApi, constants

    HfApi(library_name="awqpad", library_version=_version()).repo_info(
        repo_id, revision=revision, repo_type="model", timeout=constants.HF_HUB_ETAG_TIMEOUT)


# --- inspect / plan: config + index + shard headers only -------------------------------------------


def _headers_root(repo_id: str, commit: str) -> Path:
    from awqpad.source.header_cache import headers_root

    return headers_root(repo_id, commit)


def _complete(root: Path) -> bool:
    return (root / COMPLETE).is_file() and (root / "config.json").is_file()


def _download_json(repo_id: str, filename: str, commit: str) -> tuple[Path, int]:
    """hf_hub_download one small file at `commit`; returns (path, bytes transferred: 0 if it was cached)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename, revision=commit)
    path = Path(hf_hub_download(repo_id, filename, revision=commit, library_name="awqpad", library_version=_version()))
    return path, 0 if isinstance(cached, str) else path.stat().st_size


def resolve_headers(repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import HfApi, hf_hub_download, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.hf_api import RepoFile

    offline = is_offline_mode()
    where = _where(repo_id, revision)
    if not offline:
        _check_online(repo_id, revision)
    with _progress_bars(False):
        # config.json at the revision: resolves branch / tag -> commit (X-Repo-Commit), online or from the
        # cache's refs/ when offline, and writes refs/<revision> so a later offline run resolves it too.
        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        config_path = Path(hf_hub_download(repo_id, "config.json", revision=revision, library_name="awqpad",
                                           library_version=_version()))
        fetched = 0 if isinstance(cached, str) else config_path.stat().st_size
        commit = config_path.parent.name
        snapshot = config_path.parent

        root = _headers_root(repo_id, commit)
        if _complete(root):
            header_cache.touch(root)
            return Source(root, repo_id, commit, is_hub=True, fetched_bytes=fetched)
        if _snapshot_has_weights(snapshot):  # `pad` downloaded this commit already: its headers are local
            return Source(snapshot, repo_id, commit, is_hub=True, fetched_bytes=fetched)
        if offline:
            raise InputError(
                f"{where}: only config.json of commit {commit[:12]} is in the Hugging Face cache, not the "
                "safetensors headers (HF_HUB_OFFLINE is set)",
                hint="run `awqpad inspect` once online to cache the headers",
            )

        entries = [e for e in HfApi(library_name="awqpad", library_version=_version()).list_repo_tree(
            repo_id, revision=commit, recursive=False) if isinstance(e, RepoFile)]
        names = {e.path: e for e in entries}
        shards = sorted(n for n in names if n.endswith(".safetensors"))
        jsons = sorted(n for n in names if n.endswith(".safetensors.index.json") or n in SIDE_FILES)
        files: dict[str, Path] = {"config.json": config_path}
        for name in jsons:
            files[name], n = _download_json(repo_id, name, commit)
            fetched += n

        headers: dict[str, bytes] = {}
        if shards:
            probes = _header_estimates(files.get(INDEX_NAME))
            with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
                results = pool.map(lambda s: _fetch_header(repo_id, s, commit, names[s].size, probes.get(s)), shards)
                for shard, (raw, n) in zip(shards, results):
                    headers[shard] = raw
                    fetched += n

    pickles = [] if shards else sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    where_to = _materialise(root, files, headers, {s: names[s].size for s in shards}, pickles,
                            {"repo": repo_id, "revision": revision, "commit": commit, "fetched_bytes": fetched})
    header_cache.prune(keep=where_to)
    return Source(where_to, repo_id, commit, is_hub=True, fetched_bytes=fetched)


def _index_shards(index: Path) -> set[str] | None:
    """The shard names of a downloaded index, or None if it is malformed or names anything but plain
    relative paths (nothing outside the snapshot is even looked at; read_checkpoint says what is wrong)."""
    try:
        wanted = set(bounded_json.read(index, "index", strict=True)["weight_map"].values())
        for name in wanted:
            check_name(name, str(index))
    except (InputError, KeyError, TypeError, AttributeError):
        return None
    return wanted


def _snapshot_has_weights(snapshot: Path) -> bool:
    index = snapshot / INDEX_NAME
    if index.is_file():
        wanted = _index_shards(index)
        return bool(wanted) and all((snapshot / name).is_file() for name in wanted)
    return any(snapshot.glob("*.safetensors"))


def _header_estimates(index: Path | None) -> dict[str, int]:
    """Shard -> a generous guess of its header size from the index's tensor names, so one Range request
    usually gets the whole header without fetching much past it (a short guess costs a second request)."""
    if index is None:
        return {}
    try:
        weight_map = bounded_json.read(index, "index", strict=True)["weight_map"]
        estimates: dict[str, int] = {}
        for name, shard in weight_map.items():
            # "name":{"dtype":"BF16","shape":[a,b],"data_offsets":[c,d]}, with room for 12-digit offsets
            estimates[shard] = estimates.get(shard, 512) + len(name) + 100
        return estimates
    except (InputError, KeyError, TypeError, AttributeError):
        return {}


def _fetch_header(repo_id: str, filename: str, commit: str, size: int | None, estimate: int | None = None) -> tuple[bytes, int]:
    """The 8-byte length + JSON header of a remote shard, via Range requests on huggingface_hub's session.

    Returns (8 + header bytes, bytes transferred)."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    url = hf_hub_url(repo_id, filename, revision=commit)
    headers = build_hf_headers(library_name="awqpad", library_version=_version())
    headers["Accept-Encoding"] = "identity"

    def get(start: int, end: int) -> bytes:
        response = http_backoff("GET", url, headers={**headers, "Range": f"bytes={start}-{end}"},
                                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        hf_raise_for_status(response)
        data = response.content
        if response.status_code == 200 and start:  # server ignored the Range: slice it ourselves
            data = data[start : end + 1]
        return data

    probe = estimate or HEADER_PROBE
    probe = max(8, probe if size is None else min(probe, size))
    first = get(0, probe - 1)
    transferred = len(first)
    if len(first) < 8:
        raise InputError(f"{repo_id}@{commit[:12]}: {filename}: file is {len(first)} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", first[:8])
    if header_len > MAX_HEADER_BYTES:
        raise InputError(f"{repo_id}@{commit[:12]}: {filename}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if size is not None and 8 + header_len > size:
        raise InputError(f"{repo_id}@{commit[:12]}: {filename}: header length {header_len} is larger than the file ({size} bytes)")
    raw = first[: 8 + header_len]
    if len(raw) < 8 + header_len:
        rest = get(len(first), 8 + header_len - 1)
        transferred += len(rest)
        raw = first + rest
        if len(raw) < 8 + header_len:
            raise InputError(f"{repo_id}@{commit[:12]}: {filename}: the Hub sent {len(raw)} of {8 + header_len} header bytes")
        raw = raw[: 8 + header_len]
    return raw, transferred


def _materialise(root: Path, files: dict[str, Path], headers: dict[str, bytes], sizes: dict[str, int | None],
                 pickles: list[str], manifest: dict) -> Path:
    """Write config/index/side files, sparse shards (header + hole up to the remote size) and the marker.

    Written into a temp sibling and renamed, so a crashed run never leaves a half directory behind.
    Returns where the directory ended up (a private temp dir if HF_HOME is not writable)."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix="awqpad-headers-"))
        _write_headers_dir(tmp, files, headers, sizes, pickles, manifest)
        return tmp
    try:
        _write_headers_dir(tmp, files, headers, sizes, pickles, manifest)
        if root.exists() and not _complete(root):
            shutil.rmtree(root, ignore_errors=True)  # an incomplete leftover
        try:
            os.replace(tmp, root)
        except OSError:
            if not _complete(root):
                return tmp  # cannot rename into place: use the temp copy this once
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename; a duplicate if another run won
    return root


def _write_headers_dir(dest: Path, files: dict[str, Path], headers: dict[str, bytes], sizes: dict[str, int | None],
                       pickles: list[str], manifest: dict) -> None:
    for name in [*files, *headers, *pickles]:  # names come from the Hub's file listing: plain names only
        check_name(name, "the Hub's file listing")
    for name, src in files.items():
        shutil.copyfile(src, dest / name)
    for name, raw in headers.items():
        with open(dest / name, "wb") as fh:
            fh.write(raw)
            size = sizes.get(name)
            if size is not None and size > len(raw):
                fh.truncate(size)  # sparse: no data blocks are allocated for the hole
    for name in pickles:  # names only, so read_checkpoint can say "only pickled weights"
        (dest / name).touch()
    manifest = {**manifest, "shards": {name: sizes.get(name) for name in headers}}
    (dest / COMPLETE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
