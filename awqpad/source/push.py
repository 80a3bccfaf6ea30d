"""Upload a padded OUT to the Hub, resumably (a shard per commit, small files last), with the source repo
and revision linked in the model card (the README on disk is left as `pad` wrote it; the uploaded copy
gets the link); and the checks `pad --push-to-hub` runs before padding (`check_push_access`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from awqpad.errors import AwqpadError, InputError, OutputError
from awqpad.source.hub_common import endpoint, hub_error, library_version
from awqpad.source.hub_common import progress_bars as _progress_bars
from awqpad.source.spec import parse_repo_spec


PROVENANCE = "awqpad.json"


def _files_to_push(out_dir: Path) -> dict[str, Path]:
    """Every file of OUT, except hidden directories/files (.git, .cache, editor droppings); keeps .gitattributes."""
    files = {}
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        if not path.is_file():
            continue
        if any(part.startswith(".") for part in rel.parts) and rel.as_posix() != ".gitattributes":
            continue
        files[rel.as_posix()] = path
    return files


def _provenance_source(out_dir: Path) -> dict:
    try:
        data = json.loads((out_dir / PROVENANCE).read_text(encoding="utf-8"))
        source = data.get("source")
        return source if isinstance(source, dict) else {}
    except (OSError, ValueError):
        return {}


def source_line(source_id: str | None, source_revision: str | None, source_hub: bool) -> str | None:
    """The model-card line linking the source repo (and revision) on the Hub."""
    if not source_id:
        return None
    if not source_hub:
        return f"Source: a local checkpoint directory (`{Path(source_id).name}`)."
    base = f"{endpoint()}/{source_id}"
    if source_revision:
        return f"Source: [{source_id}]({base}) @ [`{source_revision}`]({base}/tree/{source_revision})"
    return f"Source: [{source_id}]({base})"


def model_card(text: str | None, repo_id: str, source_id: str | None, source_revision: str | None,
               source_hub: bool) -> str:
    """README text to upload: OUT's README plus the source line, and `base_model: <source>` metadata
    (the Hub's model-tree link) when the source is a Hub repo."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    text = text if text and text.strip() else f"# {repo_id.split('/')[-1]}\n"
    if source_hub and source_id:
        if REGEX_YAML_BLOCK.search(text):
            try:
                card = ModelCard(text, ignore_metadata_errors=True)
                card.data.base_model = source_id
                if getattr(card.data, "base_model_relation", None) is not None:
                    card.data.base_model_relation = None  # it described the source's own base model
                text = str(card)
            except Exception:  # unparsable front matter: leave it as the source wrote it
                pass
        else:
            text = f"---\nbase_model: {source_id}\n---\n" + text
    line = source_line(source_id, source_revision, source_hub)
    if line and line not in text:
        text = text.rstrip("\n") + "\n\n" + line + "\n"
    return text


def check_push_access(repo_id: str) -> None:
    """Before any padding: a token is set, the Hub answers, and the token may write `repo_id` (its role is not
    read-only, and the namespace is the user or one of their organisations). One-line OutputError otherwise."""
    from huggingface_hub import HfApi, get_token, is_offline_mode

    parsed = parse_repo_spec(repo_id)
    if parsed is None or parsed[1] is not None:
        raise InputError(f"--push-to-hub {repo_id!r}: expected ORG/NAME (a Hub repo id, no @revision)")
    what = f"pushing to {repo_id}"
    if is_offline_mode():
        raise OutputError(f"{what}: cannot push while HF_HUB_OFFLINE is set")
    if not get_token():
        raise OutputError(f"{what}: no Hugging Face token: set HF_TOKEN to a token with write access, "
                          f"or run `{LOGIN}`")
    api = HfApi(library_name="awqpad", library_version=library_version())
    try:
        me = api.whoami()
    except Exception as exc:
        raise hub_error(exc, repo_id, writing=True) from None
    access = (me.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        raise OutputError(f"{what}: the token is read-only: set HF_TOKEN to a token with write access, or run `{LOGIN}`")
    namespace = repo_id.split("/")[0]
    names = {me.get("name")} | {org.get("name") for org in me.get("orgs") or () if isinstance(org, dict)}
    if namespace not in names:
        raise OutputError(f"{what}: the token belongs to {me.get('name')!r}, who cannot write to {namespace!r} "
                          f"(their namespaces: {', '.join(sorted(n for n in names if n))})")


LOGIN = "hf auth login"
LARGE = 10 << 20  # the Hub stores files above this in LFS (and all *.safetensors): compare them by sha256


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _recorded_sha256(out_dir: Path) -> dict[str, str]:
    try:
        files = json.loads((out_dir / PROVENANCE).read_text(encoding="utf-8")).get("files") or {}
        return {name: entry["sha256"] for name, entry in files.items() if isinstance(entry, dict) and entry.get("sha256")}
    except (OSError, ValueError, AttributeError):
        return {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _already_there(api, repo_id: str, files: dict[str, Path], card: bytes, recorded: dict[str, str]) -> set[str]:
    """Names whose content the repo's main branch holds already: what a retried push need not send."""
    try:
        remote = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, repo_type="model")
                  if hasattr(f, "blob_id")}
    except Exception:
        return set()
    same = set()
    for name, path in files.items():
        entry = remote.get(name)
        if entry is None:
            continue
        if name == "README.md":
            local = hashlib.sha1(b"blob %d\0" % len(card) + card).hexdigest()
            same |= {name} if entry.blob_id == local else set()
        elif entry.lfs is not None:
            size = path.stat().st_size
            if entry.lfs.size == size and entry.lfs.sha256 == (recorded.get(name) or _sha256(path)):
                same.add(name)
        elif path.stat().st_size < LARGE and entry.blob_id == _git_blob_sha1(path):
            same.add(name)
    return same


def push_to_hub(
    out_dir: Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    source_id: str | None = None,
    source_revision: str | None = None,
    source_hub: bool | None = None,
    progress: bool | None = None,
    card_rewrite: dict[str, str] | None = None,
) -> str:
    """Create `repo_id` (private unless `private=False`; an existing repo keeps its visibility) and upload
    OUT. The source defaults to OUT/awqpad.json's `source` entry; `card_rewrite` replaces lines of the
    uploaded card (the launch lines, to name the repo id).

    Resumable: files the repo already holds with the same content are skipped, every shard goes up in its
    own commit, and the small files (config, index, awqpad.json, card) go last in one commit, so an
    interrupted push is retried by running it again and the repo looks complete only once it is.
    Returns the repo URL. Errors are one-line AwqpadErrors (bad repo id / OUT: exit 2; Hub: exit 4)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from awqpad import __version__

    out_dir = Path(out_dir)
    parsed = parse_repo_spec(repo_id)
    if parsed is None or parsed[1] is not None:
        raise InputError(f"--push-to-hub {repo_id!r}: expected ORG/NAME (a Hub repo id, no @revision)")
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: not a directory (nothing to push)")
    files = _files_to_push(out_dir)
    if not any(name.endswith(".safetensors") for name in files):
        raise InputError(f"{out_dir}: no *.safetensors files to push")

    recorded = _provenance_source(out_dir)
    if source_id is None:
        source_id, source_revision = recorded.get("id"), recorded.get("revision")
        if source_hub is None:
            source_hub = bool(recorded.get("hub"))
    if source_hub is None:
        source_hub = bool(source_id) and parse_repo_spec(source_id) is not None and not Path(source_id).exists()

    readme = files.get("README.md")
    card = model_card(readme.read_text(encoding="utf-8", errors="replace") if readme else None, repo_id,
                      source_id, source_revision, source_hub)
    for old, new in (card_rewrite or {}).items():
        card = card.replace(old, new)
    card_bytes = card.encode("utf-8")
    files.setdefault("README.md", out_dir / "README.md")
    api = HfApi(token=token, library_name="awqpad", library_version=__version__)
    what = f" from {source_id}" + (f"@{source_revision[:12]}" if source_revision else "") if source_hub else ""
    try:
        with _progress_bars(progress):
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            todo = [name for name in files if name not in _already_there(api, repo_id, files, card_bytes,
                                                                          _recorded_sha256(out_dir))]
            shards = [name for name in todo if name.endswith(".safetensors")]
            for i, name in enumerate(shards, 1):
                api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(files[name]))],
                                  commit_message=f"Upload {name} ({i}/{len(shards)}){what} (awqpad {__version__})",
                                  repo_type="model")
            rest = [name for name in todo if not name.endswith(".safetensors")]
            if rest:
                operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=card_bytes if name == "README.md"
                                                 else str(files[name])) for name in rest]
                api.create_commit(
                    repo_id,
                    operations,
                    commit_message=f"Upload padded checkpoint{what} (awqpad {__version__})",
                    commit_description=source_line(source_id, source_revision, source_hub) or "",
                    repo_type="model",
                )
    except AwqpadError:
        raise
    except Exception as exc:
        raise hub_error(exc, repo_id, writing=True) from None
    return str(url)


__all__ = ["check_push_access", "hub_error", "model_card", "push_to_hub", "source_line"]
