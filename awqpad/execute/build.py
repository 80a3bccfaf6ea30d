"""Building an output directory atomically: a validated destination, the lock, a free-space check, a
hidden temp sibling, fsync, then atomic.install. Used by the padded OUT (output_repo) and the linked one
(link_repo), so both follow one protocol."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar

from awqpad.errors import OutputError
from awqpad.execute.atomic import PARTIAL_TAG, install, output_lock, output_os_error, recover_leftovers, remove_tree

SPACE_MARGIN = 64 << 20
T = TypeVar("T")


@contextmanager
def terminate_as_interrupt():
    """SIGTERM (e.g. `timeout`, a killed make job) cleans up like Ctrl-C; SIGXFSZ becomes an EFBIG error."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, handler)
    old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGXFSZ, old_xfsz)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OutputError(f"{path}: flushing to disk failed ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(src: Path, out: Path, force: bool) -> None:
    try:
        src_r, out_r = src.resolve(), out.resolve()
        if out.is_symlink() and not out.exists():
            raise OutputError(f"{out}: is a dangling symlink (to {os.readlink(out)}); remove it or choose another OUT")
        if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
            raise OutputError(f"{out}: OUT must not be SRC, inside it, or contain it (awqpad never writes into the source)")
        if out.exists() and not force:
            raise OutputError(f"{out}: already exists; pass --force to replace it")
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        if not out_r.parent.is_dir():
            raise OutputError(f"{out.parent}: parent directory does not exist")
    except OSError as exc:
        raise output_os_error(exc, out) from None


def build_atomically(src: Path, out: Path, force: bool, needed: Callable[[], int], build: Callable[[Path], T],
                     notify: Callable[[str], None], fsync: bool = True) -> T:
    """Run `build(tmp)` in a fresh hidden sibling of OUT and install it at OUT; on any failure or interrupt
    the temp dir goes and OUT is untouched. `needed()` is the bytes the output will take."""
    with output_lock(out):
        try:
            recover_leftovers(out, notify)
        except OSError as exc:
            raise output_os_error(exc, out) from None
        check_destination(src, out, force)  # again, now that no other awqpad run can change OUT
        need = needed()
        free = shutil.disk_usage(out.resolve().parent).free
        if free < need + SPACE_MARGIN:
            raise OutputError(f"{out.parent}: not enough free space: the output needs {need / 1e9:.2f} GB "
                              f"(+{SPACE_MARGIN >> 20} MB margin), {free / 1e9:.2f} GB free")
        token = secrets.token_hex(6)
        tmp = out.parent / f".{out.name}{PARTIAL_TAG}{token}"
        with terminate_as_interrupt():
            try:
                tmp.mkdir()
                result = build(tmp)
                if fsync:
                    fsync_dir(tmp)
                install(tmp, out, token, replace=force)  # --force: the old OUT goes only once the new one is in place
                if fsync:
                    fsync_dir(out.resolve().parent)
            except KeyboardInterrupt:
                remove_tree(tmp)
                raise OutputError(f"{out}: interrupted; the partial output was removed and {out} was not written") from None
            except OSError as exc:
                remove_tree(tmp)
                raise output_os_error(exc, out) from None
            except BaseException:
                remove_tree(tmp)
                raise
    return result
