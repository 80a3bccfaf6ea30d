"""Upload a padded OUT to the Hub as one commit, with the source repo and revision linked in the model card
(the README on disk is left as `pad` wrote it; the uploaded copy gets the link)."""

from __future__ import annotations

import json
from pathlib import Path

from awqpad.errors import AwqpadError, InputError
from awqpad.source.hub_common import endpoint, hub_error
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
) -> str:
    """Create `repo_id` (private unless `private=False`; an existing repo keeps its visibility) and upload
    every file of `out_dir` in one commit. The source defaults to OUT/awqpad.json's `source` entry.

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
    api = HfApi(token=token, library_name="awqpad", library_version=__version__)
    what = f" from {source_id}" + (f"@{source_revision[:12]}" if source_revision else "") if source_hub else ""
    try:
        with _progress_bars(progress):
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
                          for rel, path in files.items() if rel != "README.md"]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
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


__all__ = ["hub_error", "model_card", "push_to_hub", "source_line"]
