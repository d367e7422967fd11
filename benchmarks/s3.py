"""S3 from a loopback SeaweedFS: range reads (the client of ``concept.objstore``, obstore,
against tensorstore's ``s3`` kvstore) and the training loader's cells/s from S3 against
local disk, in one run.

Usage::

    .venv/bin/python benchmarks/s3.py [--mib 64] [--cells 50000] [--block-size 32]
        [--depths 1 4 16 64] [--no-range-reads] [--json PATH]

**Loader rows** (``--cells``, 0 skips them): one synthetic file of ``--cells`` cells x
3,000 genes is compiled to local disk (defaults: uncompressed), and the same store is
uploaded to the server (``concept.objstore.publish``). ``TokenLoader`` (batch 128,
``--block-size`` 32, ``num_workers=0``) then reads whole epochs of it, local first (warm:
the page cache holds the store after the first epoch) and then from S3 at each read-ahead
depth (``prefetch``, ``--depths``, default :data:`DEPTHS`), each the median of 3 epochs
after a warm-up one; the GET requests per batch and the client's CPU use are recorded.

The loader reads contiguous entry ranges of shard files (a 32-cell block of tokens or
values is some 10-100 KiB) and, once per shard, its index (the last bytes). This script
starts ``weed mini`` on 127.0.0.1 (``tests/s3server.py``), uploads one object of ``--mib``
MiB, and times random byte-range reads of 4 KiB, 64 KiB and 1 MiB at 1, 8, 32 and 64
requests in flight, with

``obstore``
    ``concept.objstore.S3Files.read_into``: the reader's path (futures on the process's S3
    event loop, bytes copied into the destination buffer, ``If-Match`` on the ETag).
``obstore-many``
    ``concept.objstore.S3Files.read_many``: the same, handing each wave of requests to the
    event loop at once.
``tensorstore``
    ``tensorstore.KvStore`` (``s3`` driver) ``read(key, byte_range=...)`` futures, with
    ``s3_request_concurrency`` set to the same number.

Each cell is the median of 3 timed rounds after one warm-up round; the load average is
printed, since the server shares the machine's cores with the client.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from s3server import SeaweedServer  # noqa: E402

from concept import objstore  # noqa: E402

SIZES = (4 << 10, 64 << 10, 1 << 20)
DEPTHS = (1, 4, 16, 64)  # TokenLoader prefetch: batches whose reads are in flight
CONCURRENCY = (1, 8, 32, 64)
KEY = "bench/object"


def _obstore(files: objstore.S3Files, starts: np.ndarray, size: int, conc: int) -> None:
    buf = memoryview(bytearray(size * conc))
    for i in range(0, len(starts), conc):  # ``conc`` requests in flight, then the next wave
        wave = starts[i : i + conc]
        pending = [
            files.read_into("object", int(a), buf[j * size : (j + 1) * size])
            for j, a in enumerate(wave)
        ]
        for f in pending:
            f.result()


def _obstore_many(files: objstore.S3Files, starts: np.ndarray, size: int, conc: int) -> None:
    buf = memoryview(bytearray(size * conc))
    for i in range(0, len(starts), conc):
        wave = starts[i : i + conc]
        reads = [("object", int(a), buf[j * size : (j + 1) * size]) for j, a in enumerate(wave)]
        files.read_many(reads).result()


def _tensorstore(kv, starts: np.ndarray, size: int, conc: int) -> None:
    for i in range(0, len(starts), conc):
        wave = [
            kv.read("object", byte_range=slice(int(a), int(a) + size)) for a in starts[i : i + conc]
        ]
        for f in wave:
            f.result()


def measure(mib: int) -> list[dict]:
    import tensorstore as ts

    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="s3-bench-")
    with tmp, SeaweedServer(Path(tmp.name) / "data") as server:
        os.environ.update(server.env())
        data = np.random.default_rng(0).integers(0, 256, mib << 20, dtype=np.uint8)
        objstore.write(f"s3://{server.bucket}/{KEY}", data.tobytes())
        files = objstore.S3Files(f"s3://{server.bucket}/bench")
        rng = np.random.default_rng(1)
        for size in SIZES:
            n = int(np.clip((64 << 20) // size, 128, 2048))  # ~64 MiB or 2048 requests
            for conc in CONCURRENCY:
                kv = ts.KvStore.open(
                    {
                        "driver": "s3",
                        "bucket": server.bucket,
                        "path": "bench/",
                        "endpoint": server.endpoint,
                        "aws_region": "us-east-1",
                        "aws_credentials": {"type": "environment"},
                        "context": {"s3_request_concurrency": {"limit": conc}},
                    }
                ).result()
                clients = {
                    "obstore": lambda s, sz=size, c=conc: _obstore(files, s, sz, c),
                    "obstore-many": lambda s, sz=size, c=conc: _obstore_many(files, s, sz, c),
                    "tensorstore": lambda s, sz=size, c=conc, kv=kv: _tensorstore(kv, s, sz, c),
                }
                for name, run in clients.items():
                    times = []
                    for _ in range(4):
                        starts = rng.integers(0, len(data) - size, n)
                        t0 = time.perf_counter()
                        run(starts)
                        times.append(time.perf_counter() - t0)
                    dt = statistics.median(times[1:])
                    rows.append(
                        {
                            "client": name,
                            "bytes": size,
                            "in_flight": conc,
                            "requests_per_s": round(n / dt, 1),
                            "mib_per_s": round(n * size / dt / 2**20, 1),
                            "ms_per_request_wave": round(dt / -(-n // conc) * 1e3, 2),
                        }
                    )
                    print(
                        f"{name:<12} {size >> 10:>5} KiB  in flight {conc:>3}  "
                        f"{rows[-1]['requests_per_s']:>8.0f} req/s  "
                        f"{rows[-1]['mib_per_s']:>7.1f} MiB/s",
                        flush=True,
                    )
    return rows


def _store(tmp: Path, cells: int) -> Path:
    """One synthetic file of ``cells`` cells, compiled to local disk."""
    from concept.config import load_config
    from preprocess import synth
    from preprocess.compile import run

    out = tmp / "project"
    synth.generate_project(out, seed=0, n_cells=64, n_genes=3000, pretrained_dim=0, progress=False)
    synth.write_file(out, "hs_csr_e", seed=0, n_cells=cells, n_genes=3000)
    cfg = load_config([f"PATH.PROJECT_PATH={out}", "compile.register=false", "compile.workers=1"])
    if run(cfg) != 0:
        raise SystemExit("compile failed")
    return next(Path(cfg.PATH.COMPILED_ROOT).rglob("hs_csr_e.zarr"))


_GETS = [0]


def _counted(get):
    """``objstore.get_async`` counting its requests (the S3 rows' GETs per batch)."""

    async def counted(*args, **kwargs):
        _GETS[0] += 1
        return await get(*args, **kwargs)

    return counted


def _cells_per_s(path, prefetch: int, block: int) -> tuple[float, float, float]:
    """Cells/s (median of 3 epochs after a warm-up one), GET requests per batch, and the
    client's CPU seconds (all its threads) per wall second."""
    from concept.data import TokenLoader

    loader = TokenLoader(
        [path], batch_size=128, block_size=block, seed=0, prefetch=prefetch, pin_memory=False
    )
    times, cpu = [], []
    for epoch in range(4):
        loader.set_epoch(epoch)
        t0, c0, n, _GETS[0] = time.perf_counter(), time.process_time(), 0, 0
        for batch in loader:
            n += len(batch)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    dt = statistics.median(times[1:])
    return n / dt, _GETS[0] / len(loader), statistics.median(cpu[1:]) / dt


def measure_loader(cells: int, block: int, depths: tuple[int, ...]) -> list[dict]:
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="s3-bench-loader-")
    with tmp, SeaweedServer(Path(tmp.name) / "data") as server:
        os.environ.update(server.env())
        local = _store(Path(tmp.name), cells)
        uri = f"s3://{server.bucket}/loader/{local.name}"
        objstore.publish(local, uri)
        objstore.get_async = _counted(objstore.get_async)
        size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        print(f"store: {cells:,} cells, {size / 2**20:.1f} MiB", flush=True)
        base = None
        for where, path, ds in (("local", local, (4,)), ("s3", uri, depths)):
            for depth in ds:
                rate, gets, busy = _cells_per_s(path, depth, block)
                base = base or rate
                rows.append(
                    {
                        "source": where,
                        "prefetch": depth,
                        "block_size": block,
                        "cells": cells,
                        "store_mib": round(size / 2**20, 1),
                        "cells_per_s": round(rate),
                        "gets_per_batch": round(gets, 1),
                        "gets_per_s": round(gets * rate / 128),
                        "client_cpu_per_wall_s": round(busy, 2),
                        "vs_local": round(rate / base, 2),
                    }
                )
                print(
                    f"loader {where:<5} prefetch {depth:>3}  {rate:>9.0f} cells/s  "
                    f"({rate / base:.2f} of local)  {gets:.1f} GETs/batch  client CPU {busy:.2f}",
                    flush=True,
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="size of the object read (MiB)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--cells", type=int, default=50000, help="cells of the loader's store")
    ap.add_argument("--block-size", type=int, default=32, help="the loader's block_size")
    ap.add_argument(
        "--depths", type=int, nargs="+", default=DEPTHS, help="read-ahead depths from S3"
    )
    ap.add_argument("--no-range-reads", action="store_true", help="only the loader rows")
    args = ap.parse_args()
    rows = [] if args.no_range_reads else measure(args.mib)
    loader = measure_loader(args.cells, args.block_size, tuple(args.depths)) if args.cells else []
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
    }
    print(f"load average at the end: {machine['loadavg'][0]:.2f} ({machine['cpu_count']} cores)")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "range_reads": rows, "loader": loader}, indent=2)
        )


if __name__ == "__main__":
    main()
