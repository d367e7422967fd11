"""``python -m preprocess.compile PATH.PROJECT_PATH=P [overrides]``.

Compiles every file named by the configured splits (train dataset and validation
loaders) into token stores under ``PATH.COMPILED_ROOT``, in parallel across files,
skipping stores that are current, and registers them in LaminDB.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from concept import objstore
from concept.cli import entry_point
from concept.config import Config, ConfigError
from concept.h5ad import open_source
from concept.splits import SplitFile, check_store_names, configured_files
from concept.store import BYTE_SETTINGS, read_attrs, store_key, store_path
from concept.vocab import panel_files
from preprocess.compiler import FileJob, FileReport, compile_files, current_stores

log = logging.getLogger("preprocess.compile")
BATCH_FILES = 16  # files per task of a worker pool at most


def make_jobs(cfg: Config, in_memory: dict[Path, Any] | None = None) -> list[FileJob]:
    """One job per configured file of this shard (``compile.shard_index`` of ``num_shards``).

    ``in_memory`` maps configured files (their paths, which need not exist) to AnnData
    objects compiled in their place.

    Raises
    ------
    ConfigError
        Two configured files would share a store (checked over all shards' files); an
        in-memory input for a file no split names.
    """
    c = cfg.compile
    files: list[SplitFile] = configured_files(cfg, tuple(c.splits))
    collisions = check_store_names(files)
    if collisions:
        raise ConfigError("\n".join(dict.fromkeys(collisions.values())) + "\nnothing compiled")
    in_memory = {Path(k).resolve(): v for k, v in (in_memory or {}).items()}
    unknown = set(in_memory) - {f.path for f in files}
    if unknown:
        raise ConfigError(f"in-memory inputs for files no split names: {sorted(map(str, unknown))}")
    files = files[c.shard_index :: c.num_shards]
    settings = {k: getattr(c, k) for k in BYTE_SETTINGS}
    mappings = Path(cfg.PATH.GENE_MAPPINGS_PATH)
    return [
        FileJob(
            source=str(f.path),
            species=f.species,
            source_name=f.source_name,
            section=f.section,
            out=str(store_path(cfg.PATH.COMPILED_ROOT, f.source_name, f.stem)),
            name=f.stem,
            mapping=str(mappings / f"{f.species}.csv"),
            panels=[str(p) for p in panel_files(cfg.PATH.PANELS_PATH, f.species)],
            settings=settings,
            rows_per_read=c.rows_per_read,
            entries_per_read=c.entries_per_read,
            force=c.force,
            fingerprint=c.fingerprint,
            adata=in_memory.get(f.path),
        )
        for f in files
    ]


def _total_cells(jobs: list[FileJob]) -> int | None:
    """Cells to process, for the progress bar (None if a file cannot be sized)."""
    total = 0
    for j in jobs:
        try:
            with open_source(j.input, j.settings["x_source"]) as src:
                total += src.n_cells
        except Exception:  # bad files are reported by their own job
            return None
    return total


def run_jobs(jobs: list[FileJob], workers: int) -> list[FileReport]:
    """Compile jobs, ``workers`` files at a time, with one progress bar over the cells of
    the files to compile: current stores are found first, without opening their sources
    (:func:`preprocess.compiler.current_stores`), and take no worker."""
    reports = current_stores(jobs)
    todo = [i for i, r in enumerate(reports) if r is None]
    skipped = len(jobs) - len(todo)
    bar = tqdm(
        total=_total_cells([jobs[i] for i in todo]), unit="cells", desc="compile", unit_scale=True
    )
    bar.set_postfix(current=skipped)
    workers = min(workers, len(todo))
    if workers <= 1:
        # one process: small files two at a time on two threads (compile_files' lanes)
        lanes = min(2, os.cpu_count() or 1)
        built = compile_files([jobs[i] for i in todo], _Bar(bar), lanes)
        for i, report in zip(todo, built, strict=True):
            reports[i] = report
        bar.close()
        return reports
    # a few files per task, so that a worker builds one while it puts the last in place
    # (preprocess.compiler.compile_files), with enough tasks to balance the workers
    size = max(1, min(BATCH_FILES, len(todo) // (4 * workers)))
    batches = [todo[k : k + size] for k in range(0, len(todo), size)]
    # spawn: workers start clean (no inherited h5py/zarr state or event-loop threads)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        progress = manager.Queue()
        futures = {
            pool.submit(compile_files, [jobs[i] for i in batch], progress): batch
            for batch in batches
        }
        pending, done_files = set(futures), 0
        while pending:
            done, pending = wait(pending, timeout=0.2)
            while not progress.empty():
                bar.update(progress.get())
            done_files += sum(len(futures[f]) for f in done)
            bar.set_postfix(files=f"{done_files}/{len(todo)}", current=skipped)
        bar.close()
        for f, batch in futures.items():
            for i, report in zip(batch, f.result(), strict=True):
                reports[i] = report
        return reports


class _Bar:
    """The progress queue of a compile in this process: cells go straight to the bar."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def put(self, cells: int) -> None:
        self.bar.update(cells)


def print_report(reports: list[FileReport]) -> None:
    """The final table: one row per file."""
    head = (
        f"{'store':<32} {'species':<10} {'status':<9} {'cells':>9} {'nnz':>12} {'cover':>6} "
        f"{'dup':>5} {'s':>7} {'cells/s':>9} {'MiB':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in reports:
        name = r.name if len(r.name) <= 32 else "..." + r.name[-29:]
        print(
            f"{name:<32} {r.species:<10} {r.status:<9} {r.n_cells:>9} {r.nnz:>12} "
            f"{r.coverage:>6.1%} {r.duplicate_genes:>5} {r.seconds:>7.2f} {r.cells_per_s:>9.0f} "
            f"{r.peak_rss_mib:>6.0f}"
        )
    for r in reports:
        for w in r.warnings:
            print(f"warning: {r.file}: {w}")
        if r.error:
            print(f"error: {r.error}", file=sys.stderr)
    n = {s: sum(r.status == s for r in reports) for s in ("compiled", "skipped", "failed")}
    print(f"{n['compiled']} compiled, {n['skipped']} skipped, {n['failed']} failed")


def register(cfg: Config, jobs: list[FileJob], reports: list[FileReport]) -> dict:
    """Register finished stores and one collection per split section in LaminDB
    (:func:`preprocess.registry.collection_key`); returns the registry's summary (empty
    when no store finished).

    A collection lists the configured files of its section in the split's order: the
    stores this run finished, and the others (of other shards, ``compile.num_shards``, or
    failed here) when registered already, so the last shard to finish completes it.
    """
    from preprocess.registry import (
        StoreRecord,
        collection_key,
        register_stores,
        store_fingerprint,
    )

    records = []
    for j, r in zip(jobs, reports, strict=True):
        if r.status == "failed":
            continue
        attrs = read_attrs(j.out)
        features = {
            "species": j.species,
            "split": j.section,
            "source_name": j.source_name,
            "n_cells": attrs["n_cells"],
            "nnz": attrs["nnz"],
            "format_version": attrs["format_version"],
            "vocab_sha256": attrs["vocab_sha256"],
        }
        key = store_key(j.source_name, j.name)
        records.append(StoreRecord(j.out, key, features, store_fingerprint(attrs)))
    if not records:
        return {}
    collections: dict[str, list[str]] = {}
    for f in configured_files(cfg, tuple(cfg.compile.splits)):
        coll = collection_key(f.source_name, f.species, f.section)
        collections.setdefault(coll, []).append(store_key(f.source_name, f.stem))
    finished = {record.key for record in records}
    optional = [k for keys in collections.values() for k in keys if k not in finished]
    summary = register_stores(
        cfg.PATH.LAMIN_ROOT, cfg.PATH.COMPILED_ROOT, records, collections, optional
    )
    log.info("LaminDB: %s", summary)
    return summary


def check_output_folders(cfg: Config, jobs: list[FileJob]) -> None:
    """Fail before any work when the project is missing or the stores' folders are read-only.

    Raises
    ------
    ConfigError
        ``PATH.PROJECT_PATH`` does not exist, or a folder a store (or its lock) goes into
        cannot be written; nothing has been written then.
    """
    project = Path(cfg.PATH.PROJECT_PATH)
    if not project.is_dir():
        raise ConfigError(
            f"PATH.PROJECT_PATH={project} does not exist: pass the project folder (the one "
            "holding data/, references/ and panels/); nothing was written"
        )
    if objstore.is_uri(cfg.PATH.COMPILED_ROOT):
        try:  # a missing bucket or refused credentials: before any work
            objstore.check_writable(cfg.PATH.COMPILED_ROOT)
        except objstore.ObjectStoreError as e:
            raise ConfigError(f"PATH.COMPILED_ROOT: {e}; nothing was compiled") from None
        return
    folders = {Path(cfg.PATH.COMPILED_ROOT)} | {Path(j.out).parent for j in jobs}
    for folder in sorted(folders):
        while not folder.exists():  # created on demand: its first existing parent must take it
            folder = folder.parent
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise ConfigError(
                f"{folder} is not writable ({e.strerror}): compile writes stores, locks and "
                "compile_report.json under PATH.COMPILED_ROOT; make it writable or set "
                "PATH.COMPILED_ROOT to a writable folder; nothing was compiled"
            ) from None


def write_report(cfg: Config, reports: list[FileReport]) -> bool:
    """``compile_report[_<i>of<n>].json`` under the compiled root; False (said on stderr)
    when it cannot be written (a full disk)."""
    root = cfg.PATH.COMPILED_ROOT
    suffix = (
        f"_{cfg.compile.shard_index}of{cfg.compile.num_shards}"
        if cfg.compile.num_shards > 1
        else ""
    )
    name = f"compile_report{suffix}.json"
    text = json.dumps(
        {"settings": asdict(cfg.compile), "files": [r.to_dict() for r in reports]}, indent=2
    )
    path = objstore.join(root, name) if objstore.is_uri(root) else Path(root) / name
    try:
        if objstore.is_uri(root):
            objstore.write(path, text.encode())
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    except OSError as e:
        print(f"error: cannot write {path} ({e.strerror or e})", file=sys.stderr)
        return False
    return True


def run(cfg: Config, in_memory: dict[Path, Any] | None = None) -> int:
    """Compile, report, register; exit code 1 if any file failed.

    ``in_memory``: AnnData objects compiled in place of configured files
    (:func:`make_jobs`), in this process.
    """
    jobs = make_jobs(cfg, in_memory)
    check_output_folders(cfg, jobs)
    if not jobs:
        log.warning("no files to compile: check the configured splits")
        return 0
    workers = min(cfg.compile.workers or os.cpu_count() or 1, len(jobs))
    if in_memory:  # an AnnData in memory is never pickled into a worker pool
        workers = 1
    reports = run_jobs(jobs, workers)
    print_report(reports)
    written = write_report(cfg, reports)
    if cfg.compile.register:
        register(cfg, jobs, reports)
    return 1 if not written or any(r.status == "failed" for r in reports) else 0


main = entry_point(run)

if __name__ == "__main__":
    main()
