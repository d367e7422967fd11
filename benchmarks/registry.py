"""LaminDB registration and resolution at corpus scale: 1,000 stores, then 10 more.

Usage::

    .venv/bin/python benchmarks/registry.py [--files 1000] [--add 10] [--out DIR] [--json PATH]

What is measured
----------------
A project of ``--files`` tiny h5ad files (copies of the synthetic ``hs_csr_a`` at 32 cells
and 200 genes, so compile time is per-file overhead, not cells) listed by one split, 10 of
them (the first) in its ``val`` section. The steps, each timed on its own, in one run:

``compile``
    ``python -m preprocess.compile``'s ``run`` with ``compile.register=false``: every store
    built (setup; not the point here, see ``benchmarks/compile.py``).
``register``
    ``preprocess.compile.register`` on the compiled stores of an empty LaminDB instance:
    the child process, instance creation, ``files`` artifacts and one collection per split
    section.
``register again``
    The same call once more: everything is current, nothing is written.
``resolve``
    ``preprocess.registry.resolve_collections`` of the split's train collection (what
    ``datamodule.collection=<key>`` does before training): every member's path, species and
    fingerprint.
``compile +add``
    ``--add`` new files appended to the split, then ``run`` with registration on: the
    ``files`` current stores are skipped, only the new ones built and registered. Reported
    with the split of its time between compiling and registering.

Numbers are wall seconds on whatever machine runs it (the 2-core development machine for
RESULTS.md); the child process's start (interpreter, lamindb import, instance connect) is
part of every registry step, as it is for the user.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from preprocess.synth import generate_project

SPLIT_GROUP = "split_cellxgene_hsapiens"
SPLIT_NAME = "split_registry_bench"
SOURCE_NAME = "bench"
VAL_FILES = 10


def write_split(project: Path, names: list[str]) -> Path:
    """A split yaml over ``names`` (the first ``VAL_FILES`` in ``val``) in a config dir."""
    conf = project / "conf"
    path = conf / "datamodule" / SPLIT_GROUP / f"{SPLIT_NAME}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"source_name: {SOURCE_NAME}",
        "species: hsapiens",
        "source_path: ${PATH.PROJECT_PATH}/data/" + SOURCE_NAME,
        "train:",
        *(f"- {n}" for n in names[VAL_FILES:]),
        "val:",
        *(f"- {n}" for n in names[:VAL_FILES]),
    ]
    path.write_text("\n".join(lines) + "\n")
    return conf


def make_files(project: Path, start: int, stop: int) -> list[str]:
    """Copies of the tiny synthetic file as ``data/bench/f<i>.h5ad``."""
    template = project / "data" / "synth_cxg" / "h5ads" / "hs_csr_a.h5ad"
    folder = project / "data" / SOURCE_NAME
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, stop):
        shutil.copyfile(template, folder / f"f{i:05d}.h5ad")
        names.append(f"f{i:05d}.h5ad")
    return names


def load(project: Path, conf: Path, *extra: str):
    from concept.config import load_config

    return load_config(
        [
            f"PATH.PROJECT_PATH={project}",
            f"datamodule/{SPLIT_GROUP}={SPLIT_NAME}",
            "compile.obs_keys=[]",
            *extra,
        ],
        config_dir=conf,
    )


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the registry
    child, the compile workers): on a shared machine it varies much less than wall time."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def timed(label: str, results: dict, fn, *args):
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = fn(*args)
    results[label] = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(cpu_seconds() - c0, 2),
    }
    print(
        f"{label:<22} {results[label]['wall_s']:>8.2f} s wall {results[label]['cpu_s']:>8.2f} s CPU",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--add", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import preprocess.compile as compile_cli
    from preprocess.registry import collection_key, resolve_collections

    out = Path(tempfile.mkdtemp(prefix="registry-bench-")) if args.out is None else args.out
    project = out / "project"
    shutil.rmtree(project, ignore_errors=True)
    generate_project(project, n_cells=32, n_genes=200, pretrained_dim=0, progress=False)
    names = make_files(project, 0, args.files)
    conf = write_split(project, names)
    results: dict = {"files": args.files, "add": args.add}

    cfg = load(project, conf)
    jobs = compile_cli.make_jobs(cfg)
    reports = timed("compile", results, compile_cli.run_jobs, jobs, 2)
    assert all(r.status == "compiled" for r in reports), [r.error for r in reports][:3]
    first = timed("register", results, compile_cli.register, cfg, jobs, reports)
    assert first["artifacts_created"] == args.files, first
    again = timed("register again", results, compile_cli.register, cfg, jobs, reports)
    assert again["artifacts_unchanged"] == args.files, again
    key = collection_key(SOURCE_NAME, "hsapiens", "train")
    lamin, root = cfg.PATH.LAMIN_ROOT, cfg.PATH.COMPILED_ROOT
    resolved = timed("resolve", results, resolve_collections, lamin, root, [key])
    assert len(resolved[key]) == args.files - VAL_FILES

    names += make_files(project, args.files, args.files + args.add)
    conf = write_split(project, names)
    cfg = load(project, conf)
    registered = {}
    plain_register = compile_cli.register

    def register(*a):  # time the registration inside the run
        registered.update(timed("  of which register", results, plain_register, *a))
        return registered

    compile_cli.register = register
    try:
        assert timed("compile +add", results, compile_cli.run, cfg) == 0
    finally:
        compile_cli.register = plain_register
    assert registered["artifacts_created"] == args.add, registered
    assert registered["artifacts_unchanged"] == args.files, registered
    results["machine"] = {"python": sys.version.split()[0], "platform": platform.platform()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.out is None:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
