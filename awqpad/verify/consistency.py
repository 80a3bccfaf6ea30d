"""Consistency: config.json, the index and the tensor list agree with the tensors, with awqpad.json's
config updates, and (with SRC) with SRC plus exactly the recorded changes."""

from __future__ import annotations

import copy

from awqpad.source import bounded_json
from awqpad.verify.context import MAX_LISTED, Check, VerifyContext, make_check
from awqpad.verify.structure import PROVENANCE


def check_config(ctx: VerifyContext) -> list[Check]:
    out, record = ctx.out, ctx.provenance.record
    problems = [f.message for f in out.findings if f.level == "error" and "config" in f.message]
    problems += [f"{f.message}: config.json has one value for all of them" for f in out.findings
                 if "widths differ between layers" in f.message]
    updates = ((record or {}).get("plan") or {}).get("config_updates") or {}
    for path, value in updates.items():
        got = _get_path(out.config.raw, path)
        if got != value:
            problems.append(f"config.json {path} = {got!r} but {PROVENANCE} says pad set it to {value!r}")
    figures = {key: out.config.get(key) for kind, key in out.family.keys.items()
               if kind in out.dims.widths and key}
    if ctx.src is not None and record is not None:
        expected = copy.deepcopy(ctx.src.config.raw)
        for path, value in updates.items():
            _set_path(expected, path, value)
        for path in _diff(expected, out.config.raw):
            problems.append(f"config.json {path} = {_get_path(out.config.raw, path)!r}, expected "
                            f"{_get_path(expected, path)!r} (SRC's value plus the updates {PROVENANCE} records)")
    keys = ", ".join(f"{k} {v}" for k, v in figures.items()) or "no MLP width keys"
    return [make_check("config", problems, f"config.json agrees with the tensors ({keys})", figures)]


def check_index(ctx: VerifyContext) -> list[Check]:
    out, src = ctx.out, ctx.src
    problems = [f.message for f in out.findings if "index" in f.message]
    figures: dict = {"index": out.index_file}
    if out.index_file is not None:
        index = bounded_json.read(ctx.root / out.index_file, "index", strict=True)  # read_checkpoint validated it
        weight_map = index.get("weight_map", {})
        total = (index.get("metadata") or {}).get("total_size")
        actual = sum(t.nbytes for t in out.tensors.values())
        figures["total_size"] = total
        if total is not None and total != actual:
            problems.append(f"{out.index_file} metadata.total_size is {total} but the tensors hold {actual} bytes")
        if src is not None and src.index_file is not None:
            src_map = bounded_json.read(src.source.root / src.index_file, "index", strict=True).get("weight_map", {})
            for name in sorted(set(src_map) - set(weight_map))[:MAX_LISTED]:
                problems.append(f"{out.index_file} does not list {name} (SRC's index does)")
            for name in sorted(n for n in set(src_map) & set(weight_map) if src_map[n] != weight_map[n])[:MAX_LISTED]:
                problems.append(f"{out.index_file} puts {name} in {weight_map[name]}, SRC in {src_map[name]}")
    elif src is not None and src.index_file is not None:
        problems.append(f"OUT has no {src.index_file} but SRC has one")
    return [make_check("index", problems, f"{out.index_file or 'single shard, no index'} lists every tensor in its shard",
                       figures)]


def check_tensors(ctx: VerifyContext) -> list[Check]:
    """Every SRC tensor is in OUT with its dtype; shapes change only where an op says."""
    src, out = ctx.src, ctx.out
    ops = {op.tensor: op for op in ctx.ops or ()}
    problems = []
    missing = sorted(set(src.tensors) - set(out.tensors))
    extra = sorted(set(out.tensors) - set(src.tensors))
    if missing:
        problems.append(f"{len(missing)} SRC tensor(s) missing from OUT: {', '.join(missing[:MAX_LISTED])}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) in OUT that SRC does not have: {', '.join(extra[:MAX_LISTED])}")
    for name in sorted(set(src.tensors) & set(out.tensors)):
        s, o = src.tensors[name], out.tensors[name]
        op = ops.get(name)
        want = tuple(op.new_shape) if op is not None else tuple(s.shape)
        if o.dtype != s.dtype:
            problems.append(f"{name}: dtype {o.dtype} in OUT, {s.dtype} in SRC")
        elif op is not None and tuple(op.old_shape) != tuple(s.shape):
            problems.append(f"{name}: the op pads a {list(op.old_shape)} tensor but SRC's is {list(s.shape)}")
        elif tuple(o.shape) != want:
            problems.append(f"{name}: shape {list(o.shape)} in OUT, expected {list(want)}"
                            + (" (unchanged from SRC)" if op is None else ""))
    return [make_check("tensors", problems, f"all {len(src.tensors)} SRC tensors present; {len(ops)} padded as recorded",
                       {"tensors": len(src.tensors), "padded": len(ops)})]


def _get_path(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set_path(config: dict, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(path)
            else:
                out += _diff(a[key], b[key], path)
        return out
    return [] if a == b else [prefix or "(root)"]
