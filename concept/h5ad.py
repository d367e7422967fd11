"""Read ``.h5ad`` files in row blocks, without loading the expression matrix whole.

Used by the compiler and by ``concept.embed`` (never on the training path). The matrix
comes from ``raw/X`` when the file has ``raw`` (else ``X``), or from the source the
caller names (``X``, ``raw``, ``layers/<name>``). CSR and dense matrices are read block
by block; a CSC matrix cannot be cut into row blocks cheaply, so it is read whole and
converted once (said in a warning: rewrite such files as CSR for bounded memory).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from concept.vocab import InputError

log = logging.getLogger(__name__)


def _decode(a: np.ndarray) -> np.ndarray:
    return a.astype(str) if a.dtype.kind in "SO" else a


class H5adSource:
    """An open ``.h5ad`` file: its genes, obs columns and expression blocks.

    Parameters
    ----------
    path
        The file.
    x_source
        ``auto`` (``raw/X`` if present, else ``X``), ``X``, ``raw`` or ``layers/<name>``.
    """

    def __init__(self, path: str | Path, x_source: str = "auto"):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: file not found")
        try:
            self._f = h5py.File(self.path, "r")
            self._open(x_source)
        except InputError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{self.path}: unreadable or truncated h5ad ({e})") from None

    def _open(self, x_source: str) -> None:
        f = self._f
        if x_source == "auto":
            x_source = "raw" if "raw" in f and "X" in f["raw"] else "X"
        self.x_source = x_source
        if x_source == "raw":
            if "raw" not in f or "X" not in f["raw"]:
                raise InputError(f"{self.path}: compile.x_source=raw but the file has no raw/X")
            self._x, var = f["raw/X"], f["raw/var"]
        elif x_source == "X":
            self._x, var = f["X"], f["var"]
        else:
            if x_source not in f:
                raise InputError(f"{self.path}: compile.x_source={x_source} not in the file")
            self._x, var = f[x_source], f["var"]
        self._var = var
        enc = self._x.attrs.get("encoding-type", "array")
        if isinstance(enc, bytes):
            enc = enc.decode()
        self.encoding = enc
        if enc in ("csr_matrix", "csc_matrix"):
            self.shape = tuple(int(s) for s in self._x.attrs["shape"])
        elif enc == "array":
            self.shape = tuple(self._x.shape)
        else:
            raise InputError(f"{self.path}: unsupported matrix encoding {enc!r} in {x_source}")
        self.n_cells, self.n_vars = self.shape

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> H5adSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def var_ids(self, column: str | None = None) -> np.ndarray:
        """Gene ids: ``var_names``, or a var column."""
        from anndata.io import read_elem

        if column is None:
            index_name = self._var.attrs.get("_index", "_index")
            return _decode(self._var[index_name][:])
        if column not in self._var:
            raise InputError(f"{self.path}: var has no column {column!r}")
        return np.asarray(read_elem(self._var[column])).astype(str)

    def obs_column(self, key: str) -> tuple[np.ndarray, list[str]] | None:
        """Codes (int32, -1 missing) and categories of an obs column; None if absent."""
        from anndata.io import read_elem

        obs = self._f["obs"]
        if key not in obs:
            return None
        values = read_elem(obs[key])
        if hasattr(values, "categories"):  # pandas Categorical
            return np.asarray(values.codes, dtype=np.int32), [str(c) for c in values.categories]
        values = np.asarray(values)
        missing = (values != values) if values.dtype.kind == "f" else np.zeros(len(values), bool)
        cats, codes = np.unique(values[~missing].astype(str), return_inverse=True)
        out = np.full(len(values), -1, dtype=np.int32)
        out[~missing] = codes
        return out, [str(c) for c in cats]

    def blocks(
        self, rows_per_block: int, max_entries: int | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(first_row, indptr, indices, data)`` CSR blocks of consecutive rows.

        A block has at most ``rows_per_block`` rows and, when given, about ``max_entries``
        stored entries (at least one row): memory follows entries, not rows.
        """
        n = self.n_cells
        if self.encoding == "csr_matrix":
            indptr = self._x["indptr"][:].astype(np.int64)
            a = 0
            while a < n:
                b = min(a + rows_per_block, n)
                if max_entries:
                    fit = int(np.searchsorted(indptr, indptr[a] + max_entries, "right")) - 1
                    b = max(min(b, fit), a + 1)
                lo, hi = indptr[a], indptr[b]
                yield a, indptr[a : b + 1], self._x["indices"][lo:hi], self._x["data"][lo:hi]
                a = b
        elif self.encoding == "csc_matrix":
            import scipy.sparse as sp

            log.warning("%s: CSC matrix is read whole (rewrite as CSR to bound memory)", self.path)
            x = sp.csc_matrix(
                (self._x["data"][:], self._x["indices"][:], self._x["indptr"][:]), shape=self.shape
            ).tocsr()
            for a in range(0, n, rows_per_block):
                blk = x[a : a + rows_per_block]
                yield a, blk.indptr.astype(np.int64), blk.indices, blk.data
        else:
            if max_entries:
                rows_per_block = max(min(rows_per_block, max_entries // max(self.n_vars, 1)), 1)
            for a in range(0, n, rows_per_block):
                dense = self._x[a : a + rows_per_block]
                r, c = np.nonzero(dense)
                counts = np.bincount(r, minlength=dense.shape[0])
                indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
                yield a, indptr, c.astype(np.int32), dense[r, c]

    @property
    def nnz_hint(self) -> int | None:
        """Stored entries of a sparse matrix (None for dense): sizes the compiler's buffers."""
        return int(self._x["data"].shape[0]) if self.encoding != "array" else None
