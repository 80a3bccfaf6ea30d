"""Where awqpad may read and write, in one place (the checkpoint reader, the writer and verify use it).

A checkpoint's index and file list are written by whoever published it, so a name from them is only
used once `source_file` has proved it names a regular file inside SRC: a relative path with no `..`,
`.` or empty parts, and no symlink (anywhere along it) that leads out of SRC. The one exception is the
Hugging Face cache's own layout, `models--org--name/snapshots/<commit>/<file>` -> `../../blobs/<hash>`:
a link into the `blobs/` folder of the same cached repo is allowed.

Every file awqpad writes goes through `output_file` (a path inside OUT's fresh temporary directory) and
is created with O_EXCL | O_NOFOLLOW, so nothing that exists already, anywhere, is ever truncated.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath

from awqpad.errors import InputError, OutputError

HF_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def check_name(name: object, where: str) -> PurePosixPath:
    """`name` as a relative POSIX path with only ordinary parts, or InputError naming `where`."""
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: file name {name!r} is not a non-empty string")
    if "\x00" in name or "\\" in name:
        raise InputError(f"{where}: file name {name!r} contains a NUL or backslash")
    if name.startswith("/"):
        raise InputError(f"{where}: {name!r} is an absolute path; files must be named relative to the checkpoint")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InputError(f"{where}: {name!r} has a '..', '.' or empty path part; files must stay inside the checkpoint")
    return PurePosixPath(name)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def hf_cache_blobs(root: Path) -> Path | None:
    """`<cache>/models--org--name/blobs` when `root` (resolved) is a snapshot folder of the HF cache."""
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(HF_CACHE_REPO_PREFIXES):
        return root.parent.parent / "blobs"
    return None


def source_file(root: Path, name: object, where: str, *, missing_ok: bool = False,
                allow_outside: bool = False) -> Path | None:
    """The resolved path of the regular file `name` inside SRC `root`; InputError if it is not one.

    `where` starts the message (e.g. "SRC/model.safetensors.index.json: lists shard"). With `missing_ok`,
    a name that does not exist returns None (a symlink whose target does not exist is still an error).
    `allow_outside`: a symlink may lead out of SRC (the caller decides; see `inside_source`)."""
    rel = check_name(name, where)
    real_root = root.resolve()
    path = real_root / rel
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(f"{where} {name}: dangling symlink to {os.readlink(path)}") from None
        if missing_ok:
            return None
        raise InputError(f"{where} {name}, which does not exist") from None
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise InputError(f"{where} {name}: symlink loop") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{where} {name}: symlink loop") from None
        raise InputError(f"{where} {name}: cannot read ({exc.strerror or exc})") from None
    if not allow_outside and not inside_source(root, real):
        raise InputError(f"{where} {name}: resolves to {real}, outside SRC; awqpad reads only files inside the checkpoint")
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise InputError(f"{where} {name}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{where} {name}: not a regular file (a FIFO, device, socket or directory)")
    return real


def inside_source(root: Path, real: Path) -> bool:
    """Whether the resolved path `real` is inside SRC `root`, or in the blobs of SRC's HF cache repo."""
    real_root = root.resolve()
    blobs = hf_cache_blobs(real_root)
    return _inside(real, real_root) or (blobs is not None and _inside(real, blobs))


def output_file(tmp: Path, name: str) -> Path:
    """Path of `name` inside the output's temporary directory `tmp` (parents created); refuses anything that
    would land outside it. Names were validated when read; this is the writer's own check."""
    rel = check_name(name, f"{tmp}: output file")
    path = tmp / rel
    if len(rel.parts) > 1:
        path.parent.mkdir(parents=True, exist_ok=True)
    if not _inside(path.parent.resolve(), tmp.resolve()):
        raise OutputError(f"{path}: would be written outside the output directory {tmp}")
    return path


def create_output(path: Path, readable: bool = False) -> int:
    """A new file's descriptor, opened for writing (and reading, if asked): never an existing file, never
    through a symlink."""
    flags = (CREATE_FLAGS & ~os.O_WRONLY) | os.O_RDWR if readable else CREATE_FLAGS
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create ({exc.strerror or exc})") from None


def write_output(tmp: Path, name: str, data: bytes) -> Path:
    """Create `name` inside `tmp` holding `data`."""
    path = output_file(tmp, name)
    fd = create_output(path)
    try:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except OSError as exc:
                raise OutputError(f"{path}: write failed ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    return path
