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


def test_a_range_across_inner_chunks_is_one_read_when_they_are_adjacent(tmp_path, monkeypatch):
    """A read across inner-chunk boundaries of a shard is one ``preadv`` when the chunks lie
    one after the other in the shard file (as compiled), one per chunk when they do not;
    the values are the tensorstore reader's either way."""
    import numpy as np
    from test_corpus import SMALL, _write

    from concept import store as fmt

    path = _write(tmp_path / "s.zarr", 0, 60, SMALL | {"compressor": None})
    reads = []
    read_into = fmt._LocalFiles.read_into

    def counted(self, name, offset, out):
        reads.append((name, offset, len(out)))
        return read_into(self, name, offset, out)

    monkeypatch.setattr(fmt._LocalFiles, "read_into", counted)
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
