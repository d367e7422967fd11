"""The annbatch side of ``benchmarks/loader.py``, run with the Python >= 3.12 venv.

Usage (by ``loader.py``; prints one ``RESULT {json}`` line)::

    benchmarks/out/annbatch-venv/bin/python benchmarks/_annbatch_child.py convert \\
        --h5ad FILE.h5ad --out STORE.zarr
    benchmarks/out/annbatch-venv/bin/python benchmarks/_annbatch_child.py measure \\
        --store STORE.zarr --obs-keys a,b --mode warm|cold --warmup W --batches N

``convert`` is annbatch's compile step: ``DatasetCollection(out).add_adatas([h5ad])`` with
annbatch's defaults (pre-shuffled, lz4-compressed sharded Zarr), timed, with its peak RSS.
``measure`` times ``annbatch.Loader`` (README settings ``chunk_size=32, preload_nchunks=256``;
``batch_size=128``, shuffled, main process, no GPU preloading, CSR output) over that
collection with the harness of ``loader.py`` (imported: it needs only the standard library).
The zarrs codec pipeline is enabled, as annbatch recommends for local files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import BATCH, RESULT_TAG, files_under, measure, peak_rss_mb  # noqa: E402


def _zarrs() -> None:
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def convert(args) -> dict:
    import numpy as np
    from annbatch import DatasetCollection

    _zarrs()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), os.times()
    DatasetCollection(out).add_adatas([args.h5ad], shuffle=True, rng=np.random.default_rng(0))
    seconds, cpu1 = time.perf_counter() - t0, os.times()
    size = sum(p.stat().st_size for p in files_under(out))
    return {
        "seconds": round(seconds, 2),
        "cpu_user_seconds": round(cpu1.user - cpu0.user, 2),  # all threads
        "cpu_system_seconds": round(cpu1.system - cpu0.system, 2),
        "store_mb": round(size / (1 << 20), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "settings": "DatasetCollection.add_adatas defaults (shuffle, lz4 blosc, 1GB shards)",
    }


def loader_batches(store: Path, obs_keys: list[str], seed: int):
    import anndata as ad
    import numpy as np
    import zarr
    from annbatch import DatasetCollection, Loader

    _zarrs()

    def load(g: zarr.Group) -> ad.AnnData:  # X and the obs keys only (annbatch's advice)
        return ad.AnnData(X=ad.io.sparse_dataset(g["X"]), obs=ad.io.read_elem(g["obs"])[obs_keys])

    with ad.settings.override(remove_unused_categories=False):
        loader = Loader(
            batch_size=BATCH,
            chunk_size=32,
            preload_nchunks=256,
            shuffle=True,
            preload_to_gpu=False,
            rng=np.random.default_rng(seed),
        ).use_collection(DatasetCollection(store, mode="r"), load_adata=load)

    def gen():
        while True:  # each pass is a new epoch (fresh shuffle from the rng)
            for batch in loader:
                x = batch["X"]
                yield x.shape[0], int(x.nnz)

    return gen(), loader.n_obs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=("convert", "measure"))
    p.add_argument("--h5ad")
    p.add_argument("--out")
    p.add_argument("--store")
    p.add_argument("--obs-keys", default="")
    p.add_argument("--mode", default="warm")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        if args.command == "convert":
            res = convert(args)
        else:
            store = Path(args.store)
            keys = [k for k in args.obs_keys.split(",") if k]
            batches, n_obs = loader_batches(store, keys, args.seed)
            res = measure(
                batches,
                files_under(store),
                args.warmup,
                args.batches,
                args.mode == "cold",
                n_obs // BATCH,
            )
    except Exception as e:  # the parent reports it in the row
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
    print(RESULT_TAG + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
