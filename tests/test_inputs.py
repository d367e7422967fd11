"""Real-world inputs (issue 10): each layout a user may bring compiles and verifies, or
fails before doing damage with a message that says what to do."""

from __future__ import annotations

import json
import os
import subprocess
import tracemalloc
import warnings
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from concept.config import ConfigError, load_config
from concept.datamodule import read_mappings, resolve_stores
from concept.h5ad import H5adSource
from concept.splits import resolve_split_list
from concept.store import open_store
from concept.vocab import InputError, read_panel, read_token_mapping
from preprocess import compile as cli
from preprocess import verify

N_GENES = 40
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]
SYMBOLS = [f"GENE{i}" for i in range(N_GENES)]


def counts(n_cells: int, seed: int, n_genes: int = N_GENES, density: float = 0.3) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng)
    x.data = np.ceil(x.data * 20).astype(np.float32)
    return x


def anndata(x, genes=GENES, **var_columns) -> ad.AnnData:
    n = x.shape[0]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(["B", "T"] * (n // 2) + ["B"] * (n % 2))},
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(var_columns, index=list(genes)))


class Project:
    """A project folder with one human split (``source_name`` "mine") of given files."""

    def __init__(self, root: Path, vocab_ids=GENES):
        self.root = root
        self.h5 = root / "data/mine/h5ads"
        self.h5.mkdir(parents=True)
        self.mapping = root / "references/vocabulary/token_mappings_per_specie/hsapiens.csv"
        self.mapping.parent.mkdir(parents=True)
        rows = ["<cls>,,0", "<pad>,,1"] + [
            f"{g},{s},{i + 2}" for i, (g, s) in enumerate(zip(vocab_ids, SYMBOLS, strict=True))
        ]
        self.mapping.write_text("gene_id,gene_name,token\n" + "\n".join(rows) + "\n")
        self.conf = root / "conf"
        self.split(["a.h5ad"])

    def split(self, train, val=(), extra: str = "") -> None:
        folder = self.conf / "datamodule/split_cellxgene_hsapiens"
        folder.mkdir(parents=True, exist_ok=True)
        entries = json.dumps(train) if not isinstance(train, str) else train
        (folder / "split_mine.yaml").write_text(
            "source_name: mine\nspecies: hsapiens\n"
            "source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads\n"
            f"train: {entries}\nval: {json.dumps(list(val))}\n{extra}"
        )

    def write(self, name: str, adata: ad.AnnData) -> Path:
        path = self.h5 / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (adata.write_zarr if name.endswith(".zarr") else adata.write_h5ad)(path)
        return path

    def config(self, *overrides: str):
        return load_config(
            [
                f"PATH.PROJECT_PATH={self.root}",
                "datamodule/split_cellxgene_hsapiens=split_mine",
                "compile.register=false",
                "compile.workers=1",
                "datamodule.obs_keys=[dataset,cell_type]",
                *overrides,
            ],
            config_dir=self.conf,
        )

    def compile(self, *overrides: str) -> tuple[int, dict]:
        code = cli.run(self.config(*overrides))
        report = json.loads((self.root / "compiled/compile_report.json").read_text())
        return code, {f["name"]: f for f in report["files"]}

    def store(self, name: str):
        return open_store(self.root / "compiled/mine" / f"{name}.zarr")


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path / "project")


def cells_of(store) -> dict[int, tuple[list, list]]:
    """Source row -> (tokens, values) of every stored cell."""
    tokens, values, indptr = store.cells(0, len(store))
    return {
        int(r): (
            tokens[indptr[i] : indptr[i + 1]].tolist(),
            values[indptr[i] : indptr[i + 1]].tolist(),
        )
        for i, r in enumerate(store.rows)
    }


def assert_matches_source(project: Project, name: str, source: Path) -> None:
    """Every cell of the store equals verify's independent recomputation from the source."""
    store = project.store(name)
    mapping = read_token_mapping(project.mapping)
    assert verify.verify_store(source, store, mapping, sample=len(store)) == []


# --- 1. store names ---------------------------------------------------------------------


def test_same_file_name_in_two_folders_gets_two_stores(project, capsys):
    """sample1/adata.h5ad and sample2/adata.h5ad (cellranger's layout): two stores, each
    with its own file's cells, on the first run and the next; verify and LaminDB agree."""
    from preprocess.registry import lookup_stores

    x1, x2 = counts(10, 1), counts(14, 2)
    p1 = project.write("sample1/adata.h5ad", anndata(x1))
    p2 = project.write("sample2/adata.h5ad", anndata(x2))
    project.split(["sample1/adata.h5ad", "sample2/adata.h5ad"])
    code, files = project.compile("compile.register=true")
    assert code == 0
    assert {n: f["status"] for n, f in files.items()} == {
        "mine/sample1/adata": "compiled",
        "mine/sample2/adata": "compiled",
    }
    for name, x, path in (("sample1/adata", x1, p1), ("sample2/adata", x2, p2)):
        store = project.store(name)
        assert len(store) == x.shape[0]
        assert np.allclose(np.sort(store.total_counts), np.sort(np.asarray(x.sum(1)).ravel()))
        assert_matches_source(project, name, path)
    code, files = project.compile()
    assert code == 0 and {f["status"] for f in files.values()} == {"skipped"}
    cfg = project.config()
    keys = ["compiled/mine/sample1/adata.zarr", "compiled/mine/sample2/adata.zarr"]
    found = lookup_stores(cfg.PATH.LAMIN_ROOT, cfg.PATH.COMPILED_ROOT, keys)
    assert found == {k: str(project.root / k) for k in keys}
    capsys.readouterr()
    assert verify.run(cfg) == 0
    out = capsys.readouterr().out
    assert "ok   mine/sample1/adata: 10 cells checked" in out
    assert "ok   mine/sample2/adata: 14 cells checked" in out


def test_two_files_for_one_store_fail_before_any_work(project):
    project.write("a.h5ad", anndata(counts(10, 1)))
    project.write("a.zarr", anndata(counts(12, 2)))
    project.split(["a.h5ad", "a.zarr"])
    with pytest.raises(ConfigError) as e:
        cli.run(project.config())
    msg = str(e.value)
    assert "would share the store mine/a.zarr" in msg and str(project.h5 / "a.zarr") in msg
    assert "rename one of them" in msg and "nothing compiled" in msg
    assert not (project.root / "compiled").exists()


def test_split_entry_outside_source_path_is_refused(project):
    split = {"source_name": "s", "species": "hsapiens", "source_path": "/data/s"}
    with pytest.raises(ConfigError, match=r"'../x.h5ad' is outside source_path /data/s"):
        resolve_split_list([{**split, "train": ["../x.h5ad"]}], "train")


# --- 3. files written before anndata 0.7 --------------------------------------------------


def write_legacy(adata: ad.AnnData, path: Path, raw: ad.AnnData | None = None) -> None:
    """``adata`` in anndata < 0.7's layout: compound obs/var datasets (first field the index),
    categoricals as codes with ``uns/<col>_categories``, h5sparse CSR matrices, raw.X."""

    def frame(df: pd.DataFrame) -> np.ndarray:
        fields = [("index", f"S{max(len(s) for s in df.index)}")]
        columns = [np.asarray(df.index, "S")]
        for c in df.columns:
            col = df[c]
            if isinstance(col.dtype, pd.CategoricalDtype):
                fields.append((c, "i1"))
                columns.append(col.cat.codes.to_numpy().astype("i1"))
            else:
                fields.append((c, f"S{max(len(str(v)) for v in col)}"))
                columns.append(col.astype(str).to_numpy().astype("S"))
        return np.rec.fromarrays(columns, dtype=fields)

    def matrix(f, key: str, x) -> None:
        if sp.issparse(x):
            g = f.create_group(key)
            g.attrs["h5sparse_format"] = "csr"
            g.attrs["h5sparse_shape"] = np.array(x.shape)
            g["data"], g["indices"], g["indptr"] = x.data, x.indices, x.indptr
        else:
            f.create_dataset(key, data=x)

    with h5py.File(path, "w") as f:
        f.create_dataset("obs", data=frame(adata.obs))
        f.create_dataset("var", data=frame(adata.var))
        matrix(f, "X", adata.X)
        for c in adata.obs.columns:
            if isinstance(adata.obs[c].dtype, pd.CategoricalDtype):
                cats = np.asarray(adata.obs[c].cat.categories, "S")
                f.create_dataset(f"uns/{c}_categories", data=cats)
        if raw is not None:
            matrix(f, "raw.X", raw.X)
            f.create_dataset("raw.var", data=frame(raw.var))


def test_legacy_h5ad_compiles_from_raw(project):
    """scanpy's pbmc68k_reduced layout: log-normalized dense X over some genes, counts in
    the old raw.X over all genes, compound obs/var."""
    x = counts(21, 3)
    full = anndata(x)
    reduced = ad.AnnData(np.log1p(x[:, :10].toarray()), obs=full.obs, var=full.var.iloc[:10])
    path = project.h5 / "a.h5ad"
    write_legacy(reduced, path, raw=full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = ad.read_h5ad(path)  # anndata itself reads it
    assert (x != read.raw.X).nnz == 0 and list(read.obs["cell_type"][:2]) == ["B", "T"]
    with h5py.File(path) as f, pytest.raises(ValueError, match="Field _index"):
        f["var"]["_index"]  # what the old fast path tripped over
    code, files = project.compile()
    assert code == 0, files["mine/a"]["error"]
    assert "written by anndata < 0.7" in " ".join(files["mine/a"]["warnings"])
    store = project.store("a")
    assert store.attrs["x_source"] == "raw" and len(store) == 21 and store.attrs["nnz"] == x.nnz
    assert_matches_source(project, "a", path)
    codes, cats = store.obs("cell_type")
    assert [cats[c] for c in codes] == ["B" if r % 2 == 0 else "T" for r in store.rows]


def test_legacy_h5ad_embeds_like_the_current_file(tmp_path, tmp_path_factory, compiled):
    """embed reads an anndata < 0.7 file exactly as the same data written today."""
    from test_embed import trained_run

    from concept import Concept

    run = trained_run(tmp_path_factory.getbasetemp(), compiled)
    src = compiled / "data/synth_cxg/h5ads/hs_csr_e.h5ad"
    current = ad.read_h5ad(src)
    current.obs = current.obs[["cell_type"]]
    legacy = tmp_path / "legacy.h5ad"
    write_legacy(current, legacy)
    model = Concept.from_pretrained(run)
    want = model.embed(src, species="hsapiens", device="cpu", precision="32")
    got = model.embed(legacy, species="hsapiens", device="cpu", precision="32")
    assert got.shape == (current.n_obs, want.shape[1]) and np.allclose(got, want, atol=1e-6)


# --- 4. AnnData .zarr ---------------------------------------------------------------------


def test_zarr_anndata_compiles_and_verifies(project, capsys):
    x = counts(17, 4)
    a = anndata(x)
    a.raw = a
    path = project.write("donor.zarr", a)
    project.split(["donor.zarr"])
    code, files = project.compile()
    assert code == 0, files
    store = project.store("donor")
    assert len(store) == 17 and store.attrs["nnz"] == x.nnz and store.attrs["x_source"] == "raw"
    assert_matches_source(project, "donor", path)
    code, files = project.compile()
    assert files["mine/donor"]["status"] == "skipped"  # the folder's fingerprint is stable
    cfg = project.config()
    stores = resolve_stores(cfg, read_mappings(cfg))  # training finds it current
    assert stores.train == [project.root / "compiled/mine/donor.zarr"]
    capsys.readouterr()
    assert verify.run(project.config()) == 0
    assert "ok   mine/donor: 17 cells checked" in capsys.readouterr().out


# --- 5. CSC in bounded memory -------------------------------------------------------------


def test_csc_compiles_exactly_like_csr(project):
    x = counts(300, 5, density=0.2)
    project.write("rows.h5ad", anndata(x))
    project.write("cols.h5ad", anndata(x.tocsc()))
    project.split(["rows.h5ad", "cols.h5ad"])
    code, files = project.compile("compile.entries_per_read=300", "compile.rows_per_read=64")
    assert code == 0
    assert files["mine/cols"]["peak_rss_mib"] > 0  # the report states the peak
    a, b = project.store("rows"), project.store("cols")
    assert cells_of(a) == cells_of(b)
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.total_counts, b.total_counts)
    assert_matches_source(project, "cols", project.h5 / "cols.h5ad")


def test_csc_reader_never_holds_the_matrix(tmp_path):
    """Row blocks of a CSC file equal scipy's conversion, and the reader's peak traced
    memory stays far below the matrix's own size."""
    x = counts(6000, 400, n_genes=400, density=0.1)  # 240k entries: 1.9 MB of data+indices
    path = tmp_path / "csc.h5ad"
    anndata(x.tocsc(), genes=[f"g{i}" for i in range(400)]).write_h5ad(path)
    matrix_bytes = x.nnz * (4 + 4)
    with H5adSource(path) as src:
        assert src.encoding == "csc_matrix"
        tracemalloc.start()
        got, peak, base = [], 0, 0
        for a, indptr, indices, data in src.blocks(128, max_entries=4000, scratch_dir=tmp_path):
            assert indptr[-1] - indptr[0] <= 4000 or len(indptr) == 2
            peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
            got.append((a, indptr.copy(), indices.copy(), data.copy()))
            tracemalloc.reset_peak()  # the blocks kept for the check are not the reader's
            base = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    assert peak < matrix_bytes / 4, (peak, matrix_bytes)
    rebuilt = sp.vstack(
        [sp.csr_matrix((d, i, p - p[0]), shape=(len(p) - 1, 400)) for _, p, i, d in got]
    )
    assert [a for a, *_ in got] == sorted(a for a, *_ in got)
    assert (rebuilt != x).nnz == 0
    assert not list(tmp_path.glob(".csc-*"))  # scratch removed


# --- 6. messages that say what to do ------------------------------------------------------


def test_only_layer_is_used_and_said(project):
    x = counts(12, 6)
    a = anndata(x)
    project.write("a.h5ad", ad.AnnData(X=None, obs=a.obs, var=a.var, layers={"counts": x}))
    code, files = project.compile()
    assert code == 0
    assert "no X or raw/X: reading layers/counts, the file's only matrix" in " ".join(
        files["mine/a"]["warnings"]
    )
    store = project.store("a")
    assert store.attrs["x_source"] == "layers/counts" and store.attrs["nnz"] == x.nnz
    assert_matches_source(project, "a", project.h5 / "a.h5ad")


def test_several_layers_and_no_x_name_the_choices(project):
    x = counts(12, 6)
    a = anndata(x)
    path = project.write(
        "a.h5ad", ad.AnnData(X=None, obs=a.obs, var=a.var, layers={"counts": x, "spliced": x})
    )
    code, files = project.compile()
    err = files["mine/a"]["error"]
    assert code == 1 and str(path) in err
    assert "no X or raw/X; the file's matrices are ['layers/counts', 'layers/spliced']" in err
    assert "compile.x_source=<matrix>" in err
    code, files = project.compile("compile.x_source=layers/spliced")
    assert code == 0 and project.store("a").attrs["x_source"] == "layers/spliced"


def test_symbols_in_var_names_ids_in_a_column(project):
    """scanpy's 10x layout: the column with the vocabulary's ids is found and named."""
    x = counts(12, 7)
    project.write("a.h5ad", anndata(x, genes=SYMBOLS, gene_ids=GENES, feature_types=["GEX"] * 40))
    code, files = project.compile()
    assert code == 0
    note = " ".join(files["mine/a"]["warnings"])
    assert "genes matched on var column 'gene_ids' (40 of 40)" in note
    assert "compile.var_column=gene_ids" in note
    store = project.store("a")
    assert store.attrs["var_source"] == "var/gene_ids" and files["mine/a"]["coverage"] == 1.0
    assert_matches_source(project, "a", project.h5 / "a.h5ad")


def test_lower_case_ids_match(project):
    x = counts(12, 7)
    project.write("a.h5ad", anndata(x, genes=[g.lower() for g in GENES]))
    code, files = project.compile()
    assert code == 0 and files["mine/a"]["coverage"] == 1.0 and not files["mine/a"]["warnings"]
    assert_matches_source(project, "a", project.h5 / "a.h5ad")


def test_no_id_column_names_the_candidates(project):
    project.write("a.h5ad", anndata(counts(12, 7), genes=SYMBOLS, feature_types=["GEX"] * 40))
    code, files = project.compile()
    err = files["mine/a"]["error"]
    assert code == 1
    assert "no gene overlaps the hsapiens vocabulary: var_names look like" in err
    assert "['GENE0', 'GENE1', 'GENE2']" in err and "['ENSG00000000000'" in err
    assert "(columns: ['feature_types'])" in err and "compile.var_column=" in err


def test_token_mapping_with_bom_and_missing_columns(project):
    project.write("a.h5ad", anndata(counts(12, 8)))
    text = project.mapping.read_text()
    project.mapping.write_text("\ufeff" + text)
    assert read_token_mapping(project.mapping).tokens_of(GENES[:2]).tolist() == [2, 3]
    code, files = project.compile()
    assert code == 0 and files["mine/a"]["coverage"] == 1.0
    project.mapping.write_text("\ufeffgene_id,gene_name,tok\n<cls>,,0\n")
    with pytest.raises(InputError) as e:
        read_token_mapping(project.mapping)
    assert "lacks column(s) ['token'] (columns found: ['gene_id', 'gene_name', 'tok'])" in str(
        e.value
    )


def test_panel_with_bom_and_lower_case_header(tmp_path):
    path = tmp_path / "hsapiens" / "p.csv"
    path.parent.mkdir()
    path.write_text("\ufeffensembl_id,name\nENSG00000000003.4,A\n\nensg00000000005,B\n")
    assert read_panel(path).gene_ids == ["ENSG00000000003", "ENSG00000000005"]
    path.write_text("\ufeffgene,name\nENSG1,A\n")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['Ensembl_ID'\] \(columns found"):
        read_panel(path)


@contextmanager
def tmpfs(path: Path, size: str):
    """A real size-limited file system at ``path`` (root only: a mount)."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(cmd, capture_output=True).returncode:
        pytest.skip("needs mount (root) for a size-limited or read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_names_enospc_and_keeps_earlier_stores(project, tmp_path):
    project.write("small.h5ad", anndata(counts(4, 9)))
    project.write("big.h5ad", anndata(counts(4000, 10, n_genes=N_GENES, density=0.9)))
    root = tmp_path / "disk"
    with tmpfs(root, "400k"):
        project.split(["small.h5ad"])
        assert cli.run(project.config(f"PATH.COMPILED_ROOT={root}")) == 0
        before = cells_of(open_store(root / "mine/small.zarr"))
        project.split(["small.h5ad", "big.h5ad"])
        assert cli.run(project.config(f"PATH.COMPILED_ROOT={root}")) == 1
        report = json.loads((root / "compile_report.json").read_text())
        files = {f["name"]: f for f in report["files"]}
        err = files["mine/big"]["error"]
        assert files["mine/small"]["status"] == "skipped"
        assert "no space left on device (ENOSPC)" in err and str(root) in err
        assert "PATH.COMPILED_ROOT to a larger disk" in err
        assert cells_of(open_store(root / "mine/small.zarr")) == before
        left = sorted(p.name for p in (root / "mine").iterdir() if not p.name.endswith(".lock"))
        assert left == ["small.zarr"]  # no half store, no temporary folder


def test_read_only_compiled_folder_is_one_clear_error(project, tmp_path):
    project.write("a.h5ad", anndata(counts(6, 11)))
    root = tmp_path / "ro"
    with tmpfs(root, "4m"):
        assert cli.run(project.config(f"PATH.COMPILED_ROOT={root}")) == 0
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        with pytest.raises(ConfigError) as e:
            cli.run(project.config(f"PATH.COMPILED_ROOT={root}"))
        assert f"{root} is not writable (Read-only file system)" in str(e.value)
        assert "set PATH.COMPILED_ROOT to a writable folder" in str(e.value)
        assert len(open_store(root / "mine/a.zarr")) == 6


def test_missing_project_path_writes_nothing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"PATH.PROJECT_PATH=.*nope does not exist"):
        cli.run(load_config([f"PATH.PROJECT_PATH={missing}", "compile.register=false"]))
    assert not missing.exists()


# --- 7. a split's file list written as a string -------------------------------------------


def test_split_file_as_string_is_one_file(project):
    project.write("donor1.h5ad", anndata(counts(8, 12)))
    project.split("donor1.h5ad")
    code, files = project.compile()
    assert code == 0 and list(files) == ["mine/donor1"] and len(project.store("donor1")) == 8
    split = {"source_name": "s", "species": "hsapiens", "source_path": "/d", "train": 3}
    with pytest.raises(ConfigError, match=r"'s' train: expected a list of file names, got 3"):
        resolve_split_list([split], "train")


# --- 8. versioned ids in the vocabulary ---------------------------------------------------


def test_versioned_vocabulary_ids_match_unversioned_files(tmp_path):
    p = Project(tmp_path / "project", vocab_ids=[f"{g}.{i % 7 + 1}" for i, g in enumerate(GENES)])
    x = counts(10, 13)
    p.write("a.h5ad", anndata(x))
    code, files = p.compile()
    assert code == 0 and files["mine/a"]["coverage"] == 1.0
    assert p.store("a").attrs["nnz"] == x.nnz
    assert_matches_source(p, "a", p.h5 / "a.h5ad")
    ids = "ENSG00000000001.1,2\nensg00000000001.2,3"
    p.mapping.write_text(f"gene_id,token\n<cls>,0\n<pad>,1\n{ids}\n")
    with pytest.raises(InputError, match=r"'ENSG00000000001' \('ENSG00000000001.1' and 'ensg0"):
        read_token_mapping(p.mapping)


# --- 9. verify checks every store ----------------------------------------------------------


def test_verify_reports_every_failure_at_the_end(project, capsys):
    for name in ("a", "b", "c"):
        project.write(f"{name}.h5ad", anndata(counts(9, ord(name))))
    project.split(["a.h5ad", "b.h5ad", "c.h5ad"])
    assert project.compile()[0] == 0
    (project.h5 / "a.h5ad").unlink()  # a deleted source
    (project.root / "compiled/mine/b.zarr/zarr.json").unlink()  # a broken store
    capsys.readouterr()
    assert verify.run(project.config()) == 1
    out, err = capsys.readouterr()
    assert "FAIL mine/a: not checked" in out and "FAIL mine/b: not checked" in out
    assert "ok   mine/c: 9 cells checked" in out
    assert "2 of 3 store(s) failed verification:" in err
    assert f"mine/a: {project.h5 / 'a.h5ad'}: source not found" in err
    assert "mine/b:" in err and "not a token store (no zarr.json)" in err


# --- 10. quiet problems said out loud ------------------------------------------------------


def test_non_integer_raw_values_are_warned_with_their_range(project, capsys):
    x = counts(10, 14)
    x.data = np.log1p(x.data)
    path = project.write("a.h5ad", anndata(x))
    code, files = project.compile()
    lo, hi = float(x.data.min()), float(x.data.max())
    warning = f"values of X are not integer counts (range {lo:.4g}..{hi:.4g})"
    assert code == 0 and any(warning in w for w in files["mine/a"]["warnings"])
    assert f"warning: {path}: {warning}" in capsys.readouterr().out


def test_duplicate_genes_are_counted_in_the_table(project, capsys):
    genes = list(GENES)
    genes[1] = GENES[0] + ".2"  # one gene twice, as two versions
    project.write("a.h5ad", anndata(counts(10, 15), genes=genes))
    code, files = project.compile()
    assert code == 0 and files["mine/a"]["duplicate_genes"] == 1
    lines = capsys.readouterr().out.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("store")))
    columns = lines[head].split()
    row = next(line for line in lines if line.startswith("mine/a ")).split()
    assert row[columns.index("dup")] == "1"
