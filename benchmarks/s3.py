"""S3 from a loopback SeaweedFS: range reads (the client of ``concept.objstore``, obstore,
against tensorstore's ``s3`` kvstore) and the training loader's cells/s from S3 against
local disk, in one run.

Usage::

    .venv/bin/python benchmarks/s3.py [--mib 64] [--cells 50000] [--block-size 32 [128 ...]]
        [--depths 1 4 16 64] [--rtt-ms 0 [20 ...]] [--requests 64]
        [--weed-flag=-FLAG=VALUE ...] [--no-range-reads] [--json PATH]

**Loader rows** (``--cells``, 0 skips them): one synthetic file of ``--cells`` cells x
3,000 genes is compiled to local disk (defaults: uncompressed), and the same store is
uploaded to the server (``concept.objstore.publish``). ``TokenLoader`` (batch 128, each
``--block-size``, ``num_workers=0``) then reads whole epochs of it, local first (warm:
the page cache holds the store after the first epoch) and then from S3 at each read-ahead
depth (``prefetch``, ``--depths``, default :data:`DEPTHS`), each the median of 3 epochs
after a warm-up one; the GET requests (and bytes) per batch and the CPU seconds per wall
second of the client, the server and the proxy are recorded.

**Added latency** (``--rtt-ms``): the kernel has no ``sch_netem``, so a delay is added by
a TCP proxy (:func:`serve_proxy`, asyncio, a child process listening on 127.0.0.1 only,
stopped after its rows) between the client and the server: every segment is forwarded
half the round trip after it arrived, in each direction, so each request waits
``--rtt-ms`` more (20: 10 ms each way); bandwidth and pipelining are not limited. Before
the loader rows of each delay, the **server ceiling** is measured through the same path:
random ranges of :data:`CEILING_BYTES` of the token and value shards with ``--requests`` in flight.

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
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from s3server import SeaweedServer  # noqa: E402

from concept import objstore  # noqa: E402
from concept.store import TOKENS, VALUES  # noqa: E402

SIZES = (4 << 10, 64 << 10, 1 << 20)
DEPTHS = (1, 4, 16, 64)  # TokenLoader prefetch: batches whose reads are in flight
CONCURRENCY = (1, 8, 32, 64)
KEY = "bench/object"
CEILING_BYTES = 48 << 10  # the server-ceiling rows' range: about a 32-cell block's tokens


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


# --- the delay proxy ----------------------------------------------------------------------


async def _forward(reader, writer, delay: float) -> None:
    """Copy one direction of a connection, each segment ``delay`` seconds after it arrived
    (in order: every segment waits the same), then half-close."""
    loop = asyncio.get_running_loop()
    segments: asyncio.Queue = asyncio.Queue()

    async def receive() -> None:
        try:
            while data := await reader.read(1 << 16):
                segments.put_nowait((loop.time() + delay, data))
        except ConnectionError:
            pass
        segments.put_nowait((loop.time() + delay, b""))

    async def deliver() -> None:
        while True:
            due, data = await segments.get()
            await asyncio.sleep(due - loop.time())
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    try:
        await asyncio.gather(receive(), deliver())
    except ConnectionError:
        writer.close()


def serve_proxy(port: int, one_way_ms: float) -> None:
    """A TCP proxy on 127.0.0.1 to ``127.0.0.1:port`` that delays every segment, both ways,
    by ``one_way_ms``; prints the port it listens on, runs until killed."""
    delay = one_way_ms / 1e3

    async def connection(client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(
            _forward(client_r, server_w, delay), _forward(server_r, client_w, delay)
        )
        client_w.close()
        server_w.close()

    async def main() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


class DelayProxy:
    """:func:`serve_proxy` in a child process (its own core time, not the client's GIL);
    ``endpoint`` is the server's through it, ``process`` the child (for its CPU time)."""

    def __init__(self, endpoint: str, one_way_ms: float):
        self.target = int(endpoint.rsplit(":", 1)[1])
        self.one_way_ms = one_way_ms

    def __enter__(self) -> DelayProxy:
        cmd = [sys.executable, __file__, "--serve-proxy", str(self.target), str(self.one_way_ms)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.endpoint = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"
        self.process = psutil.Process(self.proc.pid)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class _Direct:
    """The server's own endpoint (no added delay), as a :class:`DelayProxy` stand-in."""

    def __init__(self, endpoint: str):
        self.endpoint, self.process = endpoint, None

    def __enter__(self) -> _Direct:
        return self

    def __exit__(self, *exc) -> None:
        pass


# --- the loader rows ----------------------------------------------------------------------

_GETS = [0, 0]  # requests, bytes


def _counted(get):
    """``objstore.get_async`` counting its requests and their bytes (GETs per batch)."""

    async def counted(*args, **kwargs):
        data, etag = await get(*args, **kwargs)
        _GETS[0] += 1
        _GETS[1] += len(data)
        return data, etag

    return counted


def _cpu(process) -> float:
    """CPU seconds (user + system) of a process so far; 0 for none."""
    if process is None:
        return 0.0
    t = process.cpu_times()
    return t.user + t.system


def _cells_per_s(path, prefetch: int, block: int, others: dict) -> dict:
    """Cells/s (median of 3 epochs after a warm-up one), GET requests and bytes per
    batch, and the CPU seconds per wall second of the client (all its threads) and of
    each process in ``others`` (the server, the proxy)."""
    from concept.data import TokenLoader

    loader = TokenLoader(
        [path], batch_size=128, block_size=block, seed=0, prefetch=prefetch, pin_memory=False
    )
    times, cpu = [], {k: [] for k in ("client", *others)}
    for epoch in range(4):
        loader.set_epoch(epoch)
        c0 = {k: _cpu(p) for k, p in others.items()}
        t0, c, n, _GETS[:] = time.perf_counter(), time.process_time(), 0, [0, 0]
        for batch in loader:
            n += len(batch)
        times.append(time.perf_counter() - t0)
        cpu["client"].append(time.process_time() - c)
        for k, p in others.items():
            cpu[k].append(_cpu(p) - c0[k])
    dt = statistics.median(times[1:])
    out = {
        "cells_per_s": n / dt,
        "gets_per_batch": _GETS[0] / len(loader),
        "kib_per_get": _GETS[1] / max(_GETS[0], 1) / 1024,
    }
    return out | {f"{k}_cpu_per_wall_s": statistics.median(v[1:]) / dt for k, v in cpu.items()}


def _ceiling(uri: str, size: int, others: dict) -> dict:
    """The server's request rate for random ``size``-byte ranges of the store's token and
    value shards (the objects the loader reads), :data:`concept.objstore.REQUESTS` in
    flight (median of 3 rounds of 1,024 requests after a warm-up one), and the server's
    and proxy's CPU per wall second."""
    files = objstore.S3Files(uri)
    shards = {
        k: n
        for k, n in objstore.list_objects(uri).items()
        if k.split("/c/")[0] in (TOKENS, VALUES) and n > size
    }
    names = sorted(shards)
    rng = np.random.default_rng(2)
    times, cpu = [], {k: [] for k in others}
    buf = memoryview(bytearray(size * objstore.REQUESTS))
    for _ in range(4):
        picks = rng.integers(0, len(names), 1024)
        starts = [(names[i], int(rng.integers(0, shards[names[i]] - size))) for i in picks]
        c0 = {k: _cpu(p) for k, p in others.items()}
        t0 = time.perf_counter()
        # all requests at once, REQUESTS of them in flight (into overlapping buffers: the
        # bytes are not looked at)
        pending = [
            files.read_into(name, a, buf[(j % objstore.REQUESTS) * size :][:size])
            for j, (name, a) in enumerate(starts)
        ]
        for f in pending:
            f.result()
        times.append(time.perf_counter() - t0)
        for k, p in others.items():
            cpu[k].append(_cpu(p) - c0[k])
    dt = statistics.median(times[1:])
    out = {"requests_per_s": 1024 / dt}
    return out | {f"{k}_cpu_per_wall_s": statistics.median(v[1:]) / dt for k, v in cpu.items()}


def measure_loader(
    cells: int,
    blocks: tuple[int, ...],
    depths: tuple[int, ...],
    delays_ms: tuple[float, ...],
    weed_flags: tuple[str, ...] = (),
) -> list[dict]:
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="s3-bench-loader-")
    with tmp, SeaweedServer(Path(tmp.name) / "data", flags=weed_flags) as server:
        os.environ.update(server.env())
        local = _store(Path(tmp.name), cells)
        uri = f"s3://{server.bucket}/loader/{local.name}"
        objstore.publish(local, uri)
        objstore.get_async = _counted(objstore.get_async)
        size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        print(f"store: {cells:,} cells, {size / 2**20:.1f} MiB", flush=True)
        weed = psutil.Process(server.proc.pid)
        base = {}
        for block in blocks:
            got = _cells_per_s(local, 4, block, {})
            base[block] = got["cells_per_s"]
            rows.append(_row("local", 0, 4, block, cells, size, got, base[block]))
        for rtt in delays_ms:
            with DelayProxy(server.endpoint, rtt / 2) if rtt else _Direct(server.endpoint) as via:
                os.environ["AWS_ENDPOINT_URL"] = via.endpoint
                others = {"server": weed} | ({"proxy": via.process} if via.process else {})
                ceiling = _ceiling(uri, CEILING_BYTES, others)
                rows.append({"source": "ceiling", "added_rtt_ms": rtt} | _rounded(ceiling))
                print(
                    f"server ceiling, +{rtt:g} ms: {ceiling['requests_per_s']:.0f} requests/s "
                    f"of {CEILING_BYTES >> 10} KiB ({objstore.REQUESTS} in flight)  "
                    + _cpus(ceiling),
                    flush=True,
                )
                for block in blocks:
                    for depth in depths:
                        got = _cells_per_s(uri, depth, block, others)
                        rows.append(_row("s3", rtt, depth, block, cells, size, got, base[block]))
            os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    return rows


def _rounded(d: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


def _cpus(d: dict) -> str:
    return "  ".join(
        f"{k[:-15]} CPU {v:.2f}" for k, v in d.items() if k.endswith("_cpu_per_wall_s")
    )


def _row(where, rtt, depth, block, cells, size, got: dict, base: float) -> dict:
    row = {
        "source": where,
        "added_rtt_ms": rtt,
        "prefetch": depth,
        "block_size": block,
        "cells": cells,
        "store_mib": round(size / 2**20, 1),
        "gets_per_s": round(got["gets_per_batch"] * got["cells_per_s"] / 128),
        "vs_local": round(got["cells_per_s"] / base, 3),
    } | _rounded(got)
    print(
        f"loader {where:<5} +{rtt:>2g} ms  block {block:>3}  prefetch {depth:>3}  "
        f"{got['cells_per_s']:>9.0f} cells/s  ({row['vs_local']:.3f} of local)  "
        f"{got['gets_per_batch']:.1f} GETs/batch of {got['kib_per_get']:.0f} KiB  " + _cpus(got),
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="size of the object read (MiB)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--cells", type=int, default=50000, help="cells of the loader's store")
    ap.add_argument(
        "--block-size", type=int, nargs="+", default=[32], help="the loader's block_size(s)"
    )
    ap.add_argument(
        "--depths", type=int, nargs="+", default=DEPTHS, help="read-ahead depths from S3"
    )
    ap.add_argument(
        "--rtt-ms",
        type=float,
        nargs="+",
        default=[0],
        help="added round-trip delays (ms) of the loader rows (0: no proxy)",
    )
    ap.add_argument(
        "--requests", type=int, default=objstore.REQUESTS, help="objstore.REQUESTS in flight"
    )
    ap.add_argument(
        "--weed-flag", action="append", default=[], help="another `weed mini` flag (repeatable)"
    )
    ap.add_argument("--no-range-reads", action="store_true", help="only the loader rows")
    ap.add_argument(
        "--serve-proxy", nargs=2, metavar=("PORT", "ONE_WAY_MS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.serve_proxy:
        serve_proxy(int(args.serve_proxy[0]), float(args.serve_proxy[1]))
        return
    objstore.REQUESTS = args.requests
    load0 = os.getloadavg()
    rows = [] if args.no_range_reads else measure(args.mib)
    loader = (
        measure_loader(
            args.cells,
            tuple(args.block_size),
            tuple(args.depths),
            tuple(args.rtt_ms),
            tuple(args.weed_flag),
        )
        if args.cells
        else []
    )
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_start": load0,
        "loadavg": os.getloadavg(),
        "requests_in_flight": objstore.REQUESTS,
        "weed_flags": args.weed_flag,
    }
    print(
        f"load average at the start {load0[0]:.2f}, at the end {machine['loadavg'][0]:.2f} "
        f"({machine['cpu_count']} cores)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "range_reads": rows, "loader": loader}, indent=2)
        )


if __name__ == "__main__":
    main()
