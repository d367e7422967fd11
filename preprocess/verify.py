"""``python -m preprocess.verify PATH.PROJECT_PATH=P``: check stores against their sources.

Re-reads a sample of cells from every compiled store and recomputes them from the
source ``.h5ad`` with anndata and ``np.lexsort`` — a second, deliberately plain
implementation, independent of the compiler's packed-key sort and bucket shuffle.
Exits non-zero on any mismatch or missing store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from concept.cli import entry_point
from concept.config import Config
from concept.splits import configured_files
from concept.store import StoreError, open_store, store_path
from concept.tokenize import normalize
from concept.vocab import read_token_mapping

SAMPLE = 64  # cells checked per store


def _matrix(adata, x_source: str):
    if x_source == "raw":
        return adata.raw.X, adata.raw.var_names
    if x_source.startswith("layers/"):
        return adata.layers[x_source.split("/", 1)[1]], adata.var_names
    return adata.X, adata.var_names


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
    import anndata as ad
    import scipy.sparse as sp

    attrs = store.attrs
    adata = ad.read_h5ad(source, backed="r")
    x, var_names = _matrix(adata, attrs["x_source"])
    var_col = attrs["settings"]["var_column"]
    ids = adata.var[var_col].astype(str).to_numpy() if var_col else np.asarray(var_names)
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
    block = x[src_rows[order]]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
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
        if key not in adata.obs:
            continue
        codes, cats = store.obs(key)
        labels = adata.obs[key].astype(object).to_numpy()[rows[picks]]
        got = np.array([cats[c] if c >= 0 else None for c in codes[picks]], dtype=object)
        want = np.array([None if v != v or v is None else str(v) for v in labels], dtype=object)
        if not np.array_equal(got, want):
            problems.append(f"obs {key!r}: codes do not decode to the source labels")
    adata.file.close()
    return problems


def run(cfg: Config) -> int:
    failed = 0
    mappings = {}
    for f in configured_files(cfg, tuple(cfg.compile.splits)):
        out = store_path(cfg.PATH.COMPILED_ROOT, f.source_name, f.stem)
        try:
            store = open_store(out)
        except StoreError as e:
            print(f"FAIL {f.path.name}: {e}", file=sys.stderr)
            failed += 1
            continue
        if f.species not in mappings:
            mappings[f.species] = read_token_mapping(
                Path(cfg.PATH.GENE_MAPPINGS_PATH) / f"{f.species}.csv"
            )
        problems = verify_store(f.path, store, mappings[f.species])
        status = "ok  " if not problems else "FAIL"
        print(f"{status} {f.path.name}: {min(SAMPLE, len(store))} cells checked")
        for p in problems[:5]:
            print(f"     {p}", file=sys.stderr)
        failed += bool(problems)
    print(f"{failed} store(s) failed verification" if failed else "all stores match their sources")
    return 1 if failed else 0


main = entry_point(run)

if __name__ == "__main__":
    main()
