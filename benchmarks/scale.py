"""Corpus scale: the training loader's costs at thousands of stores and millions of cells.

Usage::

    .venv/bin/python benchmarks/scale.py [--points STORES:CELLS[,STORES:CELLS...]]
                                         [--median-genes N] [--ranks 1,2] [--seconds S]
                                         [--big] [--out DIR] [--json PATH]

Defaults: ``--points 1:1000000,200:2000000,2000:10000000 --median-genes 1000 --ranks 1,2
--seconds 5``. At a median of 1,000 genes the three corpora hold ~1.4e10 entries (~60 GB,
most of an hour to write on 2 cores); ``--median-genes 100`` makes them ~6 GB (about
10 minutes to write). The loader's per-store and per-cell costs measured here do not
depend on the genes per cell; the rates in cells/s do.

Data
----
One synthetic corpus per point, written straight into the store format by
``preprocess.synth.synthetic_store`` (the compiler's own writer, ``preprocess.writer``; no
h5ad, uncompressed, the compile defaults): CELLxGENE-like file sizes (log-normal,
sigma 1.5, clipped to 300 .. 300,000 cells and scaled so that they sum to the point's
cells; one store holds them all at ``STORES=1``) and per-cell gene counts (log-normal
around ``--median-genes``, sigma 0.6, clipped to a fifth .. five times the median: 200 ..
5,000 at the default 1,000), a 20,000-token vocabulary, uint16 tokens and values. A
corpus is cached in ``--out`` under a name made of its parameters and reused when they
match; delete the folder to reclaim the disk. Before writing, the free disk space is
checked against an estimate of the corpora still to write.

What is measured
----------------
For every point and every rank count of ``--ranks``, ``world`` child processes run the
loader at once, as the DDP ranks of one node would (rank ``r`` of world ``w``:
``TokenLoader(stores, batch_size=128 * w, block_size=32, within_group="dataset", seed=0,
rank=r, world_size=w, num_workers=0, prefetch=4)``, reader ``auto``: raw byte ranges).
Every rank reads 128 cells a batch whatever the world size, so the ranks' aggregate
shows how the data path scales with ranks, not the per-batch overhead of smaller
per-rank batches. The parent reads every corpus file once before each run (the page
cache holds the corpus: *warm*), then drives the ranks through these phases in lockstep:

``startup_s``
    ``TokenLoader(...)`` to the first batch (the imports before it are ``import_s``).
``warm_cells_per_s``
    After 20 more batches, cells per second over ``--seconds`` (the endless iteration
    over epochs that training does), all ranks together; ``warm_ratio`` divides it by
    the 1-store point's figure at the same rank count in the same run. With 2 ranks
    ``scaling`` is the aggregate over the 1-rank figure of the same point (the target
    is >= 1.7). The ranks run independently (no collective per step);
    ``warm_cpu_cores``: the CPU time of all ranks over the window (how many cores the
    ranks got: on a shared 2-core machine, often fewer than 2).
``uss/pss/pss_file/anon/private_dirty_bytes_per_cell``
    Each rank's memory from ``/proc/self/smaps_rollup`` at the end of the warm window,
    minus its own before the loader was built (after the imports), over the corpus
    cells (the largest rank's). The loader memory-maps the per-cell arrays (``indptr``,
    ``cell/total_counts``, ...) from their chunk files, read-only, so their pages are
    the page cache's, file-backed and clean. USS = ``Private_Clean + Private_Dirty``: a
    file page mapped by one process only counts as private, so with 1 rank USS includes
    every mapped page it touched, although no rank owns it; with 2 ranks a page both
    touched is shared and leaves USS. PSS splits shared pages between the processes
    mapping them (``pss_file``: its file-backed part; ``pss_total_bytes``: the sum over
    the ranks; ``pss_total_vs_1rank``: that sum over the 1-rank figure: ~1 when the ranks
    share their per-cell arrays, ~2 when each copies them). Anonymous is memory no file
    backs (the rank's own copies and structures: what it adds to the node whatever the
    ranks share); ``Private_Dirty`` is the pages it wrote (its anonymous ones, plus any
    written file page: none here, the mappings are never written). The per-rank private
    memory target is judged on Anonymous (``anon_slope_bytes_per_cell``), with USS and
    PSS beside it. ``stores_touched``: stores read before the memory was taken (the
    loader maps a store's per-cell arrays on first use).
``fds``
    ``/proc/self/fd`` entries of each rank at the end of the warm window and of the cold
    window, the largest (the soft ``RLIMIT_NOFILE`` is raised to the hard limit; both
    are recorded).
``schedule_s``
    The time of ``build_schedule`` (below: ``sampler.global_batches`` of a new epoch),
    slowest rank; ``schedule_bytes``: what the built schedule holds (tracemalloc, a
    second build; ``peak_bytes`` per rank with the temporaries).
``cold_cells_per_s``, ``cold_ratio``
    The parent drops the corpus from the page cache (``posix_fadvise(DONTNEED)`` on
    every file after ``sync``; ``resident_after_drop`` is measured with ``mincore``),
    then each rank starts a new epoch and, from its first batch on (the epoch's start
    is not timed), reads for ``--seconds`` while every ``os.pread`` / ``os.preadv`` /
    ``os.posix_fadvise(WILLNEED)`` the loader makes is logged (thread, file, offset,
    bytes asked for and copied, ``RWF_NOWAIT`` or not: a few hundred nanoseconds per
    call). The loader reads tokens and values through the store's descriptor pool
    (``concept.store``): when it starts a batch (``prefetch`` batches before handing it
    out) it copies what the page cache holds (``preadv`` with ``RWF_NOWAIT``) and hints
    the rest to the kernel (``WILLNEED``), which it reads when it finishes the batch.
    The parent drops the pages again and each rank replays the calls logged within its
    window, in order, on as many threads as the loader used (files opened beforehand),
    with no work between them: the disk's time for the loader's own I/O.
    ``floor_cells_per_s`` is the cold window's cells over the replay's time;
    ``cold_ratio`` = cold / floor. Then ``floor_blocking_cells_per_s`` and
    ``cold_ratio_blocking``: the same bytes replayed one blocking ``preadv`` at a time
    per thread (no hints: what the floor was before the loader hinted). The page-ins of
    the memory-mapped per-cell arrays (no system call) are not replayed; the
    ``/proc/self/io`` bytes the window and the replay read from the disk
    (``cold_disk_bytes``, ``replay_disk_bytes``, read-ahead and page-ins included) and
    the major page faults per batch (``cold_majflt_per_batch``) show what that leaves
    out. ``cold_cpu_cores``: the CPU time of the window over its length. On a VM the
    host may cache the disk: "cold" means "not in this kernel's page cache".
``resume_s``
    ``load_state_dict`` of a state halfway through a new epoch, then the first batch
    (checked to be the expected batch).

The wall-clock figures are sensitive to other processes on the machine, so the CPU time
of each phase is reported beside it (``startup_cpu_s``, ``schedule_cpu_s``,
``resume_cpu_s``: the slowest rank's process CPU time; ``warm_cells_per_cpu_s`` and
``warm_ratio_per_cpu``: cells over all ranks' CPU time, all threads), with the load
average at start and end.

Targets (reported, not asserted; issue "Corpus scale", 2-core machine), at 2,000 stores and
10M cells: startup <= 10 s; per-rank private memory growing <= 8 bytes per corpus cell
(the Anonymous slope from the smallest to the largest point, 2 ranks; USS and PSS
slopes beside it); open fds <= 512 per
process; schedule build <= 0.5 s; warm cells/s >= 80% of the 1-store figure; cold cells/s
>= 70% of the disk's random-read floor; 2 ranks >= 1.7x one rank.

``--big`` adds a point of 2,000 stores whose corpus is 1.25x this machine's RAM (at
``--median-genes``), once, if the disk has room (refused with a message otherwise); its
"warm" phase cannot be warm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages are importable
    sys.path.insert(0, str(ROOT))

from benchmarks.compile import git_state  # noqa: E402
from benchmarks.loader import drop_pages, files_under, machine_info, warm_cache  # noqa: E402

DEFAULT_POINTS = "1:1000000,200:2000000,2000:10000000"
VOCAB = 20_000
STORE_SIGMA, STORE_MIN, STORE_MAX = 1.5, 300, 300_000
GENE_SIGMA, GENE_SPREAD = 0.6, 5
ENTRY_BYTES = 4  # uint16 token + uint16 value
CELL_BYTES = 24  # indptr (8) + row (8) + total_counts (4) + n_genes (4)
RANK_BATCH = 128  # cells per rank per batch: the global batch is RANK_BATCH * world
LOADER = {
    "block_size": 32,
    "seed": 0,
    "within_group": "dataset",
    "num_workers": 0,
    "prefetch": 4,
    "pin_memory": False,
    "rows": False,  # what training reads (concept.datamodule): no ``cell/row``
}
WARMUP_BATCHES = 20
COLD_EPOCH, RESUME_EPOCH, SCHEDULE_EPOCH = 1000, 2000, 3000  # epochs no phase read before
TAG = "SCALE "
GB = 1e9

# ----------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------


def store_sizes(stores: int, cells: int, seed: int) -> np.ndarray:
    """Log-normal store sizes, clipped to [STORE_MIN, STORE_MAX], summing to ``cells``."""
    if stores == 1:
        return np.array([cells], np.int64)
    lo, hi = min(STORE_MIN, cells // stores), max(STORE_MAX, -(-cells // stores))
    w = np.exp(np.random.default_rng([seed, stores, cells]).normal(0, STORE_SIGMA, stores))
    a, b = 0.0, hi / w.min()  # the scale s with sum(clip(s * w)) = cells, by bisection
    for _ in range(200):
        s = (a + b) / 2
        a, b = (s, b) if np.clip(s * w, lo, hi).sum() < cells else (a, s)
    sizes = np.clip(np.floor(b * w), lo, hi).astype(np.int64)
    for i in np.argsort(-sizes):  # the rounding remainder: off the largest stores
        sizes[i] -= min(int(sizes.sum()) - cells, int(sizes[i]) - lo)
    if sizes.sum() != cells:
        raise SystemExit(f"cannot split {cells:,} cells over {stores:,} stores of {lo}..{hi}")
    return sizes


def genes_per_cell(n: int, median: int, rng: np.random.Generator) -> np.ndarray:
    """Log-normal nonzero genes per cell around ``median`` (a fifth to five times it)."""
    k = np.exp(rng.normal(math.log(median), GENE_SIGMA, n))
    return np.clip(k, max(median // GENE_SPREAD, 1), min(median * GENE_SPREAD, VOCAB - 2)).astype(
        np.int64
    )


def corpus_bytes(cells: int, median: int) -> int:
    """The corpus's expected size on disk."""
    mean = genes_per_cell(200_000, median, np.random.default_rng(0)).mean()
    return int(cells * (mean * ENTRY_BYTES + CELL_BYTES))


def corpus_dir(out: Path, stores: int, cells: int, median: int, seed: int) -> Path:
    from concept import store as fmt

    key = f"s{stores}_c{cells}_g{median}_v{VOCAB}_seed{seed}_f{fmt.FORMAT_VERSION}.{fmt.COMPILER_VERSION}"
    return out / key


def corpus_stores(path: Path) -> list[Path]:
    return sorted((path / "stores").glob("*.zarr"))


def ensure_corpus(path: Path, stores: int, cells: int, median: int, seed: int) -> dict:
    """Write the corpus into ``path`` (through a temporary folder) unless it is there."""
    from preprocess.synth import synthetic_store

    meta_path = path / "corpus.json"
    if meta_path.is_file():
        return {**json.loads(meta_path.read_text()), "cached": True}
    sizes = store_sizes(stores, cells, seed)
    est = corpus_bytes(cells, median)
    print(
        f"writing {stores:,} stores, {cells:,} cells, median {median} genes "
        f"(~{est / GB:.1f} GB) into {path} ...",
        flush=True,
    )
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0, cpu0, entries = time.perf_counter(), time.process_time(), 0
    for i, n in enumerate(sizes):
        rng = np.random.default_rng([seed, i])
        k = genes_per_cell(int(n), median, rng)
        synthetic_store(tmp / "stores" / f"{i:05d}.zarr", k, VOCAB, "synthetic-vocab", rng)
        entries += int(k.sum())
        if (i + 1) % max(stores // 10, 1) == 0 and stores > 1:
            print(f"  {i + 1:,}/{stores:,} stores, {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    files = files_under(tmp / "stores")
    meta = {
        "stores": stores,
        "cells": cells,
        "median_genes": median,
        "seed": seed,
        "entries": entries,
        "mean_genes": round(entries / cells, 1),
        "store_cells_min_median_max": [int(sizes.min()), int(np.median(sizes)), int(sizes.max())],
        "bytes": sum(p.stat().st_size for p in files),
        "files": len(files),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "entries_per_s": round(entries / seconds),
        "cells_per_s": round(cells / seconds),
    }
    (tmp / "corpus.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(path)
    return {**meta, "cached": False}


def check_disk(out: Path, need: dict[str, int], note: str = "") -> None:
    """Refuse (exit with a message) when the corpora still to write do not fit the disk."""
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    total = sum(need.values())
    if total * 1.1 + 2 * GB > free:
        listed = ", ".join(f"{k}: {v / GB:.1f} GB" for k, v in need.items())
        raise SystemExit(
            f"benchmarks/scale.py: not run: the corpora still to write need about "
            f"{total / GB:.1f} GB ({listed}{note}), and {out} has {free / GB:.1f} GB free "
            f"(needed: that plus 10% and 2 GB). Choose smaller --points or a smaller "
            f"--median-genes (each cell takes ~{ENTRY_BYTES} bytes per gene), or free disk space"
        )


# ----------------------------------------------------------------------------------------
# The child: one loader rank, driven by commands on stdin, replies on stdout
# ----------------------------------------------------------------------------------------


def smaps() -> dict[str, int]:
    """This process's memory from ``/proc/self/smaps_rollup`` (bytes): uss, pss, anon, rss."""
    kb = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        kb[name] = int(value.split()[0]) * 1024
    return {
        "uss": kb["Private_Clean"] + kb["Private_Dirty"],
        "pss": kb["Pss"],
        "pss_file": kb.get("Pss_File", 0),
        "anon": kb["Anonymous"],
        "private_dirty": kb["Private_Dirty"],
        "rss": kb["Rss"],
    }


def disk_reads() -> tuple[int, int]:
    """This process's major page faults and the bytes it had read from the disk (page-ins
    of mapped files and read-ahead included: ``/proc/self/io`` ``read_bytes``)."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt, int(io["read_bytes"])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def build_schedule(loader, epoch: int):
    """The epoch's global batches (a ``sampler.Schedule`` of numpy arrays), built afresh:
    the one call ``schedule_s`` times. The sampler caches the last epoch's schedule, so
    ``epoch`` must differ from the one built before (every phase uses its own epoch)."""
    return loader.sampler.global_batches(epoch)


def mid_epoch_state(loader, epoch: int) -> dict:
    """A loader state halfway through ``epoch`` (BlockSampler's state: epoch, position,
    seed)."""
    loader.set_epoch(epoch)
    return {**loader.state_dict(), "position": len(loader) // 2}


class PreadLog:
    """While active, logs the reads of this process, as (thread, file, offset, bytes
    asked for, bytes copied, kind): every ``os.pread``/``os.preadv`` (kind ``read``, or
    ``nowait`` for a ``preadv`` with ``RWF_NOWAIT``: what the page cache held, 0 bytes
    copied when it held none) and every ``os.posix_fadvise(WILLNEED)`` (``hint``: read
    ahead, nothing copied). The file of a descriptor comes from the ``os.open`` that made
    it (or ``/proc/self/fd`` for one opened before)."""

    NAMES = ("open", "close", "pread", "preadv", "posix_fadvise")

    def __enter__(self) -> PreadLog:
        self.reads: list[tuple[int, str, int, int, int, str]] = []
        self._paths: dict[int, str] = {}
        self._orig = {n: getattr(os, n) for n in self.NAMES}
        o, paths, reads, ident = self._orig, self._paths, self.reads, threading.get_ident

        def path_of(fd: int) -> str:
            p = paths.get(fd)
            if p is None:
                p = paths[fd] = os.readlink(f"/proc/self/fd/{fd}")
            return p

        def open_(path, flags, *a, **k):
            fd = o["open"](path, flags, *a, **k)
            paths[fd] = os.fsdecode(os.path.abspath(path))
            return fd

        def close_(fd):
            paths.pop(fd, None)
            return o["close"](fd)

        def pread(fd, n, offset):
            data = o["pread"](fd, n, offset)
            reads.append((ident(), path_of(fd), offset, n, len(data), "read"))
            return data

        def preadv(fd, buffers, offset, flags=0):
            nowait = bool(flags & os.RWF_NOWAIT)
            asked = sum(len(memoryview(b)) for b in buffers)
            try:
                got = o["preadv"](fd, buffers, offset, flags)
            except BlockingIOError:
                reads.append((ident(), path_of(fd), offset, asked, 0, "nowait"))
                raise
            reads.append((ident(), path_of(fd), offset, asked, got, "nowait" if nowait else "read"))
            return got

        def posix_fadvise(fd, offset, n, advice):
            o["posix_fadvise"](fd, offset, n, advice)
            if advice == os.POSIX_FADV_WILLNEED:
                reads.append((ident(), path_of(fd), offset, n, 0, "hint"))

        os.open, os.close, os.pread, os.preadv = open_, close_, pread, preadv
        os.posix_fadvise = posix_fadvise
        return self

    def __exit__(self, *exc) -> None:
        for n, f in self._orig.items():
            setattr(os, n, f)


def replay(reads: list[tuple[int, str, int, int, int, str]], blocking: bool = False) -> dict:
    """The logged reads again, each thread's in its order on a thread of its own (files
    opened before the clock starts): every call as the loader made it (``preadv`` with
    its flags, the read-ahead hints), or with ``blocking``, only the bytes copied, each
    with a plain ``preadv`` that waits for the disk (one read at a time per thread)."""
    by_thread: dict[int, list[tuple[str, int, int, str]]] = {}
    for tid, path, offset, asked, got, kind in reads:
        if blocking and got:
            by_thread.setdefault(tid, []).append((path, offset, got, "read"))
        elif not blocking and asked:
            by_thread.setdefault(tid, []).append((path, offset, asked, kind))
    fds = {p: os.open(p, os.O_RDONLY) for p in {r[1] for r in reads}}
    try:

        def work(seq: list[tuple[str, int, int, str]]) -> None:
            buf = memoryview(bytearray(max(n for _, _, n, _ in seq)))
            for path, offset, n, kind in seq:
                if kind == "hint":
                    os.posix_fadvise(fds[path], offset, n, os.POSIX_FADV_WILLNEED)
                elif kind == "nowait":
                    with contextlib.suppress(BlockingIOError):
                        os.preadv(fds[path], [buf[:n]], offset, os.RWF_NOWAIT)
                else:
                    os.preadv(fds[path], [buf[:n]], offset)

        threads = [threading.Thread(target=work, args=(s,)) for s in by_thread.values()]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
    finally:
        for fd in fds.values():
            os.close(fd)
    calls = [r for seq in by_thread.values() for r in seq]
    return {
        "seconds": seconds,
        "calls": len(calls),
        "hints": sum(r[3] == "hint" for r in calls),
        "threads": len(by_thread),
        "files": len(fds),
    }


class Rank:
    """One loader rank's phases (each returns the reply's fields)."""

    def __init__(self, args):
        self.args = args
        self.paths = corpus_stores(Path(args.corpus))
        self.loader = self.it = self.reads = None
        self.touched: set[int] = set()
        self.base = smaps()

    def _epochs(self):
        epoch = 0
        while True:
            self.loader.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def start(self) -> dict:
        from concept.data import TokenLoader

        t0, cpu0 = time.perf_counter(), time.process_time()
        a = self.args
        self.loader = TokenLoader(
            self.paths, batch_size=RANK_BATCH * a.world, rank=a.rank, world_size=a.world, **LOADER
        )
        self.it = self._epochs()
        batch = next(self.it)
        startup, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        self.touched.add(int(batch.store_index[0]))  # "dataset" grouping: one store a batch
        return {"startup_s": startup, "cpu_seconds": cpu, "batches_per_epoch": len(self.loader)}

    def warm(self) -> dict:
        for _ in range(WARMUP_BATCHES):
            self.touched.add(int(next(self.it).store_index[0]))
        n = cells = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < self.args.seconds:
            batch = next(self.it)
            n, cells = n + 1, cells + len(batch)
            self.touched.add(int(batch.store_index[0]))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        mem, fds = smaps(), open_fds()
        self.it.close()
        return {
            "batches": n,
            "cells": cells,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "cells_per_s": cells / seconds,
            "memory": mem,
            "growth": {k: mem[k] - self.base[k] for k in mem},
            "fds": fds,
            "stores_touched": len(self.touched),
        }

    def schedule(self) -> dict:
        import gc
        import tracemalloc

        gc.collect()
        t0, cpu0 = time.perf_counter(), time.process_time()
        schedule = build_schedule(self.loader, SCHEDULE_EPOCH)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        n = len(schedule)
        del schedule
        gc.collect()
        tracemalloc.start()
        schedule = build_schedule(self.loader, SCHEDULE_EPOCH + 1)
        held, peak = tracemalloc.get_traced_memory()  # held: the schedule itself
        tracemalloc.stop()
        del schedule
        return {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "bytes": held,
            "peak_bytes": peak,
            "batches": n,
        }

    def cold(self) -> dict:
        self.loader.set_epoch(COLD_EPOCH)
        n = cells = 0
        with PreadLog() as log:
            t0 = time.perf_counter()
            it = iter(self.loader)
            next(it)  # the epoch's start (its schedule) is not part of the window
            first = time.perf_counter() - t0
            i0, cpu0, t0 = len(log.reads), time.process_time(), time.perf_counter()
            disk0 = disk_reads()
            for batch in it:
                n, cells = n + 1, cells + len(batch)
                if time.perf_counter() - t0 >= self.args.seconds:
                    break
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            majflt, disk_bytes = (b - a for a, b in zip(disk0, disk_reads(), strict=True))
            self.reads = log.reads[i0:]  # the reads done within the window
            fds = open_fds()
            it.close()
        return {
            "first_batch_s": first,
            "batches": n,
            "cells": cells,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "cells_per_s": cells / seconds,
            "fds": fds,
            "calls": len(self.reads),
            "read_bytes": sum(r[4] for r in self.reads),
            "hints": sum(r[5] == "hint" for r in self.reads),
            "nowait_missed": sum(r[5] == "nowait" and r[4] < r[3] for r in self.reads),
            "threads": len({r[0] for r in self.reads}),
            "majflt": majflt,
            "disk_bytes": disk_bytes,
        }

    def replay(self, blocking: bool = False) -> dict:
        if not self.reads:
            return {"seconds": None}
        disk0 = disk_reads()
        out = replay(self.reads, blocking)
        majflt, disk_bytes = (b - a for a, b in zip(disk0, disk_reads(), strict=True))
        return {**out, "majflt": majflt, "disk_bytes": disk_bytes}

    def replay_blocking(self) -> dict:
        return self.replay(blocking=True)

    def resume(self) -> dict:
        state = mid_epoch_state(self.loader, RESUME_EPOCH)
        t0, cpu0 = time.perf_counter(), time.process_time()
        self.loader.load_state_dict(state)
        it = iter(self.loader)
        batch = next(it)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        it.close()
        return {"seconds": seconds, "cpu_seconds": cpu, "exact": batch.index == state["position"]}


def child_main(args) -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401  (what a training rank has imported before its loader)

    import concept.data  # noqa: F401

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rank = Rank(args)
    reply = {"import_s": time.perf_counter() - t0, "memory_base": rank.base}
    print(TAG + json.dumps({**reply, "nofile": [soft, hard]}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            return
        print(TAG + json.dumps(getattr(rank, cmd)()), flush=True)


# ----------------------------------------------------------------------------------------
# The parent: the ranks of one run, the rows, the summary
# ----------------------------------------------------------------------------------------


class RankFailed(RuntimeError):
    pass


class World:
    """``world`` rank processes over one corpus, sent the same command at once."""

    def __init__(self, corpus: Path, world: int, seconds: float, logs: Path):
        self.logs = [logs / f"rank{r}.log" for r in range(world)]
        self.procs = []
        for r in range(world):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(corpus)]
            cmd += ["--rank", str(r), "--world", str(world), "--seconds", str(seconds)]
            with self.logs[r].open("w") as err:
                self.procs.append(
                    subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
                    )
                )
        self.ready = self._replies()

    def _replies(self) -> list[dict]:
        out = []
        for p, log in zip(self.procs, self.logs, strict=True):
            for line in p.stdout:
                if line.startswith(TAG):
                    out.append(json.loads(line[len(TAG) :]))
                    break
            else:
                p.wait()
                tail = " | ".join(log.read_text().strip().splitlines()[-6:])
                raise RankFailed(f"rank exited with {p.returncode}: {tail[-800:]}")
        return out

    def ask(self, cmd: str) -> list[dict]:
        for p in self.procs:
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
        return self._replies()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.write("quit\n")
                    p.stdin.close()
                except BrokenPipeError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def run(corpus: Path, meta: dict, world: int, seconds: float, fits: bool) -> dict:
    """One row: every phase on ``world`` ranks."""
    files = files_under(corpus / "stores")
    row = {"stores": meta["stores"], "cells": meta["cells"], "ranks": world}
    row["warm_cache_s"] = round(warm_cache(files), 1) if fits else None
    logs = corpus.parent / "logs"
    logs.mkdir(exist_ok=True)
    w = World(corpus, world, seconds, logs)
    ranks: dict[str, list[dict]] = {"ready": w.ready}
    try:
        for phase in ("start", "warm", "schedule"):
            ranks[phase] = w.ask(phase)
        row["drop_before_cold"] = drop_pages(files)
        ranks["cold"] = w.ask("cold")
        row["drop_before_replay"] = drop_pages(files)
        ranks["replay"] = w.ask("replay")
        row["drop_before_blocking_replay"] = drop_pages(files)
        ranks["replay_blocking"] = w.ask("replay_blocking")
        ranks["resume"] = w.ask("resume")
    except RankFailed as e:
        row["error"] = str(e)
        print(f"  {world} rank(s): FAILED: {e}", flush=True)
        return row
    finally:
        w.close()
    cells = meta["cells"]
    warm, cold, replayed = ranks["warm"], ranks["cold"], ranks["replay"]

    def floor_of(replays: list[dict]) -> float | None:
        if not all(r["seconds"] for r in replays):
            return None
        return sum(c["cells"] / r["seconds"] for c, r in zip(cold, replays, strict=True))

    floor, blocking = floor_of(replayed), floor_of(ranks["replay_blocking"])
    row.update(
        {
            "startup_s": max(r["startup_s"] for r in ranks["start"]),
            "startup_cpu_s": max(r["cpu_seconds"] for r in ranks["start"]),
            "import_s": max(r["import_s"] for r in ranks["ready"]),
            "uss_bytes_per_cell": max(r["growth"]["uss"] for r in warm) / cells,
            "pss_bytes_per_cell": max(r["growth"]["pss"] for r in warm) / cells,
            "anon_bytes_per_cell": max(r["growth"]["anon"] for r in warm) / cells,
            "private_dirty_bytes_per_cell": max(r["growth"]["private_dirty"] for r in warm) / cells,
            "pss_file_bytes_per_cell": max(r["growth"]["pss_file"] for r in warm) / cells,
            "uss_growth_bytes": max(r["growth"]["uss"] for r in warm),
            "anon_growth_bytes": max(r["growth"]["anon"] for r in warm),
            "pss_growth_bytes": max(r["growth"]["pss"] for r in warm),
            "pss_total_bytes": sum(r["growth"]["pss"] for r in warm),
            "stores_touched": min(r["stores_touched"] for r in warm),
            "fds": max(max(r["fds"] for r in warm), max(r["fds"] for r in cold)),
            "nofile": w.ready[0]["nofile"],
            "schedule_s": max(r["seconds"] for r in ranks["schedule"]),
            "schedule_cpu_s": max(r["cpu_seconds"] for r in ranks["schedule"]),
            "schedule_bytes": max(r["bytes"] for r in ranks["schedule"]),
            "resume_s": max(r["seconds"] for r in ranks["resume"]),
            "resume_cpu_s": max(r["cpu_seconds"] for r in ranks["resume"]),
            "resume_exact": all(r["exact"] for r in ranks["resume"]),
            "warm_cells_per_s": sum(r["cells_per_s"] for r in warm),
            "warm_cells_per_cpu_s": sum(r["cells"] for r in warm)
            / sum(r["cpu_seconds"] for r in warm),
            "warm_cpu_cores": sum(r["cpu_seconds"] / r["seconds"] for r in warm),
            "cold_cells_per_s": sum(r["cells_per_s"] for r in cold),
            "floor_cells_per_s": floor,
            "cold_ratio": None if floor is None else sum(r["cells_per_s"] for r in cold) / floor,
            "floor_blocking_cells_per_s": blocking,
            "cold_ratio_blocking": None
            if blocking is None
            else sum(r["cells_per_s"] for r in cold) / blocking,
            "cold_cpu_cores": sum(r["cpu_seconds"] / r["seconds"] for r in cold),
            "cold_majflt_per_batch": sum(r["majflt"] for r in cold)
            / max(sum(r["batches"] for r in cold), 1),
            "cold_disk_bytes": sum(r["disk_bytes"] for r in cold),
            "replay_disk_bytes": sum(r["disk_bytes"] for r in replayed),
            "loadavg_1min": os.getloadavg()[0],
            "per_rank": ranks,
        }
    )
    print(
        f"  {world} rank(s): startup {row['startup_s']:.2f} s, warm "
        f"{row['warm_cells_per_s']:,.0f} cells/s, cold {row['cold_cells_per_s']:,.0f} "
        f"(floor {floor or 0:,.0f}, blocking {blocking or 0:,.0f}; disk MB {row['cold_disk_bytes'] / 1e6:,.0f} / "
        f"{row['replay_disk_bytes'] / 1e6:,.0f}, major faults per batch "
        f"{row['cold_majflt_per_batch']:.2f}), USS {row['uss_bytes_per_cell']:.1f} B/cell, fds "
        f"{row['fds']}, schedule {row['schedule_s']:.3f} s, resume {row['resume_s']:.3f} s",
        flush=True,
    )
    return row


def add_ratios(rows: list[dict]) -> None:
    """warm_ratio (to the 1-store row of the same ranks), scaling and pss_total_vs_1rank (to
    the 1-rank row of the same point)."""
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        one_store = next((o for o in ok if o["stores"] == 1 and o["ranks"] == r["ranks"]), None)
        one_rank = next(
            (
                o
                for o in ok
                if (o["stores"], o["cells"]) == (r["stores"], r["cells"]) and o["ranks"] == 1
            ),
            None,
        )
        r["warm_ratio"] = one_store and r["warm_cells_per_s"] / one_store["warm_cells_per_s"]
        r["warm_ratio_per_cpu"] = (
            one_store and r["warm_cells_per_cpu_s"] / one_store["warm_cells_per_cpu_s"]
        )
        r["scaling"] = one_rank and r["warm_cells_per_s"] / one_rank["warm_cells_per_s"]
        r["pss_total_vs_1rank"] = one_rank and r["pss_total_bytes"] / one_rank["pss_total_bytes"]


def growth(rows: list[dict]) -> list[dict]:
    """Per rank count: each figure at the smallest and the largest point (by cells), and the
    USS slope between them (bytes per corpus cell)."""
    out = []
    for ranks in sorted({r["ranks"] for r in rows}):
        ok = sorted((r for r in rows if r["ranks"] == ranks and "error" not in r), key=_size)
        if len(ok) < 2:
            continue
        a, b = ok[0], ok[-1]
        keys = ("startup_s", "startup_cpu_s", "fds", "schedule_s", "schedule_cpu_s")
        keys += ("resume_s", "warm_cells_per_s", "warm_cells_per_cpu_s", "cold_ratio")
        out.append(
            {
                "ranks": ranks,
                "from": [a["stores"], a["cells"]],
                "to": [b["stores"], b["cells"]],
                "figures": {k: [a[k], b[k]] for k in keys},
                **{
                    f"{m}_slope_bytes_per_cell": (b[f"{m}_growth_bytes"] - a[f"{m}_growth_bytes"])
                    / (b["cells"] - a["cells"])
                    for m in ("uss", "pss", "anon")
                },
            }
        )
    return out


def _size(r: dict) -> tuple[int, int]:
    return r["cells"], r["stores"]


def targets(rows: list[dict], grown: list[dict]) -> dict:
    """The issue's targets, checked at the largest point of the run."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {}
    big = max(ok, key=_size)
    at = [r for r in ok if _size(r) == _size(big)]
    one = next((r for r in at if r["ranks"] == 1), None)
    two = next((r for r in at if r["ranks"] == 2), None)
    slope = next((g for g in grown if g["ranks"] == 2), None) or next(iter(grown), None)
    t = {"point": [big["stores"], big["cells"]]}

    def check(name, value, limit, below=True):
        if value is not None:
            met = value <= limit if below else value >= limit
            t[name] = {"value": value, "target": f"{'<=' if below else '>='} {limit}", "met": met}

    check("startup_s", max(r["startup_s"] for r in at), 10)
    if slope:  # judged on the private (anonymous) memory; USS and PSS shown beside it
        for m in ("anon", "uss", "pss"):
            check(
                f"{m}_slope_bytes_per_cell ({slope['ranks']} rank(s))",
                slope[f"{m}_slope_bytes_per_cell"],
                8,
            )
    check("fds", max(r["fds"] for r in at), 512)
    check("schedule_s", max(r["schedule_s"] for r in at), 0.5)
    if one:
        check("warm_ratio (1 rank)", one["warm_ratio"], 0.8, below=False)
        check("cold_ratio (1 rank)", one["cold_ratio"], 0.7, below=False)
    if two:
        check("scaling (2 ranks / 1)", two["scaling"], 1.7, below=False)
    return t


def _f(x, digits=0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| stores | cells | ranks | startup s (CPU) | USS B/cell | PSS B/cell (file) | anon B/cell | private dirty B/cell | PSS 2 ranks / 1 | fds | schedule s (CPU) | resume s (CPU) | warm cells/s | warm ratio | warm cells/CPU-s (ratio) | 2 ranks / 1 | cold cells/s (CPU cores) | floor cells/s | cold ratio | blocking floor | cold / blocking |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['stores']:,} | {r['cells']:,} | {r['ranks']} | failed: {r['error'][:200]} |"
            )
            continue
        two = r["ranks"] == 2
        lines.append(
            f"| {r['stores']:,} | {r['cells']:,} | {r['ranks']} | "
            f"{r['startup_s']:.2f} ({r['startup_cpu_s']:.2f}) | "
            f"{r['uss_bytes_per_cell']:.1f} | {r['pss_bytes_per_cell']:.1f} "
            f"({r['pss_file_bytes_per_cell']:.1f}) | {r['anon_bytes_per_cell']:.1f} | "
            f"{r['private_dirty_bytes_per_cell']:.1f} | "
            f"{_f(r['pss_total_vs_1rank'] if two else None, 2)} | "
            f"{r['fds']:,} | {r['schedule_s']:.3f} ({r['schedule_cpu_s']:.3f}) | "
            f"{r['resume_s']:.3f} ({r['resume_cpu_s']:.3f}) | "
            f"{r['warm_cells_per_s']:,.0f} | {_f(r['warm_ratio'], 2)} | "
            f"{r['warm_cells_per_cpu_s']:,.0f} ({_f(r['warm_ratio_per_cpu'], 2)}) | "
            f"{_f(r['scaling'] if two else None, 2)} | {r['cold_cells_per_s']:,.0f} "
            f"({r['cold_cpu_cores']:.2f}) | {_f(r['floor_cells_per_s'])} | "
            f"{_f(r['cold_ratio'], 2)} | {_f(r['floor_blocking_cells_per_s'])} | "
            f"{_f(r['cold_ratio_blocking'], 2)} |"
        )
    return lines


def parse_points(text: str) -> list[tuple[int, int]]:
    try:
        points = [tuple(int(x) for x in p.split(":")) for p in text.split(",") if p.strip()]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 or min(p) < 1 or p[0] > p[1] for p in points):
        raise SystemExit(f"--points {text!r}: expected STORES:CELLS[,STORES:CELLS...]")
    return points


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default=DEFAULT_POINTS, help="STORES:CELLS[,STORES:CELLS...]")
    ap.add_argument("--median-genes", type=int, default=1000)
    ap.add_argument("--ranks", default="1,2", help="rank counts to run, e.g. 1,2")
    ap.add_argument(
        "--seconds", type=float, default=5.0, help="length of the warm and cold windows"
    )
    ap.add_argument(
        "--big", action="store_true", help="add a corpus 1.25x the RAM (if disk allows)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "scale")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "scale.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.corpus = args.child
        child_main(args)
        return

    import psutil

    points = parse_points(args.points)
    ranks = [int(x) for x in args.ranks.split(",")]
    ram = psutil.virtual_memory().total
    if args.big:
        per_cell = corpus_bytes(1_000_000, args.median_genes) / 1_000_000
        points.append((2000, int(1.25 * ram / per_cell)))
    dirs = [corpus_dir(args.out, s, c, args.median_genes, args.seed) for s, c in points]
    need = {
        d.name: corpus_bytes(c, args.median_genes)
        for d, (_, c) in zip(dirs, points, strict=True)
        if not (d / "corpus.json").is_file()
    }
    big = (
        f"; --big adds the last: 1.25x this machine's {ram / GB:.0f} GB of RAM" if args.big else ""
    )
    check_disk(args.out, need, big)
    load_start = os.getloadavg()
    rows, compiled = [], []
    for d, (s, c) in zip(dirs, points, strict=True):
        meta = ensure_corpus(d, s, c, args.median_genes, args.seed)
        compiled.append(meta)
        fits = meta["bytes"] < 0.8 * psutil.virtual_memory().available
        print(
            f"point {s:,} stores, {c:,} cells ({meta['bytes'] / GB:.2f} GB, "
            f"{meta['files']:,} files{'' if fits else ', larger than the free RAM'})",
            flush=True,
        )
        for w in ranks:
            row = run(d, meta, w, args.seconds, fits)
            row["median_genes"] = args.median_genes
            row["corpus_fits_in_ram"] = fits
            rows.append(row)
    add_ratios(rows)
    grown = growth(rows)
    checked = targets(rows, grown)
    lines = table(rows)
    print("\n" + "\n".join(lines))
    for g in grown:
        print(
            f"growth {g['ranks']} rank(s) {g['from']} -> {g['to']}: slope B/cell anon "
            f"{g['anon_slope_bytes_per_cell']:.1f}, USS {g['uss_slope_bytes_per_cell']:.1f}, "
            f"PSS {g['pss_slope_bytes_per_cell']:.1f}; "
            + ", ".join(f"{k} {_f(a, 3)} -> {_f(b, 3)}" for k, (a, b) in g["figures"].items())
        )
    for name, t in checked.items():
        if name != "point":
            print(
                f"target {name}: {t['value']:,.3f} ({t['target']}) {'met' if t['met'] else 'MISSED'}"
            )
    machine = machine_info(None)
    machine.update(
        {
            "git": git_state(),
            "disk_free_gb": round(shutil.disk_usage(args.out).free / GB, 1),
            "loadavg_1_5_15_at_start": [round(x, 2) for x in load_start],
            "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        }
    )
    report = {
        "machine": machine,
        "command": " ".join([".venv/bin/python", "benchmarks/scale.py", *(argv or sys.argv[1:])]),
        "settings": {"median_genes": args.median_genes, "seconds": args.seconds, "loader": LOADER},
        "results": rows,
        "growth": grown,
        "targets": checked,
        "compile": {
            "what": "preprocess.synth.synthetic_store writing each corpus (random cells straight "
            "through preprocess.writer.StoreWriter: no h5ad read, no per-cell sort, one "
            "process). Not the compiler's rate: benchmarks/compile.py measures that "
            "(h5ad -> store, benchmarks/out/compile.json).",
            "corpora": compiled,
        },
        "table": lines,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
