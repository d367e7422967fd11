"""Writing the token store format: whole-shard entry arrays, per-cell arrays, root attributes.

The compiler (:mod:`preprocess.compiler`) feeds it cells in their final (shuffled) order;
benchmarks write synthetic corpora through it directly, so both make the same bytes.
"""

from __future__ import annotations

import datetime as dt
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from concept import store as fmt


def compressors(name: str | None):
    """The Zarr codecs of ``compile.compressor`` (None: uncompressed, the default)."""
    import zarr

    if name is None:
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]


def _plain(array) -> str | None:
    """How ``array``'s bytes can be written without zarr's per-chunk machinery, which
    costs more than the bytes: ``"shards"`` (the sharding codec, uncompressed inner chunks,
    the index at the end: little-endian offsets and lengths, crc32c), ``"chunks"``
    (uncompressed chunks, split along the first axis only), or None (compressed: zarr
    writes it). Only on a little-endian machine, where the array's bytes are the stored
    ones."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    codecs, little = array.metadata.codecs, BytesCodec(endian="little")
    if sys.byteorder != "little" or len(codecs) != 1:
        return None
    if codecs == (little,) and tuple(array.chunks[1:]) == tuple(array.shape[1:]):
        return "chunks"
    shard = codecs[0]
    if (
        isinstance(shard, ShardingCodec)
        and shard.codecs == (little,)
        and shard.index_codecs == (little, Crc32cCodec())
        and shard.index_location.value == "end"
    ):
        return "shards"
    return None


_TEMPLATES: dict[tuple, object] = {}  # per process: zarr's metadata, one per kind of array


def _metadata(
    shape: tuple, chunks: tuple, shards: tuple | None, dtype: np.dtype, compressor, attrs
):
    """The ``ArrayV3Metadata`` that ``create_array`` gives an array (fill value 0): zarr's
    own for the first array of a kind (dtype, dimensions, sharding, compressor) in this
    process, then that one with the shape, chunk grid and attributes replaced.
    ``tests/test_compile.py`` checks the bytes against zarr's for every kind the compiler
    writes."""
    import dataclasses

    import zarr
    from zarr.core.chunk_grids import RegularChunkGrid

    key = (dtype.str, len(shape), shards is not None and chunks, compressor)
    template = _TEMPLATES.get(key)
    if template is None:
        template = _TEMPLATES[key] = zarr.create_array(
            zarr.storage.MemoryStore(),
            shape=shape,
            chunks=chunks,
            shards=shards,
            dtype=dtype,
            compressors=compressors(compressor),
            fill_value=0,
        ).metadata
    grid = RegularChunkGrid(chunk_shape=shards or chunks)
    return dataclasses.replace(template, shape=shape, chunk_grid=grid, attributes=attrs or {})


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


class _ShardWriter:
    """Appends to a 1-D Zarr array in whole shards, so no shard is ever rewritten.

    Entries are copied into one of three shard-sized buffers; a full one is written on a
    background thread (one write at a time, in order, at most two in flight) while the
    next fills. Plain (uncompressed) shards are written as files directly
    (:func:`_shard_buffers`): the same bytes as zarr's, without its per-chunk cost.
    """

    def __init__(self, array, folder: Path, dtype: np.dtype, pool: ThreadPoolExecutor):
        self.array, self.folder, self.pool = array, folder, pool
        self.shard = array.shards[0]
        self.raw = _plain(array) == "shards"
        size = min(self.shard, max(array.shape[0], 1))
        self.buffers = [np.empty(size, dtype) for _ in range(3)]
        self.pos, self.fill, self.current, self.writes = 0, 0, 0, []

    def _write_raw(self, start: int, data: np.ndarray) -> None:
        buffers = _shard_buffers(data, self.shard, self.array.chunks[0])
        if buffers:
            key = self.array.metadata.encode_chunk_key((start // self.shard,))
            _write_file(self.folder / key, buffers)

    def _flush(self) -> None:
        data = self.buffers[self.current][: self.fill]
        while len(self.writes) > 1:  # the buffer filled next must be written out first
            self.writes.pop(0).result()
        if self.raw:
            self.writes.append(self.pool.submit(self._write_raw, self.pos, data))
        else:
            section = slice(self.pos, self.pos + len(data))
            self.writes.append(self.pool.submit(self.array.__setitem__, section, data))
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
        if self.fill:
            self._flush()
        for w in self.writes:
            w.result()


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
    """

    def __init__(
        self,
        tmp: Path,
        settings: dict,
        nnz: int,
        token_dtype: np.dtype,
        value_dtype: np.dtype,
    ):
        from zarr.storage import LocalStore

        self.settings, self.nnz, self.folder = settings, nnz, Path(tmp)
        self.store = LocalStore(self.folder)
        self._group("", {})
        self.pool = ThreadPoolExecutor(1)
        self.tokens = self._entries(fmt.TOKENS, np.dtype(token_dtype))
        self.values = self._entries(fmt.VALUES, np.dtype(value_dtype))

    def _group(self, name: str, attrs: dict) -> None:
        """Write group ``name``'s ``zarr.json`` (zarr's bytes)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.group import GroupMetadata

        meta = GroupMetadata(attributes=attrs).to_buffer_dict(default_buffer_prototype())
        _write_file(self.folder / name / "zarr.json", [meta["zarr.json"].to_bytes()])

    def _array(self, name: str, shape: tuple, chunks: tuple, shards: tuple | None, dtype, attrs):
        """Array ``name`` as ``create_array`` makes it: its ``zarr.json`` (and those of
        missing parent groups) written directly, from the metadata zarr made for the first
        array of its kind in this process (:func:`_metadata`), without zarr's store round
        trips (several ms an array: most of a small store's cost)."""
        import zarr
        from zarr.core.array import AsyncArray
        from zarr.core.buffer import default_buffer_prototype
        from zarr.storage._common import StorePath

        meta = _metadata(shape, chunks, shards, np.dtype(dtype), self.settings["compressor"], attrs)
        parts = name.split("/")
        for i in range(1, len(parts)):
            if not (self.folder.joinpath(*parts[:i]) / "zarr.json").exists():
                self._group("/".join(parts[:i]), {})
        data = meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
        _write_file(self.folder / name / "zarr.json", [data])
        return zarr.Array(AsyncArray(metadata=meta, store_path=StorePath(self.store, name)))

    def _entries(self, name: str, dtype: np.dtype) -> _ShardWriter:
        s = self.settings
        arr = self._array(
            name, (self.nnz,), (s["chunk_elements"],), (s["shard_elements"],), dtype, None
        )
        return _ShardWriter(arr, self.folder / name, dtype, self.pool)

    def append(self, tokens: np.ndarray, values: np.ndarray) -> None:
        """The next entries, in stored order."""
        self.tokens.append(tokens)
        self.values.append(values)

    def close_entries(self) -> None:
        """Flush the entry arrays (after the last :meth:`append`)."""
        self.tokens.close()
        self.values.close()
        self.pool.shutdown()
        if self.tokens.pos != self.nnz or self.values.pos != self.nnz:
            raise ValueError(f"wrote {self.tokens.pos} entries, declared {self.nnz}")

    def abort(self) -> None:
        """After an error: wait for the writes in flight, so that none lands after the
        caller removes the folder."""
        self.pool.shutdown()

    def cells(self, name: str, data: np.ndarray, attrs: dict | None = None) -> None:
        """A whole per-cell array (``indptr``, ``cell/*``, ``obs/<key>``, ``obsm/<key>``,
        ``var_tokens``), in chunks of ``cell_chunk`` rows."""
        rows = max(min(self.settings["cell_chunk"], len(data)), 1)
        arr = self._array(name, data.shape, (rows, *data.shape[1:]), None, data.dtype, attrs)
        if _plain(arr) != "chunks":
            arr[:] = data
            return
        chunks, kept = _chunks(np.ascontiguousarray(data), rows)
        for i in np.flatnonzero(kept):
            key = arr.metadata.encode_chunk_key((int(i),) + (0,) * (data.ndim - 1))
            _write_file(self.folder / name / key, [memoryview(chunks[i]).cast("B")])

    def finish(self, attrs: dict) -> None:
        """Write the root attributes (the format name and creation time added)."""
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._group("", {"format": fmt.FORMAT, "created_at": created, **attrs})
