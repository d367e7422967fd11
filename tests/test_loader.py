"""TokenLoader in worker processes (batches are pinned in the main process only), and the
reader's range reads across inner chunks."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import store_paths

from concept.data.batch import PackedBatch
from concept.data.loader import TokenLoader


def _record_pins(monkeypatch, log: Path) -> None:
    def pin(self):  # stands in for pinning (no CUDA here): note the process that pins
        with log.open("a") as fh:
            fh.write(f"{os.getpid()}\n")
        return self

    monkeypatch.setattr(PackedBatch, "pin_memory", pin)


def test_batches_are_pinned_in_the_main_process_only(compiled, tmp_path, monkeypatch):
    log = tmp_path / "pins"
    _record_pins(monkeypatch, log)
    stores = store_paths(compiled, "hs_")
    threaded = TokenLoader(stores, batch_size=16, block_size=8)
    threaded.pin = True  # as on a CUDA machine
    assert len(list(threaded)) == len(threaded) > 0
    pins = log.read_text().split()
    assert pins == [str(os.getpid())] * len(threaded)  # the reading thread, this process
    log.unlink()
    workers = TokenLoader(stores, batch_size=16, block_size=8, num_workers=2)
    workers.pin = True
    rows = [b.rows.tolist() for b in workers]
    assert rows == [b.rows.tolist() for b in threaded]  # same batches, same order
    # forked workers never pin; the DataLoader pins in this process (when CUDA exists)
    assert set(log.read_text().split() if log.exists() else []) <= {str(os.getpid())}


def test_in_memory_loader_reads_nothing_from_disk(compiled, tmp_path):
    """model_speed_sanity_check's loader: the same batches, with tokens/values gone from disk."""
    import shutil

    from concept import store as fmt

    stores = []
    for p in store_paths(compiled, "hs_")[:2]:
        shutil.copytree(p, tmp_path / p.name)
        stores.append(tmp_path / p.name)
    want = [(b.tokens.tolist(), b.values.tolist()) for b in TokenLoader(stores, 16, 8)]
    held = TokenLoader(stores, 16, 8, in_memory=True)
    for p in stores:
        shutil.rmtree(p / fmt.TOKENS)
        shutil.rmtree(p / fmt.VALUES)
    assert [(b.tokens.tolist(), b.values.tolist()) for b in held] == want


def _reversed_shard(path: Path, inner_bytes: int) -> None:
    """Rewrite a shard file with its inner chunks in reverse order (a valid shard: the
    index and its crc32c follow), so that no two neighbouring chunks are adjacent."""
    import google_crc32c
    import numpy as np

    raw = path.read_bytes()
    n = (len(raw) - 4) // (16 + inner_bytes)
    index = np.frombuffer(raw[-4 - 16 * n : -4], "<u8").reshape(n, 2).copy()
    assert (index[:, 0] == np.arange(n) * inner_bytes).all()  # the compiler's order
    chunks = [raw[int(o) : int(o) + inner_bytes] for o, _ in index]
    index[:, 0] = (n - 1 - np.arange(n)) * inner_bytes
    body = b"".join(reversed(chunks)) + index.tobytes()
    path.write_bytes(body + np.uint32(google_crc32c.value(index.tobytes())).tobytes())


class _ColdCache:
    """``os.preadv`` and ``os.posix_fadvise`` as the store module sees them, with a page
    cache that holds the first ``cached`` bytes of every ``RWF_NOWAIT`` read (0: none,
    None: all); the calls are logged as (kind, offset, bytes)."""

    def __init__(self, monkeypatch, cached: int | None):
        import os

        from concept import store as fmt

        self.calls, self.hinted = [], []  # hinted: (file, offset, bytes)
        preadv, fadvise = os.preadv, os.posix_fadvise

        def fake_preadv(fd, buffers, offset, flags=0):
            (buf,) = buffers
            if not flags & os.RWF_NOWAIT:
                self.calls.append(("read", offset, len(buf)))
                return preadv(fd, [buf], offset)
            self.calls.append(("nowait", offset, len(buf)))
            if cached == 0:
                raise BlockingIOError
            return preadv(fd, [memoryview(buf)[:cached]], offset)

        def fake_fadvise(fd, offset, n, advice):
            assert advice == os.POSIX_FADV_WILLNEED
            self.calls.append(("hint", offset, n))
            self.hinted.append((os.readlink(f"/proc/self/fd/{fd}"), offset, n))
            return fadvise(fd, offset, n, advice)

        monkeypatch.setattr(fmt.os, "preadv", fake_preadv)
        monkeypatch.setattr(fmt.os, "posix_fadvise", fake_fadvise)


def test_a_local_read_takes_the_cached_bytes_at_once_and_hints_the_rest(tmp_path, monkeypatch):
    """A started local read copies what the page cache holds (``RWF_NOWAIT``) and asks the
    kernel for the rest (``WILLNEED``) without waiting; completing it reads that rest.
    The bytes are the tensorstore reader's whatever the cache held."""
    import numpy as np
    from test_corpus import SMALL, _write

    from concept import store as fmt

    path = _write(tmp_path / "s.zarr", 0, 60, SMALL | {"compressor": None})
    want = fmt.open_store(path, "tensorstore").read(fmt.TOKENS, 0, 200)
    size = want.dtype.itemsize
    for cached, calls in [
        (None, [("nowait", 30 * size, 170 * size)]),  # all cached: no hint, nothing left
        (0, [("nowait", 30 * size, 170 * size), ("hint", 30 * size, 170 * size)]),
        (100, [("nowait", 30 * size, 170 * size), ("hint", 30 * size + 100, 170 * size - 100)]),
    ]:
        raw = fmt.open_store(path, "raw")
        raw.read(fmt.TOKENS, 0, 1)  # the shard index (a tail read)
        cache = _ColdCache(monkeypatch, cached)
        out = np.zeros(170, want.dtype)
        finish = raw.submit(fmt.TOKENS, 30, 200, out)
        assert cache.calls == calls
        copied = (170 if cached is None else cached // size) * size
        assert (
            out.view(np.uint8)[:copied].tobytes() == want[30:200].view(np.uint8)[:copied].tobytes()
        )
        assert not out.view(np.uint8)[copied:].any()  # the rest: not read yet
        finish()
        left = [("read", 30 * size + cached, 170 * size - cached)] if cached is not None else []
        assert cache.calls == calls + left
        assert np.array_equal(out, want[30:200])


def test_batches_are_the_same_with_a_cold_page_cache(tmp_path, monkeypatch):
    """With nothing in the page cache, every token and value read of a batch is hinted when
    the batch is started (``prefetch`` batches before it is handed out) and read when it is
    finished: the batches are those of a warm cache."""
    import numpy as np
    from test_corpus import SMALL, _write

    from concept.data import TokenLoader

    paths = [_write(tmp_path / f"{i}.zarr", i, 300, SMALL | {"compressor": None}) for i in range(3)]

    def batches():
        loader = TokenLoader(paths, batch_size=16, block_size=4, prefetch=3, rows=False)
        return [(b.tokens.numpy().copy(), b.values.numpy().copy()) for b in loader]

    warm = batches()
    cache = _ColdCache(monkeypatch, 0)
    cold = batches()
    assert len(cold) == len(warm) > 3
    for (t, v), (t2, v2) in zip(warm, cold, strict=True):
        assert np.array_equal(t, t2) and np.array_equal(v, v2)
    kinds = [c[0] for c in cache.calls]
    reads = [c[1:] for c in cache.calls if c[0] == "read"]
    tokens = [h for h in cache.hinted if "/tokens/" in h[0] or "/values/" in h[0]]
    assert kinds.count("nowait") == len(reads) == len(tokens) > 0
    assert {h[1:] for h in tokens} == set(reads)  # what was hinted is read


def test_a_cold_cache_hints_the_per_cell_pages_of_the_batches_ahead(tmp_path, monkeypatch):
    """Once a batch's reads miss the page cache, the loader hints the per-cell array bytes
    (``indptr``, ``cell/total_counts``) of the batches it starts next, ahead of their
    first touch; with a warm cache it hints nothing."""
    import os

    from test_corpus import SMALL, _write

    from concept.data import TokenLoader

    cell_chunk = SMALL["cell_chunk"]
    paths = [_write(tmp_path / f"{i}.zarr", i, 300, SMALL | {"compressor": None}) for i in range(3)]

    def run(cache: _ColdCache) -> tuple[set, set]:
        loader = TokenLoader(paths, batch_size=16, block_size=4, prefetch=3, rows=False)
        schedule = loader.sampler.global_batches(0)
        want = set()  # (file, offset, bytes) of the per-cell ranges of batch 3 on (the
        # first batch started finds the cache cold; the next 2 are chosen with it)
        for i in range(3, len(schedule)):
            reads = loader.sampler.rank_slice(schedule.batch(i))
            for s, a, b in zip(reads.store, reads.start, reads.stop, strict=True):
                for name, size, stop in (("indptr", 8, b + 1), ("cell/total_counts", 4, b)):
                    for k in range(a // cell_chunk, (stop - 1) // cell_chunk + 1):
                        lo, hi = max(a, k * cell_chunk), min(stop, (k + 1) * cell_chunk)
                        want.add(
                            (
                                f"{os.path.realpath(paths[s])}/{name}/c/{k}",
                                (lo - k * cell_chunk) * size,
                                (hi - lo) * size,
                            )
                        )
        list(loader)
        got = {h for h in cache.hinted if "/indptr/" in h[0] or "/cell/" in h[0]}
        return want, got

    warm = _ColdCache(monkeypatch, None)
    assert run(warm)[1] == set()
    want, got = run(_ColdCache(monkeypatch, 0))
    assert want and want <= got


def test_a_range_across_inner_chunks_is_one_read_when_they_are_adjacent(tmp_path, monkeypatch):
    """A read across inner-chunk boundaries of a shard is one ``preadv`` when the chunks lie
    one after the other in the shard file (as compiled), one per chunk when they do not;
    the values are the tensorstore reader's either way."""
    import numpy as np
    from test_corpus import SMALL, _write

    from concept import store as fmt

    path = _write(tmp_path / "s.zarr", 0, 60, SMALL | {"compressor": None})
    reads = []

    def counting(read):
        def counted(self, name, offset, out):
            reads.append((name, offset, len(out)))
            return read(self, name, offset, out)

        return counted

    for method in ("read_into", "read_cached"):  # a read waits for the disk or not
        monkeypatch.setattr(fmt._LocalFiles, method, counting(getattr(fmt._LocalFiles, method)))
    ts = fmt.open_store(path, "tensorstore")
    want = {name: ts.read(name, 0, 600) for name in (fmt.TOKENS, fmt.VALUES)}
    size = {name: ts.dtype(name).itemsize for name in want}
    # 64-element chunks, 256-element shards: [30, 200) spans chunks 0-3 of shard 0,
    # [200, 300) the end of shard 0 and the start of shard 1
    for name in want:
        raw = fmt.open_store(path, "raw")
        raw.read(name, 0, 1)  # the shard index is read once (a tail read, not counted)
        reads.clear()
        assert np.array_equal(raw.read(name, 30, 200), want[name][30:200])
        assert reads == [(f"{name}/c/0", 30 * size[name], 170 * size[name])]
        reads.clear()
        assert np.array_equal(raw.read(name, 200, 300), want[name][200:300])
        assert [r[0] for r in reads] == [f"{name}/c/0", f"{name}/c/1"]
        _reversed_shard(path / name / "c" / "0", 64 * size[name])
        raw = fmt.open_store(path, "raw")
        raw.read(name, 0, 1)
        reads.clear()
        assert np.array_equal(raw.read(name, 30, 200), want[name][30:200])
        assert len(reads) == 4  # one per chunk: not adjacent in the file
        ts = fmt.open_store(path, "tensorstore")  # the rewritten shard is valid
        assert np.array_equal(ts.read(name, 0, 600), want[name])
