"""`checksums`: every file awqpad.json records a sha256 for still has it.

`pad` hashes each file as its bytes go out (execute/shard_writer, output_repo), so this is the one check
that catches any change after writing: a flipped bit in a tensor no other check samples, an edited
tokenizer, a truncated side file. A hard-linked OUT ("nothing to do") records hashes only for the files
it copied; when awqpad.json records none at all (hard links only, an older awqpad, no awqpad.json) the
check says it does not apply rather than passing over nothing.
"""

from __future__ import annotations

import hashlib
import time

from awqpad.verify.context import Check, VerifyContext, make_check, not_applicable
from awqpad.verify.structure import PROVENANCE

CHUNK = 8 << 20


def _sha256(path, progress) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(CHUNK):
            h.update(data)  # hashlib releases the GIL on large buffers
            progress(len(data))
    return h.hexdigest()


def recorded_digests(record: dict | None) -> dict[str, str]:
    files = (record or {}).get("files")
    if not isinstance(files, dict):
        return {}
    return {name: entry["sha256"] for name, entry in files.items()
            if isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)}


def check_checksums(ctx: VerifyContext) -> list[Check]:
    started = time.monotonic()
    digests = recorded_digests(ctx.provenance.record)
    if not digests:
        why = (f"no {PROVENANCE}" if ctx.provenance.record is None else
               f"{PROVENANCE} records no sha256 (files hard-linked to SRC were never written, so never hashed)")
        return [not_applicable("checksums", why, {"files": 0})]
    from awqpad.errors import InputError
    from awqpad.source.paths import source_file

    problems, total = [], 0
    for name, want in sorted(digests.items()):
        try:
            path = source_file(ctx.root, name, f"{PROVENANCE} lists", missing_ok=True)
        except InputError as exc:  # a name leaving OUT, a symlink out, not a regular file
            problems.append(exc.message)
            continue
        if path is None:
            problems.append(f"{name}: recorded in {PROVENANCE} but missing from OUT")
            continue
        total += path.stat().st_size
        got = _sha256(path, lambda n: None)
        if got != want.lower():
            problems.append(f"{name}: sha256 {got[:12]}… differs from the {want[:12]}… awqpad.json recorded "
                            "when it was written (changed after padding)")
    detail = f"{len(digests)} files ({total / 1e6:.1f} MB) match the sha256 recorded while writing"
    return [make_check("checksums", problems, detail, {"files": len(digests), "bytes": total}, started)]
