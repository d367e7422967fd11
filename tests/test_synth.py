"""The synthetic project generator: files, layouts, labels, vocabularies, determinism and
the structure of the expression model, checked by reading the outputs back."""

from __future__ import annotations

import re

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from preprocess import synth
from preprocess.synth import CELL_TYPES, FILES, generate_project

SMALL = {"n_cells": 200, "n_genes": 3000, "pretrained_dim": 8, "progress": False}
H5ADS = "data/synth_cxg/h5ads"
PREFIX = {"hs": "ENSG", "mm": "ENSMUSG"}
SPECIES = {"hs": "hsapiens", "mm": "mmusculus"}
_VERSION = re.compile(r"\.\d+$")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, generate_project(root, seed=0, **SMALL)


def _read(root, name, **kw) -> anndata.AnnData:
    return anndata.read_h5ad(root / H5ADS / f"{name}.h5ad", **kw)


def _counts(adata: anndata.AnnData) -> sp.csr_matrix:
    """The raw counts of a file (raw/X where present) as CSR float64."""
    x = adata.raw.X if adata.raw is not None else adata.X
    return sp.csr_matrix(x, dtype=np.float64)


def _vocab(root, species: str) -> pd.DataFrame:
    path = root / "references/vocabulary/token_mappings_per_specie" / f"{species}.csv"
    return pd.read_csv(path, keep_default_na=False)


def _strip(ids) -> list[str]:
    return [_VERSION.sub("", g) for g in ids]


def _log1p_cp10k(counts: sp.csr_matrix) -> sp.csr_matrix:
    x = sp.csr_matrix(sp.diags(1e4 / np.asarray(counts.sum(axis=1)).ravel()) @ counts)
    x.sort_indices()
    x.data = np.log1p(x.data)
    return x


def _nearest_centroid_accuracy(x_train, y_train, x_test, y_test) -> float:
    types = sorted(set(y_train) - {"nan"})
    centroids = np.stack([np.asarray(x_train[y_train == t].mean(axis=0)).ravel() for t in types])
    sq = np.asarray(x_test.multiply(x_test).sum(axis=1))
    dist = sq - 2 * np.asarray(x_test @ centroids.T) + (centroids**2).sum(axis=1)
    pred = np.array(types)[dist.argmin(axis=1)]
    keep = y_test != "nan"
    return float((pred[keep] == y_test[keep]).mean())


# ----------------------------------------------------------------------------------------
# Files and layouts
# ----------------------------------------------------------------------------------------


def test_project_layout(project):
    root, summary = project
    assert summary == {
        f"{H5ADS}/{f.name}.h5ad": (50 if f.layout == "dense" else 200) for f in FILES
    }
    for rel in summary:
        assert (root / rel).is_file()
    for species in SPECIES.values():
        assert (
            root / "references/vocabulary/token_mappings_per_specie" / f"{species}.csv"
        ).is_file()
        assert (root / "references/embeddings/esm2_t30" / f"{species}.csv").is_file()
        assert 2 <= len(list((root / "panels" / species).glob("*.csv"))) <= 4
    assert (root / "model_checkpoints").is_dir()
    assert not any((root / "model_checkpoints").iterdir())
    human = root / "conf/datamodule/split_cellxgene_hsapiens/split_synth_hsapiens.yaml"
    assert human.read_text() == (
        "source_name: synth_cxg\n"
        "species: hsapiens\n"
        "source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads\n"
        "train:\n- hs_csr_a.h5ad\n- hs_raw_b.h5ad\n- hs_csc_c.h5ad\n- hs_dense_d.h5ad\n"
        "val:\n- hs_csr_e.h5ad\n"
    )
    mouse = root / "conf/datamodule/split_cellxgene_mmusculus/split_synth_mmusculus.yaml"
    assert mouse.read_text() == (
        "source_name: synth_cxg\n"
        "species: mmusculus\n"
        "source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads\n"
        "train:\n- mm_csr_a.h5ad\n- mm_raw_b.h5ad\n"
        "val:\n- mm_csr_c.h5ad\n"
    )


# name: (X format, X dtype, counts dtype); format None = dense ndarray
EXPECTED_X = {
    "hs_csr_a": ("csr", np.int32, np.int32),
    "hs_raw_b": ("csr", np.float32, np.float32),
    "hs_csc_c": ("csc", np.float32, np.float32),
    "hs_dense_d": (None, np.float32, np.float32),
    "hs_csr_e": ("csr", np.int32, np.int32),
    "mm_csr_a": ("csr", np.float32, np.float32),
    "mm_raw_b": ("csr", np.float32, np.float32),
    "mm_csr_c": ("csr", np.int32, np.int32),
}


@pytest.mark.parametrize("name", list(EXPECTED_X))
def test_h5ad_reads_back_with_promised_layout(project, name):
    root, summary = project
    fmt, x_dtype, counts_dtype = EXPECTED_X[name]
    adata = _read(root, name)
    n = summary[f"{H5ADS}/{name}.h5ad"]
    assert adata.n_obs == n
    if fmt is None:
        assert isinstance(adata.X, np.ndarray)
    else:
        assert sp.issparse(adata.X) and adata.X.format == fmt
        assert adata.X.has_sorted_indices
    assert adata.X.dtype == x_dtype
    is_raw = name.endswith("_b")
    assert (adata.raw is not None) == is_raw
    if is_raw:
        raw_x = adata.raw.X
        assert sp.issparse(raw_x) and raw_x.format == "csr" and raw_x.dtype == counts_dtype
        assert list(adata.raw.var_names) == list(adata.var_names)
    counts = _counts(adata)
    assert counts.data.min() >= 1 and np.array_equal(counts.data, np.round(counts.data))
    totals = np.asarray(counts.sum(axis=1)).ravel()
    np.testing.assert_allclose(adata.obs["n_counts"].to_numpy(), totals, rtol=1e-6)
    if is_raw:  # X is log1p(counts / total * 1e4) on the same sparsity
        expected = _log1p_cp10k(counts)
        got = sp.csr_matrix(adata.X)
        assert np.array_equal(got.indices, expected.indices)
        np.testing.assert_allclose(got.data, expected.data, rtol=1e-5)

    assert all(g.startswith(PREFIX[name[:2]]) for g in adata.var_names)
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    assert all(c.startswith(f"{name}_cell") for c in adata.obs_names)
    assert "gene_symbols" in adata.var.columns
    assert adata.var["gene_symbols"].is_unique

    obs = adata.obs
    assert isinstance(obs["cell_type"].dtype, pd.CategoricalDtype)
    assert set(obs["cell_type"].cat.categories) == set(CELL_TYPES)
    donors = set(obs["donor_id"].astype(str))
    assert 2 <= len(donors) <= 4 and all(d.startswith(f"{name}_donor") for d in donors)
    assert ("tissue" in obs.columns) == (name != "hs_dense_d")
    assert obs["cell_type"].isna().any() == (name == "hs_raw_b")

    backed = _read(root, name, backed="r")
    try:
        assert backed.shape == adata.shape
        head = backed.X[:5] if fmt != "csc" else backed.X[:, :5]
        assert head.shape[0] == (5 if fmt != "csc" else n)
    finally:
        backed.file.close()


def test_hand_written_encoding(project):
    root, _ = project
    with h5py.File(root / H5ADS / "hs_csr_a.h5ad", "r") as f:
        assert f.attrs["encoding-type"] == "anndata"
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
        assert f["X"].attrs["encoding-version"] == "0.1.0"
        assert tuple(f["X"].attrs["shape"]) == (200, len(f["var"]["_index"]))
        assert {"obs", "var", "layers", "obsm", "varm", "obsp", "varp", "uns"} <= set(f)
    with h5py.File(root / H5ADS / "hs_raw_b.h5ad", "r") as f:
        assert f["raw"].attrs["encoding-type"] == "raw"


def test_labels(project):
    root, _ = project
    raw_b = _read(root, "hs_raw_b")
    missing = raw_b.obs["cell_type"].isna().mean()
    assert 0.005 < missing < 0.15
    csr_a = _read(root, "hs_csr_a")
    # tissue follows cell type: no neuron in blood, no immune cell in brain
    cross = pd.crosstab(csr_a.obs["cell_type"], csr_a.obs["tissue"])
    assert cross.loc["neuron"].get("blood", 0) == 0
    assert cross.loc["T cell"].get("brain", 0) == 0
    assert csr_a.obs["cell_type"].nunique() >= 6


# ----------------------------------------------------------------------------------------
# Genes, vocabularies, embeddings, panels
# ----------------------------------------------------------------------------------------


def test_token_mappings(project):
    root, _ = project
    for species, prefix in (("hsapiens", "ENSG"), ("mmusculus", "ENSMUSG")):
        vocab = _vocab(root, species)
        assert list(vocab.columns) == ["gene_id", "gene_name", "token"]
        assert vocab.iloc[0].tolist() == ["<cls>", "", 0]
        assert vocab.iloc[1].tolist() == ["<pad>", "", 1]
        assert np.array_equal(vocab["token"], np.arange(len(vocab)))
        assert len(vocab) == SMALL["n_genes"] + 2
        genes = vocab.iloc[2:]
        assert genes["gene_id"].is_unique and genes["gene_name"].is_unique
        assert all(re.fullmatch(prefix + r"\d{11}", g) for g in genes["gene_id"])


def test_var_against_vocabulary(project):
    root, _ = project
    for spec in FILES:
        species = SPECIES[spec.name[:2]]
        vocab = set(_vocab(root, species)["gene_id"])
        adata = _read(root, spec.name, backed="r")
        try:
            ids = list(adata.var_names)
        finally:
            adata.file.close()
        stripped = _strip(ids)
        versioned = np.mean([s != g for s, g in zip(stripped, ids, strict=True)])
        if spec.name == "hs_csr_a":
            assert 0.05 < versioned < 0.15
        else:
            assert versioned == 0
        absent = np.mean([g not in vocab for g in stripped])
        assert 0.01 < absent < 0.06
        covered = len(vocab & set(stripped)) / (len(vocab) - 2)
        assert 0.9 < covered < 1.0
        assert (stripped == sorted(stripped)) == (spec.name != "hs_csc_c")


def test_pretrained_embeddings(project):
    root, _ = project
    for species in SPECIES.values():
        emb = pd.read_csv(root / "references/embeddings/esm2_t30" / f"{species}.csv")
        assert emb.columns[0] == "gene_id" and emb.shape[1] == 1 + SMALL["pretrained_dim"]
        vocab_ids = set(_vocab(root, species)["gene_id"].iloc[2:])
        assert set(emb["gene_id"]) <= vocab_ids
        assert 0.85 < len(emb) / len(vocab_ids) < 0.95
        values = emb.iloc[:, 1:].to_numpy()
        assert values.dtype == np.float64 and np.isfinite(values).all() and values.std() > 0.01


def test_panels(project):
    root, _ = project
    for species in SPECIES.values():
        vocab = set(_vocab(root, species)["gene_id"])
        for path in sorted((root / "panels" / species).glob("*.csv")):
            panel = pd.read_csv(path)
            assert "Ensembl_ID" in panel.columns and "gene_name" in panel.columns
            ids = panel["Ensembl_ID"]
            assert ids.is_unique and len(ids) >= 100
            absent = (~ids.isin(vocab)).sum()
            assert 3 <= absent <= 0.05 * len(ids)


# ----------------------------------------------------------------------------------------
# Determinism and expression structure
# ----------------------------------------------------------------------------------------


def test_determinism(tmp_path):
    tiny = {"n_cells": 60, "n_genes": 1000, "pretrained_dim": 4, "progress": False}
    generate_project(tmp_path / "a", seed=3, **tiny)
    generate_project(tmp_path / "b", seed=3, **tiny)
    generate_project(tmp_path / "c", seed=4, **tiny)
    for spec in FILES:
        a, b, c = (_read(tmp_path / r, spec.name) for r in "abc")
        xa, xb = _counts(a), _counts(b)
        assert (xa != xb).nnz == 0 and np.array_equal(xa.indices, xb.indices)
        pd.testing.assert_frame_equal(a.obs, b.obs)
        pd.testing.assert_frame_equal(a.var, b.var)
        assert a.shape != c.shape or (xa != _counts(c)).nnz > 0
    # Every file, the .h5ad containers included, is byte-identical for the same seed.
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    for rel in files:
        if (tmp_path / "a" / rel).is_file():
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    for rel in (
        "references/vocabulary/token_mappings_per_specie/hsapiens.csv",
        "references/embeddings/esm2_t30/mmusculus.csv",
        "panels/hsapiens/targeted_small.csv",
    ):
        assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_cell_types_separable(project):
    root, _ = project
    a = _read(root, "hs_csr_a")
    x, y = _log1p_cp10k(_counts(a)), a.obs["cell_type"].astype(str).to_numpy()
    half = a.n_obs // 2
    assert _nearest_centroid_accuracy(x[:half], y[:half], x[half:], y[half:]) > 0.9

    # Across files (other batch effect, donors and gene subset), on the shared genes.
    e = _read(root, "hs_csr_e")
    xe, ye = _log1p_cp10k(_counts(e)), e.obs["cell_type"].astype(str).to_numpy()
    ids_a, ids_e = _strip(a.var_names), list(e.var_names)
    shared = sorted(set(ids_a) & set(ids_e))
    pos_a = {g: i for i, g in enumerate(ids_a)}
    pos_e = {g: i for i, g in enumerate(ids_e)}
    cols_a, cols_e = [pos_a[g] for g in shared], [pos_e[g] for g in shared]
    assert _nearest_centroid_accuracy(x[:, cols_a], y, xe[:, cols_e], ye) > 0.9

    # Marker programs: many genes differ by > 1 (log1p units) between the mean profiles of
    # the two commonest types, next to none between two halves of one type.
    first, second = (x[y == t] for t in a.obs["cell_type"].value_counts().index[:2])

    def mean(m):
        return np.asarray(m.mean(axis=0)).ravel()

    between = (np.abs(mean(first) - mean(second)) > 1).sum()
    within = (np.abs(mean(first[::2]) - mean(first[1::2])) > 1).sum()
    assert between >= 30 and between > 10 * max(1, within)


def test_detected_genes_at_default_width(tmp_path):
    summary = generate_project(
        tmp_path, seed=1, n_cells=60, n_genes=20000, pretrained_dim=0, progress=False
    )
    assert not (tmp_path / "references/embeddings").exists()
    assert summary[f"{H5ADS}/hs_dense_d.h5ad"] == 50
    for spec in FILES:
        counts = _counts(_read(tmp_path, spec.name))
        nnz = np.diff(counts.indptr)
        assert 1000 <= nnz.mean() <= 3000, (spec.name, nnz.mean())
        assert 3000 <= np.median(np.asarray(counts.sum(axis=1))) <= 9000


def test_detected_genes_small_vocabulary(project):
    root, _ = project
    nnz = np.diff(_counts(_read(root, "mm_csr_a")).indptr)
    assert 0.1 * SMALL["n_genes"] <= nnz.mean() <= 0.5 * SMALL["n_genes"]


# ----------------------------------------------------------------------------------------
# Internals whose failures the file-level checks could miss
# ----------------------------------------------------------------------------------------


def test_count_sampler_is_poisson():
    rng = np.random.default_rng(0)
    lam = np.array([0.01, 0.3, 2.0, 12.0, 150.0])
    n = 40000
    sampler = synth._CountSampler(n, len(lam))
    rows, cols, counts = sampler.sample(np.ones((n, 1)), lam[None, :], rng)
    dense = np.zeros((n, len(lam)))
    dense[rows, cols] = counts
    for j, m in enumerate(lam):
        # 5 standard errors: of the mean, of the variance ratio, of the zero fraction
        assert abs(dense[:, j].mean() - m) < 5 * np.sqrt(m / n)
        assert abs(dense[:, j].var() / m - 1) < 5 * np.sqrt((2 + 1 / m) / n)
        p0 = np.exp(-m)
        assert abs((dense[:, j] == 0).mean() - p0) < 5 * np.sqrt(p0 * (1 - p0) / n) + 1e-4


def test_csc_sink_with_many_column_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "_CSC_BLOCK_NNZ", 500)
    full = sp.random(300, 120, density=0.1, format="csr", random_state=1, dtype=np.float64)
    full.data = np.ceil(full.data * 9)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        sink = synth._CscSink(f, "X", full.shape, np.float32, tmp_path)
        for start in range(0, 300, 64):
            chunk = full[start : start + 64].tocoo()
            order = np.lexsort((chunk.col, chunk.row))
            sink.append(chunk.row[order], chunk.col[order], chunk.data[order], chunk.shape[0])
        sink.finish()
        assert len(sink._edges) > 3
        g = f["X"]
        got = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=full.shape)
    assert got.has_sorted_indices
    assert (got != full.tocsc()).nnz == 0
    assert not list(tmp_path.glob("block*"))


def test_synthetic_store_is_a_valid_store_in_stored_order(tmp_path):
    from concept.store import check_store, open_store
    from preprocess.synth import synthetic_store

    rng = np.random.default_rng(3)
    k = np.array([1, 7, 298, 0, 150])
    codes = np.array([0, 1, 1, -1, 0], np.int32)
    path = synthetic_store(
        tmp_path / "s.zarr", k, 300, "abc", rng, obs={"tissue": (codes, ["lung", "gut"])}
    )
    assert check_store(path, vocab_sha256="abc") is None
    store = open_store(path)
    assert len(store) == 5 and store.attrs["nnz"] == k.sum()
    for i, n in enumerate(k):
        tokens, values = store.cell(i)
        assert len(tokens) == n and len(np.unique(tokens)) == n
        assert tokens.min(initial=2) >= 2 and tokens.max(initial=0) < 300
        # stored order: value descending, then token ascending
        order = np.lexsort((tokens, -values.astype(np.int64)))
        assert np.array_equal(order, np.arange(n))
        assert store.total_counts[i] == values.sum()
    assert np.array_equal(store.obs("tissue")[0], codes)
