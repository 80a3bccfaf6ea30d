"""What downloading and pushing share: huggingface_hub exceptions -> one AwqpadError line naming the repo
(`hub_error`), and huggingface_hub's progress bars only where awqpad shows its own."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from awqpad.errors import AwqpadError, InputError, OutputError

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


def endpoint() -> str:
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
            return Err(f"{what}: access denied (gated repo): request access on the Hub and set HF_TOKEN "
                       "(or run `hf auth login`)",
                       hint=f"{endpoint()}/{repo_id}")
        if isinstance(e, RepositoryNotFoundError):
            if _status(e) == 401:
                return Err(f"{what}: repository not found, or access denied (private or gated): set HF_TOKEN "
                           "(or run `hf auth login`) or request access on the Hub")
            return Err(f"{what}: repository not found on {endpoint()}")
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
                    return Err(f"{what}: the Hub rejected the token (HTTP 401): check HF_TOKEN "
                               "(or run `hf auth login` again)")
                return Err(f"{what}: access denied (HTTP 401): set HF_TOKEN"
                           + (" to a token with write access" if writing else "") + " (or run `hf auth login`)")
            if status == 403:
                return Err(f"{what}: access denied (HTTP 403): " + ("HF_TOKEN needs write access to this namespace"
                                                                     if writing else "set HF_TOKEN (or run `hf auth login`) "
                                                                     "or request access on the Hub"))
            if status >= 500:
                return Err(f"{what}: the Hub answered HTTP {status}; retry later")
            return Err(f"{what}: the Hub answered HTTP {status} ({_first_line(e)})")
        if any(c.__name__ in NETWORK_ERRORS for c in type(e).__mro__) and not isinstance(e, OfflineModeIsEnabled):
            hint = "" if writing else "; set HF_HUB_OFFLINE=1 to use the cache"
            return Err(f"{what}: cannot reach the Hub at {endpoint()} ({e.__class__.__name__}: {_first_line(e)}){hint}")
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



@contextmanager
def progress_bars(enabled: bool | None) -> Iterator[None]:
    """huggingface_hub's tqdm bars off for the duration unless `enabled` (None: only on a terminal, like
    awqpad's own bars); never forces them on against HF_HUB_DISABLE_PROGRESS_BARS."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled is None:
        enabled = sys.stderr.isatty()
    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def library_version() -> str:
    from awqpad import __version__

    return __version__
