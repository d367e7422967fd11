"""Nothing silently wrong: exact totals, no overflowed values, fingerprints that notice
in-place rewrites, staleness from store bytes only, a store swap that survives a kill."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import config

from concept import store as fmt
from concept.datamodule import read_mappings, resolve_stores, source_problems
from concept.store import check_store, open_store
from concept.tokenize import tokenize_csr
from concept.vocab import read_token_mapping
from preprocess.compile import make_jobs
from preprocess.compiler import compile_file, recover
from preprocess.verify import verify_store

REPO = Path(__file__).resolve().parents[1]
H5 = "data/synth_cxg/h5ads"
MAPPING = "references/vocabulary/token_mappings_per_specie/hsapiens.csv"


def _compile(project: Path, stem: str, *overrides: str):
    """Compile one file of the project; returns its report."""
    jobs = [j for j in make_jobs(config(project, *overrides)) if Path(j.source).stem == stem]
    assert len(jobs) == 1
    return compile_file(jobs[0])


def _store(project: Path, stem: str) -> Path:
    return project / "compiled" / "synth_cxg" / f"{stem}.zarr"


def _verify(project: Path, stem: str, **kw) -> list[str]:
    store = open_store(_store(project, stem))
    mapping = read_token_mapping(project / MAPPING)
    return verify_store(project / H5 / f"{stem}.h5ad", store, mapping, **kw)


def _rewrite_x(path: Path, fn, n_cells: int | None = None) -> np.ndarray:
    """Replace a file's X with ``fn(X as float64 CSR)``, keeping its first ``n_cells``
    cells; returns the new dense matrix."""
    adata = ad.read_h5ad(path)[:n_cells].copy()
    adata.X = sp.csr_matrix(fn(sp.csr_matrix(adata.X, dtype=np.float64)))
    adata.write_h5ad(path)
    return adata.X.toarray()


# --- 1. cell/total_counts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "empty",
    [[9], [7, 8, 9], [0, 1, 5, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], []],
    ids=["last", "several-last", "scattered", "all", "none"],
)
def test_row_sums_with_empty_rows(empty):
    """Every cell's total is its row sum, whatever rows of the block are empty."""
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 4, (10, 12)).astype(np.float32) * (rng.random((10, 12)) < 0.5)
    dense[1:, 3] += 1.5  # some non-integer values
    dense[empty] = 0
    x = sp.csr_matrix(dense)
    col_tokens = np.where(np.arange(12) % 3 == 0, -1, np.arange(12) + 2)  # some unmapped
    blk = tokenize_csr(x.indptr, x.indices, x.data, col_tokens)
    assert blk.total_counts.tolist() == dense.sum(axis=1, dtype=np.float64).tolist()
    assert blk.n_genes.tolist() == np.count_nonzero(dense, axis=1).tolist()


def test_total_counts_when_blocks_end_in_empty_rows(project_copy):
    """20 cells, rows 8-9 and 17-19 empty, read 10 rows at a time: every stored total is
    the source row's sum (the issue's reproduction stored 50.0 for a sum of 52.0)."""
    path = project_copy / H5 / "hs_csr_e.h5ad"

    def empty_rows(x):
        x = x.tolil()
        x[[8, 9, 17, 18, 19], :] = 0
        return x

    dense = _rewrite_x(path, empty_rows, n_cells=20)
    assert _compile(project_copy, "hs_csr_e", "compile.rows_per_read=10").status == "compiled"
    s = open_store(_store(project_copy, "hs_csr_e"))
    want = dense.sum(axis=1, dtype=np.float64)[s.rows]
    assert np.array_equal(s.total_counts, want.astype(np.float32))
    assert np.array_equal(s.total_counts == 0, np.isin(s.rows, [8, 9, 17, 18, 19]))


# --- 3. values float16 cannot hold ---------------------------------------------------------


def test_values_beyond_float16_are_stored_as_float32(project_copy):
    path = project_copy / H5 / "hs_csr_e.h5ad"

    def tpm_like(x):
        x = x.copy()
        x.data = x.data * 1000.25  # non-integer, up to well beyond 65,504
        return x

    dense = _rewrite_x(path, tpm_like)
    assert dense.max() > 65504
    report = _compile(project_copy, "hs_csr_e")  # compile.value_dtype=float16 (the default)
    assert report.status == "compiled"
    assert any("exceed the float16 range: stored as float32" in w for w in report.warnings)
    s = open_store(_store(project_copy, "hs_csr_e"))
    assert s.attrs["value_dtype"] == "float32" and s.attrs["settings"]["value_dtype"] == "float16"
    assert np.isfinite(s.value_range(0, s.attrs["nnz"])).all()
    assert _verify(project_copy, "hs_csr_e", sample=len(s)) == []
    # float16 still serves a file whose values fit it
    _rewrite_x(path, lambda x: x / 1000)
    warnings = _compile(project_copy, "hs_csr_e").warnings
    assert not any("float16" in w for w in warnings)  # only the non-integer-counts warning
    assert open_store(_store(project_copy, "hs_csr_e")).attrs["value_dtype"] == "float16"


def test_verify_fails_on_a_non_finite_stored_value(project_copy):
    """One inf among the values fails verify, even in a cell the sample does not check."""
    import zarr

    _rewrite_x(project_copy / H5 / "hs_csr_e.h5ad", lambda x: x * 0.5)
    assert _compile(project_copy, "hs_csr_e").status == "compiled"
    out = _store(project_copy, "hs_csr_e")
    s = open_store(out)
    picked = np.random.default_rng(0).choice(len(s), 1, replace=False)  # verify's sample
    other = next(i for i in range(len(s)) if i != picked[0] and s.indptr[i + 1] > s.indptr[i])
    assert _verify(project_copy, "hs_csr_e", sample=1) == []
    values = zarr.open_array(out / "values", mode="r+")
    values[int(s.indptr[other])] = np.inf
    assert _verify(project_copy, "hs_csr_e", sample=1) == ["1 stored values are not finite"]


# --- 12. fingerprints ------------------------------------------------------------------------


def _rewrite_middle_keeping_size_and_mtime(path: Path) -> None:
    """Add 1 to a stored count whose bytes lie outside the first and last MiB, in place,
    then restore the mtime (as ``cp -p`` or ``rsync -a --inplace`` leave a file)."""
    st = path.stat()
    with h5py.File(path, "r+") as f:
        data = f["raw/X/data"]
        offset = data.id.get_chunk_info(0).byte_offset
        k = ((1 << 20) + 4096 - offset) // data.dtype.itemsize  # 4 KiB past the first MiB
        assert 0 <= k < data.shape[0] and offset + k * 4 < st.st_size - (1 << 20)
        data[k] = data[k] + 1
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_rewrite_in_the_middle_is_noticed(project_copy, mode):
    path = project_copy / H5 / "hs_raw_b.h5ad"
    over = f"compile.fingerprint={mode}"
    assert _compile(project_copy, "hs_raw_b", over).status == "compiled"
    assert fmt.read_attrs(_store(project_copy, "hs_raw_b"))["source_fingerprint"].startswith(
        f"{mode}:"
    )
    assert _compile(project_copy, "hs_raw_b", over).status == "skipped"
    _rewrite_middle_keeping_size_and_mtime(path)
    assert _compile(project_copy, "hs_raw_b", over).status == "compiled"
    assert _verify(project_copy, "hs_raw_b", sample=400) == []  # the new count is stored


def test_full_fingerprint_follows_content_not_the_inode(project_copy):
    """A byte-identical copy (new inode, mtime, ctime) is current under ``full``, stale
    under ``fast``; switching the mode alone rebuilds nothing."""
    path = project_copy / H5 / "hs_csr_e.h5ad"

    def recopy():
        shutil.copyfile(path, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)

    assert _compile(project_copy, "hs_csr_e", "compile.fingerprint=full").status == "compiled"
    recopy()
    assert _compile(project_copy, "hs_csr_e", "compile.fingerprint=full").status == "skipped"
    assert _compile(project_copy, "hs_csr_e").status == "skipped"  # judged by its own mode
    assert _compile(project_copy, "hs_csr_e", "compile.force=true").status == "compiled"
    recopy()
    assert _compile(project_copy, "hs_csr_e").status == "compiled"


# --- 13. staleness only from what changes a store's bytes -------------------------------------


def test_panels_and_irrelevant_settings_do_not_make_stores_stale(project_copy):
    for stem in ("hs_csr_e", "hs_raw_b"):
        assert _compile(project_copy, stem).status == "compiled"
    (project_copy / "panels/hsapiens/new_panel.csv").write_text("Ensembl_ID\nENSG00000000003\n")
    assert _compile(project_copy, "hs_csr_e").status == "skipped"
    # integer counts are stored the same under either value_dtype; read sizes change nothing
    for over in ("compile.value_dtype=float32", "compile.rows_per_read=7"):
        assert _compile(project_copy, "hs_raw_b", over).status == "skipped"
    assert _compile(project_copy, "hs_raw_b", "compile.shuffle_seed=1").status == "compiled"


def test_float32_store_of_big_values_is_current_under_either_dtype(project_copy):
    path = project_copy / H5 / "hs_csr_e.h5ad"
    _rewrite_x(path, lambda x: x * 1e5 + x * 0.5)
    assert _compile(project_copy, "hs_csr_e").status == "compiled"  # float16 asked: float32
    assert _compile(project_copy, "hs_csr_e", "compile.value_dtype=float32").status == "skipped"
    assert _compile(project_copy, "hs_csr_e").status == "skipped"


# --- 11. training checks a store against itself ---------------------------------------------


def _resolved(cfg, mappings) -> list[Path]:
    stores = resolve_stores(cfg, mappings)
    return stores.train + [p for paths in stores.val.values() for p in paths]


def test_trainer_check_needs_only_the_store(project_copy):
    """A float32 store serves a float16 training config; with the source gone training
    still resolves it; a touched source, a missing shard or array is refused."""
    _rewrite_x(project_copy / H5 / "hs_csr_e.h5ad", lambda x: x * 0.5)
    for stem in ("hs_csr_a", "hs_raw_b", "hs_csc_c", "hs_dense_d"):
        assert _compile(project_copy, stem).status == "compiled"
    assert (
        _compile(
            project_copy, "hs_csr_e", "compile.value_dtype=float32", "compile.shuffle_seed=3"
        ).status
        == "compiled"
    )
    cfg = config(project_copy)  # compile.value_dtype=float16, shuffle_seed=0
    mappings = read_mappings(cfg)
    out = _store(project_copy, "hs_csr_e")
    assert out in _resolved(cfg, mappings)
    source = project_copy / H5 / "hs_csr_e.h5ad"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 1))
    stores = resolve_stores(cfg, mappings)  # metadata only: the sources are rank 0's check
    problems = source_problems(cfg, stores.sources)
    assert f"{out}: the source {source} changed since it was compiled" in problems
    assert problems.endswith(
        f"run: python -m preprocess.compile PATH.PROJECT_PATH={project_copy} "
        "compile.value_dtype=float32 compile.shuffle_seed=3"
    )
    source.unlink()
    assert check_store(out, source) is None
    assert out in _resolved(cfg, mappings)
    assert (
        check_store(out, vocab_sha256="0" * 64)
        == f"{out}: the vocabulary changed since it was compiled"
    )


def test_trainer_check_reads_no_source_bytes(project_copy, monkeypatch):
    assert _compile(project_copy, "hs_csr_e").status == "compiled"

    def no_read(*args, **kwargs):
        raise AssertionError("training must not fingerprint sources")

    monkeypatch.setattr(fmt, "source_fingerprint", no_read)
    assert (
        check_store(_store(project_copy, "hs_csr_e"), project_copy / H5 / "hs_csr_e.h5ad") is None
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tokens/c/0", "incomplete store ('tokens' shards missing)"),
        ("cell/row/zarr.json", "incomplete store (array 'cell/row' missing)"),
    ],
)
def test_trainer_check_refuses_an_incomplete_store(project_copy, damage, message):
    assert _compile(project_copy, "hs_csr_e").status == "compiled"
    out = _store(project_copy, "hs_csr_e")
    assert check_store(out) is None
    (out / damage).unlink()
    assert check_store(out) == f"{out}: {message}"


def test_compile_command_reproduces_the_store(project_copy):
    """The overrides the command carries give a config under which the store is current."""
    extra = ("compile.value_dtype=float32", "compile.cell_chunk=64", "compile.fingerprint=full")
    assert _compile(project_copy, "hs_csr_e", *extra).status == "compiled"
    attrs = fmt.read_attrs(_store(project_copy, "hs_csr_e"))
    base = config(project_copy).compile
    settings = {k: getattr(base, k) for k in fmt.BYTE_SETTINGS}
    cmd = fmt.compile_command(attrs, project_copy, settings)
    assert cmd == f"python -m preprocess.compile PATH.PROJECT_PATH={project_copy} " + " ".join(
        extra
    )
    assert _compile(project_copy, "hs_csr_e", *cmd.split()[3:]).status == "skipped"
    everything = fmt.compile_command(attrs, "P")  # no base: every setting spelled out
    assert "compile.obs_keys=[dataset,donor_id,tissue,cell_type]" in everything
    assert "compile.var_column=null compile.normalization=raw" in everything


# --- 14. the store swap survives a kill at every step -----------------------------------------

KILL = r"""
import os, shutil, signal, sys
from pathlib import Path
from preprocess import compiler

tmp, out, kill_at, fallback, mid = sys.argv[1:]
kill_at, fallback, mid = int(kill_at), fallback == "1", mid == "1"
steps, depth = 0, 0
if fallback:
    def _exchange(a, b):  # a filesystem that cannot exchange
        return False
    compiler._exchange = _exchange

def counted(fn):
    def step(*args, **kwargs):
        global steps, depth
        if depth == 0:
            steps += 1
            print(fn.__name__, flush=True)
            if steps == kill_at:
                if mid and fn.__name__ != "rmtree":
                    os._exit(3)  # "halfway" applies to the removal of a tree only
                if mid:  # halfway through: one file of the tree gone
                    os.remove(next(p for p in Path(args[0]).rglob("*") if p.is_file()))
                os.kill(os.getpid(), signal.SIGKILL)
        depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            depth -= 1
    return step

for name in ("_fsync_tree", "_fsync_dir", "_exchange"):
    setattr(compiler, name, counted(getattr(compiler, name)))
os.rename = counted(os.rename)
shutil.rmtree = counted(shutil.rmtree)
compiler.replace_store(Path(tmp), Path(out))
"""


def _complete_rows(path: Path) -> np.ndarray | None:
    """The rows of a complete store at ``path``, None when there is none."""
    if check_store(path) is not None:
        return None
    return open_store(path).rows


def _reset(out: Path, old: Path, new: Path, tmp: Path) -> None:
    """The state before a swap: the old store at ``out``, the new one built at ``tmp``."""
    for p in [out, *out.parent.glob(f".{out.name}.*-*")]:
        shutil.rmtree(p, ignore_errors=True)
    shutil.copytree(old, out)
    shutil.copytree(new, tmp)


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "move-aside"])
def test_kill_at_every_step_of_the_swap(project_copy, tmp_path, fallback):
    """Old store (seed 0) replaced by a new one (seed 1), killed before each step and
    halfway through the last: a complete store is always on disk, the next run recovers
    it and then ends with the new store and no leftovers."""
    other = tmp_path / "other"
    shutil.copytree(project_copy, other)
    assert _compile(project_copy, "hs_csr_e").status == "compiled"
    assert _compile(other, "hs_csr_e", "compile.shuffle_seed=1").status == "compiled"
    out, new = _store(project_copy, "hs_csr_e"), _store(other, "hs_csr_e")
    old_rows, new_rows = open_store(out).rows, open_store(new).rows
    assert not np.array_equal(old_rows, new_rows)
    pristine = tmp_path / "old.zarr"
    shutil.copytree(out, pristine)
    tmp = out.parent / f".{out.name}.tmp-999999"
    seen, k = [], 1
    while True:
        for mid in (False, True):
            _reset(out, pristine, new, tmp)
            args = [tmp, out, k, int(fallback), int(mid)]
            proc = subprocess.run(
                [sys.executable, "-c", KILL, *map(str, args)],
                cwd=REPO,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            names = proc.stdout.split()
            if proc.returncode in (0, 3):
                break
            assert proc.returncode == -9, proc.stderr
            # on disk now: one complete store, old or new, under out or moved aside
            aside = list(out.parent.glob(f".{out.name}.old-*"))
            found = [r for r in map(_complete_rows, [out, *aside]) if r is not None]
            assert found, (names, mid)
            recover(out)  # what the next run does first
            rows = _complete_rows(out)
            assert rows is not None and (
                np.array_equal(rows, old_rows) or np.array_equal(rows, new_rows)
            )
            assert not list(out.parent.glob(f".{out.name}.*-*"))
            seen.append((names[-1], mid))
        if proc.returncode == 0:
            break
        k += 1
    assert np.array_equal(_complete_rows(out), new_rows) and not tmp.exists()
    steps = [name for name, mid in seen if not mid]
    want = ["_fsync_tree", "_exchange", "_fsync_dir", "rmtree"]
    if fallback:
        want = [
            "_fsync_tree",
            "_exchange",
            "rename",
            "_fsync_dir",
            "rename",
            "_fsync_dir",
            "rmtree",
        ]
    assert steps == want and ("rmtree", True) in seen
    # the next compile after a kill mid-swap ends with the new store, no leftover
    _reset(out, pristine, new, tmp)
    args = [tmp, out, 2 if not fallback else 4, int(fallback), 0]
    subprocess.run([sys.executable, "-c", KILL, *map(str, args)], cwd=REPO, check=False)
    assert _compile(project_copy, "hs_csr_e", "compile.shuffle_seed=1").status in (
        "compiled",
        "skipped",
    )
    assert np.array_equal(open_store(out).rows, new_rows)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".hs_csr_e")) == [
        ".hs_csr_e.zarr.lock"
    ]


def test_a_store_moved_aside_is_restored_not_deleted(project_copy):
    """The state the old two-rename swap left when killed between its renames: no store
    under the final name, the only complete copy aside. The next run restores it."""
    assert _compile(project_copy, "hs_csr_e").status == "compiled"
    out = _store(project_copy, "hs_csr_e")
    rows = open_store(out).rows
    out.rename(out.parent / f".{out.name}.old-12345")
    assert _compile(project_copy, "hs_csr_e").status == "skipped"  # restored, still current
    assert np.array_equal(open_store(out).rows, rows)
    assert json.loads((out / "zarr.json").read_text())["attributes"]["n_cells"] == len(rows)
