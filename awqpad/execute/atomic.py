"""Putting a finished output directory at OUT safely: one writer per OUT, no-replace renames, and a
`--force` that never loses the old OUT.

* A lock: `fcntl.flock` on `.OUT.awqpad-lock` beside OUT, held for the whole run (and the file removed
  after). A second run into the same OUT stops at once with exit 4. Because the lock dies with its process, leftovers of crashed runs
  (`.OUT.awqpad-partial-*`, `.OUT.awqpad-old-*`) are recognised as leftovers by holding it: no PID to reuse.
* Renames use `renameat2(RENAME_NOREPLACE)` (Linux >= 3.15, glibc >= 2.28) so nothing that appeared at
  OUT meanwhile is ever replaced; elsewhere a checked `lexists` + `rename`, race-free among awqpad runs
  because of the lock.
* `--force`: OUT -> `.OUT.awqpad-old-*`, new -> OUT, then the old copy is deleted. A run killed between
  the two renames leaves OUT missing and the old copy beside it; the next run (under the lock) renames
  it back before anything else.

Test-only hook (tests/test_output_safety.py): AWQPAD_TEST_PAUSE_AT=<point> makes the run announce itself
on stderr and wait at that point (`install`: output complete, lock held; `force-swap`: after OUT was
moved aside) until the file named by AWQPAD_TEST_RESUME exists, so tests can SIGKILL it exactly there or
change the world under it.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from awqpad.errors import OutputError

PARTIAL_TAG = ".awqpad-partial-"
OLD_TAG = ".awqpad-old-"
LEGACY_OLD_TAG = PARTIAL_TAG + "old-"  # how awqpad <= 0.1 named the moved-aside OUT
LOCK_TAG = ".awqpad-lock"

AT_FDCWD = -100
RENAME_NOREPLACE = 1


def _load_renameat2():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
        fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        fn.restype = ctypes.c_int
        return fn, ctypes
    except (OSError, AttributeError):
        return None, None


_RENAMEAT2, _CTYPES = _load_renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists (even as an empty directory)."""
    global _RENAMEAT2
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = _CTYPES.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: this filesystem has no RENAME_NOREPLACE
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
        _RENAMEAT2 = None
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def output_os_error(exc: OSError, path: Path | str) -> OutputError:
    """One line for an OSError on the output side, naming the file."""
    where = exc.filename or path
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = "disk full (no space, or no free inodes, left on the output filesystem)"
    elif code == errno.EFBIG:
        why = "file size limit reached"
    elif code == errno.EROFS:
        why = "the output filesystem is read-only"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied (the parent directory of OUT must be writable)"
    elif code == errno.ENAMETOOLONG:
        why = "file name too long"
    elif code == errno.EIO:
        why = "I/O error on the output filesystem"
    else:
        why = exc.strerror or str(exc)
    return OutputError(f"{where}: {why}")


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold an exclusive lock on `out` for the duration (flock on `.NAME.awqpad-lock` beside it).

    The lock file is removed on release, while still locked; a run that opened it just before then finds,
    once it holds the lock, that the path no longer names its file, and starts over."""
    import fcntl

    lock_path = out.parent / f".{out.name}{LOCK_TAG}"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise output_os_error(exc, lock_path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{out}: another awqpad run is writing it (it holds {lock_path.name}); "
                              "wait for it to finish or choose another OUT") from None
        except OSError as exc:
            os.close(fd)
            raise output_os_error(exc, lock_path) from None
        try:
            current = os.stat(lock_path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the previous holder removed the file we opened: lock the new one
    try:
        yield lock_path
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        for _ in range(3):  # a file created while rmtree ran leaves the dir non-empty: go again
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                break


def recover_leftovers(out: Path, notify: Callable[[str], None]) -> None:
    """Under the lock: put back an OUT stranded by a killed `--force`, then remove partial outputs."""
    parent, name = out.parent, out.name
    olds = sorted(
        (p for tag in (OLD_TAG, LEGACY_OLD_TAG) for p in parent.glob(f".{name}{tag}*")),
        key=lambda p: p.lstat().st_mtime,
    )
    if olds and not os.path.lexists(out):
        rename_noreplace(olds[-1], out)
        notify(f"restored {out} from {olds[-1].name}, left by an interrupted --force run")
        olds = olds[:-1]
    for old in olds:  # OUT is in place, so these were superseded by a completed --force
        remove_tree(old)
        notify(f"removed {old.name}: the previous {name}, replaced by a completed --force run")
    for partial in parent.glob(f".{name}{PARTIAL_TAG}*"):
        if partial.name.startswith(f".{name}{LEGACY_OLD_TAG}"):
            continue
        remove_tree(partial)
        notify(f"removed {partial.name}: partial output of an interrupted run")


def pause_for_tests(point: str) -> None:
    """Test-only: wait here (see the module docstring)."""
    if os.environ.get("AWQPAD_TEST_PAUSE_AT") != point:
        return
    print(f"awqpad-test: paused at {point}", file=sys.stderr, flush=True)
    resume = os.environ.get("AWQPAD_TEST_RESUME")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
        time.sleep(0.05)


def install(tmp: Path, out: Path, token: str, replace: bool) -> None:
    """Move the finished `tmp` to `out`; with `replace`, move an existing `out` aside first and delete it last."""
    pause_for_tests("install")
    if not (replace and os.path.lexists(out)):
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise OutputError(f"{out}: appeared while this run was writing; not replaced (pass --force to replace it)") from None
        return
    old = out.parent / f".{out.name}{OLD_TAG}{token}"
    rename_noreplace(out, old)
    try:
        pause_for_tests("force-swap")
        rename_noreplace(tmp, out)
    except BaseException:  # a failed rename, or SIGTERM / Ctrl-C right here
        try:
            rename_noreplace(old, out)  # put the old OUT back; if even that fails, the next run restores it
        except OSError:
            pass
        raise
    remove_tree(old)
