"""Pass 1's scratch on disk: append-only byte streams in one file, without the page cache.

The compiler's first pass spreads each block's entries over the buckets of their output
positions; the second pass reads the buckets back one by one (``preprocess.compiler``).
Through the page cache that costs more than the tokenizer on the development VM: the
kernel allocates, fills and frees a fresh page for every 4 KiB written (~1.9 of 8.2
CPU-s for a 200,000-cell file, 1.4 GB of scratch). Here each stream fills page-aligned
extents in memory, and a full extent is written at the file's end with ``O_DIRECT`` on
a thread of its own; a stream is read back extent by extent straight into the caller's
page-aligned buffer, its last partial extent copied from memory (never written). One
file for every stream: a fixed number of descriptors, however many buckets a file needs.
Where the filesystem refuses ``O_DIRECT`` (EINVAL), the same file is used through the
page cache.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from preprocess import writer

SPARE_EXTENTS = 64  # full extents that may wait for their write while the streams go on


def extent_bytes(n_streams: int, budget: int = 32 << 20) -> int:
    """The extent of ``n_streams`` streams: a power of two from 64 KiB to 1 MiB, so that
    one extent per stream fits ``budget`` where it can."""
    share = max(budget // max(n_streams, 1), 1)
    return int(min(max(1 << (share.bit_length() - 1), 64 << 10), 1 << 20))


class Spill:
    """``n_streams`` append-only byte streams in the file ``path`` (created; removed by
    :meth:`close`).

    Call :meth:`append` in any order, then :meth:`read` each stream (from any one thread
    at a time); :meth:`close` always. Full extents are written by a thread of its own,
    those waiting together in one ``pwritev`` (they lie end to end in the file).
    """

    def __init__(self, path: Path, n_streams: int):
        self.path = Path(path)
        self.extent = extent_bytes(n_streams)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        try:
            self.fd = os.open(self.path, flags | writer.DIRECT, 0o600)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.path.unlink(missing_ok=True)
            self.fd = os.open(self.path, flags, 0o600)
        n_bufs = n_streams + SPARE_EXTENTS
        self.mem = mmap.mmap(-1, n_bufs * self.extent)
        self.bufs = np.frombuffer(self.mem, np.uint8).reshape(n_bufs, self.extent)
        self.current = list(range(n_streams))  # the buffer each stream fills
        self.fill = [0] * n_streams
        self.extents: list[list[int]] = [[] for _ in range(n_streams)]  # file offsets
        self.end = 0
        # shared with the writing thread, under self.cond
        self.cond = threading.Condition()
        self.free = list(range(n_streams, n_bufs))
        self.queued: list[tuple[int, int]] = []  # (buffer, file offset), in file order
        self.busy = False  # a write in progress
        self.error: BaseException | None = None
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="spill", daemon=True)
        self.thread.start()

    def size(self, stream: int) -> int:
        """Bytes appended to ``stream``."""
        return len(self.extents[stream]) * self.extent + self.fill[stream]

    def append(self, stream: int, data: np.ndarray) -> None:
        """Append the bytes of the contiguous array ``data``."""
        raw = data.reshape(-1).view(np.uint8)
        while len(raw):
            at = self.fill[stream]
            k = min(self.extent - at, len(raw))
            self.bufs[self.current[stream], at : at + k] = raw[:k]
            self.fill[stream], raw = at + k, raw[k:]
            if self.fill[stream] == self.extent:
                self._write(stream)

    def _write(self, stream: int) -> None:
        """Queue the stream's full extent for the writing thread; go on in a free one."""
        self.extents[stream].append(self.end)
        with self.cond:
            self.queued.append((self.current[stream], self.end))
            self.cond.notify_all()
            while not self.free and self.error is None:
                self.cond.wait()
            self._raise()
            self.current[stream] = self.free.pop()
        self.end += self.extent
        self.fill[stream] = 0

    def _raise(self) -> None:
        if self.error is not None:  # a write error (a full disk) stops the compile here
            raise self.error

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queued and not self.closing:
                    self.cond.wait()
                if not self.queued:
                    return
                batch, self.queued, self.busy = self.queued, [], True
            try:
                self._pwritev(batch)
            except BaseException as e:
                with self.cond:
                    self.error = e
            with self.cond:
                self.free += [buf for buf, _ in batch]
                self.busy = False
                self.cond.notify_all()

    def _pwritev(self, batch: list[tuple[int, int]]) -> None:
        """Write extents that lie end to end in the file, from their buffers."""
        e, mem = self.extent, memoryview(self.mem)
        views = [mem[buf * e : (buf + 1) * e] for buf, _ in batch]
        offset = batch[0][1]
        for k in range(0, len(views), 64):  # well under IOV_MAX
            chunk = views[k : k + 64]
            try:
                written = os.pwritev(self.fd, chunk, offset)
            except OSError as err:  # EINVAL: O_DIRECT taken at open, refused at write
                if err.errno != errno.EINVAL or not self._buffered():
                    raise
                written = os.pwritev(self.fd, chunk, offset)
            while written < len(chunk) * e:  # a short write: the rest one view at a time
                i, at = divmod(written, e)
                written += os.pwrite(self.fd, chunk[i][at:], offset + written)
            offset += len(chunk) * e

    def _buffered(self) -> bool:
        """Clear ``O_DIRECT`` on the file; False if it was not set."""
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        if not flags & writer.DIRECT:
            return False
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~writer.DIRECT)
        return True

    def read(self, stream: int, out: np.ndarray) -> None:
        """The bytes of ``stream`` into ``out`` (uint8, :meth:`size` long, page-aligned:
        :func:`preprocess.writer.aligned_empty`)."""
        with self.cond:  # every write done before any read
            while (self.queued or self.busy) and self.error is None:
                self.cond.wait()
            self._raise()
        e = self.extent
        for k, offset in enumerate(self.extents[stream]):
            view = out[k * e : (k + 1) * e]
            try:
                got = os.preadv(self.fd, [view], offset)
            except OSError as err:
                if err.errno != errno.EINVAL or not self._buffered():
                    raise
                got = os.preadv(self.fd, [view], offset)
            if got != e:
                raise OSError(errno.EIO, f"short read of the compile's scratch ({got} of {e})")
        tail = len(self.extents[stream]) * e
        out[tail : tail + self.fill[stream]] = self.bufs[self.current[stream], : self.fill[stream]]

    def close(self) -> None:
        """Wait for the writes in flight, then remove the file and free the memory."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join()
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
        del self.bufs
        self.mem.close()
