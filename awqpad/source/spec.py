"""What a SRC spec names: a local directory or a Hub repo id `org/name[@revision]`, and the Source it resolves to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s]+))?$")

INDEX_NAME = "model.safetensors.index.json"
# Small JSON files read_checkpoint may look at besides config.json and the index (see awqpad/config.py).
SIDE_FILES = ("quantize_config.json", "quant_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")



@dataclass(frozen=True)
class Source:
    root: Path  # local directory holding config.json and the shards
    source_id: str  # what the user typed, minus the revision
    revision: str | None  # resolved commit for hub sources, None for plain directories
    is_hub: bool = False
    fetched_bytes: int = 0  # bytes transferred from the Hub to describe this source


def record_source(source: Source) -> dict:
    """The `source` entry of awqpad.json: the repo id (or directory) and the resolved commit."""
    return {"id": source.source_id, "revision": source.revision, "hub": source.is_hub}


def parse_repo_spec(spec: str) -> tuple[str, str | None] | None:
    """`org/name[@revision]` -> (repo_id, revision); None if `spec` is not shaped like a repo id."""
    match = REPO_ID.match(spec)
    if match is None or spec.startswith((".", "/", "~")):
        return None
    return match["repo"], match["revision"]



def where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id
