"""Writing the token store format: whole-shard entry arrays, per-cell arrays, root attributes.

The compiler (:mod:`preprocess.compiler`) feeds it cells in their final (shuffled) order;
benchmarks write synthetic corpora through it directly, so both make the same bytes.

An uncompressed store (the default) is written without zarr: every ``zarr.json`` from a
metadata dict (:func:`_array_meta`, :func:`_group_meta`) and every shard and chunk file
directly, with exactly the bytes zarr 3 writes for them (checked file by file against
zarr's own output in ``tests/test_compile.py``). zarr's ``create_array`` costs ~3 ms per
array, ~35 ms per store of ten arrays, more than a small file's cells; its per-chunk write
path ~6.5 ns per byte. A compressed store goes through zarr.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from concept import store as fmt

_JSON_INDENT = 2  # zarr's default ``json_indent``


def compressors(name: str | None):
    """The Zarr codecs of ``compile.compressor`` (None: uncompressed, the default)."""
    import zarr

    if name is None:
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]


def _bytes_codec(dtype: np.dtype) -> dict:
    # zarr drops the endianness of one-byte types
    if dtype.itemsize == 1:
        return {"name": "bytes"}
    return {"name": "bytes", "configuration": {"endian": "little"}}


def _array_meta(
    shape: tuple, dtype: np.dtype, chunks: tuple, inner: int | None = None, attrs=None
) -> dict:
    """An uncompressed array's ``zarr.json`` as zarr 3 writes it: chunks of ``chunks``
    (shards, when ``inner`` gives their inner chunk length: the index at the end, its
    crc32c), fill value 0."""
    codecs = [_bytes_codec(dtype)]
    if inner is not None:
        little = _bytes_codec(np.dtype(np.uint64))
        config = {
            "chunk_shape": [inner],
            "codecs": codecs,
            "index_codecs": [little, {"name": "crc32c"}],
            "index_location": "end",
        }
        codecs = [{"name": "sharding_indexed", "configuration": config}]
    return {
        "shape": list(shape),
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0 if dtype.kind == "f" else 0,
        "codecs": codecs,
        "attributes": attrs or {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _group_meta(attrs: dict) -> dict:
    return {"attributes": attrs, "zarr_format": 3, "node_type": "group"}


def _chunk_key(index: tuple[int, ...]) -> str:
    """zarr's default chunk key (``c/i/j``)."""
    return "/".join(["c", *map(str, index)])


def _chunks(data: np.ndarray, rows: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``data`` cut into chunks of ``rows`` rows as zarr stores them (the last one padded
    with zeros, the fill value) and which are kept (not all zero: zarr omits those)."""
    n_full, rest = divmod(len(data), rows)
    chunks = list(data[: n_full * rows].reshape(n_full, rows, *data.shape[1:]))
    if rest:
        tail = np.zeros((rows, *data.shape[1:]), data.dtype)
        tail[:rest] = data[n_full * rows :]
        chunks.append(tail)
    kept = np.array([c.any() for c in chunks], bool)
    return chunks, kept


def _shard_buffers(data: np.ndarray, shard: int, chunk: int) -> list:
    """The bytes of one shard file holding ``data`` (its first ``len(data)`` elements),
    as zarr writes them: the chunks that are not all zero, in order, then the index
    (offset and length per chunk; 2**64-1 for an omitted chunk) and its crc32c. Empty when
    every chunk is zero (zarr writes no file)."""
    import google_crc32c

    chunks, kept = _chunks(data, chunk)
    if not kept.any():
        return []
    index = np.full((shard // chunk, 2), 2**64 - 1, np.uint64)
    slots = np.flatnonzero(kept)
    index[slots, 0] = np.arange(len(slots), dtype=np.uint64) * (chunk * data.itemsize)
    index[slots, 1] = chunk * data.itemsize
    index_bytes = index.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).tobytes()
    n_full = len(data) // chunk
    # commonly every chunk is kept: the data as it is, and the padded tail
    parts = [data[: n_full * chunk], *chunks[n_full:]] if kept.all() else [chunks[i] for i in slots]
    return [memoryview(p).cast("B") for p in parts] + [index_bytes + crc]


def _write_file(path: Path, buffers: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for b in buffers:
            fh.write(b)


_ALIGN = 4096  # O_DIRECT: the buffer's address, the file offset and the length
DIRECT = getattr(os, "O_DIRECT", 0)


_SLOTS: dict[int, mmap.mmap] = {}  # the shard writers' buffers, kept for the next store
LANE_SLOTS = 100  # slots per lane (stores built at the same time): 0-5 the shard writer's


def aligned_empty(slot: int, n: int, dtype: np.dtype) -> np.ndarray:
    """``n`` items of ``dtype`` in page-aligned memory (an anonymous mapping): buffer
    ``slot`` of this process, reused by the next store while large enough (fresh pages
    cost more than the bytes written from them; stores written at the same time use
    slots of their own, :data:`LANE_SLOTS` apart)."""
    dtype = np.dtype(dtype)
    nbytes = max(n * dtype.itemsize, 1)
    if slot not in _SLOTS or len(_SLOTS[slot]) < nbytes:
        _SLOTS[slot] = mmap.mmap(-1, nbytes)
    return np.frombuffer(_SLOTS[slot], dtype, count=n)


def _write_shard(path: Path, buffers: list) -> None:
    """A shard file of :func:`_shard_buffers`: its leading whole pages written with
    ``O_DIRECT`` where the first buffer starts page-aligned (the shard writer's buffers
    do), the rest through the page cache. Writing a store through the page cache cost
    ~2.7 ns per byte of kernel time on the development VM (fresh pages) and as much again
    to flush it; ``O_DIRECT`` 0.1. Where the filesystem refuses ``O_DIRECT`` (tmpfs), all
    of it goes through the page cache. The store is flushed (fsync) before it is swapped
    in either way."""
    head = buffers[0]
    n = len(head) // _ALIGN * _ALIGN
    if not (DIRECT and n and np.frombuffer(head, np.uint8).ctypes.data % _ALIGN == 0):
        return _write_file(path, buffers)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | DIRECT, 0o666)
        try:
            done = 0
            while done < n:
                done += os.write(fd, head[done:n])
        finally:
            os.close(fd)
    except OSError as e:  # EINVAL: the filesystem (or its block size) refuses O_DIRECT
        if e.errno != errno.EINVAL:
            raise
        return _write_file(path, buffers)
    with open(path, "ab") as fh:
        for b in [head[n:], *buffers[1:]]:
            fh.write(b)


def _write_json(path: Path, meta: dict) -> None:
    _write_file(path, [json.dumps(meta, indent=_JSON_INDENT, allow_nan=True).encode()])


class _ShardWriter:
    """Appends to a 1-D array in whole shards, so no shard is ever rewritten.

    Entries are copied into one of three shard-sized buffers; a full one is written on a
    background thread (one write at a time, in order, at most two in flight) while the
    next fills. ``write(start, data)`` writes one shard: the files of
    :func:`_shard_buffers` for a plain store, zarr's ``__setitem__`` for a compressed one.
    """

    def __init__(
        self, write, shard: int, n: int, dtype: np.dtype, pool: ThreadPoolExecutor, slot: int
    ):
        self.write, self.pool = write, pool
        size = min(shard, max(n, 1))
        self.buffers = [aligned_empty(slot + k, size, dtype) for k in range(3)]
        self.pos, self.fill, self.current, self.writes = 0, 0, 0, []

    def _flush(self) -> None:
        data = self.buffers[self.current][: self.fill]
        while len(self.writes) > 1:  # the buffer filled next must be written out first
            self.writes.pop(0).result()
        self.writes.append(self.pool.submit(self.write, self.pos, data))
        self.pos += len(data)
        self.current, self.fill = (self.current + 1) % len(self.buffers), 0

    def append(self, data: np.ndarray) -> None:
        while len(data):
            buf = self.buffers[self.current]
            k = min(len(buf) - self.fill, len(data))
            buf[self.fill : self.fill + k] = data[:k]
            self.fill, data = self.fill + k, data[k:]
            if self.fill == len(buf):
                self._flush()

    def close(self) -> None:
        """Submit the last shard (:meth:`wait` waits for the writes)."""
        if self.fill:
            self._flush()

    def wait(self, check: bool = True) -> None:
        """Wait for the writes in flight; with ``check``, the first error is raised after
        all are done."""
        writes, self.writes = self.writes, []
        errors = [e for w in writes if (e := w.exception()) is not None]
        if errors and check:
            raise errors[0]


# every store's shards, one write at a time (stores of two lanes share it)
_POOL = ThreadPoolExecutor(1, thread_name_prefix="shards")


class StoreWriter:
    """Writes one store into an empty folder ``tmp``.

    Call :meth:`append` with the entries of consecutive stored cells (each cell's tokens
    and values in stored order), then :meth:`cells` for each per-cell array, then
    :meth:`finish` with the root attributes.

    Parameters
    ----------
    tmp
        The folder (a temporary name: the caller swaps it into place).
    settings
        The compile byte settings (``chunk_elements``, ``shard_elements``, ``cell_chunk``,
        ``compressor``).
    nnz
        Entries in all (the arrays' length).
    token_dtype, value_dtype
        The stored dtypes.
    lane
        Which of the process's buffer sets (:func:`aligned_empty`) to use: stores written
        at the same time (``preprocess.compiler.compile_files`` with ``lanes``) each
        have a lane of their own.
    """

    def __init__(
        self,
        tmp: Path,
        settings: dict,
        nnz: int,
        token_dtype: np.dtype,
        value_dtype: np.dtype,
        lane: int = 0,
    ):
        self.settings, self.nnz, self.folder = settings, nnz, Path(tmp)
        # plain: the bytes are written here (on a little-endian machine they are the
        # arrays' own); compressed: by zarr
        self.plain = settings["compressor"] is None and sys.byteorder == "little"
        self.root = None
        if not self.plain:
            import zarr

            self.root = zarr.open_group(tmp, mode="a", zarr_format=3)
        self.groups: set[str] = set()
        first = LANE_SLOTS * lane  # stores written at once use buffers of their own
        self.tokens = self._entries(fmt.TOKENS, np.dtype(token_dtype), slot=first)
        self.values = self._entries(fmt.VALUES, np.dtype(value_dtype), slot=first + 3)

    def _parents(self, name: str) -> None:
        """The ``zarr.json`` of the groups above array ``name`` (as zarr makes them)."""
        parts = name.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            group = "/".join(parts[:k])
            if group not in self.groups:
                _write_json(self.folder / group / "zarr.json", _group_meta({}))
                self.groups.add(group)

    def _entries(self, name: str, dtype: np.dtype, slot: int) -> _ShardWriter:
        s = self.settings
        shard, chunk = s["shard_elements"], s["chunk_elements"]
        if self.plain:
            self._parents(name)
            meta = _array_meta((self.nnz,), dtype, (shard,), inner=chunk)
            _write_json(self.folder / name / "zarr.json", meta)

            def write(start: int, data: np.ndarray) -> None:
                if buffers := _shard_buffers(data, shard, chunk):
                    _write_shard(self.folder / name / _chunk_key((start // shard,)), buffers)

        else:
            arr = self.root.create_array(
                name,
                shape=(self.nnz,),
                chunks=(chunk,),
                shards=(shard,),
                dtype=dtype,
                compressors=compressors(s["compressor"]),
                fill_value=0,
            )

            def write(start: int, data: np.ndarray) -> None:
                arr[start : start + len(data)] = data

        return _ShardWriter(write, shard, self.nnz, dtype, _POOL, slot)

    def append(self, tokens: np.ndarray, values: np.ndarray) -> None:
        """The next entries, in stored order."""
        self.tokens.append(tokens)
        self.values.append(values)

    def close_entries(self) -> None:
        """Submit the last shards of the entry arrays (after the last :meth:`append`);
        they are written while the per-cell arrays are (:meth:`finish` waits for them)."""
        self.tokens.close()
        self.values.close()
        if self.tokens.pos != self.nnz or self.values.pos != self.nnz:
            self.abort()
            raise ValueError(f"wrote {self.tokens.pos} entries, declared {self.nnz}")

    def abort(self) -> None:
        """After an error: wait for the writes in flight, so that none lands after the
        caller removes the folder."""
        self.tokens.wait(check=False)  # the error that led here is the one to report
        self.values.wait(check=False)

    def cells(self, name: str, data: np.ndarray, attrs: dict | None = None) -> None:
        """A whole per-cell array (``indptr``, ``cell/*``, ``obs/<key>``, ``obsm/<key>``,
        ``var_tokens``), in chunks of ``cell_chunk`` rows."""
        rows = max(min(self.settings["cell_chunk"], len(data)), 1)
        chunks = (rows, *data.shape[1:])
        if not self.plain:
            arr = self.root.create_array(
                name,
                shape=data.shape,
                chunks=chunks,
                dtype=data.dtype,
                compressors=compressors(self.settings["compressor"]),
                fill_value=0,
                attributes=attrs,
            )
            arr[:] = data
            return
        self._parents(name)
        _write_json(
            self.folder / name / "zarr.json",
            _array_meta(data.shape, data.dtype, chunks, attrs=attrs),
        )
        pieces, kept = _chunks(np.ascontiguousarray(data), rows)
        for i in np.flatnonzero(kept):
            key = _chunk_key((int(i),) + (0,) * (data.ndim - 1))
            _write_file(self.folder / name / key, [memoryview(pieces[i]).cast("B")])

    def finish(self, attrs: dict) -> None:
        """Write the root attributes (the format name and creation time added)."""
        self.tokens.wait()
        self.values.wait()
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        attrs = {"format": fmt.FORMAT, "created_at": created, **attrs}
        if self.plain:
            _write_json(self.folder / "zarr.json", _group_meta(attrs))
        else:
            self.root.update_attributes(attrs)
