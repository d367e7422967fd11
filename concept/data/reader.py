"""Contiguous range reads from a token store: raw bytes or tensorstore.

Every read the loader makes is a contiguous range of one 1-D array (cells ``[a, b)`` of a
per-cell array, or their entries ``[indptr[a], indptr[b])`` of ``tokens``/``values``).
For uncompressed stores (the compiler's default) the *raw* path computes where those
bytes sit in the chunk or shard files (the shard index gives each inner chunk's offset)
and ``preadv``s them straight into the destination buffer: no decode, no copy, no
Python per cell. Compressed stores go through tensorstore. Both return the same bytes
(tested). Nothing is opened until the first read, so a reader made before DataLoader
workers fork is safe to use in them.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from concept import store as fmt

_MISSING = np.uint64(2**64 - 1)


class NotRaw(ValueError):
    """The array's encoding needs a codec (compression): use tensorstore."""


class _FdCache:
    """A small LRU of open file descriptors (a store may have hundreds of shard files)."""

    def __init__(self, size: int = 256):
        self.size, self.fds = size, OrderedDict()

    def get(self, path: str) -> int:
        fd = self.fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self.fds) >= self.size:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[path] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class RawArray:
    """Byte-level reads of a 1-D, uncompressed Zarr v3 array (sharded or not)."""

    def __init__(self, path: Path, fds: _FdCache):
        meta = json.loads((path / "zarr.json").read_text())
        self.path, self.fds = path, fds
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value", 0)
        self.outer = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        enc = meta["chunk_key_encoding"]
        sep = enc.get("configuration", {}).get("separator", "/")
        # chunk k lives at base + str(k): built once, not per read
        self.base = f"{path}/{'c' + sep if enc['name'] == 'default' else ''}"
        codecs = meta["codecs"]

        def plain(chain: list[dict]) -> bool:  # bytes codec only (endian may be omitted)
            return [c["name"] for c in chain] == ["bytes"] and chain[0].get(
                "configuration", {}
            ).get("endian", "little") == "little"

        if codecs[0]["name"] == "sharding_indexed":
            conf = codecs[0]["configuration"]
            if not plain(conf["codecs"]) or len(codecs) > 1:
                raise NotRaw(f"{path}: compressed chunks")
            self.inner = conf["chunk_shape"][0]
            self.index_at_end = conf.get("index_location", "end") == "end"
            self._index: dict[int, np.ndarray] = {}
        elif plain(codecs):
            self.inner = None
        else:
            raise NotRaw(f"{path}: codecs {[c['name'] for c in codecs]}")

    def _file(self, k: int) -> str:
        return self.base + str(k)

    def _shard_index(self, k: int) -> np.ndarray | None:
        """(n_inner, 2) offsets/lengths of shard k's inner chunks; None if the shard is absent."""
        if k not in self._index:
            n = self.outer // self.inner
            size = n * 16 + 4  # uint64 (offset, nbytes) per chunk + crc32c
            try:
                fd = self.fds.get(self._file(k))
            except FileNotFoundError:
                self._index[k] = None
                return None
            end = os.fstat(fd).st_size
            raw = os.pread(fd, size, end - size if self.index_at_end else 0)
            self._index[k] = np.frombuffer(raw[:-4], dtype="<u8").reshape(n, 2)
        return self._index[k]

    def _pieces(self, start: int, stop: int):
        """(file number, byte offset or None if absent, element lo, element hi) pieces."""
        step = self.inner or self.outer
        for c0 in range(start - start % step, stop, step):
            lo, hi = max(start, c0), min(stop, c0 + step)
            k = c0 // self.outer
            if self.inner is None:
                yield k, (lo - c0) * self.dtype.itemsize, lo, hi
                continue
            index = self._shard_index(k)
            entry = None if index is None else index[(c0 % self.outer) // self.inner]
            if entry is None or entry[0] == _MISSING:
                yield k, None, lo, hi
            else:
                yield k, int(entry[0]) + (lo - c0) * self.dtype.itemsize, lo, hi

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy elements ``[start, stop)`` into ``out`` (a contiguous array of this dtype)."""
        view = memoryview(out.view(np.uint8))
        size = self.dtype.itemsize
        for k, offset, lo, hi in self._pieces(start, stop):
            a, b = (lo - start) * size, (hi - start) * size
            if offset is None:
                out[lo - start : hi - start] = self.fill
                continue
            try:
                fd = self.fds.get(self._file(k))
            except FileNotFoundError:  # an unwritten chunk holds the fill value
                out[lo - start : hi - start] = self.fill
                continue
            got = os.preadv(fd, [view[a:b]], offset)
            if got != b - a:
                raise OSError(f"{self._file(k)}: short read ({got} of {b - a} bytes)")


def _done() -> None:
    return None


class StoreReader:
    """Reads contiguous ranges of one store's arrays.

    Parameters
    ----------
    path
        The store.
    mode
        ``auto`` (raw bytes when the store is uncompressed, else tensorstore), ``raw`` or
        ``tensorstore``.
    """

    def __init__(self, path: str | Path, mode: str = "auto"):
        self.path = Path(path)
        self.attrs = fmt.read_attrs(self.path)
        self.n_cells = int(self.attrs["n_cells"])
        self.mode = mode
        if mode == "auto":
            self.mode = "raw" if self.attrs["settings"].get("compressor") is None else "tensorstore"
        self._arrays: dict[str, object] = {}
        self._cells: dict[str, np.ndarray] = {}
        self._memory: dict[str, np.ndarray] = {}  # whole arrays, when held in memory
        self._fds = _FdCache()
        self._pid = os.getpid()

    def _array(self, name: str):
        if self._pid != os.getpid():  # forked into a worker: open everything afresh
            self._arrays, self._fds, self._pid = {}, _FdCache(), os.getpid()
        arr = self._arrays.get(name)
        if arr is None:
            if self.mode == "raw":
                arr = RawArray(self.path / name, self._fds)
            else:
                import tensorstore as ts

                spec = {
                    "driver": "zarr3",
                    "kvstore": {"driver": "file", "path": str(self.path / name)},
                }
                arr = ts.open(spec, open=True, read=True).result()
            self._arrays[name] = arr
        return arr

    def dtype(self, name: str) -> np.dtype:
        arr = self._array(name)
        return arr.dtype if self.mode == "raw" else np.dtype(arr.dtype.numpy_dtype)

    def read(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``[start, stop)`` of array ``name`` (into ``out`` when given)."""
        if out is None:
            out = np.empty(stop - start, dtype=self.dtype(name))
        self.submit(name, start, stop, out)()
        return out

    def submit(self, name: str, start: int, stop: int, out: np.ndarray):
        """Start reading ``[start, stop)`` into ``out``; returns a call that completes it.

        Raw reads finish at once; tensorstore reads run concurrently until completed, so a
        batch issues all its reads before waiting on any.
        """
        held = self._memory.get(name)
        if held is not None:
            out[...] = held[start:stop]
            return _done
        arr = self._array(name)
        if out.dtype != self.dtype(name):  # e.g. a batch widened to a common dtype
            tmp = np.empty(stop - start, dtype=self.dtype(name))
            done = self.submit(name, start, stop, tmp)

            def widen() -> None:
                done()
                out[...] = tmp

            return widen
        if self.mode == "raw":
            arr.read_into(start, stop, out)
            return _done
        future = arr[start:stop].read()

        def finish() -> None:
            out[...] = future.result()

        return finish

    def cell_array(self, name: str) -> np.ndarray:
        """A whole per-cell array, read once and kept (a few bytes per cell): batches take
        slices of it instead of issuing tiny reads."""
        if name not in self._cells:
            n = self.n_cells + 1 if name == fmt.INDPTR else self.n_cells
            self._cells[name] = self.read(name, 0, n)
        return self._cells[name]

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a 2-D per-cell array (``obsm/<key>``), via tensorstore."""
        key = ("rows", name)
        if key not in self._arrays:
            import tensorstore as ts

            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}}
            self._arrays[key] = ts.open(spec, open=True, read=True).result()
        return self._arrays[key][start:stop].read().result()

    def hold_in_memory(self) -> None:
        """Read ``tokens`` and ``values`` whole; later reads copy from memory."""
        nnz = int(self.cell_array(fmt.INDPTR)[-1])
        for name in (fmt.TOKENS, fmt.VALUES):
            self._memory[name] = self.read(name, 0, nnz)

    def close(self) -> None:
        self._fds.close()
        self._arrays.clear()
