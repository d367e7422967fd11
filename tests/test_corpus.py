"""Corpus scale: many stores under a low fd limit, per-cell arrays shared by ranks, the
epoch schedule as arrays (the same batches as the list-based schedule before it)."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from concept import store as fmt
from concept.data import BlockSampler, TokenLoader
from concept.store import open_store
from preprocess.synth import synthetic_store

VOCAB = 200
# tiny chunks and shards: a store has ~25 files, and batches cross per-cell chunk bounds
SMALL = {"chunk_elements": 64, "shard_elements": 256, "cell_chunk": 16}


def _write(out: Path, seed: int, n: int, settings: dict) -> Path:
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 3, n).astype(np.int32)
    return synthetic_store(
        out,
        rng.integers(5, 30, n),
        VOCAB,
        "x",
        rng,
        obs={"ct": (codes, list("abc"))},
        settings=settings,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """300 small stores: 10 written, each copied 30 times (distinct files, same cells)."""
    root = tmp_path_factory.mktemp("corpus")
    first = [_write(root / f"s{i}_0.zarr", i, 20 + 7 * i, SMALL) for i in range(10)]
    stores = []
    for copy in range(30):
        for i, src in enumerate(first):
            dst = root / f"s{i}_{copy}.zarr"
            if copy:
                shutil.copytree(src, dst)
            stores.append(dst)
    return stores


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _tiny_module():
    from concept.config import load_config
    from concept.lit import ContrastiveModule

    cfg = load_config(
        [
            "PATH.PROJECT_PATH=/nonexistent",
            "model.dim_gene_embs=16",
            "model.dim_model=16",
            "model.num_head=2",
            "model.dim_hid=32",
            "model.nlayers=1",
            "model.dropout=0.0",
            "model.pe_max_len=257",
        ]
    )
    torch.manual_seed(0)
    return ContrastiveModule(ContrastiveModule.hparams_for(cfg.model, None), {"hsapiens": VOCAB})


def _under_low_limit(stores: list[str], out: str) -> None:
    """In a child: RLIMIT_NOFILE 256, a full loader epoch checked cell by cell against the
    stores (read through tensorstore), then a few optimizer steps."""
    from concept.data.views import ViewSpec, build_views, make_planner
    from concept.losses import clip_loss

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    before = _open_fds()
    loader = TokenLoader(stores, batch_size=16, block_size=4, obs_keys=["ct"], prefetch=2)
    want = {}  # (store, row) -> (tokens, values, total count)
    peak, checked = 0, 0
    for b in loader:
        peak = max(peak, _open_fds())
        cu = b.cu_seqlens.numpy()
        for i in range(len(b)):
            s, row = int(b.store_index[i]), int(b.rows[i])
            if s not in want:
                ref = open_store(stores[s], "tensorstore")
                want[s] = (*ref.cells(0, len(ref)), ref.total_counts, ref.rows)
            tokens, values, ip, totals, rows = want[s]
            k = int(np.flatnonzero(rows == row)[0])
            assert np.array_equal(b.tokens[cu[i] : cu[i + 1]].numpy(), tokens[ip[k] : ip[k + 1]])
            assert np.array_equal(b.values[cu[i] : cu[i + 1]].numpy(), values[ip[k] : ip[k + 1]])
            assert b.total_counts[i] == totals[k]
            checked += 1
    module = _tiny_module()
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-3)
    train = TokenLoader(
        stores, 16, 4, seed=1, rows=False, plan_views=make_planner(ViewSpec(max_tokens=32), VOCAB)
    )
    losses = []
    for step, b in enumerate(train):
        if step == 3:
            break
        assert b.rows is None  # training has no use for source rows
        v = build_views(b.to("cpu"))
        z, _ = module.net(v.tokens, v.values, v.cu_seqlens, v.max_seqlen, "hsapiens")
        loss = clip_loss(z[: v.n_cells], z[v.n_cells :], torch.tensor(20.0))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        peak = max(peak, _open_fds())
    torch.save(
        {
            "before": before,
            "peak": peak,
            "checked": checked,
            "pool": fmt._fd_capacity(),
            "stores": len(want),
            "len": len(loader),
            "losses": losses,
        },
        out,
    )


def test_many_stores_under_a_low_fd_limit(corpus, tmp_path):
    out = tmp_path / "result.pt"
    child = mp.get_context("spawn").Process(
        target=_under_low_limit, args=([str(p) for p in corpus], str(out))
    )
    child.start()
    child.join()
    assert child.exitcode == 0
    r = torch.load(out)
    sizes = [len(open_store(p)) for p in corpus]
    assert r["checked"] == 16 * r["len"] == sum(n // 16 * 16 for n in sizes)  # a full epoch
    assert r["stores"] == len(corpus)  # every store read
    assert r["pool"] == 64  # a quarter of the limit
    # ~25 files a store, 300 stores: the pool's 64 at most stay open, whatever the count
    assert r["peak"] - r["before"] <= r["pool"] + 8
    assert len(r["losses"]) == 3 and all(np.isfinite(r["losses"]))


def _mapped(path_part: str) -> dict[str, int]:
    """This process's mappings of files containing ``path_part``: file -> kB shared with
    another process (Shared_Clean + Shared_Dirty: pages just written may not be on disk)."""
    out, current = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \d+\s+(.*)$", line)
        if head:
            current = head.group(1) if path_part in head.group(1) else None
        elif current and line.startswith(("Shared_Clean:", "Shared_Dirty:")):
            out[current] = out.get(current, 0) + int(line.split()[1])
    return out


def _rank(stores: list[str], rank: int, barrier, out: str) -> None:
    loader = TokenLoader(stores, 32, 8, rank=rank, world_size=2, obs_keys=["ct"], rows=False)
    got = [(*_flat(b), b.var_tokens.tolist()) for b in loader]
    barrier.wait()  # both ranks hold their mappings now
    shared = _mapped(str(Path(stores[0]).parent))
    barrier.wait()
    torch.save({"batches": got, "maps": shared}, out)


def _flat(b) -> tuple:
    return (
        b.index,
        b.tokens.tolist(),
        np.diff(b.cu_seqlens.numpy()).tolist(),
        None if b.rows is None else b.rows.tolist(),
        b.store_index.tolist(),
        b.total_counts.tolist(),
        b.obs["ct"].tolist(),
    )


def test_two_ranks_share_the_per_cell_arrays(tmp_path):
    stores = [str(_write(tmp_path / f"s{i}.zarr", i, 300 + 50 * i, {})) for i in range(3)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_rank, args=(stores, r, barrier, str(tmp_path / f"r{r}.pt")))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    # the per-cell arrays training reads, and each store's gene universe, are mapped from
    # the stores' chunk files, in both ranks, and their pages are shared (one copy in the
    # page cache, not one per rank)
    names = [fmt.INDPTR, fmt.TOTAL_COUNTS, f"{fmt.OBS_GROUP}/ct", fmt.VAR_TOKENS]
    files = {f"{s}/{n}/c/0" for s in stores for n in names}
    assert set(r0["maps"]) == set(r1["maps"]) == files  # cell/row is not mapped for batches
    assert all(r0["maps"][f] > 0 and r1["maps"][f] > 0 for f in files), (r0["maps"], r1["maps"])
    # each rank's batches are its half of the single-process batches
    whole = TokenLoader(stores, 32, 8, obs_keys=["ct"], rows=False)
    for b, h0, h1 in zip(whole, r0["batches"], r1["batches"], strict=True):
        *h0, var0 = h0
        *h1, var1 = h1
        joined = tuple(None if x is None else x + y for x, y in zip(h0[1:], h1[1:], strict=True))
        assert h0[0] == h1[0] == b.index and joined == _flat(b)[1:]
        assert var0 == var1 == b.var_tokens.tolist()  # the global batch's store's genes


def test_compressed_stores_read_the_same(tmp_path):
    """A compressed store (per-cell arrays: a private copy, tensorstore reads) gives the
    same batches as the uncompressed one; a slice across per-cell chunks concatenates."""
    plain = _write(tmp_path / "plain.zarr", 0, 200, SMALL)
    packed = _write(tmp_path / "zstd.zarr", 0, 200, SMALL | {"compressor": "zstd"})
    assert open_store(packed).mode == "tensorstore"
    a = [_flat(b) for b in TokenLoader([plain], 32, 8, obs_keys=["ct"])]
    assert a == [_flat(b) for b in TokenLoader([packed], 32, 8, obs_keys=["ct"])]
    s = open_store(plain)
    ts = open_store(plain, "tensorstore")
    for name in (fmt.INDPTR, fmt.TOTAL_COUNTS, fmt.ROW):
        col = s.column(name)
        assert col._raw is not None  # mapped chunk files
        for lo, hi in [(0, 16), (3, 40), (15, 17), (0, len(col))]:
            assert np.array_equal(col[lo:hi], ts.read(name, lo, hi)), (name, lo, hi)


def test_loader_opens_the_stores_arrays_at_construction(tmp_path, monkeypatch):
    """The loader opens what training reads when it is built: each array's zarr.json is
    read once, the per-cell arrays and var_tokens are mapped, and no later batch reads
    metadata; a store missing an array fails there, naming the store and the array."""
    stores = [_write(tmp_path / f"s{i}.zarr", i, 60 + 10 * i, SMALL) for i in range(3)]
    texts = []
    text = fmt._LocalFiles.text
    monkeypatch.setattr(fmt._LocalFiles, "text", lambda self, n: texts.append(n) or text(self, n))
    loader = TokenLoader(stores, 32, 8, obs_keys=["ct", "absent"], rows=False)
    arrays = [fmt.INDPTR, fmt.TOTAL_COUNTS, fmt.VAR_TOKENS, f"{fmt.OBS_GROUP}/ct"]
    arrays += [fmt.TOKENS, fmt.VALUES, f"{fmt.OBS_GROUP}/absent"]
    assert sorted(texts) == sorted((["zarr.json"] + [f"{a}/zarr.json" for a in arrays]) * 3)
    for r in loader.readers:
        for name in arrays[:4]:
            assert r.column(name)._chunks  # mapped
    texts.clear()
    batches = list(loader)
    assert texts == [] and len(batches) == len(loader)
    for b in batches:  # the batch's genes are its store's, from the mapping
        store = int(b.store_index[0])
        assert b.var_tokens.tolist() == open_store(stores[store]).var_tokens.tolist()
    shutil.rmtree(stores[1] / fmt.TOTAL_COUNTS)
    with pytest.raises(fmt.StoreError, match=rf"{stores[1]}.*'{fmt.TOTAL_COUNTS}' missing"):
        TokenLoader(stores, 32, 8)


# --- the schedule as arrays equals the list-based schedule before it ---------------------


def _part_reads(part, a: int, b: int) -> list[tuple[int, int, int]]:
    if part.cells is None:
        return [(part.store, a, b)]
    c = part.cells[a:b]
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(c) != 1) + 1, [len(c)]])
    return [
        (part.store, int(c[i]), int(c[j - 1]) + 1)
        for i, j in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _reference_batches(s: BlockSampler, epoch: int) -> list[list[tuple[int, int, int]]]:
    """The list-based ``global_batches`` the arrays replaced (commit 714f85f), kept as the
    reference: the same random calls, in the same order, Python objects per read."""
    rng = np.random.default_rng([s.seed, epoch])
    batches = []
    for group in s.groups:
        blocks = []
        for p in group:
            starts = np.union1d(0, np.arange(int(rng.integers(s.block_size)), p.size, s.block_size))
            blocks.append((starts, np.diff(starts, append=p.size)))
        part = np.concatenate([np.full(len(st), i) for i, (st, _) in enumerate(blocks)])
        starts = np.concatenate([st for st, _ in blocks])
        lengths = np.concatenate([n for _, n in blocks])
        order = rng.permutation(len(starts))
        part, starts, lengths = part[order], starts[order], lengths[order]
        b0 = offset = 0
        for _ in range(int(lengths.sum() // s.batch_size)):
            need, reads = s.batch_size, []
            while need:
                take = min(int(lengths[b0]) - offset, need)
                start = int(starts[b0]) + offset
                if take:  # (an empty store's empty block gave an empty read)
                    reads += _part_reads(group[part[b0]], start, start + take)
                need, offset = need - take, offset + take
                if offset == lengths[b0]:
                    b0, offset = b0 + 1, 0
            batches.append(reads)
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def _reference_slice(s: BlockSampler, batch) -> list[tuple[int, int, int]]:
    per = s.batch_size // s.world_size
    lo, hi = s.rank * per, (s.rank + 1) * per
    out, pos = [], 0
    for store, start, stop in batch:
        a, b = max(lo - pos, 0), min(hi - pos, stop - start)
        if a < b:
            out.append((store, start + a, start + b))
        pos += stop - start
    return out


def _as_list(reads) -> list[tuple[int, int, int]]:
    return list(zip(*(x.tolist() for x in reads), strict=True))


_rng = np.random.default_rng(0)
_cells = [_rng.integers(-1, 4, 500) for _ in range(4)]
CONFIGS = {
    "stores": ([300, 250, 130, 50], 64, 16, {}),
    "one store, blocks of 1": ([4096], 128, 1, {}),
    "species": ([100, 0, 90, 40], 32, 8, {"groups": [0, 0, 0, 0]}),
    "num_samples": ([1000, 100, 600], 32, 8, {"num_samples": 330}),
    "equally": ([1000, 100], 32, 8, {"num_samples": 200, "sample_groups_equally": True}),
    "num_groups": ([100, 100, 100, 80], 32, 8, {"num_groups": 2}),
    "obs groups": (
        [500] * 5,
        32,
        8,
        {"groups": [np.sort(_cells[0]), _cells[1], 2, _cells[2], np.sort(_cells[3])]},
    ),
    "obs groups, capped": (
        [500] * 5,
        32,
        8,
        {"groups": [np.sort(_cells[0]), _cells[1], -1, _cells[2], _cells[3]], "num_samples": 700},
    ),
}


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_schedule_arrays_equal_the_list_schedule(name, world_size):
    sizes, batch_size, block_size, kw = CONFIGS[name]
    for rank in range(world_size):
        s = BlockSampler(sizes, batch_size, block_size, 7, rank, world_size, **kw)
        for epoch in range(3):
            want, got = _reference_batches(s, epoch), s.global_batches(epoch)
            assert len(got) == len(want) == len(s) > 0
            for i, batch in enumerate(want):
                assert _as_list(got.batch(i)) == batch, (name, epoch, i)
                assert _as_list(s.rank_slice(got.batch(i))) == _reference_slice(s, batch)
