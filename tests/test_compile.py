"""The compiler: round trips on every layout, shuffle, incremental runs, crashes, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import config

from concept.store import StoreError, open_store, store_path
from concept.tokenize import tokenize_csr
from concept.vocab import read_token_mapping
from preprocess import compile as cli
from preprocess.compile import make_jobs
from preprocess.verify import verify_store

REPO = Path(__file__).resolve().parents[1]
H5 = "data/synth_cxg/h5ads"


def _stores(project: Path) -> dict[str, Path]:
    root = project / "compiled" / "synth_cxg"
    return {p.name.removesuffix(".zarr"): p for p in sorted(root.glob("*.zarr"))}


def _arrays(path: Path) -> dict[str, np.ndarray]:
    s = open_store(path)
    out = {"indptr": s.indptr, "rows": s.rows, "var": s.var_tokens, "tc": s.total_counts}
    out["tokens"], out["values"], _ = s.cells(0, len(s))
    for k in s.obs_keys:
        out[f"obs/{k}"] = s.obs(k)[0]
    return out


def test_every_layout_round_trips(compiled):
    """Each stored cell equals an independent lexsort computation from the source file."""
    import anndata as ad

    stores = _stores(compiled)
    assert set(stores) == {
        "hs_csr_a",
        "hs_raw_b",
        "hs_csc_c",
        "hs_dense_d",
        "hs_csr_e",
        "mm_csr_a",
        "mm_raw_b",
        "mm_csr_c",
    }
    refs = compiled / "references/vocabulary/token_mappings_per_specie"
    for stem, path in stores.items():
        store = open_store(path)
        mapping = read_token_mapping(refs / f"{store.attrs['species']}.csv")
        problems = verify_store(compiled / H5 / f"{stem}.h5ad", store, mapping, sample=len(store))
        assert problems == [], (stem, problems[:3])
        # every cell's total, straight from the source matrix (not from the store)
        adata = ad.read_h5ad(compiled / H5 / f"{stem}.h5ad")
        x = adata.raw.X if store.attrs["x_source"] == "raw" else adata.X
        sums = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        assert np.array_equal(store.total_counts, sums[store.rows].astype(np.float32)), stem


def test_store_attributes_and_dtypes(compiled):
    s = open_store(_stores(compiled)["hs_raw_b"])
    assert s.attrs["x_source"] == "raw"  # counts come from raw/X, not the normalized X
    assert s.attrs["value_dtype"].startswith("uint")  # integer counts stored compactly
    assert s.attrs["format"] == "concept-token-store" and s.attrs["format_version"] == 1
    assert s.indptr.dtype == np.int64 and s.indptr[-1] == s.attrs["nnz"]
    tokens, values = s.cell(0)
    assert tokens.dtype == np.uint16
    assert np.all(np.diff(values.astype(np.int64)) <= 0)  # value descending
    ties = np.flatnonzero(np.diff(values.astype(np.int64)) == 0)
    assert np.all(tokens[ties] < tokens[ties + 1])  # ties by token ascending
    assert np.all(np.diff(s.var_tokens.astype(np.int64)) > 0)


def test_shuffle_is_a_permutation_and_rows_undo_it(compiled):
    s = open_store(_stores(compiled)["hs_csr_a"])
    rows = s.rows
    assert sorted(rows.tolist()) == list(range(len(s)))
    assert not np.array_equal(rows, np.arange(len(s)))  # actually shuffled
    with h5py.File(compiled / H5 / "hs_csr_a.h5ad") as f:
        indptr = f["X/indptr"][:]
    # n_genes of stored cell i is the nonzero count of its source row
    assert np.array_equal(s.n_genes, np.diff(indptr)[rows])


def test_obs_codes_decode_to_labels(compiled):
    import anndata as ad

    s = open_store(_stores(compiled)["hs_raw_b"])
    codes, cats = s.obs("cell_type")
    labels = ad.read_h5ad(compiled / H5 / "hs_raw_b.h5ad", backed="r").obs["cell_type"]
    want = labels.to_numpy()[s.rows]
    missing = codes == -1
    assert missing.any()  # the generator leaves some labels missing in this file
    assert all(w != w for w in want[missing])
    assert [cats[c] for c in codes[~missing]] == list(want[~missing])
    # a column the file lacks: warned, all codes -1
    dcodes, dcats = open_store(_stores(compiled)["hs_dense_d"]).obs("tissue")
    assert np.all(dcodes == -1) and dcats == []


def test_incremental_skip_and_force(project_copy):
    cfg = config(project_copy, "compile.workers=1")
    assert cli.run(cfg) == 0
    before = {k: (p / "zarr.json").stat().st_mtime_ns for k, p in _stores(project_copy).items()}
    assert cli.run(cfg) == 0
    report = json.loads((project_copy / "compiled/compile_report.json").read_text())
    assert {f["status"] for f in report["files"]} == {"skipped"}
    after = {k: (p / "zarr.json").stat().st_mtime_ns for k, p in _stores(project_copy).items()}
    assert before == after
    # a changed source is rebuilt, the others are not
    src = project_copy / H5 / "hs_csr_e.h5ad"
    os.utime(src, ns=(time.time_ns(), time.time_ns()))
    assert cli.run(cfg) == 0
    report = json.loads((project_copy / "compiled/compile_report.json").read_text())
    status = {Path(f["file"]).name: f["status"] for f in report["files"]}
    assert status["hs_csr_e.h5ad"] == "compiled" and status["hs_csr_a.h5ad"] == "skipped"
    # a setting that changes bytes rebuilds everything; force rebuilds too
    assert cli.run(config(project_copy, "compile.workers=1", "compile.shuffle_seed=1")) == 0
    assert (
        cli.run(
            config(
                project_copy, "compile.workers=1", "compile.shuffle_seed=1", "compile.force=true"
            )
        )
        == 0
    )
    report = json.loads((project_copy / "compiled/compile_report.json").read_text())
    assert {f["status"] for f in report["files"]} == {"compiled"}


def test_parallel_equals_serial(project_copy, tmp_path):
    """Two worker processes give the same bytes as one."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(project_copy, other)
    assert cli.run(config(project_copy, "compile.workers=1")) == 0
    assert cli.run(config(other, "compile.workers=2")) == 0
    for stem, path in _stores(project_copy).items():
        a, b = _arrays(path), _arrays(_stores(other)[stem])
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), stem


def test_num_shards_partitions_files(synth_project):
    cfg = config(synth_project)
    all_files = {j.source for j in make_jobs(cfg)}
    parts = [
        {
            j.source
            for j in make_jobs(
                config(synth_project, "compile.num_shards=3", f"compile.shard_index={i}")
            )
        }
        for i in range(3)
    ]
    assert set().union(*parts) == all_files and sum(map(len, parts)) == len(all_files)


def _compile_cmd(project: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "preprocess.compile",
        f"PATH.PROJECT_PATH={project}",
        "compile.register=false",
        *extra,
    ]


def test_kill_and_rerun_equals_clean_run(project_copy, tmp_path):
    """SIGKILL in the middle of a build, rerun: the stores equal an uninterrupted compile."""
    import shutil

    clean = tmp_path / "clean"
    shutil.copytree(project_copy, clean)
    assert cli.run(config(clean, "compile.workers=1")) == 0
    out_dir = project_copy / "compiled" / "synth_cxg"
    # tiny read blocks make the build slow enough to be caught mid-way
    proc = subprocess.Popen(
        _compile_cmd(project_copy, "compile.workers=1", "compile.rows_per_read=2"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(out_dir.glob(".hs_raw_b.zarr.tmp-*")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out_dir / "hs_raw_b.zarr").exists()  # never a half store under the final name
    assert list(out_dir.glob(".hs_raw_b.zarr.tmp-*"))  # killed mid-build
    assert cli.run(config(project_copy, "compile.workers=1")) == 0
    assert not list(out_dir.glob(".*.tmp-*"))  # leftovers cleaned
    for stem, path in _stores(clean).items():
        a, b = _arrays(path), _arrays(_stores(project_copy)[stem])
        assert all(np.array_equal(a[k], b[k]) for k in a), stem


def test_concurrent_compiles_do_not_collide(project_copy):
    procs = [
        subprocess.Popen(_compile_cmd(project_copy, "compile.workers=1"), cwd=REPO)
        for _ in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    refs = project_copy / "references/vocabulary/token_mappings_per_specie"
    mapping = read_token_mapping(refs / "hsapiens.csv")
    for stem, path in _stores(project_copy).items():
        assert verify_store(project_copy / H5 / f"{stem}.h5ad", open_store(path), mapping) == []


def test_tokenize_orders_float_values_and_ties():
    """Non-integer values use the distinct-value rank; ties go by token."""
    indptr = np.array([0, 4, 6])
    indices = np.array([0, 1, 2, 3, 1, 2])
    data = np.array([0.5, 2.25, 0.5, 1.0, 3.0, 3.0])
    col_tokens = np.array([9, 4, 7, -1])
    blk = tokenize_csr(indptr, indices, data, col_tokens)
    assert blk.indptr.tolist() == [0, 3, 5]
    assert blk.tokens.tolist() == [4, 7, 9, 4, 7]
    assert blk.values.tolist() == [2.25, 0.5, 0.5, 3.0, 3.0]
    assert blk.total_counts.tolist() == [4.25, 6.0]  # before vocabulary masking
    assert blk.n_genes.tolist() == [4, 2]


# --- bad input -------------------------------------------------------------------------


def _run_and_report(project: Path, *overrides: str) -> tuple[int, dict]:
    code = cli.run(config(project, "compile.workers=1", *overrides))
    report = json.loads((project / "compiled/compile_report.json").read_text())
    return code, {Path(f["file"]).name: f for f in report["files"]}


def _rewrite_x(path: Path, fn) -> None:
    import anndata as ad

    adata = ad.read_h5ad(path)
    fn(adata)
    adata.write_h5ad(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "file not found"),
        ("truncated", "unreadable or truncated"),
        ("negative", "negative expression values"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("no_overlap", "no gene overlaps"),
    ],
)
def test_bad_h5ad_fails_alone(project_copy, damage, message):
    bad = project_copy / H5 / "hs_csr_e.h5ad"
    if damage == "missing":
        bad.unlink()
    elif damage == "truncated":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    elif damage in ("negative", "nan", "inf"):
        value = {"negative": -1, "nan": np.nan, "inf": np.inf}[damage]

        def poison(adata):
            adata.X = adata.X.astype(np.float32)
            adata.X.data[5] = value

        _rewrite_x(bad, poison)
    else:

        def rename(adata):
            adata.var_names = [f"ENSXXX{i:011d}" for i in range(adata.n_vars)]

        _rewrite_x(bad, rename)
    code, files = _run_and_report(project_copy)
    assert code == 1
    assert files["hs_csr_e.h5ad"]["status"] == "failed"
    assert (
        message in files["hs_csr_e.h5ad"]["error"] and str(bad) in files["hs_csr_e.h5ad"]["error"]
    )
    others = [f for name, f in files.items() if name != "hs_csr_e.h5ad"]
    assert {f["status"] for f in others} == {"compiled"}
    assert not store_path(project_copy / "compiled", "synth_cxg", "hs_csr_e").exists()


def test_failed_rebuild_keeps_the_old_store(project_copy):
    assert cli.run(config(project_copy, "compile.workers=1")) == 0
    before = _arrays(_stores(project_copy)["hs_csr_e"])

    def poison(adata):
        adata.X = adata.X.astype(np.float32)
        adata.X.data[0] = -5

    _rewrite_x(project_copy / H5 / "hs_csr_e.h5ad", poison)
    code, files = _run_and_report(project_copy)
    assert code == 1 and files["hs_csr_e.h5ad"]["status"] == "failed"
    after = _arrays(_stores(project_copy)["hs_csr_e"])  # still the earlier, complete store
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("gene_id,gene_name\n<cls>,\n<pad>,\n", "lacks column"),
        (
            "gene_id,gene_name,token\n<cls>,,0\n<pad>,,1\nENSG1,A,2\nENSG1,B,3\n",
            "duplicate gene_id",
        ),
        ("gene_id,gene_name,token\n<cls>,,0\n<pad>,,1\nENSG1,A,5\n", "contiguous"),
        ("gene_id,gene_name,token\n<pad>,,0\n<cls>,,1\nENSG1,A,2\n", "<cls> must have token 0"),
    ],
)
def test_bad_token_mapping_fails_its_species(project_copy, content, message):
    mapping = project_copy / "references/vocabulary/token_mappings_per_specie/mmusculus.csv"
    mapping.write_text(content)
    code, files = _run_and_report(project_copy, "datamodule=DataModuleSynthMultiSpecies")
    assert code == 1
    for name, f in files.items():
        if name.startswith("mm_"):
            assert f["status"] == "failed" and message in f["error"] and str(mapping) in f["error"]
        else:
            assert f["status"] == "compiled"


def test_bad_panel_csv(project_copy):
    panel = sorted((project_copy / "panels/hsapiens").glob("*.csv"))[0]
    panel.write_text("gene,name\nENSG1,A\n")
    code, files = _run_and_report(project_copy)
    assert code == 1
    assert all(
        "panel CSV lacks column(s) ['Ensembl_ID'] (columns found: ['gene', 'name'])" in f["error"]
        and str(panel) in f["error"]
        for f in files.values()
    )


def test_duplicate_ids_after_mapping_keep_first(project_copy):
    """Two columns naming one gene (version suffixes): the first column is kept, counted."""
    path = project_copy / H5 / "hs_csr_e.h5ad"

    def duplicate(adata):
        names = list(adata.var_names)
        names[1] = names[0].split(".")[0] + ".99"
        adata.var_names = names

    _rewrite_x(path, duplicate)
    code, files = _run_and_report(project_copy)
    assert code == 0 and files["hs_csr_e.h5ad"]["duplicate_genes"] == 1
    refs = project_copy / "references/vocabulary/token_mappings_per_specie"
    store = open_store(_stores(project_copy)["hs_csr_e"])
    problems = verify_store(
        path, store, read_token_mapping(refs / "hsapiens.csv"), sample=len(store)
    )
    assert problems == []


def test_cells_without_mapped_genes_are_kept(project_copy):
    path = project_copy / H5 / "hs_csr_e.h5ad"
    mapping = read_token_mapping(
        project_copy / "references/vocabulary/token_mappings_per_specie/hsapiens.csv"
    )

    def empty_first_cells(adata):
        x = adata.X.tolil()
        x[:3, :] = 0
        unmapped = np.flatnonzero(mapping.tokens_of(list(adata.var_names)) < 0)
        x[:3, unmapped[:2]] = 7  # genes outside the vocabulary only
        adata.X = x.tocsr()

    _rewrite_x(path, empty_first_cells)
    code, files = _run_and_report(project_copy)
    assert code == 0 and files["hs_csr_e.h5ad"]["n_cells_unmapped"] == 3
    store = open_store(_stores(project_copy)["hs_csr_e"])
    empty = np.flatnonzero(np.diff(store.indptr) == 0)
    assert sorted(store.rows[empty].tolist()) == [0, 1, 2]
    assert np.all(store.total_counts[empty] == 14)  # counted before vocabulary masking


def test_open_store_rejects_non_stores(tmp_path):
    with pytest.raises(StoreError, match="not a token store"):
        open_store(tmp_path)
    (tmp_path / "zarr.json").write_text(
        json.dumps({"attributes": {"format": "concept-token-store", "format_version": 99}})
    )
    with pytest.raises(StoreError, match="format_version 99"):
        open_store(tmp_path)


def test_compile_registers_stores_in_lamindb(project_copy):
    """compile.register=true: every store an artifact, re-running adds nothing."""
    from preprocess.registry import lookup_stores

    cfg = config(project_copy, "compile.workers=1", "compile.register=true")
    assert cli.run(cfg) == 0
    keys = [f"compiled/synth_cxg/{stem}.zarr" for stem in _stores(project_copy)]
    found = lookup_stores(cfg.PATH.LAMIN_ROOT, cfg.PATH.COMPILED_ROOT, keys)
    assert found == {k: str(project_copy / "compiled" / k.removeprefix("compiled/")) for k in keys}
    assert cli.run(cfg) == 0  # idempotent: nothing new
    assert lookup_stores(cfg.PATH.LAMIN_ROOT, cfg.PATH.COMPILED_ROOT, keys) == found


@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.int64, np.float32, np.float64])
def test_tokenize_equals_a_lexsort_per_cell(dtype):
    """Random cells, tokens not in column order, ties and large values: every cell equals
    an independent per-cell lexsort (value descending, token ascending), in the asked cell
    order, with reused buffers."""
    import scipy.sparse as sp

    rng = np.random.default_rng(int(np.dtype(dtype).itemsize))
    n_cells, n_genes = 40, 300
    dense = rng.integers(0, 6, (n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.4)
    dense[::7] *= 5000  # values beyond a byte and the counting sort's range
    dense = dense.astype(dtype)
    if dense.dtype.kind == "f":
        dense[::3] = dense[::3] / 4  # non-integer values
    x = sp.csr_matrix(dense)
    col_tokens = rng.permutation(n_genes) + 2
    col_tokens[rng.random(n_genes) < 0.1] = -1
    order = rng.permutation(n_cells)
    out = (np.empty(x.nnz, np.uint16), np.empty(x.nnz, np.uint64))
    blk = tokenize_csr(x.indptr, x.indices, x.data, col_tokens, cells=order, out=out)
    for i, row in enumerate(order):
        cols = np.flatnonzero((dense[row] != 0) & (col_tokens >= 0))
        vals, toks = dense[row, cols], col_tokens[cols]
        want = np.lexsort((toks, -vals.astype(np.float64)))
        a, b = blk.indptr[i], blk.indptr[i + 1]
        assert blk.tokens[a:b].tolist() == toks[want].tolist()
        assert blk.values[a:b].tolist() == vals[want].tolist() and blk.values.dtype == dtype
        assert blk.total_counts[i] == dense[row].sum(dtype=np.float64)
        assert blk.n_genes[i] == np.count_nonzero(dense[row])


@pytest.mark.parametrize("io", ["direct", "page cache", "direct refused"])
@pytest.mark.parametrize("value_dtype", [np.float16, np.uint8])
def test_writer_writes_zarrs_own_bytes(tmp_path, value_dtype, io, monkeypatch):
    """The writer's store (it writes every file of an uncompressed store itself, zarr.json
    included) equals what zarr writes for the same data, file by file: a zero chunk
    omitted, a zero shard absent, a padded tail, 2-D and empty per-cell arrays, float and
    one-byte dtypes (zarr drops their endianness), nested groups, attributes; with the
    shards' whole pages written with O_DIRECT, through the page cache, and where the
    filesystem refuses O_DIRECT (EINVAL: written through the page cache)."""
    import errno

    import zarr

    from preprocess import writer
    from preprocess.writer import StoreWriter

    opened = []
    if io == "page cache":
        monkeypatch.setattr(writer, "DIRECT", 0)
    else:
        real_open = os.open

        def tracked_open(path, flags, *a):
            if flags & writer.DIRECT:
                opened.append(path)
                if io == "direct refused":
                    raise OSError(errno.EINVAL, "Invalid argument", str(path))
            return real_open(path, flags, *a)

        monkeypatch.setattr(writer.os, "open", tracked_open)

    rng = np.random.default_rng(0)
    s = {"chunk_elements": 256, "shard_elements": 4096, "cell_chunk": 64, "compressor": None}
    n = 3 * 4096 + 100
    values = rng.integers(1, 200, n).astype(value_dtype)
    values[256:512] = 0  # one chunk of zeros
    values[4096:8192] = 0  # one shard of zeros
    tokens = values.astype(np.uint16)
    cells = {
        "indptr": np.arange(201, dtype=np.int64),
        "cell/total_counts": rng.random(200).astype(np.float32),
        "obs/tissue": np.r_[np.zeros(70, np.int32), rng.integers(-1, 3, 130).astype(np.int32)],
        "obsm/emb": rng.random((200, 7)).astype(np.float32),
        "var_tokens": np.arange(5, dtype=np.uint16),
        "obs/empty": np.zeros(0, np.int32),
    }
    mine, theirs = tmp_path / "mine", tmp_path / "zarr"
    mine.mkdir()
    w = StoreWriter(mine, s, n, np.uint16, value_dtype)
    assert w.plain and w.root is None  # zarr writes nothing here
    for i in range(0, n, 777):
        w.append(tokens[i : i + 777], values[i : i + 777])
    w.close_entries()
    root = zarr.open_group(theirs, mode="a", zarr_format=3)
    for name, data in (("tokens", tokens), ("values", values)):
        kw = {"chunks": (256,), "shards": (4096,), "compressors": None, "fill_value": 0}
        root.create_array(name, shape=(n,), dtype=data.dtype, **kw)[:] = data
    for name, data in cells.items():
        attrs = {"categories": ["a", "b\u00e9"]} if name.startswith("obs/") else None
        w.cells(name, data, attrs)
        arr = root.create_array(
            name,
            shape=data.shape,
            chunks=(max(min(64, len(data)), 1), *data.shape[1:]),
            dtype=data.dtype,
            compressors=None,
            fill_value=0,
        )
        arr[:] = data
        if attrs:
            arr.attrs.update(attrs)
    w.finish({"n_cells": 200, "stat": {"size": 1}, "keys": ["a"], "dim": None})
    written = json.loads((mine / "zarr.json").read_text())["attributes"]
    assert written["format"] == "concept-token-store" and written["n_cells"] == 200
    root.update_attributes(written)
    files = sorted(p.relative_to(mine) for p in mine.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    assert "tokens/c/1" not in map(str, files)  # the zero shard is not written
    assert len([f for f in files if f.name == "zarr.json"]) == 12  # 8 arrays, the root, 3 groups
    for f in files:
        assert (mine / f).read_bytes() == (theirs / f).read_bytes(), f
    assert sorted(Path(p).relative_to(mine).as_posix() for p in opened) == (
        [] if io == "page cache" else ["tokens/c/2", "values/c/2"]
    )  # the full shard without a zero chunk (the last is shorter than a page)


def test_current_stores_are_found_by_stat_alone(project_copy, monkeypatch):
    """A run over current stores opens no source and reads no source byte (a stat each,
    with the inode and ctime recorded); a chmod (a new ctime) is noticed and rebuilds that
    file only; a store with a killed compile's leftovers goes through the locked path,
    which removes them. A file changed under two seconds ago records no identity (a write
    in the same timestamp tick could leave it unchanged): the fingerprint decides."""
    from concept import store as fmt

    src = project_copy / H5 / "hs_csr_e.h5ad"
    os.utime(src)  # changed just now
    assert "ino" not in fmt.source_stat(src, identity=True)
    assert "ino" not in fmt.source_stat(src)  # what training checks: size and mtime
    monkeypatch.setattr(fmt, "_RACY_NS", 0)
    assert set(fmt.source_stat(src, identity=True)) == {"size", "mtime_ns", "ino", "ctime_ns"}
    cfg = config(project_copy, "compile.workers=1")  # in this process: _RACY_NS is 0
    assert cli.run(cfg) == 0
    stores = _stores(project_copy)
    leftover = stores["hs_csr_a"].parent / ".hs_csr_a.zarr.tmp-99999999"
    leftover.mkdir()

    def no_read(*a, **k):
        raise AssertionError("a current store's source was read")

    with monkeypatch.context() as m:
        m.setattr(fmt, "source_fingerprint", no_read)
        m.setattr(cli, "open_source", no_read)  # the progress bar's size pass
        reports = cli.current_stores(make_jobs(cfg))
    current = {Path(r.file).stem for r in reports if r is not None}
    assert current == set(stores) - {"hs_csr_a"}
    assert all(r.status == "skipped" and r.n_cells > 0 for r in reports if r is not None)
    src.chmod(0o644 if src.stat().st_mode & 0o777 != 0o644 else 0o640)
    assert cli.run(cfg) == 0
    report = json.loads((project_copy / "compiled/compile_report.json").read_text())
    status = {Path(f["file"]).stem: f["status"] for f in report["files"]}
    assert status.pop("hs_csr_e") == "compiled" and set(status.values()) == {"skipped"}
    assert not leftover.exists()


def test_stores_put_in_place_behind_the_next_build(project_copy, monkeypatch):
    """compile_files swaps each store in on its own thread while the next file is built:
    every store ends in place; a swap that fails (a full disk) fails its file alone, with
    its temporary folder removed and its lock released (the next run compiles it)."""
    import errno

    from preprocess import compiler

    jobs = make_jobs(config(project_copy, "compile.workers=1"))
    replace = compiler.replace_store

    def full_disk_for_csr_e(tmp, out, flushed=False, sync_folder=True):
        assert flushed and not sync_folder  # the batch is flushed before and after the swaps
        if out.name == "hs_csr_e.zarr":
            raise OSError(errno.ENOSPC, "No space left on device", str(out))
        replace(tmp, out, flushed, sync_folder)

    monkeypatch.setattr(compiler, "replace_store", full_disk_for_csr_e)
    reports = {Path(r.file).stem: r for r in compiler.compile_files(jobs)}
    failed = reports.pop("hs_csr_e")
    assert failed.status == "failed" and "no space left on device" in failed.error
    assert {r.status for r in reports.values()} == {"compiled"}
    assert set(_stores(project_copy)) == set(reports)
    assert all(r.seconds > 0 and r.n_cells > 0 for r in reports.values())
    assert not list((project_copy / "compiled/synth_cxg").glob(".*.tmp-*"))
    monkeypatch.setattr(compiler, "replace_store", replace)
    again = {Path(r.file).stem: r.status for r in compiler.compile_files(jobs)}
    assert again.pop("hs_csr_e") == "compiled" and set(again.values()) == {"skipped"}


@pytest.mark.parametrize("io", ["direct", "page cache", "direct refused at write"])
def test_spill_streams_read_back_what_was_appended(tmp_path, io, monkeypatch):
    """The compiler's scratch: many streams appended to in any order, in pieces of any
    size and dtype, read back byte for byte, from one file (whatever the stream count),
    with O_DIRECT, through the page cache, and where O_DIRECT is refused at the first
    write (EINVAL: the same file through the page cache)."""
    import errno

    from preprocess import spill, writer

    if io == "page cache":
        monkeypatch.setattr(writer, "DIRECT", 0)
    refused = []
    if io == "direct refused at write":
        real = os.pwritev

        def pwritev(fd, buffers, offset):
            import fcntl

            if fcntl.fcntl(fd, fcntl.F_GETFL) & writer.DIRECT:
                refused.append(offset)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, buffers, offset)

        monkeypatch.setattr(spill.os, "pwritev", pwritev)
    monkeypatch.setattr(spill, "SPARE_EXTENTS", 2)  # streams wait for the writing thread
    rng = np.random.default_rng(0)
    n_streams = 600  # 64 KiB extents
    s = spill.Spill(tmp_path / "spill", n_streams)
    assert s.extent == 64 << 10
    expected: list[list[bytes]] = [[] for _ in range(n_streams)]
    for _ in range(3000):
        stream = int(rng.integers(n_streams)) if rng.random() < 0.7 else 7  # one long stream
        dtype = rng.choice([np.uint8, np.uint16, np.float32, np.int64])
        piece = rng.integers(0, 250, int(rng.integers(0, 40_000))).astype(dtype)
        s.append(stream, piece)
        expected[stream].append(piece.tobytes())
    assert os.listdir(tmp_path) == ["spill"]
    assert s.size(7) > 10 * s.extent  # many extents, on disk
    for stream in rng.permutation(n_streams):
        want = b"".join(expected[stream])
        got = writer.aligned_empty(20, s.size(stream), np.uint8)
        s.read(stream, got)
        assert got.tobytes() == want, stream
    s.close()
    assert os.listdir(tmp_path) == []
    assert bool(refused) == (io == "direct refused at write")


def test_many_buckets_on_disk_equal_one_in_memory(project_copy, monkeypatch):
    """A file read in many blocks (read, tokenized and spread on three threads) over many
    scratch buckets (on disk, read back one ahead of the one being written) gives the
    same store as one block in one bucket in memory: every array."""
    import shutil

    from preprocess import compiler

    other = project_copy.parent / "other"
    shutil.copytree(project_copy, other)
    assert cli.run(config(project_copy, "compile.workers=1")) == 0
    monkeypatch.setattr(compiler, "BUCKET_ELEMENTS", 20_000)  # ~25 cells per bucket
    monkeypatch.setattr(compiler, "MIN_BUCKET_CELLS", 8)
    spills = []
    real_spill = compiler.Spill

    def counted(path, n_streams):
        spills.append(n_streams)
        return real_spill(path, n_streams)

    monkeypatch.setattr(compiler, "Spill", counted)
    assert cli.run(config(other, "compile.workers=1", "compile.rows_per_read=16")) == 0
    assert len(spills) == 4 and min(spills) >= 2 * 6  # the CSR/CSC files: 6+ buckets each
    for stem, path in _stores(project_copy).items():
        a, b = _arrays(path), _arrays(_stores(other)[stem])
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), stem
    assert not list((other / "compiled").rglob("_scratch"))


def test_bad_values_mid_file_stop_the_reading_threads(project_copy):
    """A negative value in a later block of a file read in many blocks fails that file
    with the rows named, and leaves no reading or tokenizing thread behind."""
    import threading

    path = project_copy / H5 / "hs_csr_a.h5ad"
    with h5py.File(path, "r+") as f:
        indptr, data = f["X/indptr"][:], f["X/data"]
        data[indptr[150]] = -3  # row 150
    jobs = [
        j
        for j in make_jobs(config(project_copy, "compile.rows_per_read=16"))
        if "hs_csr_a" in j.source
    ]
    from preprocess.compiler import compile_file

    report = compile_file(jobs[0])
    assert report.status == "failed"
    assert "rows 144..159" in report.error and "negative" in report.error, report.error
    # the readers are joined before the error is reported
    assert not [t for t in threading.enumerate() if t.name.endswith("(produce)")]


def test_small_files_on_two_lanes_equal_one_at_a_time(project_copy, monkeypatch):
    """compile_files with two lanes (small files built two at a time on threads, each
    with buffers of its own) gives the same stores as one at a time, its reports in the
    jobs' order; a file above the size limit is built alone."""
    import shutil

    from preprocess import compiler

    other = project_copy.parent / "other"
    shutil.copytree(project_copy, other)
    serial = compiler.compile_files(make_jobs(config(project_copy, "compile.workers=1")))
    sizes = {Path(j.source).stem: os.stat(j.source).st_size for j in make_jobs(config(other))}
    big = max(sizes, key=sizes.get)
    monkeypatch.setattr(compiler, "SMALL_FILE_BYTES", sizes[big])  # all but the largest
    lanes = set()
    real = compiler._build

    def build(*args):
        lanes.add(args[-1])
        return real(*args)

    monkeypatch.setattr(compiler, "_build", build)
    jobs = make_jobs(config(other, "compile.workers=1"))
    reports = compiler.compile_files(jobs, lanes=2)
    assert [r.file for r in reports] == [j.source for j in jobs]
    assert [r.status for r in reports] == ["compiled"] * len(jobs) == [r.status for r in serial]
    assert lanes == {0, 1}
    for stem, path in _stores(project_copy).items():
        a, b = _arrays(path), _arrays(_stores(other)[stem])
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), stem
