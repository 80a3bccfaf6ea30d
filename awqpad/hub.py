"""The Hugging Face Hub side of awqpad, all through huggingface_hub (no hand-written HTTP).

* `hub_error`: any huggingface_hub / HTTP-client exception -> one AwqpadError line naming the repo.
* `push_to_hub`: upload a padded OUT as one commit, with the source repo and revision linked in the
  model card (the README on disk is left as `pad` wrote it; the uploaded copy gets the link).
"""

from __future__ import annotations

import json
from pathlib import Path

from awqpad.errors import AwqpadError, InputError, OutputError
from awqpad.source import parse_repo_spec

# Names (anywhere in the MRO) of the HTTP client's "could not talk to the server" exceptions; the
# client is an implementation detail of huggingface_hub (requests, httpx, httpx2 over its versions).
NETWORK_ERRORS = {
    "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
    "NetworkError", "ReadError", "WriteError", "RemoteProtocolError", "ProxyError", "SSLError",
    "ConnectionError", "Timeout",
}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 8:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else exc.__class__.__name__


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_error(exc: BaseException, repo_id: str, revision: str | None = None, *, writing: bool = False) -> AwqpadError:
    """Translate a huggingface_hub exception into a one-line AwqpadError naming `repo_id`.

    Reading (SRC) -> InputError (exit 2); writing (--push-to-hub) -> OutputError (exit 4), except a bad
    repo id, which is usage (exit 2)."""
    from huggingface_hub import is_offline_mode
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    what = f"pushing to {repo_id}" if writing else where
    Err = OutputError if writing else InputError
    chain = _chain(exc)  # the exception first, then what caused it

    def find(cls):
        return next((e for e in chain if isinstance(e, cls)), None)

    if find(OfflineModeIsEnabled) is not None or (is_offline_mode() and find(LocalEntryNotFoundError) is not None):
        if writing:
            return OutputError(f"{what}: cannot push while HF_HUB_OFFLINE is set")
        incomplete = " completely" if find(IncompleteSnapshotError) is not None else ""
        return InputError(f"{where}: not{incomplete} in the Hugging Face cache and HF_HUB_OFFLINE is set",
                          hint="unset HF_HUB_OFFLINE to download it")

    def specific(e: BaseException) -> AwqpadError | None:
        if isinstance(e, HFValidationError):
            return InputError(f"{what}: not a valid repo id or revision ({_first_line(e)})")
        if isinstance(e, GatedRepoError):
            return Err(f"{what}: access denied (gated repo): request access on the Hub and set HF_TOKEN",
                       hint=f"{_endpoint()}/{repo_id}")
        if isinstance(e, RepositoryNotFoundError):
            if _status(e) == 401:
                return Err(f"{what}: repository not found, or access denied (private or gated): set HF_TOKEN "
                           "or request access on the Hub")
            return Err(f"{what}: repository not found on {_endpoint()}")
        if isinstance(e, RevisionNotFoundError):
            return Err(f"{what}: revision {revision or 'main'!r} not found (expected a branch, tag or commit)")
        if isinstance(e, RemoteEntryNotFoundError):
            url = str(getattr(getattr(e, "response", None), "url", "") or "")
            name = url.rsplit("/", 1)[-1] if "/resolve/" in url else "a required file"
            return Err(f"{what}: {name} not found in the repo")
        if isinstance(e, DisabledRepoError):
            return Err(f"{what}: access to this repo is disabled on the Hub")
        if isinstance(e, HfHubHTTPError) and (status := _status(e)) is not None:
            if status == 429:
                return Err(f"{what}: rate limited by the Hub (HTTP 429); retry later")
            if status == 401:
                if "invalid credentials" in f"{e} {getattr(e, 'server_message', '')}".lower():  # a token was sent
                    return Err(f"{what}: the Hub rejected the token (HTTP 401): check HF_TOKEN")
                return Err(f"{what}: access denied (HTTP 401): set HF_TOKEN"
                           + (" to a token with write access" if writing else ""))
            if status == 403:
                return Err(f"{what}: access denied (HTTP 403): " + ("HF_TOKEN needs write access to this namespace"
                                                                     if writing else "set HF_TOKEN or request access on the Hub"))
            if status >= 500:
                return Err(f"{what}: the Hub answered HTTP {status}; retry later")
            return Err(f"{what}: the Hub answered HTTP {status} ({_first_line(e)})")
        if any(c.__name__ in NETWORK_ERRORS for c in type(e).__mro__) and not isinstance(e, OfflineModeIsEnabled):
            hint = "" if writing else "; set HF_HUB_OFFLINE=1 to use the cache"
            return Err(f"{what}: cannot reach the Hub at {_endpoint()} ({e.__class__.__name__}: {_first_line(e)}){hint}")
        return None

    for e in chain:
        if (error := specific(e)) is not None:
            return error
    if find(LocalEntryNotFoundError) is not None:
        return Err(f"{where}: not in the Hugging Face cache and the Hub could not be reached",
                   hint="check the connection, or HF_ENDPOINT")
    if isinstance(exc, OSError) and writing:
        return OutputError(f"{what}: {exc.strerror or _first_line(exc)}")
    return Err(f"{what}: {exc.__class__.__name__}: {_first_line(exc)}")


# --- push ------------------------------------------------------------------------------------------

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
    base = f"{_endpoint()}/{source_id}"
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
    from awqpad.source import _progress_bars

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
