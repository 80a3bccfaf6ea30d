"""The one way awqpad parses JSON it did not write itself: bounded in size, nesting depth and number length.

Python's json module reads any size into memory, recurses once per nesting level and converts integers of
any length, so a hostile 500 MB config.json costs tens of GB of RAM, `[[[[...` raises RecursionError and a
5,000-digit integer raises ValueError deep inside. Here each kind of file has a byte cap, nesting is
counted before parsing (a vectorised scan, no recursion) and numbers are capped at 40 digits.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import re

from awqpad.lazy import numpy as np

from awqpad.errors import InputError

# Byte caps per kind of file. Real files are far smaller: config.json of the largest VL models ~30 kB, the
# index of DeepSeek-V3 (91k tensors) ~9 MB, awqpad.json of a 256-expert MoE ~40 MB.
LIMITS = {
    "config": 16 << 20,
    "index": 128 << 20,
    "side": 4 << 20,  # quantize_config.json, quant_config.json and other small JSON side files
    "provenance": 256 << 20,  # awqpad.json
    "header": 100_000_000,  # safetensors' own MAX_HEADER_SIZE (safetensors/src/tensor.rs)
}
MAX_DEPTH = 64
MAX_NUMBER_DIGITS = 40

SMALL = 1 << 20  # below this a regex scan is as fast as numpy, and `inspect` need not import numpy
_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _depth_small(raw: bytes) -> int:
    depth = deepest = 0
    for match in _STRING_OR_BRACKET.finditer(raw):
        c = match.group()[0]
        if c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


def _depth(raw: bytes) -> int:
    """Deepest nesting of `raw`, ignoring brackets inside strings (memory ~ number of quotes and brackets)."""
    if len(raw) < SMALL:
        return _depth_small(raw)
    data = np.frombuffer(raw, dtype=np.uint8)
    opening = np.isin(data, np.frombuffer(b"[{", dtype=np.uint8))
    bracket_pos = np.flatnonzero(opening | np.isin(data, np.frombuffer(b"]}", dtype=np.uint8)))
    if not bracket_pos.size:
        return 0
    quote = data == ord('"')
    # A quote preceded by an odd run of backslashes is escaped; such quotes are rare, so loop over them only.
    for pos in np.flatnonzero(quote[1:] & (data[:-1] == ord("\\"))) + 1:
        run = 0
        while pos - 1 - run >= 0 and data[pos - 1 - run] == ord("\\"):
            run += 1
        quote[pos] = run % 2 == 0
    quote_pos = np.flatnonzero(quote)
    outside = np.searchsorted(quote_pos, bracket_pos) % 2 == 0  # an even number of quotes before: not in a string
    step = np.where(opening[bracket_pos[outside]], 1, -1)
    return int(np.cumsum(step).max(initial=0))


def _number(text: str, where: str):
    if len(text.lstrip("-").split(".")[0].split("e")[0].split("E")[0]) > MAX_NUMBER_DIGITS:
        raise InputError(f"{where}: a number with more than {MAX_NUMBER_DIGITS} digits ({text[:20]}...)")
    return text


def loads(raw: bytes, where: str, kind: str, *, strict: bool = False) -> Any:
    """Parse `raw` (the contents of `where`) under the limits for `kind`. `strict` (headers, the index):
    reject NaN / Infinity (serde_json, which safetensors uses, refuses them) and duplicate keys (which
    would make two readers see different files)."""
    limit = LIMITS[kind]
    if len(raw) > limit:
        raise InputError(f"{where}: {len(raw):,} bytes, over the {limit:,}-byte limit for a {kind} file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = _depth(raw)
    if depth > MAX_DEPTH:
        raise InputError(f"{where}: JSON nested {depth} levels deep, over the limit of {MAX_DEPTH}")

    def constant(name: str):
        if strict:
            raise InputError(f"{where}: {name} is not valid JSON")
        return float(name)

    def unique(pairs):
        out = dict(pairs)
        if len(out) != len(pairs):
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise InputError(f"{where}: key {dup!r} appears twice in one JSON object")
        return out

    try:
        return json.loads(
            text,
            object_pairs_hook=unique if strict else None,
            parse_int=lambda s: int(_number(s, where)),
            parse_float=lambda s: float(_number(s, where)),
            parse_constant=constant,
        )
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # belt and braces: the checks above should catch these
        raise InputError(f"{where}: not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]})") from None


def read(path: Path | str, kind: str, where: str | None = None, *, strict: bool = False) -> Any:
    """Read and parse the JSON file `path` (already confined by the caller) under the limits for `kind`.
    Reads at most limit + 1 bytes, so a huge file costs no memory."""
    where = where or str(path)
    limit = LIMITS[kind]
    try:
        # O_NONBLOCK: a FIFO planted under a JSON name must not hang the run; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{where}: does not exist") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot read ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{where}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{where}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise InputError(f"{where}: over the {limit:,}-byte limit for a {kind} file")
    return loads(raw, where, kind, strict=strict)
