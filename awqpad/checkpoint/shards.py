"""SRC's safetensors files: the index (confined, bounded), every shard header, and the tensor table.

Every shard name the index gives is proved to be a regular file inside SRC (source/paths) before
anything is opened; tensors must be stored once and the index must list exactly the tensors the shards hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from awqpad.checkpoint.header import ShardHeader, TensorInfo, read_header
from awqpad.errors import InputError
from awqpad.source import bounded_json
from awqpad.source.paths import source_file
from awqpad.source.spec import INDEX_NAME, PICKLE_SUFFIXES


@dataclass(frozen=True)
class Finding:
    level: str  # info | warning | error
    message: str


def read_shards(root: Path) -> tuple[tuple[ShardHeader, ...], dict[str, TensorInfo], str | None, list[Finding]]:
    findings: list[Finding] = []
    names = sorted(p.name for p in root.iterdir() if p.is_file() or p.is_symlink())
    shard_files = [n for n in names if n.endswith(".safetensors")]
    index_files = [n for n in names if n.endswith(".safetensors.index.json")]
    if not shard_files and not index_files:
        pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise InputError(
                f"{root}: only pickled weights ({pickled[0]}{', ...' if len(pickled) > 1 else ''}); awqpad reads "
                "safetensors only, because pickle files can run code when loaded and have no header to stream from",
                hint="convert them to safetensors first (e.g. transformers save_pretrained(safe_serialization=True))",
            )
        raise InputError(f"{root}: no *.safetensors files")

    index_name = INDEX_NAME if INDEX_NAME in index_files else (index_files[0] if index_files else None)
    paths: dict[str, Path] = {}
    if index_name is not None:
        index_path = source_file(root, index_name, f"{root}:")
        index = bounded_json.read(index_path, "index", str(root / index_name), strict=True)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise InputError(f"{root / index_name}: not a valid safetensors index (no `weight_map` object)")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise InputError(f"{root / index_name}: weight_map names tensor {bad[0]!r} in {bad[1]!r}, not a file name")
        wanted = sorted(set(weight_map.values()))
        for shard in wanted:
            # Confinement first: nothing outside SRC is opened, not even to read its header.
            paths[shard] = source_file(root, shard, f"{root / index_name}: lists shard")
    else:
        if len(shard_files) > 1:
            raise InputError(f"{root}: {len(shard_files)} safetensors files but no model.safetensors.index.json")
        weight_map, wanted = None, shard_files
        for shard in wanted:
            paths[shard] = source_file(root, shard, f"{root}:")

    headers = tuple(read_header(paths[shard], shard) for shard in wanted)
    tensors: dict[str, TensorInfo] = {}
    for header in headers:
        for name, info in header.tensors.items():
            if name in tensors:
                raise InputError(f"{root}: tensor {name!r} is stored twice, in {tensors[name].shard} and {header.filename}")
            tensors[name] = info
    if not tensors:
        raise InputError(f"{root}: the safetensors files hold no tensors")
    if weight_map is not None:
        for name, shard in weight_map.items():
            info = tensors.get(name)
            if info is None or info.shard != shard:
                where = f" (it is in {info.shard})" if info is not None else ""
                raise InputError(f"{root / index_name}: names tensor {name!r} in {shard} but that shard lacks it{where}")
        unindexed = sorted(set(tensors) - set(weight_map))
        if unindexed:
            # Loaders disagree on such tensors (some load every tensor of a listed shard, some only the
            # index's), so the padded output could not be proven to load as SRC does: refuse, as verify would.
            raise InputError(f"{root / index_name}: {len(unindexed)} tensor(s) are in the shards but not in the "
                             f"index, e.g. {unindexed[0]!r} in {tensors[unindexed[0]].shard}")
        unused = sorted(set(shard_files) - set(wanted))
        if unused:
            findings.append(Finding("warning", f"safetensors files not referenced by the index: {', '.join(unused)}"))
    return headers, tensors, index_name, findings
