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
import queue
import sys
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from concept.cli import entry_point
from concept.config import Config
from concept.splits import SplitFile, configured_files
from concept.store import BYTE_SETTINGS, read_attrs, store_key, store_path
from concept.vocab import panel_files
from preprocess.compiler import FileJob, FileReport, compile_file

log = logging.getLogger("preprocess.compile")


def make_jobs(cfg: Config) -> list[FileJob]:
    """One job per configured file of this shard (``compile.shard_index`` of ``num_shards``)."""
    c = cfg.compile
    files: list[SplitFile] = configured_files(cfg, tuple(c.splits))[c.shard_index :: c.num_shards]
    settings = {k: getattr(c, k) for k in BYTE_SETTINGS}
    mappings = Path(cfg.PATH.GENE_MAPPINGS_PATH)
    return [
        FileJob(
            source=str(f.path),
            species=f.species,
            source_name=f.source_name,
            section=f.section,
            out=str(store_path(cfg.PATH.COMPILED_ROOT, f.source_name, f.stem)),
            mapping=str(mappings / f"{f.species}.csv"),
            panels=[str(p) for p in panel_files(cfg.PATH.PANELS_PATH, f.species)],
            settings=settings,
            rows_per_read=c.rows_per_read,
            entries_per_read=c.entries_per_read,
            force=c.force,
            fingerprint=c.fingerprint,
        )
        for f in files
    ]


def _total_cells(jobs: list[FileJob]) -> int | None:
    """Cells to process, for the progress bar (None if a file cannot be sized)."""
    import h5py

    total = 0
    for j in jobs:
        try:
            with h5py.File(j.source, "r") as f:
                x = (
                    f["raw/X"]
                    if "raw" in f and j.settings["x_source"] in ("auto", "raw")
                    else f["X"]
                )
                total += int(x.attrs["shape"][0]) if "shape" in x.attrs else x.shape[0]
        except Exception:  # bad files are reported by their own job
            return None
    return total


def run_jobs(jobs: list[FileJob], workers: int) -> list[FileReport]:
    """Compile jobs, ``workers`` files at a time, with one progress bar over cells."""
    bar = tqdm(total=_total_cells(jobs), unit="cells", desc="compile", unit_scale=True)
    if workers <= 1:
        progress: queue.Queue = queue.Queue()
        reports = []
        for j in jobs:
            reports.append(compile_file(j, progress))
            while not progress.empty():
                bar.update(progress.get())
            bar.set_postfix(files=f"{len(reports)}/{len(jobs)}")
        bar.close()
        return reports
    # spawn: workers start clean (no inherited h5py/zarr state or event-loop threads)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        progress = manager.Queue()
        futures = [pool.submit(compile_file, j, progress) for j in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2)
            while not progress.empty():
                bar.update(progress.get())
            bar.set_postfix(files=f"{len(futures) - len(pending)}/{len(jobs)}")
        bar.close()
        return [f.result() for f in futures]


def print_report(reports: list[FileReport]) -> None:
    """The final table: one row per file."""
    head = f"{'file':<28} {'species':<10} {'status':<9} {'cells':>9} {'nnz':>12} {'cover':>6} {'s':>7} {'cells/s':>9}"
    print(head)
    print("-" * len(head))
    for r in reports:
        print(
            f"{Path(r.file).name[:28]:<28} {r.species:<10} {r.status:<9} {r.n_cells:>9} {r.nnz:>12} "
            f"{r.coverage:>6.1%} {r.seconds:>7.2f} {r.cells_per_s:>9.0f}"
        )
    for r in reports:
        for w in r.warnings:
            print(f"warning: {Path(r.file).name}: {w}")
        if r.error:
            print(f"error: {r.error}", file=sys.stderr)
    n = {s: sum(r.status == s for r in reports) for s in ("compiled", "skipped", "failed")}
    print(f"{n['compiled']} compiled, {n['skipped']} skipped, {n['failed']} failed")


def register(cfg: Config, jobs: list[FileJob], reports: list[FileReport]) -> None:
    """Register finished stores and one collection per split section in LaminDB."""
    from preprocess.registry import StoreRecord, register_stores

    records, collections = [], {}
    for j, r in zip(jobs, reports, strict=True):
        if r.status == "failed":
            continue
        attrs = read_attrs(j.out)
        key = store_key(j.source_name, Path(j.out).stem)
        features = {
            "species": j.species,
            "split": j.section,
            "source_name": j.source_name,
            "n_cells": attrs["n_cells"],
            "nnz": attrs["nnz"],
            "format_version": attrs["format_version"],
            "vocab_sha256": attrs["vocab_sha256"],
        }
        fingerprint = attrs["source_fingerprint"] + attrs["vocab_sha256"] + attrs["created_at"]
        records.append(StoreRecord(j.out, key, features, fingerprint))
        collections.setdefault(f"compiled/{j.source_name}_{j.species}/{j.section}", []).append(key)
    if records:
        summary = register_stores(cfg.PATH.LAMIN_ROOT, cfg.PATH.COMPILED_ROOT, records, collections)
        log.info("LaminDB: %s", summary)


def run(cfg: Config) -> int:
    """Compile, report, register; exit code 1 if any file failed."""
    jobs = make_jobs(cfg)
    if not jobs:
        log.warning("no files to compile: check the configured splits")
        return 0
    workers = min(cfg.compile.workers or os.cpu_count() or 1, len(jobs))
    reports = run_jobs(jobs, workers)
    print_report(reports)
    root = Path(cfg.PATH.COMPILED_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    suffix = (
        f"_{cfg.compile.shard_index}of{cfg.compile.num_shards}"
        if cfg.compile.num_shards > 1
        else ""
    )
    (root / f"compile_report{suffix}.json").write_text(
        json.dumps(
            {"settings": asdict(cfg.compile), "files": [r.to_dict() for r in reports]}, indent=2
        )
    )
    if cfg.compile.register:
        register(cfg, jobs, reports)
    return 1 if any(r.status == "failed" for r in reports) else 0


main = entry_point(run)

if __name__ == "__main__":
    main()
