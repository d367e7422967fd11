"""Compiler throughput and peak memory, against the time anndata needs to read the same file.

Usage::

    .venv/bin/python benchmarks/compile.py [--cells N] [--genes G] [--out DIR] [--json PATH]
        [--baseline COMMIT] [--small FILES,CELLS[,WORKERS]] [--no-annbatch]

What is measured
----------------
One synthetic human CSR file, ``hs_csr_a.h5ad`` (``preprocess.synth``'s first file: int32
counts, ~1,800 nonzero genes per cell at the default 20,000 genes, 10% of the gene ids
carrying a version suffix), at ``--cells`` cells (default 200,000: 2.9 GB on disk). Every
step runs in a fresh child process (``--step NAME``) so that no step's memory pollutes
another's; a step times only its own work (imports and interpreter start-up excluded) and
the child reports its peak RSS (``VmHWM``, see :func:`peak_rss_mb`). Each reader step runs
``--repeat`` times (default 3) and the compile ``--compile-repeat`` times (default 2): the
fastest run is kept, with the highest peak RSS of all runs. Beside the wall time each row
gives the step's CPU time (all its threads, user + system), the CPU time *other* user
processes used while it ran (on a shared machine a busy moment inflates the wall times, the
CPU times much less) and that of kernel threads (writeback of the bytes the step wrote,
memory reclaim and free-page reporting of this VM: work the step causes but is not billed). The steps, in order:

``warm-up``
    A full h5py block read of X, so that the page cache holds the file before anything is
    timed. Every timed step below therefore reads from a *warm* cache: the numbers measure
    CPU work and memory traffic, not the disk.
``baseline``
    Imports only (anndata, h5py, zarr, the compiler): the peak RSS every later step starts
    from.
``anndata full read``
    ``anndata.read_h5ad(path)``: the whole file into memory (the *floor*: the least a
    reader that touches every entry must spend; its RSS is the size of the matrix).
``h5py row blocks``
    ``indices``/``data`` slices of X's CSR arrays read in blocks of ``compile.rows_per_read``
    rows, as ``concept.h5ad.H5adSource.blocks`` reads them: the compiler's own I/O floor,
    with bounded memory.
``anndata backed blocks``
    ``read_h5ad(path, backed="r").X[a:b]`` in the same blocks: the obvious streaming reader.
``compile``
    ``preprocess.compiler.compile_file`` on the job ``preprocess.compile.make_jobs`` builds
    for the file with ``compile.workers=1 compile.force=true compile.register=false``
    (every other setting at its default: raw values, no compressor, obs keys of
    ``DataModuleBasic``). The old store is deleted first, so the time is that of a fresh
    compile. The compiler fsyncs the store before swapping it in; the ``sync`` after it
    is timed and reported on its own.

``compile_file, code of COMMIT``
    With ``--baseline COMMIT``: the same compile with that commit's code (``git archive``
    into ``--out``), run the same way in the same run: the before row.
``annbatch store creation``
    annbatch's own compile step on the same file (``DatasetCollection.add_adatas`` with its
    defaults: pre-shuffled, lz4-compressed sharded Zarr), in its Python 3.12 venv
    (``make bench-setup``; ``--no-annbatch`` skips it), with the time, CPU time (all its
    threads) and peak RSS its process reports for that call alone.
``per-cell order alone``
    ``concept.tokenize._order_cells`` on the file's first 40,000 cells (CPU time,
    entries per second), with the file's tokens (ascending with the columns, as in the
    synthetic file, so the token passes are skipped) and with the tokens relabelled at
    random (every cell runs them); beside it ``np.sort`` of the packed 64-bit keys the
    compiler sorted before, whose speed depends on numpy's SIMD sort engaging.
``many small files``
    ``preprocess.compile.run_jobs`` (the entry point's orchestration) over ``--small
    FILES,CELLS[,WORKERS]`` files (default 1,000 files of 1,000 cells, 1 worker), hard
    links to one generated file (so they share one gene list: the per-process gene-match
    cache hits after the first file). ``compile.register=false``: registration is timed
    by the registry's own benchmark.

Targets (reported, not asserted): the compile at >= 4x the baseline's cells per
CPU-second (``--baseline``) and >= 4x annbatch's, many small files at >= 70% of the large file's cells/s,
peak RSS under 1 GiB for a 200,000-cell file; also shown, the compile's time against the
anndata full read (the target of the first version: ratio <= 2). With ``--profile
always`` (or ``auto`` when the speed-up or memory target is missed) the compile runs once
more under ``cProfile`` with an RSS sampler that notes the line executing at each sample,
and reports where time and memory go. That run is not part of the measured steps.

Data
----
Only what the compile of ``hs_csr_a`` needs is generated at full size: the whole project
is first generated tiny (64 cells per file: vocabularies, panels, split configs) with
``generate_project``, then ``hs_csr_a.h5ad`` is rewritten at ``--cells`` cells with the same
per-file random stream, so it is byte-identical to what ``generate_project(n_cells=N)``
writes (checked at a small size). Generating all eight files at 200,000 cells would take
over 10 minutes and ~30 GB of disk for nothing measured here; this takes ~80 s and 2.9 GB. A file generated earlier in ``--out`` with the same
parameters is reused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages are importable
    sys.path.insert(0, str(ROOT))

FILE = "hs_csr_a.h5ad"
RESULT_TAG = "RESULT "
MiB = 1 << 20
SMALL = (1000, 1000, 1)  # files, cells per file, workers of the small-files step (--small)
BASELINE = ROOT  # the tree --baseline extracted (git archive) for the before row


# ----------------------------------------------------------------------------------------
# Data and configuration
# ----------------------------------------------------------------------------------------


def _h5ad_path(out: Path) -> Path:
    from preprocess.synth import H5AD_DIR

    return out / H5AD_DIR / FILE


def ensure_data(out: Path, cells: int, genes: int, seed: int) -> tuple[Path, float | None]:
    """Generate the project (tiny) and ``hs_csr_a`` at full size, unless already there.

    Returns
    -------
    path, seconds
        The file, and the generation time (None when reused).
    """
    import h5py

    from preprocess import synth

    path = _h5ad_path(out)
    meta_path = out / "generated.json"
    meta = {"cells": cells, "genes": genes, "seed": seed, "file": FILE}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        with h5py.File(path, "r") as f:
            if int(f["X"].attrs["shape"][0]) == cells:
                return path, None
    t0 = time.perf_counter()
    meta_path.unlink(missing_ok=True)
    print(f"generating {FILE} with {cells:,} cells x {genes:,} genes in {out} ...", flush=True)
    internals = ("FILES", "SPECIES", "_species_model", "_write_file", "_SEED_SPECIES", "_SEED_FILE")
    if not all(hasattr(synth, name) for name in internals):  # synth changed: the slow way
        print("preprocess.synth lacks its per-file helpers: generating the whole project")
        synth.generate_project(out, seed=seed, n_cells=cells, n_genes=genes, pretrained_dim=0)
    else:
        synth.generate_project(
            out, seed=seed, n_cells=64, n_genes=genes, pretrained_dim=0, progress=False
        )
        synth.write_file(out, FILE.removesuffix(".h5ad"), seed=seed, n_cells=cells, n_genes=genes)
    meta_path.write_text(json.dumps(meta))
    return path, time.perf_counter() - t0


def _config(out: Path, rows: int | None = None):
    from concept.config import load_config

    overrides = [
        f"PATH.PROJECT_PATH={out}",
        "compile.workers=1",
        "compile.force=true",
        "compile.register=false",
    ]
    if rows:
        overrides.append(f"compile.rows_per_read={rows}")
    return load_config(overrides)


def _job(out: Path, rows: int | None = None):
    """The compile job of ``hs_csr_a`` as the compile entry point builds it."""
    from preprocess.compile import make_jobs

    jobs = [j for j in make_jobs(_config(out, rows)) if Path(j.source).name == FILE]
    if len(jobs) != 1:
        raise SystemExit(f"the configured splits do not name {FILE} exactly once")
    return jobs[0]


# ----------------------------------------------------------------------------------------
# Steps (each runs in its own child process)
# ----------------------------------------------------------------------------------------


def _import_all() -> None:
    import anndata  # noqa: F401
    import h5py  # noqa: F401
    import zarr  # noqa: F401

    import preprocess.compiler  # noqa: F401


def _h5py_blocks(path: Path, rows: int) -> tuple[int, int]:
    import h5py
    import numpy as np

    nnz = 0
    with h5py.File(path, "r") as f:
        x = f["X"]
        n = int(x.attrs["shape"][0])
        indptr = x["indptr"][:].astype(np.int64)
        for a in range(0, n, rows):
            lo, hi = indptr[a], indptr[min(a + rows, n)]
            indices, data = x["indices"][lo:hi], x["data"][lo:hi]
            assert len(indices) == len(data)
            nnz += len(data)
    return n, nnz


_CPU_START: os.times_result | None = None


def _start() -> float:
    """Start a step's clocks: wall (returned) and CPU time of the process (all threads)."""
    global _CPU_START
    _CPU_START = os.times()
    return time.perf_counter()


def step_warmup(out: Path, rows: int) -> dict:
    t0 = _start()
    n, nnz = _h5py_blocks(_h5ad_path(out), rows)
    return {"seconds": time.perf_counter() - t0, "n_cells": n, "nnz": nnz}


def step_baseline(out: Path, rows: int) -> dict:
    return {"seconds": 0.0, "n_cells": 0, "nnz": 0}


def step_anndata_full(out: Path, rows: int) -> dict:
    import anndata

    t0 = _start()
    adata = anndata.read_h5ad(_h5ad_path(out))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "n_cells": adata.n_obs, "nnz": int(adata.X.nnz)}


def step_h5py_blocks(out: Path, rows: int) -> dict:
    t0 = _start()
    n, nnz = _h5py_blocks(_h5ad_path(out), rows)
    return {"seconds": time.perf_counter() - t0, "n_cells": n, "nnz": nnz}


def step_anndata_backed(out: Path, rows: int) -> dict:
    import anndata

    t0 = _start()
    adata = anndata.read_h5ad(_h5ad_path(out), backed="r")
    n, nnz = adata.n_obs, 0
    for a in range(0, n, rows):
        nnz += adata.X[a : a + rows].nnz
    adata.file.close()
    return {"seconds": time.perf_counter() - t0, "n_cells": n, "nnz": nnz}


def step_compile(out: Path, rows: int) -> dict:
    from preprocess.compiler import compile_file

    job = _job(out, rows)
    t0 = _start()
    report = compile_file(job)
    seconds = time.perf_counter() - t0
    if report.status != "compiled":
        raise SystemExit(f"compile failed: {report.error}")
    return {
        "seconds": seconds,
        "n_cells": report.n_cells,
        "nnz": report.nnz,
        "compiler_seconds": report.seconds,
        "store_mb": _du(Path(job.out)) / MiB,
    }


def step_annbatch(out: Path, rows: int) -> dict:
    """annbatch's store creation on the same file (``benchmarks/loader.py``'s: its
    ``DatasetCollection.add_adatas`` with its defaults), in annbatch's own venv; its
    time, CPU time and peak RSS are those the annbatch process reports for that call."""
    import h5py

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from loader import ANNBATCH_CHILD, _run_child, annbatch_python

    py, why = annbatch_python()
    if py is None:
        raise SystemExit(f"no annbatch venv: {why}")
    path, store = _h5ad_path(out), out / "annbatch.zarr"
    with h5py.File(path) as f:
        n_cells, nnz = int(f["X"].attrs["shape"][0]), int(f["X"]["data"].shape[0])
    cmd = [str(py), str(ANNBATCH_CHILD), "convert", "--h5ad", str(path), "--out", str(store)]
    res = _run_child(cmd, timeout=3600)
    shutil.rmtree(store, ignore_errors=True)
    if "error" in res:
        raise SystemExit(f"annbatch failed: {res['error']}")
    user, system = res["cpu_user_seconds"], res["cpu_system_seconds"]
    return {
        "seconds": res["seconds"],
        "n_cells": n_cells,
        "nnz": nnz,
        "store_mb": res["store_mb"],
        "settings": res["settings"],
        "cpu_seconds": round(user + system, 3),
        "cpu_user_seconds": user,
        "cpu_system_seconds": system,
        "peak_rss_mb": res["peak_rss_mb"],
    }


def step_profile(out: Path, rows: int) -> dict:
    """The compile under cProfile, with an RSS sampler naming the line running at each sample."""
    import cProfile
    import io
    import pstats
    import threading

    import psutil

    from concept import h5ad, tokenize
    from preprocess.compiler import compile_file

    # Source lines as imported (others may edit the files while this runs).
    source = {
        os.path.relpath(m.__file__, ROOT): Path(m.__file__).read_text().splitlines()
        for m in (sys.modules["preprocess.compiler"], tokenize, h5ad)
    }
    job = _job(out, rows)
    shutil.rmtree(job.out, ignore_errors=True)
    proc, main = psutil.Process(), threading.main_thread().ident
    stop = threading.Event()
    peak = {"rss": 0, "stack": []}
    by_line: dict[str, int] = {}
    time_by_line: dict[str, float] = {}
    incl_by_line: dict[str, float] = {}

    def stack() -> list[str]:
        frame, chain = sys._current_frames().get(main), []
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(str(ROOT)) and "/benchmarks/" not in name:
                rel = os.path.relpath(name, ROOT)
                chain.append(f"{rel}:{frame.f_lineno} {frame.f_code.co_name}")
            frame = frame.f_back
        return chain

    def sample() -> None:
        last = time.perf_counter()
        while not stop.wait(0.005):
            rss, chain = proc.memory_info().rss, stack()
            now = time.perf_counter()
            where = chain[0] if chain else "(outside the project)"
            by_line[where] = max(by_line.get(where, 0), rss)
            # The time since the last sample goes to the line running now (a sampling
            # profiler: approximate, but it splits tokenize_csr's numpy work by line).
            time_by_line[where] = time_by_line.get(where, 0.0) + now - last
            for w in set(chain):  # inclusive: the line and everything it called
                incl_by_line[w] = incl_by_line.get(w, 0.0) + now - last
            last = now
            if rss > peak["rss"]:
                peak.update(rss=rss, stack=chain)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    prof = cProfile.Profile()
    t0 = _start()
    prof.enable()
    report = compile_file(job)
    prof.disable()
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()

    stats = pstats.Stats(prof)
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(30)
    (out / "compile_profile.txt").write_text(text.getvalue())

    def label(func: tuple) -> str:
        file, line, name = func
        if file.startswith(str(ROOT)):
            file = os.path.relpath(file, ROOT)
        elif file != "~":
            file = "/".join(Path(file).parts[-2:])
        return f"{name} ({file}:{line})" if file != "~" else name

    rows_ = [
        {"function": label(f), "calls": nc, "tottime": round(tt, 3), "cumtime": round(ct, 3)}
        for f, (_, nc, tt, ct, _) in stats.stats.items()
    ]

    def text(where: str) -> str:
        """``file:line function`` plus the line's code, when it is one of ours."""
        file, _, rest = where.partition(":")
        lines = source.get(file)
        if lines is None or not rest.split()[0].isdigit():
            return where
        return f"{where}: {lines[int(rest.split()[0]) - 1].strip()}"

    top = [(text(k), v) for k, v in sorted(by_line.items(), key=lambda kv: -kv[1])[:12]]
    slow = [(text(k), v) for k, v in sorted(time_by_line.items(), key=lambda kv: -kv[1])[:20]]
    # The compiler's own lines, inclusive of what they call: where pass 1 and pass 2 spend.
    ours = [kv for kv in incl_by_line.items() if kv[0].startswith("preprocess/compiler.py")]
    incl = [(text(k), v) for k, v in sorted(ours, key=lambda kv: -kv[1])[:16]]
    return {
        "seconds": seconds,
        "n_cells": report.n_cells,
        "nnz": report.nnz,
        "by_tottime": sorted(rows_, key=lambda r: -r["tottime"])[:25],
        "by_cumtime": sorted(rows_, key=lambda r: -r["cumtime"])[:25],
        "rss_peak_mb": round(peak["rss"] / MiB, 1),
        "rss_peak_stack": [text(w) for w in peak["stack"]],
        "rss_max_by_line_mb": {k: round(v / MiB, 1) for k, v in top},
        "seconds_by_line": {k: round(v, 2) for k, v in slow},
        "seconds_by_compiler_line_inclusive": {k: round(v, 2) for k, v in incl},
    }


def step_sort(out: Path, rows: int) -> dict:
    """The per-cell order alone (``concept.tokenize._order_cells``) on the file's first
    blocks, with the file's tokens (ascending with the columns, as in the synthetic file:
    the token passes are skipped) and with the tokens relabelled at random (every cell
    runs them), against ``np.sort`` of the packed 64-bit keys the compiler used before
    (whose speed depends on numpy's SIMD sort engaging on the machine)."""
    import h5py
    import numpy as np

    from concept.h5ad import row_ranges
    from concept.tokenize import _order_cells, value_keys

    with h5py.File(_h5ad_path(out), "r") as f:
        indptr = f["X"]["indptr"][: min(40_000, int(f["X"].attrs["shape"][0])) + 1]
        blocks = [
            (
                indptr[a : b + 1] - indptr[a],
                f["X"]["indices"][indptr[a] : indptr[b]],
                f["X"]["data"][indptr[a] : indptr[b]],
            )
            for a, b in row_ranges(indptr.astype(np.int64), rows, 2_097_152)
        ]
        n_vars = int(f["X"].attrs["shape"][1])
    rng = np.random.default_rng(0)
    in_order = np.arange(n_vars, dtype=np.int32) + 2
    shuffled = (rng.permutation(n_vars) + 2).astype(np.int32)
    result = {"seconds": 0.0, "n_cells": 0, "nnz": sum(len(d) for _, _, d in blocks)}
    for label, col_tokens in (("tokens_in_column_order", in_order), ("tokens_shuffled", shuffled)):
        seconds = 0.0
        for ip, ind, data in blocks:
            m, keys = len(ip) - 1, value_keys(data)
            outs = (np.empty(len(data), np.uint16), np.empty(len(data), keys.dtype))
            per_cell = [np.empty(m, t) for t in (np.int64, np.int32, np.float64)]
            args = (ip.astype(np.int64), ind, keys, col_tokens, np.arange(m), *outs, *per_cell)
            _order_cells(*args)  # compiled (or loaded from the cache) before timing
            t0 = time.process_time()
            _order_cells(*args)
            seconds += time.process_time() - t0
        result[f"{label}_entries_per_s"] = round(result["nnz"] / seconds)
    # the previous method: one np.sort of cell | value rank | token keys per block
    seconds = 0.0
    for ip, ind, data in blocks:
        row = np.repeat(np.arange(len(ip) - 1, dtype=np.uint64), np.diff(ip))
        key = (row << np.uint64(40)) | (data.astype(np.uint64) << np.uint64(16))
        key |= ind.astype(np.uint64)
        t0 = time.process_time()
        key.sort()
        seconds += time.process_time() - t0
    result["np_sort_uint64_keys_per_s"] = round(result["nnz"] / seconds)
    return result


def _small_project(
    out: Path, n_files: int, cells: int, compiled: Path | None = None
) -> tuple[Path, list]:
    """A project of ``n_files`` files of ``cells`` cells (hard links to one generated
    file: the same genes, so the per-process gene-match cache hits after the first) and
    its compile jobs (a split of its own), into ``compiled`` (default: the project's)."""
    import yaml

    from concept.config import load_config
    from preprocess import synth
    from preprocess.compile import make_jobs

    project = out / f"small_{cells}"
    src = project / synth.H5AD_DIR / FILE
    if not src.is_file():
        synth.generate_project(
            project, seed=0, n_cells=64, n_genes=20000, pretrained_dim=0, progress=False
        )
        synth.write_file(project, FILE.removesuffix(".h5ad"), n_cells=cells, progress=False)
    names = [f"many/f{i:05d}.h5ad" for i in range(n_files)]
    (src.parent / "many").mkdir(exist_ok=True)
    for name in names:
        if not (src.parent / name).exists():
            os.link(src, src.parent / name)
    split = project / "conf/datamodule/split_cellxgene_hsapiens"
    doc = yaml.safe_load((split / "split_synth_hsapiens.yaml").read_text())
    (split / "split_many.yaml").write_text(yaml.safe_dump({**doc, "train": names, "val": []}))
    overrides = [
        f"PATH.PROJECT_PATH={project}",
        "compile.force=true",
        "compile.register=false",
        "datamodule/split_cellxgene_hsapiens=split_many",
    ] + ([f"PATH.COMPILED_ROOT={compiled}"] if compiled else [])
    cfg = load_config(overrides, config_dir=project / "conf")
    return project, [j for j in make_jobs(cfg) if "/many/" in j.source]


def step_small_files(out: Path, rows: int) -> dict:
    """``preprocess.compile.run_jobs`` (the entry point's orchestration: progress bar,
    pool) over ``SMALL`` files, timed from the first job to the last report.

    The stores go to a new folder, and earlier runs' are removed only after the timing:
    ext4 skips the inodes of files deleted in the last minute (five, before writeback)
    when it allocates new ones, so 50,000 inodes just deleted made every file and folder
    created here several times slower (``recently_deleted`` in a ``perf`` profile)."""
    from preprocess.compile import run_jobs

    n_files, cells, workers = SMALL
    compiled = out / f"small_{cells}" / f"compiled-{os.getpid()}"
    project, jobs = _small_project(out, n_files, cells, compiled)
    t0 = _start()
    reports = run_jobs(jobs, workers)
    seconds = time.perf_counter() - t0
    for old in (out / f"small_{cells}").glob("compiled*"):
        shutil.rmtree(old)
    os.sync()
    failed = [r.error for r in reports if r.status != "compiled"]
    if failed:
        raise SystemExit(f"{len(failed)} small files failed: {failed[0]}")
    per_file = sorted(r.seconds for r in reports)
    return {
        "seconds": seconds,
        "n_cells": sum(r.n_cells for r in reports),
        "nnz": sum(r.nnz for r in reports),
        "files": len(reports),
        "workers": workers,
        "median_file_seconds": round(per_file[len(per_file) // 2], 4),
    }


STEPS = {
    "warmup": ("warm-up: h5py row blocks (first read)", step_warmup),
    "baseline": ("baseline: interpreter + imports", step_baseline),
    "anndata_full": ("anndata read_h5ad (full, floor)", step_anndata_full),
    "h5py_blocks": ("h5py X row blocks", step_h5py_blocks),
    "anndata_backed": ("anndata backed X[a:b] blocks", step_anndata_backed),
    "compile": ("compile_file (workers=1)", step_compile),
    "compile_baseline": ("compile_file, baseline code (workers=1)", None),
    "annbatch": ("annbatch store creation (add_adatas)", step_annbatch),
    "sort": ("per-cell order alone (CPU s)", step_sort),
    "small_files": ("many small files (run_jobs)", step_small_files),
    "profile": ("compile_file under cProfile", step_profile),
}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``: the high-water mark of its own address space).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that over ``execve`` from the address
    space being replaced, so a child started by a parent that once held 2 GB reports at
    least 2 GB. ``VmHWM`` belongs to the new address space and starts from zero.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_main(step: str, out: Path, rows: int) -> None:
    _import_all()
    result = STEPS[step][1](out, rows)
    if "cpu_seconds" not in result:  # the annbatch step reports its process's own
        now = os.times()
        start = _CPU_START or now  # children: the pool workers of the small-files step
        user = now.user - start.user + now.children_user - start.children_user
        system = now.system - start.system + now.children_system - start.children_system
        result["cpu_seconds"] = round(user + system, 3)
        result["cpu_user_seconds"] = round(user, 3)
        result["cpu_system_seconds"] = round(system, 3)
        result["peak_rss_mb"] = peak_rss_mb()
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------
# Parent: run the steps, print and save the results
# ----------------------------------------------------------------------------------------


def run_step(step: str, out: Path, rows: int) -> dict:
    """Run one step in a fresh interpreter, which reports its time and peak RSS.

    Also notes the CPU time that *other* processes used meanwhile (all busy CPU time of the
    machine less the child's): on a shared machine that is the contention the wall times
    suffered. The step's own ``cpu_seconds`` do not depend on it.
    """
    script = Path(__file__).resolve()
    if step == "compile_baseline":  # the baseline checkout's own compile step
        script = BASELINE / "benchmarks" / "compile.py"
    cmd = [sys.executable, str(script), "--step", step.removesuffix("_baseline"), "--out", str(out)]
    if step == "small_files":
        cmd += ["--small", ",".join(map(str, SMALL))]
    load1, busy0, procs0 = os.getloadavg()[0], _busy_seconds(), _process_seconds()
    env = {**os.environ, "PYTHONPATH": str(script.parents[1]), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([*cmd, "--rows", str(rows)], stdout=subprocess.PIPE, text=True, env=env)
    lines = proc.stdout.read().splitlines()
    proc.stdout.close()
    procs1 = _process_seconds()  # before the wait: the child's own entry is still there
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    child = usage.ru_utime + usage.ru_stime
    others = sum(v - procs0.get(k, 0.0) for k, v in procs1.items() if k != proc.pid)
    kernel = _busy_seconds() - busy0 - child - others
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed (exit {proc.returncode})")
    result = json.loads(
        next(x for x in reversed(lines) if x.startswith(RESULT_TAG))[len(RESULT_TAG) :]
    )
    n, s = result["n_cells"], result["seconds"]
    return {
        "name": STEPS[step][0],
        "step": step,
        "seconds": round(s, 3),
        "cells_per_s": round(n / s, 1) if s else None,
        "peak_rss_mb": round(result.pop("peak_rss_mb"), 1),
        **{k: v for k, v in result.items() if k != "seconds"},
        "other_cpu_seconds": round(max(others, 0.0), 2),
        "kernel_threads_cpu_seconds": round(max(kernel, 0.0), 2),
        "load1_before": round(load1, 2),
    }


def run_best(step: str, out: Path, rows: int, repeat: int, before=None, after=None) -> dict:
    """Run a step ``repeat`` times; keep the fastest run, and the highest peak RSS of all."""
    runs = []
    for _ in range(max(repeat, 1)):
        if before:
            before()
        runs.append(run_step(step, out, rows))
        if after:
            after()
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    best["seconds_all_runs"] = [r["seconds"] for r in runs]
    best["cpu_seconds_all_runs"] = [r["cpu_seconds"] for r in runs]
    best["median_seconds"] = round(float(sorted(best["seconds_all_runs"])[len(runs) // 2]), 3)
    runs_text = ", ".join(f"{r['seconds']:.2f}" for r in runs)
    print(f"  {best['name']}: {runs_text} s", flush=True)
    return best


def _process_seconds() -> dict[int, float]:
    """CPU seconds (own and reaped children's) of every user-space process but this one."""
    tick, out, me = os.sysconf("SC_CLK_TCK"), {}, os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[6]) & 0x00200000:  # PF_KTHREAD: kernel threads are counted apart
            continue
        out[int(d.name)] = sum(int(x) for x in fields[11:15]) / tick
    return out


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, ``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine_info() -> dict:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("numpy", "zarr", "anndata", "h5py", "scipy")},
        "date": dt.date.today().isoformat(),
    }


def _shown(path: str) -> str:
    """A path as typed from the project root, when it lies inside the project."""
    p = Path(path).absolute()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def git_state() -> dict:
    """Commit, and the compiler's source files that differ from it (the code measured)."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip()

    paths = ["preprocess/compiler.py", "preprocess/compile.py", "concept"]
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "modified": git("status", "--porcelain", "--", *paths).splitlines(),
    }


def print_table(results: list[dict], floor: dict) -> None:
    """One row per step (its fastest run); ratio = seconds / the anndata full read's."""
    head = (
        f"{'step':<38} {'seconds':>8} {'cells/s':>9} {'peak RSS MiB':>12} {'ratio':>6} "
        f"{'CPU s (user+sys)':>17} {'others CPU s':>12} {'kthreads CPU s':>14}  all runs, s"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        timed = r["seconds"] and r["step"] not in ("warmup", "profile")
        cps = f"{r['cells_per_s']:>9,.0f}" if r["cells_per_s"] else f"{'-':>9}"
        ratio = f"{r['seconds'] / floor['seconds']:>6.2f}" if timed else f"{'-':>6}"
        cpu = f"{r['cpu_user_seconds']:.2f}+{r['cpu_system_seconds']:.2f}"
        runs = " ".join(f"{x:.2f}" for x in r.get("seconds_all_runs", []))
        print(
            f"{r['name']:<38} {r['seconds']:>8.2f} {cps} {r['peak_rss_mb']:>12,.0f} {ratio} "
            f"{cpu:>17} {r['other_cpu_seconds']:>12.1f} {r['kernel_threads_cpu_seconds']:>14.1f}  "
            f"{runs}"
        )


def print_profile(p: dict) -> None:
    print(f"\ncProfile of the compile ({p['seconds']:.1f} s with the profiler on):")
    print(f"  {'tottime':>8} {'cumtime':>8} {'calls':>8}  function")
    for r in p["by_tottime"][:15]:
        print(f"  {r['tottime']:>8.2f} {r['cumtime']:>8.2f} {r['calls']:>8}  {r['function']}")
    print("  -- by cumulative time --")
    for r in p["by_cumtime"][:15]:
        print(f"  {r['tottime']:>8.2f} {r['cumtime']:>8.2f} {r['calls']:>8}  {r['function']}")
    print(f"RSS peak {p['rss_peak_mb']:,.0f} MiB while running:")
    for s in p["rss_peak_stack"]:
        print(f"  {s}")
    print("time by running line, exclusive (sampled every 5 ms, seconds):")
    for k, v in p["seconds_by_line"].items():
        print(f"  {v:>8.2f}  {k}")
    print("compiler lines, inclusive of their callees (sampled, seconds):")
    for k, v in p["seconds_by_compiler_line_inclusive"].items():
        print(f"  {v:>8.2f}  {k}")
    print("highest RSS seen per running line (MiB):")
    for k, v in p["rss_max_by_line_mb"].items():
        print(f"  {v:>8,.0f}  {k}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=200_000, help="cells of hs_csr_a.h5ad")
    ap.add_argument("--genes", type=int, default=20_000, help="genes of the vocabulary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "compile")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "compile.json")
    ap.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows per block of the block readers and the compiler (compile.rows_per_read; "
        "default: the config's)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each reader step (fastest kept)")
    ap.add_argument(
        "--compile-repeat", type=int, default=2, help="runs of the compile (fastest kept)"
    )
    ap.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="profile the compile: auto = only when it misses a target",
    )
    ap.add_argument(
        "--small",
        default="1000,1000,1",
        help="the many-small-files row: FILES,CELLS[,WORKERS] (default 1000,1000,1); "
        "FILES=0 skips it",
    )
    ap.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="also compile with the code of COMMIT (git archive into --out), in the same run",
    )
    ap.add_argument(
        "--no-annbatch",
        dest="annbatch",
        action="store_false",
        help="skip annbatch's store creation (its venv: make bench-setup)",
    )
    ap.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    global SMALL, BASELINE
    small = [int(x) for x in args.small.split(",")]
    SMALL = (small[0], small[1], small[2] if len(small) > 2 else 1)

    if args.step:
        _child_main(args.step, out, args.rows)
        return 0
    if args.baseline:
        BASELINE = out / f"baseline-{args.baseline}"
        if not BASELINE.is_dir():
            BASELINE.mkdir(parents=True)
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(BASELINE)], input=archive.stdout, check=True)

    git = git_state()
    rows = args.rows or _config(out).compile.rows_per_read
    path, gen_seconds = ensure_data(out, args.cells, args.genes, args.seed)
    size = path.stat().st_size
    print(
        f"file: {path} ({size / MiB:,.0f} MiB), "
        + (f"generated in {gen_seconds:.0f} s" if gen_seconds else "reused")
    )
    print(f"rows per block: {rows}; page cache warmed by a full read before timing")
    print(f"code: {git['commit']}" + (f", modified: {git['modified']}" if git["modified"] else ""))

    results = [run_step("warmup", out, rows)]
    print(f"  cache warm-up read: {results[0]['seconds']:.2f} s (not timed against targets)")
    t_measured = time.perf_counter()
    results.append(run_step("baseline", out, rows))
    for step in ("anndata_full", "h5py_blocks", "anndata_backed"):
        results.append(run_best(step, out, rows, args.repeat))
    store, sync_seconds = Path(_job(out).out), []

    def before() -> None:
        shutil.rmtree(store, ignore_errors=True)  # a fresh compile each time, not a replace

    def after() -> None:
        t0 = time.perf_counter()
        os.sync()  # so that the next step does not pay for this one's writeback
        sync_seconds.append(round(time.perf_counter() - t0, 3))

    results.append(run_best("compile", out, rows, args.compile_repeat, before, after))
    results[-1]["sync_seconds_after"] = sync_seconds
    if args.baseline:
        results.append(run_best("compile_baseline", out, rows, args.compile_repeat, before, after))
        results[-1]["name"] = f"compile_file, code of {args.baseline} (workers=1)"
    if args.annbatch:
        results.append(run_step("annbatch", out, rows))
    results.append(run_step("sort", out, rows))
    if SMALL[0]:
        results.append(run_step("small_files", out, rows))
        results[-1]["name"] = f"{SMALL[0]:,} files x {SMALL[1]:,} cells (workers={SMALL[2]})"
    measured = time.perf_counter() - t_measured

    by = {r["step"]: r for r in results}
    floor, comp = by["anndata_full"], by["compile"]
    nnz = {r["nnz"] for r in results if r["step"] in ("anndata_full", "h5py_blocks")}
    print()
    print_table(results, floor)
    print(
        f"\n{comp['n_cells']:,} cells, {floor['nnz']:,} stored entries in the file, "
        f"{comp['nnz']:,} tokens in the store ({comp['store_mb']:,.0f} MiB); "
        f"sync after each compile {sync_seconds} s; measured steps took {measured:.0f} s"
    )
    sort = by["sort"]
    print(
        "per-cell order alone (CPU): "
        f"{sort['tokens_in_column_order_entries_per_s'] / 1e6:,.0f}M entries/s (tokens ascending "
        f"with the columns), {sort['tokens_shuffled_entries_per_s'] / 1e6:,.0f}M entries/s "
        f"(tokens shuffled); np.sort of 64-bit keys (the previous method): "
        f"{sort['np_sort_uint64_keys_per_s'] / 1e6:,.0f}M keys/s"
    )
    per_cpu = comp["n_cells"] / comp["cpu_seconds"]
    print(f"compile: {comp['cells_per_s']:,.0f} cells/s, {per_cpu:,.0f} cells per CPU-second")

    def four_times(other: dict, what: str, extra: str = "") -> bool:
        """Print whether the compile is >= 4x ``other`` per CPU-second."""
        other_cpu = other["n_cells"] / other["cpu_seconds"]
        ok = per_cpu >= 4 * other_cpu
        print(
            f"target >= 4x {what} per core: {'met' if ok else 'MISSED'} "
            f"({per_cpu / other_cpu:.2f}x per CPU-second: {other_cpu:,.0f} -> {per_cpu:,.0f}; "
            f"{other['seconds'] / comp['seconds']:.2f}x wall: {other['seconds']:.1f} -> "
            f"{comp['seconds']:.1f} s{extra})"
        )
        return ok

    speedup_ok = four_times(by["compile_baseline"], "the baseline") if args.baseline else True
    annbatch_ok = None
    if "annbatch" in by:
        peak = f"; annbatch peak RSS {by['annbatch']['peak_rss_mb']:,.0f} MiB"
        annbatch_ok = four_times(by["annbatch"], "annbatch's store creation", peak)
    if "small_files" in by:
        sm = by["small_files"]
        small_ok = sm["cells_per_s"] >= 0.7 * comp["cells_per_s"]
        print(
            f"target small files >= 70% of the large file's cells/s: "
            f"{'met' if small_ok else 'MISSED'} ({sm['cells_per_s']:,.0f} vs "
            f"{comp['cells_per_s']:,.0f} cells/s: {sm['cells_per_s'] / comp['cells_per_s']:.0%}; "
            f"median {sm['median_file_seconds'] * 1e3:.0f} ms per file)"
        )
    ratio = comp["seconds"] / floor["seconds"]
    speed_ok = ratio <= 2.0
    mem_ok = comp["peak_rss_mb"] < 1024
    print(
        f"target throughput >= 1/2 of anndata full read: "
        f"{'met' if speed_ok else 'MISSED'} ({comp['cells_per_s']:,.0f} vs "
        f"{floor['cells_per_s']:,.0f} cells/s, {ratio:.2f}x the time)"
    )
    print(
        f"  (on the median runs: {comp['median_seconds']:.2f} s vs {floor['median_seconds']:.2f} s, "
        f"{comp['median_seconds'] / floor['median_seconds']:.2f}x; against the h5py block read "
        f"of the same arrays: {comp['seconds'] / by['h5py_blocks']['seconds']:.1f}x)"
    )
    print(
        f"target peak RSS < 1 GiB: {'met' if mem_ok else 'MISSED'} "
        f"({comp['peak_rss_mb']:,.0f} MiB, of which {by['baseline']['peak_rss_mb']:,.0f} "
        "MiB is the interpreter and imports)"
    )
    busy = [r for r in results if r["other_cpu_seconds"] > 0.1 * max(r["seconds"], 1.0)]
    if busy:
        print(
            "warning: other processes used the CPU during "
            + ", ".join(f"{r['step']} ({r['other_cpu_seconds']:.0f} s)" for r in busy)
            + ": on 2 cores those wall times may be inflated; the step's CPU seconds less so"
        )
    if len(nnz) != 1:
        print(f"warning: readers disagree on the number of stored entries: {sorted(nnz)}")

    doc = {
        "machine": machine_info(),
        "command": " ".join([_shown(sys.executable), _shown(sys.argv[0]), *sys.argv[1:]]),
        "git": git,
        "file": {"path": str(path), "bytes": size, "n_cells": comp["n_cells"]},
        "rows_per_block": rows,
        "page_cache": "warm (one full read before the timed steps)",
        "generation_seconds": gen_seconds,
        "measured_seconds": round(measured, 1),
        "targets": {
            "speedup_per_core_min": 4.0,
            "speedup_met": speedup_ok if args.baseline else None,
            "annbatch_speedup_met": annbatch_ok,
            "throughput_ratio_max": 2.0,
            "throughput_met": speed_ok,
            "peak_rss_mb_max": 1024,
            "peak_rss_met": mem_ok,
        },
        "results": results,
    }
    if args.profile == "always" or (args.profile == "auto" and not (speedup_ok and mem_ok)):
        print("\nprofiling the compile (not part of the measurement) ...", flush=True)
        prof = run_step("profile", out, rows)
        doc["profile"] = prof
        print_profile(prof)
        print(f"full cProfile listing: {out / 'compile_profile.txt'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
