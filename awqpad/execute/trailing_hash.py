"""sha256 of a file while it is being written, by a second thread that reads it back just behind the writer.

Why a thread reading the file back rather than hashing the bytes on their way out: unchanged tensors are
copied in the kernel (copy_file_range: one copy, no trip through user space), so the writer never holds
those bytes. The hasher reads them back from the page cache on another core, at most HASH_LAG bytes behind,
so the pages are still cached and a cold source is never read from disk twice. It also hashes what is
in the file, not what awqpad meant to write there.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading

HASH_CHUNK = 4 << 20
HASH_LAG = 256 << 20  # the writer waits when the hasher is this far behind


class TrailingHasher:
    def __init__(self, fd: int, name: str):
        self._fd = fd
        self._sha = hashlib.sha256()
        self._written = 0  # bytes [0, _written) of the file are final
        self._hashed = 0
        self._closing = False  # no more writes: hash up to _written, then stop
        self._abandon = False
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"sha256 {name}", daemon=True)
        self._thread.start()

    def advance(self, written: int) -> None:
        """The writer has finished bytes [0, written). Blocks while the hasher lags more than HASH_LAG."""
        with self._cv:
            self._written = written
            self._cv.notify_all()
            while self._written - self._hashed > HASH_LAG and self._error is None:
                self._cv.wait()
            self._raise_error()

    def hexdigest(self) -> str:
        """Wait for the hasher to catch up with every byte written; the file's sha256."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        self._raise_error()
        return self._sha.hexdigest()

    def abandon(self) -> None:
        with self._cv:
            self._abandon = True
            self._cv.notify_all()
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        buffer = memoryview(bytearray(HASH_CHUNK))
        try:
            while True:
                with self._cv:
                    while self._hashed >= self._written and not (self._closing or self._abandon):
                        self._cv.wait()
                    if self._abandon or self._hashed >= self._written:
                        return
                    upto = self._written
                while self._hashed < upto and not self._abandon:
                    view = buffer[: min(HASH_CHUNK, upto - self._hashed)]
                    got = os.preadv(self._fd, [view], self._hashed)
                    if got <= 0:  # the file is shorter than what was written to it: something else truncated it
                        raise OSError(errno.EIO, "file shorter than the bytes written to it")
                    self._sha.update(view[:got])  # releases the GIL
                    with self._cv:
                        self._hashed += got
                        self._cv.notify_all()
        except BaseException as exc:  # handed to the writer thread, which raises it
            with self._cv:
                self._error = exc
                self._cv.notify_all()
