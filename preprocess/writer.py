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


def _raw_shards(array) -> bool:
    """Whether ``array``'s shards are plain bytes: the sharding codec with uncompressed
    inner chunks, the index at the end (little-endian offsets and lengths, crc32c), on a
    little-endian machine. :func:`_shard_buffers` writes exactly zarr's bytes for those."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    codecs = array.metadata.codecs
    if sys.byteorder != "little" or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    shard, little = codecs[0], BytesCodec(endian="little")
    return (
        shard.codecs == (little,)
        and shard.index_codecs == (little, Crc32cCodec())
        and shard.index_location.value == "end"
    )


def _shard_buffers(data: np.ndarray, shard: int, chunk: int) -> list:
    """The bytes of one shard file holding ``data`` (its first ``len(data)`` elements),
    as zarr writes them: the chunks that are not all zero (the fill value), the last one
    padded with zeros, in order, then the index (offset, length per chunk; 2**64-1 for
    an omitted chunk) and its crc32c. Empty when every chunk is zero (no file)."""
    import google_crc32c

    n_full, rest = divmod(len(data), chunk)
    parts = [data[: n_full * chunk]]
    if rest:
        tail = np.zeros(chunk, data.dtype)
        tail[:rest] = data[n_full * chunk :]
        parts.append(tail)
    present = np.concatenate([p.reshape(-1, chunk).any(axis=1) for p in parts])
    if not present.any():
        return []
    if not present.all():  # keep only the chunks zarr keeps
        kept = np.concatenate([p.reshape(-1, chunk) for p in parts])[present]
        parts = [kept.ravel()]
    index = np.full((shard // chunk, 2), 2**64 - 1, np.uint64)
    nbytes = chunk * data.itemsize
    slots = np.flatnonzero(present)
    index[slots, 0] = np.arange(len(slots), dtype=np.uint64) * nbytes
    index[slots, 1] = nbytes
    index_bytes = index.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).tobytes()
    return [memoryview(p).cast("B") for p in parts] + [index_bytes + crc]


class _ShardWriter:
    """Appends to a 1-D Zarr array in whole shards, so no shard is ever rewritten. Writes
    run on a background thread (one at a time, in order) while the next bucket is built.
    Plain (uncompressed) shards are written as files directly (:func:`_shard_buffers`):
    the same bytes as zarr's, without its per-chunk cost."""

    def __init__(self, array, folder: Path, dtype: np.dtype, pool: ThreadPoolExecutor):
        self.array, self.folder, self.dtype, self.pool = array, folder, dtype, pool
        self.shard = array.shards[0]
        self.raw = _raw_shards(array)
        self.pos, self.pending, self.writes = 0, [], []

    def _write_raw(self, start: int, data: np.ndarray) -> None:
        chunk = self.array.chunks[0]
        for a in range(0, len(data), self.shard):
            buffers = _shard_buffers(data[a : a + self.shard], self.shard, chunk)
            if not buffers:
                continue
            path = self.folder / self.array.metadata.encode_chunk_key(((start + a) // self.shard,))
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                for b in buffers:
                    fh.write(b)

    def _write(self, data: np.ndarray) -> None:
        while len(self.writes) > 1:  # bound the buffers in flight
            self.writes.pop(0).result()
        start = self.pos
        if self.raw:
            self.writes.append(self.pool.submit(self._write_raw, start, data))
        else:
            self.writes.append(
                self.pool.submit(self.array.__setitem__, slice(start, start + len(data)), data)
            )
        self.pos += len(data)

    def append(self, data: np.ndarray) -> None:
        self.pending.append(data.astype(self.dtype, copy=False))
        if sum(len(p) for p in self.pending) >= self.shard:
            buf = np.concatenate(self.pending)
            k = len(buf) // self.shard * self.shard
            self._write(buf[:k])
            self.pending = [buf[k:]]

    def close(self) -> None:
        buf = np.concatenate(self.pending) if self.pending else np.empty(0, self.dtype)
        if len(buf):
            self._write(buf)
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
        import zarr

        self.settings, self.nnz, self.folder = settings, nnz, Path(tmp)
        self.comp = compressors(settings["compressor"])
        self.root = zarr.open_group(tmp, mode="a", zarr_format=3)
        self.pool = ThreadPoolExecutor(1)
        self.tokens = self._entries(fmt.TOKENS, np.dtype(token_dtype))
        self.values = self._entries(fmt.VALUES, np.dtype(value_dtype))

    def _entries(self, name: str, dtype: np.dtype) -> _ShardWriter:
        s = self.settings
        arr = self.root.create_array(
            name,
            shape=(self.nnz,),
            chunks=(s["chunk_elements"],),
            shards=(s["shard_elements"],),
            dtype=dtype,
            compressors=self.comp,
            fill_value=0,
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

    def cells(self, name: str, data: np.ndarray, attrs: dict | None = None) -> None:
        """A whole per-cell array (``indptr``, ``cell/*``, ``obs/<key>``, ``obsm/<key>``,
        ``var_tokens``), in chunks of ``cell_chunk`` rows."""
        arr = self.root.create_array(
            name,
            shape=data.shape,
            chunks=(max(min(self.settings["cell_chunk"], len(data)), 1), *data.shape[1:]),
            dtype=data.dtype,
            compressors=self.comp,
            fill_value=0,
        )
        arr[:] = data
        if attrs:
            arr.attrs.update(attrs)

    def finish(self, attrs: dict) -> None:
        """Write the root attributes (the format name and creation time added)."""
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.root.attrs.update({"format": fmt.FORMAT, "created_at": created, **attrs})
