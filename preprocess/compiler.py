"""Compile one ``.h5ad`` file into a token store (DESIGN.md section 5).

Two passes with bounded memory:

1. Read the file in row blocks, tokenize and order every cell (``concept.tokenize``),
   and append each cell to the scratch *bucket* that holds its shuffled output position.
   A bucket is a contiguous range of output cells sized to a few million entries.
2. Load one bucket at a time, put its cells in output order in memory, and write them
   as whole Zarr shards.

Only the per-cell index arrays grow with the number of cells (about 40 bytes per cell).
The store is built under a temporary name and renamed when complete, under a per-store
lock, so a killed compile never leaves a half store and two compiles never collide.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from concept import store as fmt
from concept.h5ad import H5adSource
from concept.tokenize import drop_duplicate_columns, gather_cells, tokenize_csr
from concept.vocab import InputError, TokenMapping, read_panel, read_token_mapping

BUCKET_ELEMENTS = 4 << 20  # entries per scratch bucket: bounds pass-2 memory (~50 MB)


@dataclass
class FileJob:
    """Everything one worker needs to compile one file (picklable)."""

    source: str  # h5ad path
    species: str
    source_name: str
    section: str
    out: str  # final store path
    mapping: str  # token-mapping CSV
    panels: list[str]
    settings: dict  # compile settings that change the store's bytes (fingerprinted)
    rows_per_read: int = 8192
    entries_per_read: int = 2_097_152
    force: bool = False


@dataclass
class FileReport:
    file: str
    species: str
    section: str
    status: str  # compiled | skipped | failed
    store: str = ""
    n_cells: int = 0
    nnz: int = 0
    coverage: float = 0.0  # fraction of the file's genes found in the vocabulary
    n_cells_unmapped: int = 0  # cells with no mapped gene (kept, empty)
    duplicate_genes: int = 0  # source genes dropped as duplicates after mapping
    seconds: float = 0.0
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


def _compressors(name: str | None):
    import zarr

    if name is None:
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]


class _ShardWriter:
    """Appends to a 1-D Zarr array in whole shards, so no shard is ever rewritten. Writes
    run on a background thread (one at a time, in order) while the next bucket is built."""

    def __init__(self, array, shard: int, dtype: np.dtype, pool: ThreadPoolExecutor):
        self.array, self.shard, self.dtype, self.pool = array, shard, dtype, pool
        self.pos, self.pending, self.writes = 0, [], []

    def _write(self, data: np.ndarray) -> None:
        while len(self.writes) > 1:  # bound the buffers in flight
            self.writes.pop(0).result()
        start = self.pos
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


def _build(job: FileJob, mapping: TokenMapping, tmp: Path, report: FileReport, progress) -> dict:
    """Write the store into ``tmp``; return the per-store attributes to set."""
    import zarr

    s = job.settings
    with H5adSource(job.source, s["x_source"]) as src:
        col_tokens = mapping.tokens_of(src.var_ids(s["var_column"]))
        report.duplicate_genes = drop_duplicate_columns(col_tokens)
        n_mapped = int((col_tokens >= 0).sum())
        if n_mapped == 0:
            raise InputError(f"{job.source}: no gene overlaps the {job.species} vocabulary")
        report.coverage = n_mapped / max(src.n_vars, 1)
        n = src.n_cells
        perm = np.random.default_rng(s["shuffle_seed"]).permutation(n)
        out_pos = np.empty(n, dtype=np.int64)
        out_pos[perm] = np.arange(n)
        per_cell = src.nnz_hint / max(n, 1) if src.nnz_hint is not None else src.n_vars / 10
        bucket_cells = int(np.clip(BUCKET_ELEMENTS // max(per_cell, 1), 256, max(n, 1)))
        n_buckets = max(-(-n // bucket_cells), 1)

        obs = {}
        for key in s["obs_keys"]:
            col = src.obs_column(key)
            if col is None and key == "dataset":  # the reference's file-index key
                col = (np.zeros(n, np.int32), [Path(job.source).stem])
            elif col is None:
                report.warnings.append(f"obs column {key!r} missing: codes -1")
                col = (np.full(n, -1, np.int32), [])
            obs[key] = col
        if s["group_by"]:  # cells of one value contiguous (shuffled within it): fast sampling
            perm = perm[np.argsort(obs[s["group_by"]][0][perm], kind="stable")]
            out_pos[perm] = np.arange(n)

        scratch = tmp / "_scratch"
        scratch.mkdir(parents=True)
        tok_files = [open(scratch / f"t{b}", "wb") for b in range(n_buckets)]
        val_files = [open(scratch / f"v{b}", "wb") for b in range(n_buckets)]
        pos_lists: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]
        total_counts = np.zeros(n, np.float32)
        n_genes = np.zeros(n, np.int32)
        nnz = np.zeros(n, np.int64)
        # Scratch values keep the exact input dtype when raw (the store's dtype depends on
        # the file's max, known only at the end); normalized values go straight to theirs.
        raw = s["normalization"] == "raw"
        vmax, integral, val_dtype = 0.0, raw, None
        try:
            for a, indptr, indices, data in src.blocks(job.rows_per_read, job.entries_per_read):
                try:
                    blk = tokenize_csr(indptr, indices, data, col_tokens, s["normalization"])
                except InputError as e:
                    raise InputError(
                        f"{job.source}: rows {a}..{a + len(indptr) - 2}: {e}"
                    ) from None
                m = len(indptr) - 1
                total_counts[a : a + m] = blk.total_counts
                n_genes[a : a + m] = blk.n_genes
                nnz[a : a + m] = np.diff(blk.indptr)
                vals = blk.values if raw else blk.values.astype(s["value_dtype"])
                val_dtype = vals.dtype
                if integral and vals.size:
                    vmax = max(vmax, float(vals.max()))
                    if vals.dtype.kind == "f":  # float storage of counts is common
                        integral = bool(np.array_equal(vals, np.floor(vals)))
                # Scatter this block's cells to their buckets, in bucket order.
                bucket = out_pos[a : a + m] // bucket_cells
                order = np.argsort(bucket, kind="stable")
                idx = gather_cells(blk.indptr, order)
                toks = blk.tokens[idx].astype(mapping.token_dtype)
                vals = vals[idx]
                cuts = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
                ecuts = np.concatenate([[0], np.cumsum(np.diff(blk.indptr)[order])])[cuts]
                for b in np.flatnonzero(np.diff(cuts)):
                    toks[ecuts[b] : ecuts[b + 1]].tofile(tok_files[b])
                    vals[ecuts[b] : ecuts[b + 1]].tofile(val_files[b])
                    pos_lists[b].append(out_pos[a : a + m][order[cuts[b] : cuts[b + 1]]])
                if progress is not None:
                    progress.put(m)
                del blk, idx, toks, vals, order  # free before the next block is read
        finally:
            for fh in tok_files + val_files:
                fh.close()

    val_dtype = val_dtype or np.dtype(np.float32)
    store_vdtype = fmt.uint_dtype_for(vmax) if integral else np.dtype(s["value_dtype"])
    total = int(nnz.sum())
    comp = _compressors(s["compressor"])
    root = zarr.open_group(tmp, mode="a", zarr_format=3)

    def entries(name: str, dtype: np.dtype):
        return root.create_array(
            name,
            shape=(total,),
            chunks=(s["chunk_elements"],),
            shards=(s["shard_elements"],),
            dtype=dtype,
            compressors=comp,
            fill_value=0,
        )

    pool = ThreadPoolExecutor(1)
    tok_w = _ShardWriter(
        entries(fmt.TOKENS, mapping.token_dtype), s["shard_elements"], mapping.token_dtype, pool
    )
    val_w = _ShardWriter(entries(fmt.VALUES, store_vdtype), s["shard_elements"], store_vdtype, pool)
    out_nnz = nnz[perm]
    for b in range(n_buckets):
        pos = np.concatenate(pos_lists[b]) if pos_lists[b] else np.empty(0, np.int64)
        counts = out_nnz[pos]
        local = np.concatenate([[0], np.cumsum(counts)])
        idx = gather_cells(local, np.argsort(pos))
        tok_w.append(np.fromfile(scratch / f"t{b}", dtype=mapping.token_dtype)[idx])
        val_w.append(np.fromfile(scratch / f"v{b}", dtype=val_dtype)[idx])
        (scratch / f"t{b}").unlink()
        (scratch / f"v{b}").unlink()
    tok_w.close()
    val_w.close()
    pool.shutdown()
    shutil.rmtree(scratch)

    def cells(name: str, data: np.ndarray, attrs: dict | None = None) -> None:
        arr = root.create_array(
            name,
            shape=data.shape,
            chunks=(max(min(s["cell_chunk"], len(data)), 1),),
            dtype=data.dtype,
            compressors=comp,
            fill_value=0,
        )
        arr[:] = data
        if attrs:
            arr.attrs.update(attrs)

    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(out_nnz, out=indptr[1:])
    cells(fmt.INDPTR, indptr)
    cells(fmt.VAR_TOKENS, np.unique(col_tokens[col_tokens >= 0]).astype(mapping.token_dtype))
    cells(fmt.TOTAL_COUNTS, total_counts[perm])
    cells(fmt.N_GENES, n_genes[perm])
    cells(fmt.ROW, perm.astype(np.int64))
    for key, (codes, cats) in obs.items():
        cells(f"{fmt.OBS_GROUP}/{key}", codes[perm], {"categories": cats})

    report.n_cells, report.nnz = n, total
    report.n_cells_unmapped = int((nnz == 0).sum())
    return {
        "n_cells": n,
        "nnz": total,
        "n_var_mapped": n_mapped,
        "n_var_source": int(len(col_tokens)),
        "x_source": src.x_source,
        "value_dtype": store_vdtype.name,
        "obs_keys": list(obs),
        "n_cells_unmapped": report.n_cells_unmapped,
        "duplicate_genes": report.duplicate_genes,
    }


def _clean_leftovers(out: Path) -> None:
    """Remove temporary stores a killed compile left behind (caller holds the lock)."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        shutil.rmtree(p, ignore_errors=True)


_MAPPINGS: dict[str, TokenMapping] = {}


def compile_file(job: FileJob, progress=None) -> FileReport:
    """Compile one file (or skip it when its store is current); never raises for bad input.

    Parameters
    ----------
    job
        The file and settings.
    progress
        Optional queue receiving the number of cells done after each block.
    """
    t0 = time.perf_counter()
    report = FileReport(job.source, job.species, job.section, "failed", store=job.out)
    out = Path(job.out)
    try:
        if job.mapping not in _MAPPINGS:
            _MAPPINGS[job.mapping] = read_token_mapping(job.mapping)
        mapping = _MAPPINGS[job.mapping]
        if not Path(job.source).is_file():
            raise InputError(f"{job.source}: file not found")
        for p in job.panels:
            read_panel(p)  # a malformed panel fails its species' files, loudly
        expected = fmt.expected_attrs(
            job.source, mapping.sha256, list(map(Path, job.panels)), job.settings
        )
        with store_lock(out):
            if not job.force and fmt.stale_reason(out, expected) is None:
                attrs = fmt.read_attrs(out)
                report.status, report.n_cells, report.nnz = (
                    "skipped",
                    attrs["n_cells"],
                    attrs["nnz"],
                )
                report.coverage = attrs["n_var_mapped"] / max(attrs["n_var_source"], 1)
                return report
            _clean_leftovers(out)
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
            try:
                attrs = _build(job, mapping, tmp, report, progress)
                import zarr

                root = zarr.open_group(tmp, mode="a", zarr_format=3)
                root.attrs.update(
                    {
                        "format": fmt.FORMAT,
                        "species": job.species,
                        "source_name": job.source_name,
                        "source_file": Path(job.source).name,
                        "normalization": job.settings["normalization"],
                        "shuffle_seed": job.settings["shuffle_seed"],
                        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        **expected,
                        **attrs,
                    }
                )
                if out.exists():  # replace: move the old store aside first, then swap
                    old = out.parent / f".{out.name}.old-{os.getpid()}"
                    out.rename(old)
                    tmp.rename(out)
                    shutil.rmtree(old)
                else:
                    tmp.rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        report.status = "compiled"
    except InputError as e:
        report.error = str(e)  # InputErrors name their file (the h5ad, a mapping, a panel)
    except Exception as e:  # an unexpected failure of one file must not stop the others
        report.error = f"{job.source}: {type(e).__name__}: {e}"
    finally:
        report.seconds = time.perf_counter() - t0
    return report
