"""Training-loader throughput and peak memory: packed batches against the peers, same cells.

Usage::

    .venv/bin/python benchmarks/loader.py [--cells N] [--rows KEY,...] [--scale X]
                                          [--no-cold] [--profile auto|always|never]
                                          [--json PATH]

What is measured
----------------
Every row reads 128-cell batches of the *same* synthetic file and hands them to a consumer
that only counts them (cells, and the gene entries a model would see). Each row runs in a
fresh child process (``--step KEY``): the child builds its loader, draws a few warm-up
batches (worker start-up, first opens, first allocations), then times a fixed number of
batches (``--scale`` multiplies the counts; the defaults take ~2-10 s per row on 2 cores)
and reports its peak RSS (``VmHWM`` of the child; DataLoader workers' peak, the largest
of them, separately, from ``RUSAGE_CHILDREN``), the CPU time of the child (all its
threads, not its DataLoader workers: ``cells/CPU-s`` is shown only for rows without
workers) and the 1-minute load average (other processes on the machine slow every row
down; cells per CPU-second is the figure they disturb least). The rows:

``packed/raw``
    ``concept.data.TokenLoader`` over the compiled store, ``reader="raw"`` (byte ranges
    ``preadv``'d into the batch's buffers), ``num_workers=0`` (one read-ahead thread),
    ``block_size=32``, obs keys ``cell_type, donor_id, tissue``. A batch holds every
    mapped nonzero gene of its cells, compact dtypes, value-descending per cell.
``packed/tensorstore``
    The same with ``reader="tensorstore"``.
``packed/tissue``
    The same as ``packed/raw`` with ``within_group_sampling: tissue`` (every batch holds
    cells of one tissue): the store keeps the compile's random order, so a tissue's cells
    are scattered and a batch is read as about one run per cell.
``packed/tissue+layout``
    The same over a second store of the file compiled with ``compile.group_by=tissue``
    (each tissue's cells contiguous, shuffled within it): one run per block again.
``packed+views/raw``
    The same as ``packed/raw`` with the two panel views planned on the reading thread
    (``concept.data.views.make_planner`` with the ``DataModuleBasic`` train view settings).
``reference``
    The reference's data path: ``lamin_dataloader``'s ``LaminDiskCollection`` (lamindb's
    ``MappedCollection``: per-cell reads of the backed ``.h5ad``, densified to all genes)
    as the reference builds it (``layers_keys="X"``, ``join=None``, ``encode_labels=True``,
    ``parallel=True``), ``TokenizedDataset`` (mask to vocabulary genes, ``raw``
    normalization), a torch ``DataLoader`` with 2 workers, batch 128, random order, and
    ``lamin_dataloader.BaseCollate(PAD, 1000, "top-nonzero")``: keep nonzero, sort by
    value desc / token asc, truncate to 1,000, pad. Tokens counted: non-padding positions.
``scdataset`` / ``scdataset+collate``
    ``scDataset`` with its documented AnnData settings (``BlockShuffling(block_size=16)``,
    ``fetch_factor=16``, DataLoader ``prefetch_factor=17``), 2 workers, 128-cell batches.
    Each fetch reads ``X[sorted indices]`` of the backed ``.h5ad`` (a CSR matrix). Without
    collate the batch is that CSR slice (tokens: its nonzeros, all file genes); with
    collate each batch is densified, masked to vocabulary genes and passed through the
    reference's ``BaseCollate`` (the same per-cell work as ``reference``).
``annbatch``
    ``annbatch.Loader`` (Python 3.12 venv in ``benchmarks/out/annbatch-venv``, zarrs codec
    pipeline as annbatch recommends) over annbatch's own pre-shuffled Zarr collection of
    the same file (``DatasetCollection.add_adatas`` with its defaults: lz4-compressed
    shards; its time is reported as annbatch's compile step), README settings
    ``chunk_size=32, preload_nchunks=256``, ``batch_size=128``, shuffled, main process,
    obs keys as above. Batches are raw CSR rows (tokens: their nonzeros, all file genes).
    Run by ``benchmarks/_annbatch_child.py``.

Warm and cold
    *Warm* rows run with the page cache holding the files (they were read just before).
    *Cold* rows drop the files' pages after the warm-up and before the timed batches
    (``os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` on every file of the store or the
    ``.h5ad``, after ``os.sync()``); ``mincore`` checks that the pages really left the cache
    (reported as ``resident_after_drop``). On a VM the host may still cache the disk, so
    "cold" here means "not in this kernel's page cache". Cold rows draw at most the cells
    of one epoch so that nothing is read twice.

Targets (reported, not asserted): ``packed/raw`` warm >= 300k cells/s with 0 workers,
>= 5x ``annbatch`` and >= 100x ``reference`` (also shown per CPU-second against annbatch,
which reads on several threads). When ``packed/raw`` misses one (or with ``--profile
always``) a last child times ``read_batch`` on the main thread against the same batches
through the iterator (read-ahead thread and queue), then runs the ``read_batch`` loop
under ``cProfile`` (the read-ahead thread runs exactly that) and prints the top functions
(all of it goes to the JSON).

Data
----
``preprocess.synth``'s ``hs_csr_e.h5ad`` (CSR, int32 counts, uncompressed, unversioned
gene ids, 20,000 genes of which 97% are in the vocabulary; at the defaults 1,929 nonzeros
per cell of which 1,874 map to the vocabulary, 1.5 GB for 100,000 cells): the
project is generated tiny (64 cells per file) with ``generate_project``, then this file
is rewritten at ``--cells`` cells with its own random stream (byte-identical to what
``generate_project(n_cells=N)`` writes). It is compiled with ``preprocess.compile.run``
(default settings: uncompressed, raw values) and converted by annbatch. All of it is
cached in ``--out`` (default ``benchmarks/out/loader_data``) and reused when the
parameters match; the times of the steps that built it are kept with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages are importable
    sys.path.insert(0, str(ROOT))

FILE = "hs_csr_e.h5ad"
OBS_KEYS = ["cell_type", "donor_id", "tissue"]
BATCH = 128
MAX_TOKENS = 1000
RESULT_TAG = "RESULT "
MiB = 1 << 20
ANNBATCH_VENV = ROOT / "benchmarks" / "out" / "annbatch-venv"
ANNBATCH_CHILD = ROOT / "benchmarks" / "_annbatch_child.py"
ANNBATCH_PACKAGES = ["annbatch[zarrs]==0.3.1"]

# key: (label, warm-up batches, timed batches, note)
ROWS = {
    "packed/raw": (
        "packed batches, raw reader (TokenLoader, 0 workers)",
        50,
        12000,
        "all mapped nonzero genes per cell, compact dtypes",
    ),
    "packed/tensorstore": (
        "packed batches, tensorstore reader (0 workers)",
        20,
        1500,
        "as packed/raw",
    ),
    "packed/tissue": (
        "packed batches within one tissue, compile order (raw, 0 workers)",
        20,
        2000,
        "as packed/raw; within_group_sampling: tissue",
    ),
    "packed/tissue+layout": (
        "packed batches within one tissue, compile.group_by=tissue (raw, 0 workers)",
        50,
        12000,
        "as packed/tissue, store laid out by tissue",
    ),
    "packed+views/raw": (
        "packed batches + views planned on CPU (raw, 0 workers)",
        20,
        1000,
        "tokens: positions of both views (CLS included), <= 1000 genes each",
    ),
    "reference": (
        "reference: lamin-dataloader per-cell h5ad (2 workers)",
        4,
        60,
        "densify row, mask, top-nonzero sort, truncate 1000, pad; tokens = non-pad",
    ),
    "scdataset": (
        "scDataset block-shuffled h5ad, CSR batches (2 workers)",
        20,
        1500,
        "no collate: CSR rows of all file genes; tokens = nnz",
    ),
    "scdataset+collate": (
        "scDataset block-shuffled h5ad + reference collate (2 workers)",
        8,
        150,
        "densify, mask, top-nonzero sort, truncate 1000, pad; tokens = non-pad",
    ),
    "annbatch": (
        "annbatch pre-shuffled zarr (main process)",
        20,
        4000,
        "CSR rows of all file genes, no collate; tokens = nnz",
    ),
}
WORKER_ROWS = {"reference", "scdataset", "scdataset+collate"}  # rows with 2 DataLoader workers

# ----------------------------------------------------------------------------------------
# Small helpers (also used by the children)
# ----------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size (``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mb() -> float:
    """Largest peak RSS of any waited-for child process (DataLoader workers), in MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in sorted(path.rglob("*")) if p.is_file()]


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (``mmap`` + ``mincore`` via libc)."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    total = resident = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        n = (size + page - 1) // page
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * n)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in bytes(vec))
                total += n
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None


def drop_pages(paths: list[Path]) -> dict:
    """Drop the files' pages from the page cache; report residency before and after."""
    os.sync()
    before = resident_fraction(paths)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    after = resident_fraction(paths)
    return {"resident_before_drop": before, "resident_after_drop": after}


# ----------------------------------------------------------------------------------------
# Data: the h5ad, the compiled store, annbatch's collection (cached in --out)
# ----------------------------------------------------------------------------------------


def h5ad_path(out: Path) -> Path:
    from preprocess.synth import H5AD_DIR

    return out / H5AD_DIR / FILE


def mapping_path(out: Path) -> Path:
    from preprocess.synth import VOCAB_DIR

    return out / VOCAB_DIR / "hsapiens.csv"


def store_dir(out: Path) -> Path:
    from concept.store import store_path
    from preprocess.synth import SOURCE_NAME

    return store_path(out / "compiled", SOURCE_NAME, Path(FILE).stem)


def grouped_store_dir(out: Path) -> Path:
    """The store of ``FILE`` compiled with ``compile.group_by=tissue``."""
    from concept.store import store_path
    from preprocess.synth import SOURCE_NAME

    return store_path(out / "compiled_by_tissue", SOURCE_NAME, Path(FILE).stem)


def annbatch_dir(out: Path) -> Path:
    return out / "annbatch" / f"{Path(FILE).stem}.zarr"


def _read_meta(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def ensure_h5ad(out: Path, cells: int, genes: int, seed: int) -> dict:
    """Generate the project (tiny) and ``FILE`` at full size, unless already there."""

    from preprocess import synth

    path, meta_path = h5ad_path(out), out / "generated.json"
    want = {"cells": cells, "genes": genes, "seed": seed, "file": FILE}
    meta = _read_meta(meta_path)
    if path.is_file() and {k: meta.get(k) for k in want} == want:
        return {**meta, "cached": True}
    meta_path.unlink(missing_ok=True)
    print(f"generating {FILE}: {cells:,} cells x {genes:,} genes in {out} ...", flush=True)
    t0 = time.perf_counter()
    synth.generate_project(out, seed=seed, n_cells=64, n_genes=genes, pretrained_dim=0)
    synth.write_file(out, FILE.removesuffix(".h5ad"), seed=seed, n_cells=cells, n_genes=genes)
    meta = {**want, "seconds": round(time.perf_counter() - t0, 1)}
    meta["mb"] = round(path.stat().st_size / MiB, 1)
    meta_path.write_text(json.dumps(meta))
    return {**meta, "cached": False}


def ensure_store(out: Path, grouped: bool = False) -> dict:
    """Compile the project's human split with ``preprocess.compile.run`` (which skips
    stores that are current); the compile time of ``FILE`` is kept from its fresh build.
    ``grouped``: the second set of stores, compiled with ``compile.group_by=tissue``."""
    from concept.config import load_config
    from preprocess.compile import run

    meta_path = out / ("compiled_by_tissue.json" if grouped else "compiled.json")
    over = [f"PATH.PROJECT_PATH={out}", "compile.register=false", "compile.workers=1"]
    if grouped:
        over += [f"PATH.COMPILED_ROOT={out}/compiled_by_tissue", "compile.group_by=tissue"]
    cfg = load_config(over)
    t0 = time.perf_counter()
    if run(cfg) != 0:
        raise SystemExit("compile failed")
    wall = time.perf_counter() - t0
    report = json.loads((Path(cfg.PATH.COMPILED_ROOT) / "compile_report.json").read_text())
    rec = next(f for f in report["files"] if Path(f["file"]).name == FILE)
    if rec["status"] == "skipped" and meta_path.is_file():
        return {**_read_meta(meta_path), "cached": True}
    du = sum(
        p.stat().st_size for p in files_under(grouped_store_dir(out) if grouped else store_dir(out))
    )
    meta = {
        "seconds": round(rec["seconds"], 2),
        "cells_per_s": round(rec["cells_per_s"]),
        "wall_seconds_all_files": round(wall, 2),
        "store_mb": round(du / MiB, 1),
        "settings": "defaults: uncompressed, raw values, workers=1"
        + (", group_by=tissue" if grouped else ""),
    }
    meta_path.write_text(json.dumps(meta))
    return {**meta, "cached": rec["status"] == "skipped"}


def annbatch_python() -> tuple[Path | None, str]:
    """The annbatch venv's interpreter (created on first use), or None and why not."""
    py = ANNBATCH_VENV / "bin" / "python"
    if py.is_file():
        check = subprocess.run([str(py), "-c", "import annbatch, zarrs"], capture_output=True)
        if check.returncode == 0:
            return py, "cached venv"
    base = None
    for cand in sorted(Path("/root/.pyenv/versions").glob("3.1[2-9]*")) + [Path("/usr/bin")]:
        exe = cand / "bin" / "python3" if cand.name != "bin" else cand / "python3.12"
        if exe.is_file():
            base = exe
            break
    if base is None:
        from shutil import which

        found = which("python3.12")
        base = Path(found) if found else None
    if base is None:
        return None, "no Python >= 3.12 interpreter found (annbatch needs >= 3.12)"
    print(f"creating {ANNBATCH_VENV} with {base} and installing annbatch ...", flush=True)
    steps = [
        [str(base), "-m", "venv", str(ANNBATCH_VENV)],
        [str(py), "-m", "pip", "install", "-q", *ANNBATCH_PACKAGES],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"{' '.join(cmd[:4])} failed: {proc.stderr.strip()[-300:]}"
    return py, f"created with {base}"


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def ensure_annbatch(out: Path, py: Path) -> dict:
    """Convert the h5ad into annbatch's pre-shuffled collection (its compile step)."""
    meta_path = out / "annbatch.json"
    meta = _read_meta(meta_path)
    target = annbatch_dir(out)
    source = _fingerprint(h5ad_path(out))
    if target.is_dir() and meta.get("source") == source:
        return {**meta, "cached": True}
    print(f"converting {FILE} with annbatch ...", flush=True)
    res = _run_child(
        [str(py), str(ANNBATCH_CHILD), "convert", "--h5ad", str(h5ad_path(out))]
        + ["--out", str(target)],
        timeout=3600,
    )
    if "error" in res:
        raise RuntimeError(res["error"])
    meta = {**res, "source": source}
    meta_path.write_text(json.dumps(meta))
    return {**meta, "cached": False}


# ----------------------------------------------------------------------------------------
# The rows (each runs in its own child process): endless (cells, tokens) per batch
# ----------------------------------------------------------------------------------------


def _token_loader(out: Path, reader: str, planner=None, store=None, within_group="dataset"):
    from concept.data import TokenLoader

    return TokenLoader(
        [store or store_dir(out)],
        batch_size=BATCH,
        block_size=32,
        seed=0,
        within_group=within_group,
        reader=reader,
        obs_keys=OBS_KEYS,
        pin_memory=False,
        plan_views=planner,
    )


def _epochs(loader, count):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield len(batch), count(batch)
        epoch += 1


def row_packed(out: Path, reader: str, seed: int = 0):
    loader = _token_loader(out, reader)
    return _epochs(loader, lambda b: int(b.tokens.numel())), files_under(store_dir(out))


def row_tissue(out: Path, layout: bool):
    store = grouped_store_dir(out) if layout else store_dir(out)
    loader = _token_loader(out, "raw", store=store, within_group="tissue")
    return _epochs(loader, lambda b: int(b.tokens.numel())), files_under(store)


def views_planner(out: Path):
    """``make_planner`` with the ``DataModuleBasic`` train view settings, as training uses."""
    from concept.config import load_config
    from concept.data.views import Panels, make_planner
    from concept.datamodule import view_spec
    from concept.vocab import read_token_mapping

    cfg = load_config([f"PATH.PROJECT_PATH={out}"])
    train = cfg.datamodule.dataset.train
    mapping = read_token_mapping(mapping_path(out))
    panels = Panels.load(
        cfg.PATH.PANELS_PATH, {"hsapiens": mapping}, regex=train.panel_filter_regex
    )
    return make_planner(view_spec(cfg, train, train=True, seed=0), mapping.size, panels)


def row_views(out: Path, seed: int = 0):
    loader = _token_loader(out, "raw", views_planner(out))
    return _epochs(loader, lambda b: int(b.views.cu_seqlens[-1])), files_under(store_dir(out))


def _gene_mapping(out: Path) -> dict[str, int]:
    import csv

    with mapping_path(out).open(newline="") as fh:
        return {r["gene_id"]: int(r["token"]) for r in csv.DictReader(fh)}


def _order(n_cells: int, n: int, seed: int):
    """Random cell order of length n (successive permutations: epochs)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    reps = -(-n // n_cells)
    return np.concatenate([rng.permutation(n_cells) for _ in range(reps)])[:n].tolist()


def row_reference(out: Path, n_batches: int, seed: int = 0):
    import torch
    from lamin_dataloader import BaseCollate, GeneIdTokenizer, TokenizedDataset
    from lamin_dataloader.lamin_disk_collection import LaminDiskCollection

    path = h5ad_path(out)
    collection = LaminDiskCollection(
        [str(path)],
        layers_keys="X",
        obs_keys=OBS_KEYS,
        keys_to_cache=None,
        join=None,
        encode_labels=True,
        parallel=True,
    )
    tokenizer = GeneIdTokenizer(_gene_mapping(out))
    dataset = TokenizedDataset(collection, tokenizer, obs_keys=OBS_KEYS, normalization="raw")
    pad = tokenizer.PAD_TOKEN
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=_order(len(dataset), n_batches * BATCH, seed),
        num_workers=2,
        collate_fn=BaseCollate(pad, MAX_TOKENS, "top-nonzero"),
        worker_init_fn=LaminDiskCollection.torch_worker_init_fn,
    )

    def gen():
        for batch in loader:
            tokens = batch["tokens"]
            yield tokens.shape[0], int((tokens != pad).sum())

    return gen(), [path]


class Rows:
    """CSR rows with their obs codes; indexing selects rows of both."""

    def __init__(self, x, obs: dict):
        self.x, self.obs = x, obs

    def __getitem__(self, idx) -> Rows:
        return Rows(self.x[idx], {k: v[idx] for k, v in self.obs.items()})


class BackedRows:
    """The backed ``.h5ad`` as scDataset's collection: ``[sorted indices]`` gives ``Rows``
    (X read as CSR by anndata, obs codes from memory); opened once per process."""

    def __init__(self, path: Path):
        import h5py

        self.path = path
        with h5py.File(path, "r") as f:
            self.n = int(f["X"].attrs["shape"][0])
        self._pid, self._x, self._obs = None, None, None

    def __len__(self) -> int:
        return self.n

    def _open(self):
        import anndata

        adata = anndata.read_h5ad(self.path, backed="r")
        self._x = adata.X
        self._obs = {k: adata.obs[k].cat.codes.to_numpy() for k in OBS_KEYS}
        self._pid = os.getpid()

    def __getitem__(self, idx) -> Rows:
        if self._pid != os.getpid():
            self._open()
        return Rows(self._x[idx], {k: v[idx] for k, v in self._obs.items()})


class DenseCollate:
    """Densify a CSR batch, mask to vocabulary genes, then the reference's ``BaseCollate``."""

    def __init__(self, out: Path, pad: int):
        import anndata
        import numpy as np
        from lamin_dataloader import BaseCollate

        mapping = _gene_mapping(out)
        adata = anndata.read_h5ad(h5ad_path(out), backed="r")
        tokens = np.array([mapping.get(g, -1) for g in adata.var_names])
        adata.file.close()
        self.mask = tokens >= 0
        self.tokens = tokens[self.mask]
        self.collate = BaseCollate(pad, MAX_TOKENS, "top-nonzero")

    def __call__(self, batch):
        dense = batch.x.toarray()[:, self.mask]
        return self.collate([{"tokens": self.tokens, "values": row} for row in dense])


def row_scdataset(out: Path, collate: bool, seed: int = 0):
    import torch
    from scdataset import BlockShuffling, scDataset

    pad = 1
    transform = DenseCollate(out, pad) if collate else None
    data = scDataset(
        BackedRows(h5ad_path(out)),
        BlockShuffling(block_size=16),
        batch_size=BATCH,
        fetch_factor=16,
        batch_transform=transform,
        seed=seed,
    )
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=2, prefetch_factor=17, persistent_workers=True
    )

    def gen():
        while True:  # persistent workers: each pass is the next epoch (scDataset counts them)
            for batch in loader:
                if collate:
                    tokens = batch["tokens"]
                    yield tokens.shape[0], int((tokens != pad).sum())
                else:
                    yield batch.x.shape[0], int(batch.x.nnz)

    return gen(), [h5ad_path(out)]


def make_row(key: str, out: Path, n_batches: int, seed: int):
    if key == "packed/raw":
        return row_packed(out, "raw", seed)
    if key == "packed/tensorstore":
        return row_packed(out, "tensorstore", seed)
    if key == "packed/tissue":
        return row_tissue(out, layout=False)
    if key == "packed/tissue+layout":
        return row_tissue(out, layout=True)
    if key == "packed+views/raw":
        return row_views(out, seed)
    if key == "reference":
        return row_reference(out, n_batches, seed)
    if key == "scdataset":
        return row_scdataset(out, False, seed)
    if key == "scdataset+collate":
        return row_scdataset(out, True, seed)
    raise SystemExit(f"unknown row {key!r}")


def measure(batches, files, warmup: int, n: int, cold: bool, epoch_batches: int) -> dict:
    """Warm up, optionally drop the files' pages, time ``n`` batches."""
    it = iter(batches)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    warmup_s = time.perf_counter() - t0
    drop = {}
    if cold:  # only cells not read yet in this epoch (ahead: read-ahead / prefetch slack)
        n = max(min(n, epoch_batches - warmup - 64), 20)
        drop = drop_pages(files)
    cells = tokens = 0
    load = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        c, t = next(it)
        cells, tokens = cells + c, tokens + t
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if hasattr(it, "close"):
        it.close()  # stops read-ahead threads and DataLoader workers (joined: their RSS counts)
    del it, batches
    import gc

    gc.collect()
    return {
        "batches": n,
        "cells": cells,
        "tokens": tokens,
        "seconds": seconds,
        "warmup_seconds": warmup_s,
        "cells_per_s": cells / seconds,
        "tokens_per_s": tokens / seconds,
        "cpu_seconds": cpu,  # this process, all its threads (not DataLoader workers)
        "loadavg_1min": load,
        "peak_rss_mb": peak_rss_mb(),
        "worker_peak_rss_mb": children_peak_rss_mb() or None,
        **drop,
    }


def step(args) -> dict:
    out = Path(args.out)
    import h5py

    with h5py.File(h5ad_path(out), "r") as f:
        n_cells = int(f["X"].attrs["shape"][0])
    batches, files = make_row(args.step, out, args.warmup + args.batches, args.seed)
    return measure(batches, files, args.warmup, args.batches, args.mode == "cold", n_cells // BATCH)


def step_profile(args) -> dict:
    """``read_batch`` on the main thread: plain rate, then the same loop under cProfile."""
    import cProfile
    import pstats

    out = Path(args.out)
    loader = _token_loader(out, "raw")
    _, _, batches = loader.sampler.remaining()
    reads = [loader.sampler.rank_slice(batches.batch(i)) for i in range(len(batches))]
    n = min(len(reads) - 30, args.batches)
    for r in reads[:20]:
        loader.read_batch(r)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for r in reads[:n]:
        loader.read_batch(r)
    plain, plain_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # the same batches through the iterator (read-ahead thread + queue), same process
    it = iter(loader)
    for _ in range(20):
        next(it)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        next(it)
    threaded, threaded_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    it.close()
    prof = cProfile.Profile()
    prof.enable()
    for r in reads[:n]:
        loader.read_batch(r)
    prof.disable()
    stats = pstats.Stats(prof)

    def name(func) -> str:
        file, line, fn = func
        file = file.replace(str(ROOT) + "/", "")
        if "site-packages/" in file:
            file = file.split("site-packages/", 1)[1]
        return f"{file}:{line}({fn})" if line else fn

    rows = [
        {
            "function": name(func),
            "ncalls": nc,
            "tottime_s": round(tt, 4),
            "cumtime_s": round(ct, 4),
            "us_per_batch": round(tt / n * 1e6, 1),
        }
        for func, (cc, nc, tt, ct, _) in stats.stats.items()
    ]
    by_tottime = sorted(rows, key=lambda r: -r["tottime_s"])[:20]
    by_cumtime = sorted(rows, key=lambda r: -r["cumtime_s"])[:15]
    return {
        "batches": n,
        "main_thread_cells_per_s": n * BATCH / plain,
        "main_thread_cells_per_cpu_s": n * BATCH / plain_cpu,
        "iterator_cells_per_s": n * BATCH / threaded,
        "iterator_cells_per_cpu_s": n * BATCH / threaded_cpu,
        "us_per_batch": plain / n * 1e6,
        "profiled_seconds": stats.total_tt,
        "top_tottime": by_tottime,
        "top_cumtime": by_cumtime,
    }


# ----------------------------------------------------------------------------------------
# The parent: prepare, run every row in a child, print and write the results
# ----------------------------------------------------------------------------------------


def _run_child(cmd: list[str], timeout: float = 900) -> dict:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}


def _version(pkg: str, python: Path | None = None) -> str | None:
    if python is not None:
        code = f"from importlib.metadata import version; print(version({pkg!r}))"
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
        return proc.stdout.strip() or None
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def machine_info(annbatch_py: Path | None) -> dict:
    import psutil

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    pkgs = ["numpy", "torch", "tensorstore", "zarr", "anndata", "h5py", "lamindb"]
    pkgs += ["lamin-dataloader", "scdataset"]
    info = {
        "date": dt.date.today().isoformat(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in pkgs},
    }
    if annbatch_py is not None:
        info["annbatch_env"] = {
            "python": subprocess.run(
                [str(annbatch_py), "-c", "import platform; print(platform.python_version())"],
                capture_output=True,
                text=True,
            ).stdout.strip(),
            **{p: _version(p, annbatch_py) for p in ("annbatch", "zarr", "zarrs", "anndata")},
        }
    return info


def warm_cache(paths: list[Path]) -> float:
    """Read every file once so that the warm rows find it in the page cache."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
    return time.perf_counter() - t0


def _fmt(x: float | None, scale: float = 1.0, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x / scale:,.{digits}f}"


def print_table(results: list[dict]) -> list[str]:
    head = (
        f"{'row':<20} {'warm cells/s':>13} {'cells/CPU-s':>12} {'warm tok/s':>11} "
        f"{'cold cells/s':>13} {'RSS MB':>7} {'wRSS MB':>8}  note"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        cold = r.get("cold") or {}
        if r.get("cells_per_s") is None:
            lines.append(f"{r['key']:<20} {r['note']}")
            continue
        lines.append(
            f"{r['key']:<20} {_fmt(r['cells_per_s']):>13} {_fmt(r.get('cells_per_cpu_s')):>12} "
            f"{_fmt(r['tokens_per_s'], 1e6, 1) + 'M':>11} "
            f"{_fmt(cold.get('cells_per_s')):>13} {_fmt(r['peak_rss_mb']):>7} "
            f"{_fmt(r.get('worker_peak_rss_mb')):>8}  {r['note']}"
        )
    print("\n".join(lines))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "loader_data"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "loader.json"))
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row keys")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the timed batch counts")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    # internal: one row in this (child) process
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="warm", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, default=100, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.step:
        res = step_profile(args) if args.step == "profile" else step(args)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return

    out = Path(args.out)
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = set(keys) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    prepare: dict = {"h5ad": ensure_h5ad(out, args.cells, args.genes, args.seed)}
    prepare["compile"] = ensure_store(out)
    if "packed/tissue+layout" in keys:
        prepare["compile_by_tissue"] = ensure_store(out, grouped=True)
    annbatch_py, why = (None, "not requested")
    if "annbatch" in keys:
        annbatch_py, why = annbatch_python()
        prepare["annbatch_env"] = why
        if annbatch_py is not None:
            try:
                prepare["annbatch_convert"] = ensure_annbatch(out, annbatch_py)
            except Exception as e:  # the row reports why
                why = f"annbatch conversion failed: {e}"
                annbatch_py = None
    files = files_under(h5ad_path(out)) + files_under(store_dir(out))
    if "packed/tissue+layout" in keys:
        files += files_under(grouped_store_dir(out))
    if annbatch_py is not None:
        files += files_under(annbatch_dir(out))
    prepare["warm_cache_seconds"] = round(warm_cache(files), 1)
    print(json.dumps(prepare), flush=True)

    def run_row(key: str, mode: str) -> dict:
        _, warmup, batches, _ = ROWS[key]
        batches = max(int(batches * args.scale), 10)
        if key == "annbatch":
            if annbatch_py is None:
                return {"error": why}
            cmd = [str(annbatch_py), str(ANNBATCH_CHILD), "measure"]
            cmd += ["--store", str(annbatch_dir(out)), "--obs-keys", ",".join(OBS_KEYS)]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--step", key]
            cmd += ["--out", str(out), "--seed", str(args.seed)]
        cmd += ["--mode", mode, "--warmup", str(warmup), "--batches", str(batches)]
        t0 = time.perf_counter()
        res = _run_child(cmd)
        res["wall_seconds"] = round(time.perf_counter() - t0, 1)
        summary = res.get("error") or f"{res['cells_per_s']:,.0f} cells/s"
        print(f"  {key:<20} {mode:<5} {summary}", flush=True)
        return res

    t_measure, load_start = time.perf_counter(), os.getloadavg()
    warm = {k: run_row(k, "warm") for k in keys}
    cold = {k: run_row(k, "cold") for k in keys if not args.no_cold and "cells_per_s" in warm[k]}
    measured_s = time.perf_counter() - t_measure

    results = []
    for k in keys:
        label, _, _, note = ROWS[k]
        w = warm[k]
        row = {"name": label, "key": k, "note": note}
        if "error" in w:
            row.update(cells_per_s=None, tokens_per_s=None, peak_rss_mb=None)
            row["note"] = f"not measured: {w['error']}"
        else:
            row.update({f: w[f] for f in ("cells_per_s", "tokens_per_s", "peak_rss_mb")})
            if k not in WORKER_ROWS:  # all the work is in this process (threads included)
                row["cells_per_cpu_s"] = w["cells"] / w["cpu_seconds"]
            # only DataLoader workers count (other rows' "children" are helper processes)
            row["worker_peak_rss_mb"] = w.get("worker_peak_rss_mb") if k in WORKER_ROWS else None
            row["warm"] = w
            if k in cold:
                row["cold"] = cold[k]
        results.append(row)

    by_key = {r["key"]: r for r in results}
    packed = (by_key.get("packed/raw") or {}).get("cells_per_s")
    targets = {}
    if packed:
        targets["packed_raw_cells_per_s"] = {"value": packed, "target": 300_000}
        for k, want in (("annbatch", 5), ("reference", 100)):
            other = (by_key.get(k) or {}).get("cells_per_s")
            if other:
                targets[f"packed_raw_over_{k}"] = {"value": packed / other, "target": want}
        per_cpu = (by_key.get("annbatch") or {}).get("cells_per_cpu_s")
        if per_cpu and by_key["packed/raw"].get("cells_per_cpu_s"):
            ratio = by_key["packed/raw"]["cells_per_cpu_s"] / per_cpu
            targets["packed_raw_over_annbatch_per_cpu_s"] = {"value": ratio, "target": 5}
    profile = None
    missed = any(t["value"] < t["target"] for t in targets.values())
    if "packed/raw" in keys and (args.profile == "always" or (args.profile == "auto" and missed)):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", "profile"]
        cmd += ["--out", str(out), "--batches", "600"]
        profile = _run_child(cmd)

    print()
    lines = print_table(results)
    for name, t in targets.items():
        ok = "met" if t["value"] >= t["target"] else "MISSED"
        print(f"target {name}: {t['value']:,.1f} (>= {t['target']:,}) {ok}")
    if profile and "top_tottime" in profile:
        print(
            f"\nprofile: read_batch on the main thread {profile['main_thread_cells_per_s']:,.0f} "
            f"cells/s ({profile['main_thread_cells_per_cpu_s']:,.0f} per CPU-s, "
            f"{profile['us_per_batch']:,.0f} us/batch); through the iterator "
            f"{profile['iterator_cells_per_s']:,.0f} cells/s "
            f"({profile['iterator_cells_per_cpu_s']:,.0f} per CPU-s); top by own time:"
        )
        for r in profile["top_tottime"][:12]:
            print(f"  {r['us_per_batch']:>8.1f} us/batch {r['ncalls']:>8} calls  {r['function']}")
    print(f"\nmeasured part: {measured_s:.0f} s")

    machine = machine_info(annbatch_py)
    machine["loadavg_1_5_15_at_start"] = [round(x, 2) for x in load_start]
    machine["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at start/end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f}")
    report = {
        "machine": machine,
        "command": " ".join([".venv/bin/python", "benchmarks/loader.py", *sys.argv[1:]]),
        "data": {"file": FILE, "cells": args.cells, "genes": args.genes, "seed": args.seed},
        "prepare": prepare,
        "measured_seconds": round(measured_s, 1),
        "results": results,
        "targets": targets,
        "profile": profile,
        "table": lines,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
