"""TokenLoader in worker processes: batches are pinned in the main process only."""

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
