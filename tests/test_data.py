"""The training data path: sampler, readers, packed batches, resume, panel views."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import store_paths

from concept.data import BlockSampler, TokenLoader
from concept.data.batch import PackedBatch
from concept.data.views import (
    Panels,
    ViewSpec,
    build_views,
    draw_gene_sets,
    make_planner,
    normalize_values,
    plan_views,
)
from concept.store import open_store
from concept.vocab import read_token_mapping

# --- sampler ---------------------------------------------------------------------------


def _cells(batch) -> list[tuple[int, int]]:
    return [
        (s, c) for s, a, b in zip(*(x.tolist() for x in batch), strict=True) for c in range(a, b)
    ]


def _batches(schedule) -> list:
    """A schedule's global batches, each as its ``Reads`` arrays."""
    return [schedule.batch(i) for i in range(len(schedule))]


def _stores(batch) -> set[int]:
    return set(batch.store.tolist())


def test_each_cell_once_per_epoch_and_ranks_partition():
    sizes = [300, 250, 130, 50]
    full = BlockSampler(sizes, batch_size=64, block_size=16, seed=3)
    batches = _batches(full.global_batches(0))
    assert len(batches) == len(full) == 300 // 64 + 250 // 64 + 130 // 64
    cells = [c for b in batches for c in _cells(b)]
    assert len(cells) == len(set(cells))  # no cell twice
    for b in batches:  # within_group: one store per global batch
        assert len(_stores(b)) == 1 and len(_cells(b)) == 64
    assert full.dropped_stores == [3]  # smaller than one batch: never used (as the reference)
    per_store = {s: sum(1 for st, _ in cells if st == s) for s in range(4)}
    assert per_store == {0: 256, 1: 192, 2: 128, 3: 0}
    # rank slices of world 4 partition every global batch, contiguously per rank
    ranks = [BlockSampler(sizes, 64, 16, seed=3, rank=r, world_size=4) for r in range(4)]
    for b in batches:
        parts = [_cells(s.rank_slice(b)) for s in ranks]
        assert [len(p) for p in parts] == [16] * 4
        assert sum(parts, []) == _cells(b)
    assert len({len(s) for s in ranks}) == 1  # every rank yields the same number of batches


def test_epochs_reshuffle_deterministically():
    s = BlockSampler([500, 400], batch_size=32, block_size=8, seed=0)
    e0, e1 = _batches(s.global_batches(0)), _batches(s.global_batches(1))
    e0_again = _batches(BlockSampler([500, 400], batch_size=32, block_size=8).global_batches(0))
    assert list(map(_cells, e0)) == list(map(_cells, e0_again))
    assert list(map(_cells, e0)) != list(map(_cells, e1))
    assert sorted(map(_cells, e0)) != sorted(
        map(_cells, e1)
    )  # blocks regrouped, not only reordered


def test_block_partners_change_from_epoch_to_epoch():
    s = BlockSampler([4096], batch_size=128, block_size=32, seed=0)
    epochs, together, partners = 20, 0, set()
    for e in range(epochs):
        batches = _batches(s.global_batches(e))
        batch_of = {c: i for i, b in enumerate(batches) for _, c in _cells(b)}
        assert sorted(batch_of) == list(range(4096))  # every cell once, every epoch
        together += batch_of[0] == batch_of[31]  # one block of a fixed grid
        reads = s.global_batches(e).reads
        j = np.flatnonzero((reads.start <= 100) & (reads.stop > 100))[0]
        partners.add((int(reads.start[j]), int(reads.stop[j])))
    assert together <= 3  # ~1/32 share a block, ~1/32 a batch otherwise
    assert len(partners) >= 10  # cell 100's block moves with the grid


def test_mixed_batches_and_caps():
    s = BlockSampler([100, 90, 40], batch_size=32, block_size=8, groups=[0, 0, 0])
    batches = _batches(s.global_batches(0))
    cells = [c for b in batches for c in _cells(b)]
    assert len(batches) == 230 // 32 and len(cells) == len(set(cells))
    assert any(len(_stores(b)) > 1 for b in batches)
    capped = BlockSampler([1000, 100], batch_size=32, block_size=8, num_samples=330)
    assert capped.sizes.tolist() == [300, 32]  # proportional, at least one batch each
    equal = BlockSampler([1000, 100], 32, 8, num_samples=200, sample_groups_equally=True)
    assert equal.sizes.tolist() == [100, 100]
    one = BlockSampler([100, 100, 100], 32, 8, num_groups=1)
    assert (one.sizes > 0).sum() == 1


def test_groups_of_cells_across_stores():
    # store 0: cells alternate between groups 0 and 1; store 1: group 1, with 10 ungrouped
    g0 = np.arange(100) % 2
    g1 = np.r_[np.ones(60, int), np.full(10, -1)]
    s = BlockSampler([100, 70], batch_size=16, block_size=8, groups=[g0, g1], seed=1)
    assert len(s) == 50 // 16 + 110 // 16
    for e in range(3):
        batches = _batches(s.global_batches(e))
        cells = [c for b in batches for c in _cells(b)]
        assert len(cells) == len(set(cells)) == 16 * len(s)
        label = {(0, c): g0[c] for c in range(100)} | {(1, c): g1[c] for c in range(70)}
        for b in batches:
            assert len({label[c] for c in _cells(b)}) == 1 and label[_cells(b)[0]] >= 0
        assert any(len(_stores(b)) == 2 for b in batches)  # a group spans stores
        reads = s.global_batches(e).reads
        assert np.all((reads.stop - reads.start)[reads.store == 0] == 1)  # alternating cells
    equal = BlockSampler(
        [100, 70], 16, 8, groups=[g0, g1], num_samples=64, sample_groups_equally=True
    )
    assert equal.sizes.tolist() == [32 + 15, 17]  # 32 per group; group 1 split 50:60
    assert BlockSampler([100, 70], 16, 8, groups=[-1, g1]).dropped_stores == [0]


# --- readers and packed batches --------------------------------------------------------


def test_raw_and_tensorstore_readers_return_the_same_bytes(compiled):
    for path in store_paths(compiled):
        raw, ts = open_store(path, "raw"), open_store(path, "tensorstore")
        nnz = raw.attrs["nnz"]
        for name, n in [
            ("tokens", nnz),
            ("values", nnz),
            ("indptr", len(raw) + 1),
            ("cell/row", len(raw)),
        ]:
            for a, b in [(0, n), (n // 3, n // 3 + 17), (n - 5, n)]:
                assert np.array_equal(raw.read(name, a, b), ts.read(name, a, b)), (path.name, name)


def test_batches_equal_store_contents(compiled):
    paths = store_paths(compiled, "hs_")
    stores = [open_store(p) for p in paths]
    where = [{int(r): i for i, r in enumerate(s.rows)} for s in stores]
    loader = TokenLoader(paths, batch_size=32, block_size=8, obs_keys=["cell_type", "tissue"])
    seen = set()
    for b in loader:
        assert len(b) == 32 and b.species == "hsapiens"
        store = int(b.store_index[0])
        assert torch.all(b.store_index == store)
        cu = b.cu_seqlens.numpy()
        assert np.array_equal(b.var_tokens.numpy(), stores[store].var_tokens)
        for i in range(len(b)):
            k = where[store][int(b.rows[i])]
            tokens, values = stores[store].cell(k)
            assert np.array_equal(b.tokens[cu[i] : cu[i + 1]].numpy(), tokens)
            assert np.array_equal(b.values[cu[i] : cu[i + 1]].numpy(), values)
            assert b.total_counts[i] == stores[store].total_counts[k]
            codes, cats = stores[store].obs("cell_type")
            label = cats[codes[k]] if codes[k] >= 0 else None
            got = int(b.obs["cell_type"][i])
            assert (loader.categories.names["cell_type"][got] if got >= 0 else None) == label
            seen.add((store, k))
    expected = sum(len(s) // 32 * 32 for s in stores if len(s) >= 32)
    assert len(seen) == expected


def test_batches_within_one_tissue_across_files(compiled):
    paths = store_paths(compiled, "hs_")
    stores = [open_store(p) for p in paths]
    loader = TokenLoader(paths, 16, 4, within_group="tissue", obs_keys=["tissue"], seed=2)
    names = loader.categories.names["tissue"]
    where = [{int(r): i for i, r in enumerate(s.rows)} for s in stores]
    per_tissue: dict[str, int] = {}
    for st in stores:
        codes, cats = st.obs("tissue")
        for c in codes[codes >= 0]:
            per_tissue[cats[c]] = per_tissue.get(cats[c], 0) + 1
    assert len(loader) == sum(n // 16 for n in per_tissue.values())
    genes = np.unique(np.concatenate([s.var_tokens for s in stores]))
    seen, spans = set(), 0
    for b in loader:
        tissue = {int(t) for t in b.obs["tissue"]}
        assert len(tissue) == 1 and min(tissue) >= 0  # one tissue per batch
        assert np.array_equal(b.var_tokens.numpy(), genes)  # the union of the files' genes
        for i in range(len(b)):
            store = int(b.store_index[i])
            k = where[store][int(b.rows[i])]
            codes, cats = stores[store].obs("tissue")
            assert cats[codes[k]] == names[min(tissue)]  # the stored label of that cell
            seen.add((store, k))
        spans += len(set(b.store_index.tolist())) > 1
    assert len(seen) == 16 * len(loader) and spans  # cells once; batches span files
    no_tissue = [i for i, s in enumerate(stores) if (s.obs("tissue")[0] < 0).all()]
    assert no_tissue and loader.sampler.dropped_stores == no_tissue  # hs_dense_d: no column
    by_donor = TokenLoader(
        paths, 16, 4, within_group=["dataset", "donor_id"], obs_keys=["donor_id"]
    )
    for b in by_donor:
        assert len(set(b.store_index.tolist())) == 1 and len(set(b.obs["donor_id"].tolist())) == 1


def test_compile_group_by_lays_out_groups_for_few_reads(project_copy):
    from conftest import config

    from concept.config import ConfigError
    from preprocess.compile import run
    from preprocess.verify import run as verify

    with pytest.raises(ConfigError, match="compile.group_by='batch' is not among compile.obs_keys"):
        config(project_copy, "compile.group_by=batch")
    cfg = config(project_copy, "compile.group_by=tissue", "compile.workers=1")
    assert run(cfg) == 0 and verify(cfg) == 0  # every sampled cell equals its source row
    paths = [p for p in store_paths(project_copy, "hs_") if "dense" not in p.name]
    for p in paths:
        codes = open_store(p).obs("tissue")[0]
        assert np.all(np.diff(codes) >= 0) and len(set(codes)) > 1  # one run per tissue
    loader = TokenLoader(paths, 16, 4, within_group="tissue", obs_keys=["tissue"])
    batches = _batches(loader.sampler.global_batches(0))
    # a tissue's cells are contiguous in each store, so every block is one read (a batch:
    # 4 blocks, pieces of 2 more, and the short first block of each store's tissue run)
    blocks = [p.size // 4 + 2 for g in loader.sampler.groups for p in g]
    assert sum(len(b.store) for b in batches) <= sum(blocks) + 2 * len(batches)
    assert np.mean([len(b.store) for b in batches]) < 6  # against ~16 reads unsorted
    assert {len({int(t) for t in b.obs["tissue"]}) for b in loader} == {1}


def test_grouping_needs_the_obs_column(compiled, tmp_path):
    import shutil

    src = store_paths(compiled, "hs_csr_a")[0]
    shutil.copytree(src, tmp_path / src.name)
    shutil.rmtree(tmp_path / src.name / "obs" / "tissue")
    with pytest.raises(ValueError, match="needs obs column 'tissue', which this store was"):
        TokenLoader([tmp_path / src.name], 16, within_group="tissue")


def _trace(loader, n=None):
    """The first ``n`` batches (all when None), taking exactly ``n`` from the loader."""
    return [(b.index, int(b.store_index[0]), b.rows.tolist()) for b in itertools.islice(loader, n)]


def test_exact_mid_epoch_resume(compiled):
    paths = store_paths(compiled, "hs_")
    straight = TokenLoader(paths, batch_size=16, block_size=4, seed=5)
    straight.set_epoch(1)
    want = _trace(straight)
    first = TokenLoader(paths, batch_size=16, block_size=4, seed=5, prefetch=3)
    first.set_epoch(1)
    head = _trace(first, 7)  # the reader is ahead of the consumer here
    state = first.state_dict()
    resumed = TokenLoader(paths, batch_size=16, block_size=4, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a trainer calls at the start of the resumed epoch
    assert head + _trace(resumed) == want


def test_worker_processes_yield_the_same_batches(compiled):
    paths = store_paths(compiled, "hs_")
    plain = _trace(TokenLoader(paths, batch_size=16, block_size=4))
    assert _trace(TokenLoader(paths, batch_size=16, block_size=4, num_workers=2)) == plain


# --- views ------------------------------------------------------------------------------


def _mapping(compiled):
    return read_token_mapping(
        compiled / "references/vocabulary/token_mappings_per_specie/hsapiens.csv"
    )


def _views(compiled, spec, *, batch_size=32, rank=0, world_size=1, panels=None):
    vocab = _mapping(compiled).size
    loader = TokenLoader(
        store_paths(compiled, "hs_"),
        batch_size=batch_size,
        block_size=8,
        rank=rank,
        world_size=world_size,
        plan_views=make_planner(spec, vocab, panels),
    )
    return [(b, build_views(b.to("cpu"), spec.normalization)) for b in loader]


def _reference_view(cell_tokens, genes, strategy, max_tokens):
    """The reference's per-cell selection, written plainly: top strategies only."""
    g = set(genes.tolist())
    nonzero = [t for t in cell_tokens.tolist() if t in g][:max_tokens]
    if strategy == "top":
        room = max_tokens - len(nonzero)
        zeros = sorted(g - set(cell_tokens.tolist()))[: max(room, 0)]
        return nonzero + zeros
    return nonzero


@pytest.mark.parametrize(
    ("strategy", "max_tokens"), [("top-nonzero", 1000), ("top-nonzero", 50), ("top", 120)]
)
def test_views_equal_a_per_cell_reference(compiled, strategy, max_tokens):
    spec = ViewSpec(max_tokens=max_tokens, gene_sampling_strategy=strategy, panel_size_min=0.02)
    for b, v in _views(compiled, spec)[:4]:
        g1, g2 = b.views.gene_sets
        assert len(np.intersect1d(g1, g2)) == 0  # disjoint by default
        assert set(g1) | set(g2) <= set(b.var_tokens.tolist())
        cu_in, cu = b.cu_seqlens.numpy(), v.cu_seqlens.numpy()
        assert len(cu) == 2 * len(b) + 1 and v.max_seqlen == np.diff(cu).max()
        for i in range(len(b)):
            cell = b.tokens[cu_in[i] : cu_in[i + 1]].long()
            for view, genes in ((0, g1), (1, g2)):
                s = view * len(b) + i
                seq = v.tokens[cu[s] : cu[s + 1]].tolist()
                assert seq[0] == 0  # CLS first
                assert seq[1:] == _reference_view(cell, genes, strategy, max_tokens)


@pytest.mark.parametrize("strategy", ["random-nonzero", "random"])
def test_random_strategies_sample_within_the_view(compiled, strategy):
    spec = ViewSpec(
        max_tokens=40, gene_sampling_strategy=strategy, panel_size_min=0.3, panel_size_max=0.3
    )
    for b, v in _views(compiled, spec)[:3]:
        cu_in, cu = b.cu_seqlens.numpy(), v.cu_seqlens.numpy()
        for i in range(len(b)):
            cell = b.tokens[cu_in[i] : cu_in[i + 1]].tolist()
            for view, genes in enumerate(b.views.gene_sets):
                s = view * len(b) + i
                seq = v.tokens[cu[s] + 1 : cu[s + 1]].tolist()
                vals = v.values[cu[s] + 1 : cu[s + 1]]
                expressed = [t for t in cell if t in set(genes.tolist())]
                want = min(40, len(expressed) if strategy == "random-nonzero" else len(genes))
                assert len(seq) == want
                assert set(seq) <= set(genes.tolist())
                nz = [t for t, x in zip(seq, vals.tolist(), strict=True) if x > 0]
                assert nz == [t for t in expressed if t in set(nz)]  # stored order kept
                assert seq[: len(nz)] == nz  # expressed genes first, then zeros
                zeros = seq[len(nz) :]
                assert zeros == sorted(zeros) and not set(zeros) & set(cell)


def test_two_ranks_draw_the_same_panels(compiled):
    spec = ViewSpec(max_tokens=100, seed=7)
    r0 = _views(compiled, spec, rank=0, world_size=2)
    r1 = _views(compiled, spec, rank=1, world_size=2)
    assert len(r0) == len(r1)
    for (b0, _), (b1, _) in zip(r0, r1, strict=True):
        assert b0.index == b1.index and not torch.equal(b0.rows, b1.rows)  # different cells
        assert all(
            np.array_equal(x, y)
            for x, y in zip(b0.views.gene_sets, b1.views.gene_sets, strict=True)
        )


def test_gene_set_rules():
    rng = np.random.default_rng(0)
    var = np.arange(2, 20002)
    panel_a = np.arange(100, 1100)  # 1000 genes, all in the store
    panel_far = np.arange(50000, 50500)  # misses the store entirely
    pre = ViewSpec(panel_selection="preselected", panel_max_drop_rate=0.5)
    for _ in range(20):
        g1, g2, name = draw_gene_sets(var, [panel_a], ["hs/a.csv"], pre, rng)
        # each panel gene dropped with a rate drawn from U(0, 0.5)
        assert name == "hs/a.csv" and set(g1) <= set(panel_a) and 420 <= len(g1) <= 1000
        assert not set(g1) & set(g2) and len(g2) >= 400  # pmin = ceil(0.02 n)
    g1, _, name = draw_gene_sets(var, [panel_far], ["hs/far.csv"], pre, rng)
    assert name == "random" and len(g1) > 0  # no empty view 1 (reference bug)
    small = var[:5000]  # a targeted assay: fewer than 10,000 genes -> random panels
    assert draw_gene_sets(small, [panel_a], ["hs/a.csv"], pre, rng)[2] == "random"
    fixed = ViewSpec(panel_size_min=200, panel_size_max=200, panel_overlap=1.0)
    overlaps = [
        len(np.intersect1d(*draw_gene_sets(var, [], [], fixed, rng)[:2])) for _ in range(20)
    ]
    assert all(len(g) == 200 for g in draw_gene_sets(var, [], [], fixed, rng)[:2])
    assert max(overlaps) > 0  # overlap allowed
    big = ViewSpec(panel_size_min=6400, panel_size_max=6400)  # more than half of 5,000 genes
    g1, g2, _ = draw_gene_sets(small, [], [], big, rng)
    assert len(g1) == len(g2) == 2500 and not set(g1) & set(g2)  # split evenly, never empty
    mixed = ViewSpec(panel_selection="mixed", panel_selection_mixed_prob=0.25)
    names = [draw_gene_sets(var, [panel_a], ["a"], mixed, rng)[2] for _ in range(400)]
    assert 0.15 < names.count("random") / 400 < 0.35


def _packed(n_genes: int, n_cells: int, rng, empty=()) -> PackedBatch:
    """A host batch over a store of ``n_genes`` genes (tokens 2..), cells in stored order
    (value descending, token ascending); the cells in ``empty`` express nothing."""
    var = np.arange(2, 2 + n_genes)
    toks, vals = [], []
    for i in range(n_cells):
        k = 0 if i in empty else int(rng.integers(1, min(n_genes, 2500)))
        t = rng.choice(var, k, replace=False)
        v = rng.integers(1, 30, k).astype(np.float32)
        order = np.lexsort((t, -v))
        toks.append(t[order])
        vals.append(v[order])
    cu = np.concatenate([[0], np.cumsum([len(t) for t in toks])])
    return PackedBatch(
        tokens=torch.from_numpy(np.concatenate(toks).astype(np.int32)),
        values=torch.from_numpy(np.concatenate(vals)),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        total_counts=torch.tensor([float(v.sum()) for v in vals]),
        rows=torch.arange(n_cells),
        store_index=torch.zeros(n_cells, dtype=torch.int32),
        obs={},
        var_tokens=torch.from_numpy(var),
        species="hsapiens",
    )


def _reference_sizes(n: int, spec: ViewSpec, panel_genes: int | None):
    """REFERENCE.md 3.5 written plainly: the possible sizes of view 1 (``(lo, hi)``) and,
    given view 1's size, of view 2, for a store of ``n`` genes and a ``panel_overlap`` of
    0 or 1; ``panel_genes``: view 1 is a predesigned panel sharing that many genes."""

    def size(x):
        return math.ceil(x * n) if 0 < x < 1 else int(x)

    def log_int(low, high):  # log_int_samping: low when low >= high
        return (low, low) if low >= high else (low, high)

    pmin, pmax, overlap = size(spec.panel_size_min), size(spec.panel_size_max), spec.panel_overlap
    if panel_genes is None:
        avail = n if overlap else max(n - pmin, 0)
        k1 = log_int(min(pmin, avail), min(pmax, avail))
    else:
        k1 = (panel_genes, panel_genes)

    def k2(k):
        m = n if overlap else n - k
        return log_int(min(pmin, m), min(pmax, m))

    return k1, k2


def _conf_view_specs(tmp_path) -> dict[str, ViewSpec]:
    """The training defaults and every validation loader of conf/, plus the reference's
    advanced loaders (``DataModuleAdvanced_*``) that stress the sizes."""
    from concept.config import load_config
    from concept.datamodule import view_spec

    cfg = load_config([f"PATH.PROJECT_PATH={tmp_path}"])
    dm = cfg.datamodule
    specs = {"train": view_spec(cfg, dm.dataset.train, train=True, seed=0)}
    for name, view in dm.dataset.val.items():
        specs[name] = view_spec(cfg, view, train=False, seed=1)
    assert set(specs) == {
        "train",
        "same_as_train",
        *(f"within_P{k}_B256" for k in (200, 800, 6400)),
    }
    base = specs["within_P200_B256"]
    specs["within_unbalanced_B256"] = replace_spec(base, panel_size_min=15000, panel_size_max=15000)
    everything = replace_spec(
        base, panel_selection="preselected", panel_size_min=100000, panel_size_max=100000
    )
    specs["within_Preselected_vs_all_B256"] = everything
    specs["within_Preselected_vs_all_overlap_B256"] = replace_spec(everything, panel_overlap=1.0)
    return specs


@pytest.mark.parametrize("n_genes", [500, 10_000, 20_000])
def test_view_sizes_follow_the_reference(tmp_path, n_genes):
    vocab = 2 + n_genes
    panel_a = np.arange(100, 1100)  # 1,000 genes, all in every store
    panel_b = np.arange(n_genes - 200, n_genes + 600)  # partly beyond the store's genes
    panels = Panels(
        names={"hsapiens": ["hs/a.csv", "hs/b.csv"]}, tokens={"hsapiens": [panel_a, panel_b]}
    )
    hits = {"hs/a.csv": 1000, "hs/b.csv": len(np.intersect1d(panel_b, np.arange(2, vocab)))}
    rng = np.random.default_rng(n_genes)
    batch = _packed(n_genes, 12, rng)
    cu = batch.cu_seqlens.numpy()
    cells = [batch.tokens[cu[i] : cu[i + 1]].numpy() for i in range(len(batch))]
    for name, spec in _conf_view_specs(tmp_path).items():
        for index in range(12):
            batch.index = index
            plan = plan_views(batch, spec, vocab, panels)
            g1, g2 = plan.gene_sets
            panel = plan.panel_names[0]
            k1, k2 = _reference_sizes(n_genes, spec, None if panel == "random" else hits[panel])
            if panel != "random" and spec.panel_max_drop_rate:  # panel genes dropped at random
                k1 = (1, k1[1])
            if k1 == (0, 0) or k2(len(g1)) == (0, 0):
                # the reference would give an empty view: view 1 gets half the genes (the
                # README's list of differences), view 2 by the reference's rule
                assert panel == "random" and len(g1) == n_genes // 2, (name, n_genes)
            else:
                assert k1[0] <= len(g1) <= k1[1], (name, n_genes, panel, len(g1), k1)
            assert k2(len(g1))[0] <= len(g2) <= k2(len(g1))[1], (name, n_genes, len(g2))
            assert len(np.unique(g1)) == len(g1) and len(np.unique(g2)) == len(g2)
            if not spec.panel_overlap:
                assert not np.intersect1d(g1, g2).size
            if panel != "random":
                assert set(g1.tolist()) <= set(panels.tokens["hsapiens"][panel == "hs/b.csv"])
            if index >= 2:
                continue  # the per-cell check (slow in Python) on the first two batches
            batch.views = plan
            views = build_views(batch.to("cpu"))
            out = views.cu_seqlens.numpy()
            for v, genes in enumerate((g1, g2)):
                member = np.zeros(vocab, bool)
                member[genes] = True
                for i, cell in enumerate(cells):
                    want = cell[member[cell]][: spec.max_tokens]  # top-nonzero, stored order
                    s = v * len(batch) + i
                    got = views.tokens[out[s] : out[s + 1]].numpy()
                    assert got[0] == 0 and np.array_equal(got[1:], want), (name, v, i)
        batch.views = None


def test_view_sizes_where_the_reference_is_plain():
    """The sizes the issue measured, as numbers: the reference's where it gives two views."""
    rng = np.random.default_rng(0)
    var10k, var20k = np.arange(2, 10_002), np.arange(2, 20_002)
    panel = [np.arange(100, 600)]
    p6400 = ViewSpec(panel_selection="random", panel_size_min=6400, panel_size_max=6400)
    unbalanced = ViewSpec(panel_selection="random", panel_size_min=15000, panel_size_max=15000)
    vs_all = ViewSpec(panel_selection="preselected", panel_size_min=1e5, panel_size_max=1e5)
    cases = [
        (var10k, p6400, (3600, 6400)),
        (var20k, p6400, (6400, 6400)),
        (var20k, unbalanced, (5000, 15000)),
        (var10k, unbalanced, (5000, 5000)),  # reference: view 1 empty; here split in half
        (var20k, vs_all, (500, 19500)),  # view 2: every gene outside the panel
        (var20k, replace_spec(vs_all, panel_overlap=1.0), (500, 20000)),
    ]
    for var, spec, sizes in cases:
        g1, g2, _ = draw_gene_sets(var, panel, ["hs/p.csv"], spec, rng)
        assert (len(g1), len(g2)) == sizes


@pytest.mark.parametrize("empty", [range(8), (0, 3, 7)], ids=["all", "some"])
@pytest.mark.parametrize("strategy", ["top-nonzero", "random-nonzero", "top"])
@pytest.mark.parametrize("normalization", ["raw", "binning/10", "totalcount_log1p"])
def test_empty_cells_give_cls_only_views(empty, strategy, normalization):
    batch = _packed(300, 8, np.random.default_rng(1), empty=set(empty))
    spec = ViewSpec(max_tokens=20, gene_sampling_strategy=strategy, normalization=normalization)
    batch.views = plan_views(batch, spec, vocab_size=302)
    views = build_views(batch.to("cpu"), normalization)
    cu_in, cu = batch.cu_seqlens.numpy(), views.cu_seqlens.numpy()
    assert views.items_mask.all()  # kept, as the reference keeps them
    for i in range(len(batch)):
        cell = batch.tokens[cu_in[i] : cu_in[i + 1]].long()
        for v, genes in enumerate(batch.views.gene_sets):
            s = v * len(batch) + i
            seq = views.tokens[cu[s] : cu[s + 1]].tolist()
            vals = views.values[cu[s] : cu[s + 1]]
            assert seq[0] == 0 and vals[0] == 0  # CLS first
            if strategy.startswith("top"):
                assert seq[1:] == _reference_view(cell, genes, strategy, 20)
            if i in empty:  # CLS only, or (top) the view's first genes at value 0
                assert seq[1:] == ([] if strategy != "top" else sorted(genes.tolist())[:20])
                assert not vals.any()
    if strategy != "top":  # the training filter drops them, as the reference's qc mask
        n = np.diff(cu) - 1
        qc = plan_views(batch, replace_spec(spec, qc_threshold=0.0), vocab_size=302)
        assert qc.items_mask.tolist() == ((n[:8] > 0) & (n[8:] > 0)).tolist()
        assert not qc.items_mask[list(empty)].any()


def test_panels_load_from_the_project(compiled):
    panels = Panels.load(compiled / "panels", {"hsapiens": _mapping(compiled)})
    assert 2 <= len(panels.names["hsapiens"]) <= 4
    assert all(np.all(t >= 2) and np.all(np.diff(t) > 0) for t in panels.tokens["hsapiens"])


def _view_lengths(b, max_tokens):
    """Per cell and view: the reference's seq_length (expressed genes of the view, capped)."""
    cu = b.cu_seqlens.numpy()
    out = []
    for genes in b.views.gene_sets:
        member = set(genes.tolist())
        cells = [b.tokens[cu[i] : cu[i + 1]].tolist() for i in range(len(b))]
        out.append(np.array([min(sum(t in member for t in c), max_tokens) for c in cells]))
    return out


def test_feature_drop_qc_and_token_budget(compiled):
    base = ViewSpec(max_tokens=1000, panel_size_min=0.3, panel_size_max=0.3)
    lengths = lambda views: np.mean([np.diff(v.cu_seqlens.numpy()).mean() for _, v in views])  # noqa: E731
    assert lengths(_views(compiled, replace_spec(base, feature_max_drop_rate=0.9))) < 0.8 * lengths(
        _views(compiled, base)
    )
    kept = dropped = 0
    for b, v in _views(compiled, replace_spec(base, qc_threshold=0.15)):
        n = np.diff(v.cu_seqlens.numpy()) - 1
        l1, l2 = _view_lengths(b, 1000)
        g1, g2 = (len(g) for g in b.views.gene_sets)
        want = (l1 > 0.15 * g1) & (l2 > 0.15 * g2)  # the reference's qc_mask
        assert v.items_mask.tolist() == want.tolist()
        assert np.array_equal(n[: len(b)], np.where(want, l1, 0))  # dropped: CLS only
        assert np.array_equal(n[len(b) :], np.where(want, l2, 0))
        kept, dropped = kept + want.sum(), dropped + (~want).sum()
    assert kept and dropped  # both cases happen
    truncated = 0
    for budget in (3000, 2 * 3000):
        for b, v in _views(compiled, replace_spec(base, max_total_seq_length=budget)):
            l1, l2 = _view_lengths(b, 1000)
            total = np.cumsum(l1 + l2)  # the reference's adapt_batch_size
            want = total < budget if total[-1] > budget else np.ones(len(b), bool)
            assert v.items_mask.tolist() == want.tolist()
            truncated += not want.all()
    assert truncated
    for _, v in _views(compiled, replace_spec(base, max_total_seq_length=3000, train=False)):
        assert v.items_mask.all()  # validation ignores the training-only filters


def test_token_budget_after_qc():
    """Cells dropped by qc do not count toward the budget; reaching it exactly drops."""
    batch = _packed(300, 16, np.random.default_rng(2), empty={1})
    spec = ViewSpec(max_tokens=60, panel_size_min=100, panel_size_max=100, qc_threshold=0.5)
    batch.views = plan_views(batch, spec, vocab_size=302)
    l1, l2 = _view_lengths(batch, 60)
    qc = (l1 > 50) & (l2 > 50)
    dropped = np.flatnonzero(~qc & (l1 + l2 > 0))[0]  # dropped by qc, but has genes
    at = int(np.flatnonzero(qc & (np.arange(16) > dropped))[1])  # the budget is reached here
    budget = int(np.cumsum((l1 + l2) * qc)[at])
    plan = plan_views(batch, replace_spec(spec, max_total_seq_length=budget), vocab_size=302)
    assert plan.items_mask.tolist() == (qc & (np.arange(16) < at)).tolist()


def replace_spec(spec, **kw):
    from dataclasses import replace

    return replace(spec, **kw)


def test_normalizations_per_cell(compiled):
    loader = TokenLoader(store_paths(compiled, "hs_csr_a"), batch_size=16, block_size=8)
    b = next(iter(loader)).to("cpu")
    cu = b.cu_seqlens
    raw = b.values
    i = 3
    seg = slice(int(cu[i]), int(cu[i + 1]))
    total = b.total_counts[i]
    assert torch.allclose(normalize_values(b, "log1p")[seg], torch.log1p(raw[seg]))
    assert torch.allclose(normalize_values(b, "totalcount")[seg], raw[seg] / (total + 1e-3) * 1e4)
    tl = normalize_values(b, "totalcount_log1p")[seg]
    assert torch.allclose(tl, torch.log1p(raw[seg] / (total + 1e-3) * 1e4))
    bins = normalize_values(b, "binning/10")[seg]
    assert bins.max() == 10 and bins.min() >= 1 and torch.all(bins[:-1] >= bins[1:])
