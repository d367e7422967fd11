"""Compile one ``.h5ad`` file into a token store (DESIGN.md section 5).

Two passes with bounded memory:

1. Read the file in row blocks, tokenize and order every cell (``concept.tokenize``),
   and append each cell to the scratch *bucket* that holds its shuffled output position.
   A bucket is a contiguous range of output cells sized to a few million entries.
2. Load one bucket at a time, put its cells in output order in memory, and write them
   as whole Zarr shards.

Only the per-cell index arrays grow with the number of cells (about 40 bytes per cell).
The store is built under a temporary name, flushed to disk and swapped in when complete
(:func:`replace_store`), under a per-store lock, so a killed compile never leaves a half
store or loses the old one, and two compiles never collide. A store for an ``s3://`` URI
is built in a local temporary folder and published (:func:`concept.objstore.publish`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import queue
import resource
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from concept import objstore
from concept import store as fmt
from concept.h5ad import match_genes, open_source
from concept.tokenize import drop_duplicate_columns, take_cells, tokenize_csr
from concept.vocab import InputError, TokenMapping, read_panel, read_token_mapping
from preprocess.spill import Spill
from preprocess.writer import LANE_SLOTS, StoreWriter, aligned_empty

BUCKET_ELEMENTS = 4 << 20  # entries per scratch bucket: bounds pass-2 memory (~50 MB)
MAX_BUCKETS = 512  # larger files get larger buckets: the scratch's memory stays bounded
MIN_BUCKET_CELLS = 256
_BUCKET_SLOTS = 10  # preprocess.writer.aligned_empty slots of pass 2 (the writer has 0-5)
SMALL_FILE_BYTES = 64 << 20  # compile_files builds files under this size on several lanes


@dataclass
class FileJob:
    """Everything one worker needs to compile one file (picklable without ``adata``)."""

    source: str  # h5ad file or AnnData .zarr folder (with ``adata``: only its name)
    species: str
    source_name: str
    section: str
    out: str  # final store path
    name: str  # the store's name within its source (``sample1/adata``), see concept.splits
    mapping: str  # token-mapping CSV
    panels: list[str]
    settings: dict  # compile settings that change the store's bytes (fingerprinted)
    rows_per_read: int = 8192
    entries_per_read: int = 2_097_152
    force: bool = False
    fingerprint: str = "fast"  # fast | full (concept.store.source_fingerprint)
    adata: Any = None  # an AnnData in memory compiled in place of the file (in-process only)

    @property
    def input(self):
        """What the compiler reads: the AnnData in memory, else the file."""
        return self.source if self.adata is None else self.adata


@dataclass
class FileReport:
    file: str
    species: str
    section: str
    status: str  # compiled | skipped | failed
    store: str = ""
    name: str = ""  # <source_name>/<store name>, as the table shows it
    n_cells: int = 0
    nnz: int = 0
    coverage: float = 0.0  # fraction of the file's genes found in the vocabulary
    n_cells_unmapped: int = 0  # cells with no mapped gene (kept, empty)
    duplicate_genes: int = 0  # source genes dropped as duplicates after mapping
    seconds: float = 0.0
    peak_rss_mib: float = 0.0  # the compiling process's peak resident memory so far
    error: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def cells_per_s(self) -> float:
        return self.n_cells / self.seconds if self.seconds and self.status == "compiled" else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "cells_per_s": round(self.cells_per_s, 1)}


@contextmanager
def store_lock(out: Path):
    """Exclusive lock for one store; released by the OS if the process dies."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _value_dtype(job: FileJob, report: FileReport, integral: bool, vmax: float) -> np.dtype:
    """Integer counts: the smallest unsigned type; other values: ``compile.value_dtype``,
    or float32 when the file's largest value does not fit float16 (reported)."""
    if integral:
        return fmt.uint_dtype_for(vmax)
    try:
        dtype = fmt.float_dtype_for(job.settings["value_dtype"], vmax)
    except ValueError as e:
        raise InputError(f"{job.source}: {e}") from None
    if dtype.name != job.settings["value_dtype"]:
        report.warnings.append(
            f"values up to {vmax:.6g} exceed the float16 range: stored as {dtype.name}"
        )
    return dtype


PREFETCH = 1  # blocks read ahead by the reading thread while one is tokenized


def _at_least(buffers: tuple[np.ndarray, np.ndarray], n: int, value_dtype: np.dtype):
    """Token and value buffers of at least ``n`` entries: the same ones while they are
    large enough, so that their pages are touched once per compile, not once per block."""
    tokens, values = buffers
    if len(tokens) < n or values.dtype != value_dtype:
        tokens = np.empty(max(n, 2 * len(tokens)), tokens.dtype)
        values = np.empty(len(tokens), value_dtype)
    return tokens, values


def _prefetch(items, depth: int):
    """Iterate ``items`` with a thread producing up to ``depth`` ahead (h5py reads overlap
    the tokenizer, which releases the GIL). Errors reach the caller; stopping early (an
    error downstream) stops the thread before returning."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)
        finally:
            if hasattr(items, "close"):  # a generator stopped early: its own cleanup now
                items.close()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _Buckets:
    """Pass 1's scratch: per bucket, its cells' entries in arrival order and their output
    positions. Values are kept block by block (segments) in the narrowest dtype that holds
    that block exactly. On disk in one :class:`preprocess.spill.Spill` under ``folder``
    (two streams per bucket: tokens, values), or in memory when there is a single bucket
    (a small file: no scratch file at all). :meth:`read` fills one of two sets of
    buffers (``slot``), so that the next bucket can be read while one is written; those
    of ``lane`` (:class:`preprocess.writer.StoreWriter`)."""

    def __init__(
        self, folder: Path, n_buckets: int, token_dtype: np.dtype, in_memory: bool, lane: int
    ):
        self.token_dtype = np.dtype(token_dtype)
        self.first_slot = LANE_SLOTS * lane + _BUCKET_SLOTS
        self.positions: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]
        # values: arrays in memory; (dtype, count) on disk
        self.segments: list[list] = [[] for _ in range(n_buckets)]
        self.tokens: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]  # in memory
        self.spill: Spill | None = None
        if not in_memory:
            folder.mkdir(parents=True)
            self.spill = Spill(folder / "spill", 2 * n_buckets)
        self.folder = folder

    def add(self, b: int, tokens: np.ndarray, values: np.ndarray, positions: np.ndarray) -> None:
        self.positions[b].append(positions)
        if self.spill is None:
            self.tokens[b].append(tokens.copy())
            self.segments[b].append(values.copy())
        else:
            self.spill.append(2 * b, tokens)
            self.spill.append(2 * b + 1, values)
            self.segments[b].append((values.dtype, len(values)))

    def read(
        self, b: int, value_dtype: np.dtype, slot: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bucket ``b``'s output positions, tokens and values (as ``value_dtype``), in the
        reused buffers of ``slot``; the bucket's scratch is dropped."""
        segments, self.segments[b] = self.segments[b], []
        pos = np.concatenate(self.positions[b]) if segments else np.empty(0, np.int64)
        self.positions[b] = []
        first = self.first_slot + 3 * slot
        if self.spill is None:
            n = sum(len(v) for v in segments)
            tokens = aligned_empty(first, n, self.token_dtype)
            if segments:
                np.concatenate(self.tokens[b], out=tokens)
            self.tokens[b] = []
            parts = segments
        else:
            n = sum(k for _, k in segments)
            tokens = aligned_empty(first, n, self.token_dtype)
            self.spill.read(2 * b, tokens.view(np.uint8))
            packed = aligned_empty(first + 1, self.spill.size(2 * b + 1), np.uint8)
            self.spill.read(2 * b + 1, packed)
            parts, offset = [], 0
            for dtype, k in segments:
                parts.append(packed[offset : offset + k * dtype.itemsize].view(dtype))
                offset += k * dtype.itemsize
        values = aligned_empty(first + 2, n, value_dtype)
        at = 0
        for part in parts:
            values[at : at + len(part)] = part
            at += len(part)
        return pos, tokens, values

    def close(self) -> None:
        """Drop the scratch."""
        self.tokens = self.segments = self.positions = []
        if self.spill is not None:
            self.spill.close()
            self.spill = None
            self.folder.rmdir()


def _build(
    job: FileJob,
    mapping: TokenMapping,
    tmp: Path,
    inputs: dict,
    report: FileReport,
    progress,
    lane: int,
) -> None:
    """Write the store into ``tmp``, with ``inputs`` (:func:`concept.store.current_attrs`)
    among its root attributes, with the buffers of ``lane``."""
    s = job.settings
    with open_source(job.input, s["x_source"], job.source) as src:
        col_tokens, var_source, note = match_genes(src, mapping, job.species, s["var_column"])
        report.warnings += src.warnings + ([note] if note else [])
        report.duplicate_genes = drop_duplicate_columns(col_tokens)
        n_mapped = int((col_tokens >= 0).sum())
        report.coverage = n_mapped / max(src.n_vars, 1)
        n = src.n_cells
        perm = np.random.default_rng(s["shuffle_seed"]).permutation(n)
        out_pos = np.empty(n, dtype=np.int64)
        out_pos[perm] = np.arange(n)
        per_cell = src.nnz_hint / max(n, 1) if src.nnz_hint is not None else src.n_vars / 10
        bucket_cells = int(BUCKET_ELEMENTS // max(per_cell, 1))
        bucket_cells = max(bucket_cells, -(-n // MAX_BUCKETS), MIN_BUCKET_CELLS)
        bucket_cells = min(bucket_cells, max(n, 1))
        n_buckets = max(-(-n // bucket_cells), 1)

        obs = {}
        for key in s["obs_keys"]:
            col = src.obs_column(key)
            if col is None and key == "dataset":  # the reference's file-index key
                col = (np.zeros(n, np.int32), [job.name])
            elif col is None:
                report.warnings.append(f"obs column {key!r} missing: codes -1")
                col = (np.full(n, -1, np.int32), [])
            obs[key] = col
        embs_key = s.get("precomp_embs_key")
        embs = _read_obsm(src, embs_key, n) if embs_key else None
        if s["group_by"]:  # cells of one value contiguous (shuffled within it): fast sampling
            perm = perm[np.argsort(obs[s["group_by"]][0][perm], kind="stable")]
            out_pos[perm] = np.arange(n)

        total_counts = np.zeros(n, np.float32)
        n_genes = np.zeros(n, np.int32)
        nnz = np.zeros(n, np.int64)
        # Normalized values go straight to their dtype (below 1e4 after totalcount, below
        # 89 after log1p: float16 holds them); raw values stay exact until the file's max
        # (and so the store's dtype) is known, in the narrowest dtype of each block.
        raw = s["normalization"] == "raw"
        vmax, integral = 0.0, raw
        vrange = [np.inf, -np.inf]  # of the stored values, for the non-integer warning
        tmp.mkdir(parents=True)
        buckets = _Buckets(tmp / "_scratch", n_buckets, mapping.token_dtype, n_buckets == 1, lane)
        # tokenize output buffers, used in turn: a block is tokenized while the one before
        # is spread over the buckets, and one more waits between them
        ring = [(np.empty(0, mapping.token_dtype), np.empty(0)) for _ in range(3)]

        def tokenized(blocks):
            with closing(blocks):  # an error here stops the reading thread too
                for k, (a, indptr, indices, data) in enumerate(blocks):
                    m = len(indptr) - 1
                    # the block's cells in bucket order: each bucket's entries come out contiguous
                    bucket = out_pos[a : a + m] // bucket_cells
                    order = np.argsort(bucket, kind="stable")
                    i = k % len(ring)
                    ring[i] = _at_least(ring[i], len(data), np.dtype(np.uint64))  # value keys
                    try:
                        blk = tokenize_csr(
                            indptr,
                            indices,
                            data,
                            col_tokens,
                            s["normalization"],
                            cells=order,
                            token_dtype=mapping.token_dtype,
                            out=ring[i],
                        )
                    except InputError as e:
                        raise InputError(f"{job.source}: rows {a}..{a + m - 1}: {e}") from None
                    yield a, m, order, bucket, blk

        try:
            blocks = src.blocks(
                job.rows_per_read, job.entries_per_read, scratch_dir=tmp, buffers=PREFETCH + 2
            )
            hint = src.nnz_hint
            if hint is None or n > job.rows_per_read or hint > job.entries_per_read:
                # more than one block: h5py reads, the tokenizer (numba, without the GIL)
                # and the buckets each on a thread of their own, one block apart
                stream = _prefetch(tokenized(_prefetch(blocks, PREFETCH)), 1)
            else:
                stream = tokenized(blocks)
            with closing(stream):  # stopped early (an error): its threads stop now
                for a, m, order, bucket, blk in stream:
                    rows = a + order
                    total_counts[rows] = blk.total_counts
                    n_genes[rows] = blk.n_genes
                    nnz[rows] = np.diff(blk.indptr)
                    vals = blk.values if raw else blk.values.astype(s["value_dtype"])
                    exact = vals.dtype  # the block's scratch dtype
                    if vals.size:
                        lo, hi = float(vals.min()), float(vals.max())
                        vrange = [min(vrange[0], lo), max(vrange[1], hi)]
                        whole = vals.dtype.kind in "iu" or np.array_equal(vals, np.floor(vals))
                        if raw:
                            vmax, integral = max(vmax, hi), integral and whole
                            if whole and hi < 2**16:
                                exact = fmt.uint_dtype_for(hi)
                    cuts = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
                    ecuts = blk.indptr[cuts]
                    vals = vals.astype(exact, copy=False)
                    for b in np.flatnonzero(np.diff(cuts)):
                        buckets.add(
                            b,
                            blk.tokens[ecuts[b] : ecuts[b + 1]],
                            vals[ecuts[b] : ecuts[b + 1]],
                            out_pos[rows[cuts[b] : cuts[b + 1]]],
                        )
                    if progress is not None:
                        progress.put(m)
                    del blk, vals  # free before the next block is read
        except BaseException:
            buckets.close()
            raise

    if raw and not integral:
        report.warnings.append(
            f"values of {src.x_source} are not integer counts (range "
            f"{vrange[0]:.4g}..{vrange[1]:.4g}) but compile.normalization=raw treats them as "
            "counts; point compile.x_source at the raw counts (raw, layers/counts) if the file "
            "has them"
        )
    store_vdtype = _value_dtype(job, report, integral, vmax)
    total = int(nnz.sum())
    writer = StoreWriter(tmp, s, total, mapping.token_dtype, store_vdtype, lane)
    out_nnz = nnz[perm]
    out: tuple[np.ndarray, np.ndarray] = (np.empty(0, mapping.token_dtype), np.empty(0))
    try:
        # the next bucket is read (from disk: I/O waits) while one is put in order
        with ThreadPoolExecutor(1, thread_name_prefix="bucket") as ahead:
            nxt = ahead.submit(buckets.read, 0, store_vdtype, 0)
            for b in range(n_buckets):
                pos, tokens, values = nxt.result()
                if b + 1 < n_buckets:
                    nxt = ahead.submit(buckets.read, b + 1, store_vdtype, (b + 1) % 2)
                local = np.zeros(len(pos) + 1, np.int64)
                np.cumsum(out_nnz[pos], out=local[1:])
                out = _at_least(out, len(tokens), store_vdtype)
                writer.append(*take_cells(local, np.argsort(pos), tokens, values, out))
        writer.close_entries()
        buckets.close()
        cells = writer.cells

        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(out_nnz, out=indptr[1:])
        cells(fmt.INDPTR, indptr)
        # mapped tokens are distinct (drop_duplicate_columns): their sorted set, as a sort
        cells(fmt.VAR_TOKENS, np.sort(col_tokens[col_tokens >= 0]).astype(mapping.token_dtype))
        cells(fmt.TOTAL_COUNTS, total_counts[perm])
        cells(fmt.N_GENES, n_genes[perm])
        cells(fmt.ROW, perm.astype(np.int64))
        for key, (codes, cats) in obs.items():
            cells(f"{fmt.OBS_GROUP}/{key}", codes[perm], {"categories": cats})
        if embs_key:
            cells(f"{fmt.OBSM_GROUP}/{embs_key}", embs[perm])

        report.n_cells, report.nnz = n, total
        report.n_cells_unmapped = int((nnz == 0).sum())
        writer.finish(
            {
                "species": job.species,
                "source_name": job.source_name,
                "source_file": Path(job.source).name,
                "normalization": s["normalization"],
                "shuffle_seed": s["shuffle_seed"],
                **inputs,
                "n_cells": n,
                "nnz": total,
                "n_var_mapped": n_mapped,
                "n_var_source": int(len(col_tokens)),
                "x_source": src.x_source,
                "var_source": var_source,
                "value_dtype": store_vdtype.name,
                "obs_keys": list(obs),
                "precomp_embs_dim": int(embs.shape[1]) if embs_key else None,
                "n_cells_unmapped": report.n_cells_unmapped,
                "duplicate_genes": report.duplicate_genes,
            }
        )
    except BaseException:
        writer.abort()  # no write may land after the caller removes the folder
        raise
    finally:
        buckets.close()


def _read_obsm(src, key: str, n_cells: int) -> np.ndarray:
    """``obsm[key]`` of an open source as float32 (n_cells, k) (``compile.precomp_embs_key``)."""
    source = src.path
    if key not in src.obsm_keys():
        raise InputError(
            f"{source}: no obsm[{key!r}] (has {src.obsm_keys()}): fix datamodule.precomp_embs_key"
        )
    value = src.obsm(key)
    value = np.asarray(value.toarray() if hasattr(value, "toarray") else value, np.float32)
    if value.ndim != 2 or len(value) != n_cells:
        raise InputError(
            f"{source}: obsm[{key!r}] has shape {value.shape}, expected ({n_cells}, k)"
        )
    if not np.isfinite(value).all():
        raise InputError(f"{source}: obsm[{key!r}] holds NaN or inf")
    return value


def _os_error(e: OSError, job: FileJob) -> str:
    """One line for an operating-system error: a full disk and a read-only folder say so."""
    out = Path(job.out)
    # numpy's tofile reports a short write as "N requested and M written", without errno
    if e.errno == errno.ENOSPC or "requested and" in str(e):
        return (
            f"{job.source}: no space left on device (ENOSPC) writing {e.filename or out.parent}: "
            "free space there or set PATH.COMPILED_ROOT to a larger disk (earlier stores are "
            "untouched)"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{job.source}: cannot write {e.filename or out.parent} ({e.strerror}): make "
            "PATH.COMPILED_ROOT writable or point it at a writable folder"
        )
    return f"{job.source}: {type(e).__name__}: {e}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _fsync_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(8, thread_name_prefix="fsync")


def _fsync_tree(*roots: Path) -> None:
    """Flush every file and directory under ``roots`` to disk. The flushes run from
    several threads at once, so that the filesystem commits them together (a store has
    a few dozen files: one after the other, each waits for its own journal commit)."""
    files, folders = [], []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            folders.append(Path(dirpath))
            files += [os.path.join(dirpath, name) for name in names]
    list(_fsync_pool().map(_fsync_file, files))
    list(_fsync_pool().map(_fsync_dir, folders))


@functools.cache
def _reuse_freed_memory() -> None:
    """Have glibc keep freed blocks (up to 32 MiB each) for reuse instead of handing them
    back to the kernel: the compiler frees and reallocates arrays of that size for every
    block and file, and on a VM every fresh page costs a fault that the host serves
    (measured here: 2-4 ns per byte, more than the work done on it). No-op elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or the filesystem cannot (the caller falls back).
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_store(tmp: Path, out: Path, flushed: bool = False, sync_folder: bool = True) -> None:
    """Put the complete store ``tmp`` in place as ``out``, durably (unless ``sync_folder``
    is False: the caller flushes ``out``'s folder afterwards).

    The new store is flushed to disk first (unless ``flushed``: the caller did). An
    existing store is then swapped with it in one atomic exchange, so ``out`` always
    names a complete store; where the filesystem cannot exchange, the old store is moved
    aside to ``.<name>.old-<pid>`` first and :func:`recover` puts it back if the process
    dies before the new one is in place (the folder is then flushed here whatever
    ``sync_folder`` says). The old store is removed last.
    """
    if not flushed:
        _fsync_tree(tmp)
    old = tmp
    if not out.exists():
        os.rename(tmp, out)
    elif not _exchange(tmp, out):  # after an exchange, tmp holds the old store
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        _fsync_dir(out.parent)
        os.rename(tmp, out)
    if sync_folder or old != tmp:
        _fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)


def _leftover_of(name: str) -> str | None:
    """The store a folder entry was left beside by a killed compile (``.<store>.tmp-<pid>``,
    ``.<store>.old-<pid>``), else None."""
    store, _, suffix = name[1:].rpartition(".")
    return store if name.startswith(".") and "-" in suffix else None


def recover(out: Path) -> None:
    """Finish what a killed compile left behind (the caller holds the store's lock).

    A store moved aside by :func:`replace_store` while ``out`` is missing is moved back
    (never deleted: it may be the only complete copy); temporary stores are removed.
    """
    # one listing, not a glob: a folder may hold thousands of stores
    left = sorted(n for n in os.listdir(out.parent) if _leftover_of(n) == out.name)
    if not left:
        return
    if not out.exists():
        for name in left:
            old = out.parent / name
            if not name.startswith(f".{out.name}.old-"):
                continue
            try:
                fmt.read_attrs(old)
            except fmt.StoreError:
                continue
            os.rename(old, out)
            _fsync_dir(out.parent)
            break
    for name in left:
        shutil.rmtree(out.parent / name, ignore_errors=True)


_MAPPINGS: dict[str, TokenMapping] = {}
_PANELS: set[tuple[str, int, int]] = set()  # panels read without error: (path, mtime, size)


def _check_panel(path: str) -> None:
    """Read a panel once per process and version (every file of a species names it)."""
    try:
        st = os.stat(path)
    except OSError:
        read_panel(path)  # says what is wrong with it
        raise
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _PANELS:
        read_panel(path)
        _PANELS.add(key)


def _report(job: FileJob) -> FileReport:
    return FileReport(
        job.source,
        job.species,
        job.section,
        "failed",
        store=job.out,
        name=f"{job.source_name}/{job.name}",
    )


def _mapping(path: str) -> TokenMapping:
    """A token mapping, read once per process (every file of a species names it)."""
    if path not in _MAPPINGS:
        _MAPPINGS[path] = read_token_mapping(path)
    return _MAPPINGS[path]


def _skipped(job: FileJob, source, mapping: TokenMapping, report: FileReport) -> bool:
    """Whether the store of ``job`` is current (:func:`concept.store.stale_reason`, one
    read of its ``zarr.json``); if so ``report`` says it was skipped."""
    if job.force:
        return False
    try:
        attrs = fmt.read_attrs(job.out)
    except fmt.StoreError:
        return False
    if fmt.stale_reason(job.out, source, mapping.sha256, job.settings, attrs) is not None:
        return False
    report.status, report.n_cells, report.nnz = "skipped", attrs["n_cells"], attrs["nnz"]
    report.coverage = attrs["n_var_mapped"] / max(attrs["n_var_source"], 1)
    return True


def _leftovers(folders: set[Path]) -> set[Path]:
    """Stores with something a killed compile left beside them (``.<name>.tmp-<pid>``,
    ``.<name>.old-<pid>``: :func:`recover`'s to finish), one listing per folder."""
    found = set()
    for folder in folders:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        found |= {folder / s for s in map(_leftover_of, names) if s is not None}
    return found


def current_stores(jobs: list[FileJob]) -> list[FileReport | None]:
    """The jobs whose stores are current, reported as skipped (None for the others), from
    one stat of each source and one read of each store's ``zarr.json`` (under the ``fast``
    fingerprint; :func:`concept.store.stale_reason`).

    Run before the compile so that a run over a corpus of current stores opens no source,
    starts no worker and takes no lock. Without the lock a store found current may be
    replaced meanwhile, by a complete store (:func:`replace_store`). Left to
    :func:`compile_file` (which checks again under the lock): forced jobs, in-memory and
    ``s3://`` ones, stores a killed compile left something beside, and every job whose
    source, mapping or panels fail (it reports why).
    """
    local = [j for j in jobs if j.adata is None and not objstore.is_uri(j.out)]
    unfinished = _leftovers({Path(j.out).parent for j in local})
    reports: list[FileReport | None] = [None] * len(jobs)
    for i, job in enumerate(jobs):
        if job.force or job.adata is not None or objstore.is_uri(job.out):
            continue
        if Path(job.out) in unfinished:
            continue
        report = _report(job)
        try:
            for panel in job.panels:
                _check_panel(panel)
            if _skipped(job, job.source, _mapping(job.mapping), report):
                reports[i] = report
        except Exception:  # compile_file reports it
            continue
    return reports


def _failure(e: Exception, job: FileJob) -> str:
    """The report's one line for an error while compiling ``job``."""
    if isinstance(e, InputError):
        return str(e)  # InputErrors name their file (the h5ad, a mapping, a panel)
    if isinstance(e, OSError):
        return _os_error(e, job)
    return f"{job.source}: {type(e).__name__}: {e}"


def _finish_report(report: FileReport, seconds: float) -> None:
    report.seconds = seconds
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class _Built:
    """A store built under its temporary name, its lock held, waiting to be put in place."""

    job: FileJob
    tmp: Path
    out: Path
    lock: ExitStack  # closing it releases the store's lock
    report: FileReport
    seconds: float  # the build's


class _Finisher:
    """Puts built stores in place (:func:`replace_store`) on a thread of its own, while the
    caller builds the next file: the flushes of a small store cost about as much as
    building it. The thread takes the stores submitted within ``linger`` seconds of the
    first (or until :meth:`close`), flushes them together, swaps them in one by one, and
    flushes their folders once: every flush is a journal commit, and a commit in
    progress stalls the caller's file creations (measured: 28 us each alone, 400 us
    beside a flush of every store). Each lock is released once its store is durable. At
    most ``depth`` stores wait; a kill loses only those (their temporary folders are
    :func:`recover`'s to remove)."""

    def __init__(self, depth: int = 16, linger: float = 0.25):
        self.queue: queue.Queue = queue.Queue(depth)
        self.depth, self.linger = depth, linger
        self.thread = threading.Thread(target=self._run, name="finisher", daemon=True)
        self.thread.start()

    def submit(self, built: _Built) -> None:
        self.queue.put(built)

    def _take(self) -> list[_Built | None]:
        """The next stores: the first submitted, and those submitted ``linger`` after it
        (None: closed)."""
        batch = [self.queue.get()]
        until = time.monotonic() + self.linger
        while batch[-1] is not None and len(batch) < self.depth:
            try:
                batch.append(self.queue.get(timeout=max(until - time.monotonic(), 0)))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            started = time.perf_counter()
            stores = [b for b in batch if b is not None]
            try:
                _fsync_tree(*(b.tmp for b in stores))
                flushed = True
            except Exception:  # flushed one by one below: the error goes to its own store
                flushed = False
            done = []
            for b in stores:
                try:
                    replace_store(b.tmp, b.out, flushed=flushed, sync_folder=False)
                    done.append(b)
                except Exception as e:
                    b.report.error = _failure(e, b.job)
                finally:
                    shutil.rmtree(b.tmp, ignore_errors=True)
            folders = {b.out.parent for b in done}
            try:
                list(_fsync_pool().map(_fsync_dir, folders))
                for b in done:
                    b.report.status = "compiled"
            except Exception as e:
                for b in done:
                    b.report.error = _failure(e, b.job)
            for b in stores:
                b.lock.close()
                # the build and its batch's flushes, not the wait for the batch
                _finish_report(b.report, b.seconds + time.perf_counter() - started)
            if len(stores) < len(batch):
                return

    def close(self) -> None:
        """Wait until every submitted store is in place (or failed)."""
        self.queue.put(None)
        self.thread.join()


def compile_file(job: FileJob, progress=None) -> FileReport:
    """Compile one file (or skip it when its store is current); never raises for bad input.

    Parameters
    ----------
    job
        The file and settings.
    progress
        Optional queue receiving the number of cells done after each block.
    """
    return compile_files([job], progress)[0]


def _small(job: FileJob) -> bool:
    """Whether ``job``'s source is a file under :data:`SMALL_FILE_BYTES`."""
    if job.adata is not None or objstore.is_uri(job.out):
        return False
    try:
        return os.stat(job.source).st_size < SMALL_FILE_BYTES
    except OSError:  # reported by its own compile
        return False


def compile_files(jobs: list[FileJob], progress=None, lanes: int = 1) -> list[FileReport]:
    """Compile files in this process (:func:`compile_file`), each store put in place on
    a thread of its own while the next file is built (:class:`_Finisher`); returns when
    every store is in place.

    With ``lanes`` > 1, small files (:func:`_small`) are built that many at a time, on
    threads (the heavy parts release the GIL): a small file is one block, read, ordered
    and written on one thread, so one at a time leaves a core idle. Larger files are built
    one at a time first (each already runs on three threads).
    """
    finisher = _Finisher()
    try:
        small = [i for i, job in enumerate(jobs) if lanes > 1 and _small(job)]
        if len(small) < 2:
            return [_compile(job, progress, finisher, 0) for job in jobs]
        reports: list[FileReport | None] = [None] * len(jobs)
        for i in sorted(set(range(len(jobs))) - set(small)):
            reports[i] = _compile(jobs[i], progress, finisher, 0)
        free: queue.SimpleQueue = queue.SimpleQueue()
        for lane in range(lanes):
            free.put(lane)

        def run(i: int) -> FileReport:
            lane = free.get()
            try:
                return _compile(jobs[i], progress, finisher, lane)
            finally:
                free.put(lane)

        with ThreadPoolExecutor(lanes, thread_name_prefix="lane") as pool:
            for i, report in zip(small, pool.map(run, small), strict=True):
                reports[i] = report
        return reports
    finally:
        finisher.close()


def _compile(job: FileJob, progress, finisher: _Finisher, lane: int) -> FileReport:
    """:func:`compile_file` of one job; a local store built is handed to ``finisher``
    (the report says "compiled" once it is in place)."""
    t0 = time.perf_counter()
    report = _report(job)
    remote = objstore.is_uri(job.out)  # built locally next to a stand-in, then published
    out = objstore.staging(job.out) if remote else Path(job.out)
    _reuse_freed_memory()
    lock, handed = ExitStack(), False
    try:
        mapping = _mapping(job.mapping)
        if job.adata is None and not Path(job.source).exists():
            raise InputError(f"{job.source}: file not found")
        # an AnnData in memory is fingerprinted by its content (concept.h5ad.AnnDataSource)
        source = (
            job.source if job.adata is None else open_source(job.adata, job.settings["x_source"])
        )
        for p in job.panels:
            _check_panel(p)  # a malformed panel fails its species' files, loudly
        lock.enter_context(store_lock(out))
        recover(out)
        if _skipped(job, source, mapping, report):
            return report
        # the inputs as they are now, before the build reads them
        inputs = fmt.current_attrs(source, mapping.sha256, job.settings, job.fingerprint)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            _build(job, mapping, tmp, inputs, report, progress, lane)
            if remote:
                objstore.publish(tmp, job.out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if remote:
            shutil.rmtree(tmp, ignore_errors=True)
            report.status = "compiled"
        else:
            seconds = time.perf_counter() - t0
            finisher.submit(_Built(job, tmp, out, lock.pop_all(), report, seconds))
            handed = True
    except Exception as e:  # a failure of one file must not stop the others
        report.error = _failure(e, job)
    finally:
        lock.close()  # unless handed to the finisher, which releases it
        if not handed:
            _finish_report(report, time.perf_counter() - t0)
    return report
