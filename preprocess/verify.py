"""``python -m preprocess.verify PATH.PROJECT_PATH=P``: check stores against their sources.

Re-reads a sample of cells from every compiled store and recomputes them from the
source file with anndata's readers and ``np.lexsort`` — a second, deliberately plain
implementation, independent of the compiler's reader, packed-key sort and bucket shuffle.
Sources are read in bounded memory (backed ``.h5ad``, ``.zarr`` elements; a CSC matrix
column block by column block). Every store is checked; the failures are listed at the
end and the exit code is 1 when there is any.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from concept.cli import entry_point
from concept.config import Config
from concept.splits import check_store_names, configured_files
from concept.store import open_store, store_path
from concept.tokenize import normalize
from concept.vocab import read_token_mapping

SAMPLE = 64  # cells checked per store
COLUMN_ENTRIES = 1 << 21  # entries per column block when reading rows of a CSC matrix


def open_source(path: Path, x_source: str):
    """``(matrix, var, obs, close)`` of an AnnData file through anndata's own readers.

    ``matrix`` is a backed sparse dataset or a dense array element (nothing is loaded);
    ``var`` belongs to the matrix (``raw.var`` for ``raw``).
    """
    import anndata as ad
    from anndata.io import read_elem, sparse_dataset

    if path.is_dir():  # AnnData .zarr
        import zarr

        g = zarr.open_group(path, mode="r")
        var = read_elem(g["raw/var" if x_source == "raw" else "var"])
        obs, elem, close = read_elem(g["obs"]), g["raw/X" if x_source == "raw" else x_source], None
    else:
        adata = ad.read_h5ad(path, backed="r")
        f = adata.file._file
        raw_x = "raw/X" if "raw" in f and "X" in f["raw"] else "raw.X"  # anndata < 0.7: raw.X
        var = adata.raw.var if x_source == "raw" else adata.var
        obs, elem, close = adata.obs, f[raw_x if x_source == "raw" else x_source], adata.file.close
    matrix = elem if hasattr(elem, "dtype") else sparse_dataset(elem)
    return matrix, var, obs, close or (lambda: None)


def read_rows(matrix, rows: np.ndarray) -> np.ndarray:
    """Dense ``rows`` (sorted) of a backed matrix; a CSC matrix is read in column blocks."""
    from anndata.abc import CSCDataset, CSRDataset

    if isinstance(matrix, CSRDataset):
        return matrix[rows].toarray()
    if not isinstance(matrix, CSCDataset):  # a dense array element
        return np.stack([np.asarray(matrix[int(r)]) for r in rows]).reshape(len(rows), -1)
    n_vars = matrix.shape[1]
    step = max(int(COLUMN_ENTRIES * n_vars / max(matrix.group["data"].shape[0], 1)), 1)
    out = np.zeros((len(rows), n_vars), matrix.dtype)
    for c in range(0, n_vars, step):
        out[:, c : c + step] = matrix[:, c : c + step][rows].toarray()
    return out


def expected_cell(row: np.ndarray, col_tokens: np.ndarray, normalization: str):
    """Tokens and values of one dense source row, by value desc then token asc."""
    keep = (row != 0) & (col_tokens >= 0)
    tok, val = col_tokens[keep], row[keep]
    order = np.lexsort((tok, -val.astype(np.float64)))
    total = np.full(len(order), row.sum(dtype=np.float64))
    return tok[order], normalize(val[order], total, normalization)


def nonfinite_values(store, step: int = 1 << 24) -> list[str]:
    """Every stored value is read (``step`` at a time): a source never holds inf or NaN
    (the compiler refuses them), so any in the store is a value the source does not have."""
    if np.dtype(store.attrs["value_dtype"]).kind != "f":
        return []
    bad = 0
    for a in range(0, int(store.attrs["nnz"]), step):
        bad += int((~np.isfinite(store.value_range(a, a + step))).sum())
    return [f"{bad} stored values are not finite"] if bad else []


def verify_store(source: Path, store, mapping, sample: int = SAMPLE, seed: int = 0) -> list[str]:
    """Mismatches between a store and its source file (empty list: all good)."""
    attrs = store.attrs
    x, var, obs, close = open_source(Path(source), attrs["x_source"])
    var_col = attrs["settings"]["var_column"]
    var_source = attrs.get("var_source") or (f"var/{var_col}" if var_col else "var_names")
    ids = (
        np.asarray(var.index)
        if var_source == "var_names"
        else var[var_source.removeprefix("var/")].to_numpy()
    ).astype(str)
    col_tokens = mapping.tokens_of(ids)
    # duplicates after mapping: the compiler keeps the first column of each token
    seen: set[int] = set()
    for j, t in enumerate(col_tokens):
        if t >= 0 and t in seen:
            col_tokens[j] = -1
        seen.add(int(t))
    problems = nonfinite_values(store)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(store), min(sample, len(store)), replace=False))
    rows = store.rows
    src_rows = rows[picks]
    order = np.argsort(src_rows)
    block = read_rows(x, src_rows[order])
    dense = np.empty_like(block)
    dense[order] = block
    vdtype = np.dtype(attrs["value_dtype"])
    totals, n_genes = store.total_counts, store.n_genes
    for k, i in enumerate(picks):
        tok, val = store.cell(int(i))
        etok, eval_ = expected_cell(dense[k], col_tokens, attrs["normalization"])
        if not np.array_equal(tok, etok):
            problems.append(f"cell {i} (row {rows[i]}): tokens differ")
        elif not np.array_equal(val, eval_.astype(vdtype)):
            problems.append(f"cell {i} (row {rows[i]}): values differ")
        if not np.isclose(totals[i], dense[k].sum(), rtol=1e-5):
            problems.append(f"cell {i}: total_counts {totals[i]} != {dense[k].sum()}")
        if n_genes[i] != np.count_nonzero(dense[k]):
            problems.append(f"cell {i}: n_genes differs")
    for key in store.obs_keys:
        if key not in obs:
            continue
        codes, cats = store.obs(key)
        labels = obs[key].astype(object).to_numpy()[rows[picks]]
        got = np.array([cats[c] if c >= 0 else None for c in codes[picks]], dtype=object)
        want = np.array([None if v != v or v is None else str(v) for v in labels], dtype=object)
        if not np.array_equal(got, want):
            problems.append(f"obs {key!r}: codes do not decode to the source labels")
    close()
    return problems


def run(cfg: Config) -> int:
    """Verify every configured store; list every failure at the end; exit code 1 if any."""
    files = configured_files(cfg, tuple(cfg.compile.splits))
    collisions = check_store_names(files)
    failures: dict[str, list[str]] = {}
    mappings = {}
    for f in files:
        name = f"{f.source_name}/{f.stem}"
        out = store_path(cfg.PATH.COMPILED_ROOT, f.source_name, f.stem)
        try:
            if f.path in collisions:
                raise ValueError(collisions[f.path])
            store = open_store(out)
            if not f.path.exists():
                raise ValueError(f"{f.path}: source not found (the store cannot be checked)")
            if f.species not in mappings:
                mappings[f.species] = read_token_mapping(
                    Path(cfg.PATH.GENE_MAPPINGS_PATH) / f"{f.species}.csv"
                )
            problems = verify_store(f.path, store, mappings[f.species])
            checked = f"{min(SAMPLE, len(store))} cells checked"
        except Exception as e:  # one unreadable store or source must not stop the others
            known = isinstance(e, ValueError | OSError)  # StoreError, InputError: one line
            problems = [str(e) if known else f"{type(e).__name__}: {e}"]
            checked = "not checked"
        print(f"{'ok  ' if not problems else 'FAIL'} {name}: {checked}")
        if problems:
            failures[name] = problems
    if not failures:
        print("all stores match their sources")
        return 0
    print(f"{len(failures)} of {len(files)} store(s) failed verification:", file=sys.stderr)
    for name, problems in failures.items():
        for p in problems[:5]:
            print(f"  {name}: {p}", file=sys.stderr)
    return 1


main = entry_point(run)

if __name__ == "__main__":
    main()
