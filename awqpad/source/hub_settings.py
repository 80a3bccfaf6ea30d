"""--token and --cache-dir for the duration of one call, the way the `hf` CLI's flags act.

huggingface_hub reads the token from HF_TOKEN at each call and the cache root from
`constants.HF_HUB_CACHE` (set from HF_HUB_CACHE / HF_HOME at import), so both are set here for the
call and restored afterwards; every download, header fetch and upload then sees the same values.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_CACHE_CONSTANTS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


@contextmanager
def hub_settings(token: str | None = None, cache_dir: str | os.PathLike | None = None) -> Iterator[None]:
    env: dict[str, str] = {}
    if token:
        env["HF_TOKEN"] = token
    if cache_dir is not None:
        env["HF_HUB_CACHE"] = str(Path(cache_dir).expanduser().resolve())
    if not env:
        yield
        return
    saved_env = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    constants = sys.modules.get("huggingface_hub.constants")
    saved_constants = {name: getattr(constants, name) for name in _CACHE_CONSTANTS if hasattr(constants, name)} \
        if constants is not None else {}
    if constants is not None and "HF_HUB_CACHE" in env:
        for name in saved_constants:
            setattr(constants, name, env["HF_HUB_CACHE"])
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None and "HF_HUB_CACHE" in env:
            # imported during the call: it read our value; put back what the environment says now
            for name in _CACHE_CONSTANTS:
                if hasattr(constants, name):
                    setattr(constants, name, saved_constants.get(name, os.environ.get("HF_HUB_CACHE") or
                                                             os.path.join(constants.HF_HOME, "hub")))


def hub_cache_root() -> Path:
    """The Hub cache root huggingface_hub uses now (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)
