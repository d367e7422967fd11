"""Read AnnData files in row blocks, without loading the expression matrix whole.

Used by the compiler and by ``concept.embed`` (never on the training path). A file is an
``.h5ad`` (HDF5) or an AnnData ``.zarr`` folder (``adata.write_zarr``); both are read
through the same element API. The matrix comes from ``raw/X`` when the file has ``raw``
(else ``X``; else its only layer, said in a warning), or from the source the caller
names (``X``, ``raw``, ``layers/<name>``).

CSR and dense matrices are read block by block. A CSC matrix is converted in bounded
memory: column blocks are scattered into per-row-block scratch files, then each row block
is sorted and handed out as CSR. Files written before anndata's versioned encoding
(anndata < 0.7: compound ``obs``/``var`` datasets, ``h5sparse`` matrices, ``raw.X``)
are read through anndata's own readers (``read_h5ad(backed="r")``, ``sparse_dataset``).

An AnnData in memory is read the same way by :class:`AnnDataSource`;
:func:`open_source` picks the reader for a path or an AnnData.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from concept.vocab import InputError, TokenMapping

if TYPE_CHECKING:
    import anndata

log = logging.getLogger(__name__)

DEFAULT_ENTRIES = 2_097_152  # entries per CSC column block when the caller sets no bound


def _decode(a: np.ndarray) -> np.ndarray:
    return a.astype(str) if a.dtype.kind in "SO" else a


def _attr(elem, name: str, default=None):
    value = elem.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _is_array(elem) -> bool:
    return hasattr(elem, "shape") and hasattr(elem, "dtype")


def _current_frame(elem) -> bool:
    """A dataframe in anndata's current encoding, whose columns can be read one by one."""
    return (
        not _is_array(elem)
        and _attr(elem, "encoding-type") == "dataframe"
        and _attr(elem, "encoding-version") == "0.2.0"
    )


def _stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """Stable argsort of integer keys in ``[0, bound)``: a radix sort when they fit 16 bits."""
    return np.argsort(keys.astype(np.uint16 if bound <= 1 << 16 else np.int64), kind="stable")


def row_ranges(
    indptr: np.ndarray, rows_per_block: int, max_entries: int | None
) -> Iterator[tuple[int, int]]:
    """``[a, b)`` row ranges of a compressed matrix: at most ``rows_per_block`` rows and,
    when given, about ``max_entries`` stored entries each (at least one row)."""
    n, a = len(indptr) - 1, 0
    while a < n:
        b = min(a + rows_per_block, n)
        if max_entries:
            fit = int(np.searchsorted(indptr, indptr[a] + max_entries, "right")) - 1
            b = max(min(b, fit), a + 1)
        yield a, b
        a = b


def choose_matrix(have: list[str], x_source: str, where) -> tuple[str, str | None]:
    """The matrix ``x_source`` names among the source's matrices ``have``, and a sentence
    for the report when ``auto`` chose it on its own.

    ``auto`` is ``raw`` when present, else ``X``, else the only matrix.

    Raises
    ------
    InputError
        ``x_source`` is not among ``have``; ``auto`` with neither ``X`` nor ``raw`` and
        several layers.
    """
    if x_source != "auto":
        if x_source not in have:
            raise InputError(
                f"{where}: x_source={x_source} is not in the file; its matrices are "
                f"{have}: pass compile.x_source=<one of them> (embed: x_source=<one of them>)"
            )
        return x_source, None
    if "raw" in have or "X" in have:
        return ("raw" if "raw" in have else "X"), None
    if len(have) == 1:
        return have[0], (
            f"no X or raw/X: reading {have[0]}, the file's only matrix "
            f"(x_source={have[0]} chooses it explicitly)"
        )
    raise InputError(
        f"{where}: no X or raw/X; the file's matrices are {have}: choose one "
        "with compile.x_source=<matrix> (embed: x_source=<matrix>)"
    )


def category_codes(values) -> tuple[np.ndarray, list[str]]:
    """Codes (int32, -1 missing) and categories of column values: a pandas Categorical
    keeps its categories; other values become the sorted distinct strings."""
    import pandas as pd

    if hasattr(values, "categories"):  # pandas Categorical
        return np.asarray(values.codes, dtype=np.int32), [str(c) for c in values.categories]
    values = np.asarray(values)
    missing = np.asarray(pd.isna(values), bool)
    cats, codes = np.unique(values[~missing].astype(str), return_inverse=True)
    out = np.full(len(values), -1, dtype=np.int32)
    out[~missing] = codes
    return out, [str(c) for c in cats]


def series_codes(col) -> tuple[np.ndarray, list[str]]:
    """:func:`category_codes` of a pandas Series."""
    import pandas as pd

    return category_codes(
        col.array if isinstance(col.dtype, pd.CategoricalDtype) else col.to_numpy()
    )


def _string_categorical(elem) -> tuple[np.ndarray, list[str]] | None:
    """:func:`category_codes` of an HDF5 categorical column with string categories, read
    as its codes and categories (anndata's reader builds a pandas Categorical first:
    ~1.7 ms a column, a few percent of a small file's compile); None for any other column."""
    import h5py

    if not isinstance(elem, h5py.Group) or _attr(elem, "encoding-type") != "categorical":
        return None
    cats = elem.get("categories")
    if not isinstance(cats, h5py.Dataset) or h5py.check_string_dtype(cats.dtype) is None:
        return None
    return np.asarray(elem["codes"][:], np.int32), list(cats.asstr()[:])


class H5adSource:
    """An open AnnData file: its genes, obs columns and expression blocks.

    Parameters
    ----------
    path
        An ``.h5ad`` file or an AnnData ``.zarr`` folder.
    x_source
        ``auto`` (``raw/X`` if present, else ``X``, else the only layer), ``X``, ``raw`` or
        ``layers/<name>``.

    Attributes
    ----------
    warnings
        What the reader decided on its own (a layer chosen, a legacy encoding), for reports.
    """

    def __init__(self, path: str | Path, x_source: str = "auto"):
        self.path = Path(path)
        self.warnings: list[str] = []
        self._legacy = None  # backed AnnData, opened only for legacy-encoded obs/var
        self._frames: dict = {}
        self._f = None
        if not self.path.exists():
            raise InputError(f"{self.path}: file not found")
        kind = "AnnData zarr folder" if self.path.is_dir() else "h5ad"
        try:
            if self.path.is_dir():
                import zarr

                self._f = zarr.open_group(self.path, mode="r")
            else:
                import h5py

                self._f = h5py.File(self.path, "r")
            self._open(x_source)
        except InputError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            self.close()
            raise InputError(f"{self.path}: unreadable or truncated {kind} ({e})") from None

    # --- layout ---------------------------------------------------------------------------

    def _raw_key(self) -> str | None:
        f = self._f
        if "raw" in f and not _is_array(f["raw"]) and "X" in f["raw"]:
            return "raw/"
        return "raw." if "raw.X" in f else None  # anndata < 0.7 kept raw at the top level

    def matrices(self) -> list[str]:
        """The expression matrices the file holds, as ``x_source`` values."""
        f = self._f
        out = ["X"] if "X" in f else []
        if self._raw_key():
            out.append("raw")
        if "layers" in f and not _is_array(f["layers"]):
            out += [f"layers/{k}" for k in sorted(f["layers"])]
        return out

    def _open(self, x_source: str) -> None:
        x_source, note = choose_matrix(self.matrices(), x_source, self.path)
        self.warnings += [note] if note else []
        self.x_source = x_source
        raw = self._raw_key() if x_source == "raw" else None
        self._x = self._f[f"{raw}X" if raw else x_source]
        self._var_key = f"{raw}var" if raw else "var"
        x = self._x
        if _is_array(x):
            self.encoding, self.shape = "array", tuple(int(s) for s in x.shape)
        else:  # a sparse group, current or legacy (h5sparse) attributes: anndata decodes them
            from anndata.io import sparse_dataset

            try:
                ds = sparse_dataset(x)
            except Exception as e:  # anndata's own message says which encoding it is
                raise InputError(
                    f"{self.path}: unsupported matrix encoding in {x_source} ({e})"
                ) from None
            self.encoding, self.shape = f"{ds.format}_matrix", tuple(int(s) for s in ds.shape)
        if len(self.shape) != 2:
            raise InputError(f"{self.path}: {x_source} is not a 2-D matrix (shape {self.shape})")
        self.n_cells, self.n_vars = self.shape

    def close(self) -> None:
        if self._legacy is not None:
            self._legacy.file.close()
        if self._f is not None and hasattr(self._f, "close"):
            self._f.close()

    def __enter__(self) -> H5adSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- obs and var ----------------------------------------------------------------------

    def _frame(self, key: str):
        """``obs`` or the matrix's ``var`` as a DataFrame, decoded by anndata (encodings the
        column-by-column path does not read)."""
        if key in self._frames:
            return self._frames[key]
        elem = self._f[key]
        if not _is_array(elem) and _attr(elem, "encoding-type") == "dataframe":
            from anndata.io import read_elem

            self._frames[key] = read_elem(elem)
            return self._frames[key]
        if self._legacy is None:  # anndata < 0.7: only anndata's file reader decodes it
            import anndata as ad

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._legacy = ad.read_h5ad(self.path, backed="r")
            self.warnings.append("written by anndata < 0.7: obs and var read through anndata")
        if key == "obs":
            return self._legacy.obs
        return self._legacy.raw.var if key != "var" else self._legacy.var

    def var_columns(self) -> list[str]:
        """Columns of the matrix's ``var``."""
        elem = self._f[self._var_key]
        if _current_frame(elem):
            return [str(c) for c in _attr(elem, "column-order", [])]
        return [str(c) for c in self._frame(self._var_key).columns]

    def var_ids(self, column: str | None = None) -> np.ndarray:
        """Gene ids: ``var_names``, or a var column."""
        elem = self._f[self._var_key]
        if column is not None and column not in self.var_columns():
            raise InputError(
                f"{self.path}: var has no column {column!r} (columns: {self.var_columns()})"
            )
        if _current_frame(elem):
            from anndata.io import read_elem

            if column is None:
                return _decode(np.asarray(elem[_attr(elem, "_index", "_index")][:]))
            return np.asarray(read_elem(elem[column])).astype(str)
        frame = self._frame(self._var_key)
        return np.asarray(frame.index if column is None else frame[column]).astype(str)

    def obs_column(self, key: str) -> tuple[np.ndarray, list[str]] | None:
        """Codes (int32, -1 missing) and categories of an obs column; None if absent."""
        obs = self._f["obs"]
        if _current_frame(obs):
            from anndata.io import read_elem

            if key not in obs:
                return None
            if (direct := _string_categorical(obs[key])) is not None:
                return direct
            values = read_elem(obs[key])
        else:
            frame = self._frame("obs")
            if key not in frame.columns:
                return None
            return series_codes(frame[key])
        return category_codes(values)

    def obsm_keys(self) -> list[str]:
        """Keys of ``obsm``."""
        f = self._f
        return sorted(f["obsm"]) if "obsm" in f and not _is_array(f["obsm"]) else []

    def obsm(self, key: str):
        """``obsm[key]`` as anndata decodes it (array, sparse matrix or DataFrame)."""
        from anndata.io import read_elem

        return read_elem(self._f["obsm"][key])

    # --- expression -----------------------------------------------------------------------

    def blocks(
        self,
        rows_per_block: int,
        max_entries: int | None = None,
        scratch_dir: str | Path | None = None,
        buffers: int = 0,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(first_row, indptr, indices, data)`` CSR blocks of consecutive rows.

        A block has at most ``rows_per_block`` rows and, when given, about ``max_entries``
        stored entries (at least one row): memory follows entries, not rows. A CSC matrix
        needs scratch space on disk about the size of its entries, in a temporary folder
        under ``scratch_dir`` (default: the system's). With ``buffers=k``, a CSR matrix in
        an ``.h5ad`` is read into ``k`` sets of arrays used in turn, so a block stays valid
        only until ``k - 1`` more are read (fresh memory costs more than the read).
        """
        n = self.n_cells
        if self.encoding == "csr_matrix":
            indptr = self._x["indptr"][:].astype(np.int64)
            indices, data = self._x["indices"], self._x["data"]
            ring = [] if not buffers or not hasattr(indices, "read_direct") else [None] * buffers
            for k, (a, b) in enumerate(row_ranges(indptr, rows_per_block, max_entries)):
                lo, hi = indptr[a], indptr[b]
                if not ring:
                    yield a, indptr[a : b + 1], indices[lo:hi], data[lo:hi]
                    continue
                slot = k % len(ring)
                if ring[slot] is None or len(ring[slot][0]) < hi - lo:
                    size = max(hi - lo, max_entries or 0)
                    ring[slot] = (np.empty(size, indices.dtype), np.empty(size, data.dtype))
                out = []
                for ds, buf in zip((indices, data), ring[slot], strict=True):
                    if hi > lo:
                        ds.read_direct(buf, np.s_[lo:hi], np.s_[: hi - lo])
                    out.append(buf[: hi - lo])
                yield a, indptr[a : b + 1], *out
        elif self.encoding == "csc_matrix":
            yield from self._csc_blocks(rows_per_block, max_entries or DEFAULT_ENTRIES, scratch_dir)
        else:
            if max_entries:
                rows_per_block = max(min(rows_per_block, max_entries // max(self.n_vars, 1)), 1)
            for a in range(0, n, rows_per_block):
                dense = self._x[a : a + rows_per_block]
                r, c = np.nonzero(dense)
                counts = np.bincount(r, minlength=dense.shape[0])
                indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
                yield a, indptr, c.astype(np.int32), dense[r, c]

    def _csc_blocks(self, rows_per_block: int, max_entries: int, scratch_dir):
        """CSC -> CSR row blocks with about ``max_entries`` entries in memory at a time.

        Pass 1 counts each row's entries (column blocks of ``indices``); pass 2 appends each
        column block's entries to the scratch files of their row blocks; then each row block
        is read back, put in row order and yielded.
        """
        n = self.n_cells
        colptr = self._x["indptr"][:].astype(np.int64)
        indices, data = self._x["indices"], self._x["data"]
        col_blocks = list(row_ranges(colptr, self.n_vars, max_entries))
        counts = np.zeros(n, np.int64)
        for c0, c1 in col_blocks:
            counts += np.bincount(indices[colptr[c0] : colptr[c1]], minlength=n)
        rowptr = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=rowptr[1:])
        del counts
        blocks = list(row_ranges(rowptr, rows_per_block, max_entries))
        starts = np.array([a for a, _ in blocks], np.int64)
        with tempfile.TemporaryDirectory(prefix=".csc-", dir=scratch_dir) as tmp:
            files = [[Path(tmp) / f"{k}.{part}" for part in "rcv"] for k in range(len(blocks))]
            vdtype = data.dtype
            for c0, c1 in col_blocks:
                lo, hi = colptr[c0], colptr[c1]
                rows = indices[lo:hi].astype(np.int64)
                cols = np.repeat(np.arange(c0, c1, dtype=np.int32), np.diff(colptr[c0 : c1 + 1]))
                vals = data[lo:hi]
                blk = np.searchsorted(starts, rows, "right") - 1
                order = _stable_order(blk, len(blocks))  # keeps column order within a block
                cuts = np.searchsorted(blk[order], np.arange(len(blocks) + 1))
                for k in np.flatnonzero(np.diff(cuts)):
                    sel = order[cuts[k] : cuts[k + 1]]
                    local = (rows[sel] - starts[k]).astype(np.int32)
                    for path, arr in zip(files[k], (local, cols[sel], vals[sel]), strict=True):
                        with open(path, "ab") as fh:
                            arr.tofile(fh)
                del rows, cols, vals, blk, order
            for k, (a, b) in enumerate(blocks):
                r, c, v = (
                    np.fromfile(p, dtype=dt) if p.exists() else np.empty(0, dt)
                    for p, dt in zip(files[k], (np.int32, np.int32, vdtype), strict=True)
                )
                for p in files[k]:
                    p.unlink(missing_ok=True)
                order = _stable_order(r, b - a)  # row order, columns ascending within
                yield a, rowptr[a : b + 1] - rowptr[a], c[order], v[order]

    @property
    def nnz_hint(self) -> int | None:
        """Stored entries of a sparse matrix (None for dense): sizes the compiler's buffers."""
        return int(self._x["data"].shape[0]) if self.encoding != "array" else None


class AnnDataSource:
    """An AnnData in memory with :class:`H5adSource`'s interface: the compiler and the
    embedder read it in the same row blocks, without a copy through a file.

    A CSR matrix is handed out in slices of its own arrays; a dense one block by block; any
    other sparse format is converted to CSR once (a copy of its entries).

    Parameters
    ----------
    adata
        The AnnData, in memory.
    x_source
        As :class:`H5adSource`'s.
    name
        What messages call it.
    """

    def __init__(self, adata: anndata.AnnData, x_source: str = "auto", name: str = "<AnnData>"):
        self.path = name
        self.warnings: list[str] = []
        self._adata = adata
        self._fingerprint: str | None = None
        self._size = 0  # bytes hashed by fingerprint()
        self.x_source, note = choose_matrix(self.matrices(), x_source, name)
        self.warnings += [note] if note else []
        if self.x_source == "raw":
            self._x, self._var = adata.raw.X, adata.raw.var
        elif self.x_source == "X":
            self._x, self._var = adata.X, adata.var
        else:
            self._x, self._var = adata.layers[self.x_source[len("layers/") :]], adata.var
        self.n_cells, self.n_vars = (int(k) for k in self._x.shape)

    def matrices(self) -> list[str]:
        """The AnnData's expression matrices, as ``x_source`` values."""
        a = self._adata
        out = ["X"] if a.X is not None else []
        out += ["raw"] if a.raw is not None else []
        return out + [f"layers/{k}" for k in sorted(a.layers)]

    def close(self) -> None:
        pass

    def __enter__(self) -> AnnDataSource:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def var_columns(self) -> list[str]:
        """Columns of the matrix's ``var``."""
        return [str(c) for c in self._var.columns]

    def var_ids(self, column: str | None = None) -> np.ndarray:
        """Gene ids: ``var_names``, or a var column."""
        if column is None:
            return np.asarray(self._var.index).astype(str)
        if column not in self._var.columns:
            raise InputError(
                f"{self.path}: var has no column {column!r} (columns: {self.var_columns()})"
            )
        return np.asarray(self._var[column]).astype(str)

    def obs_column(self, key: str) -> tuple[np.ndarray, list[str]] | None:
        """Codes (int32, -1 missing) and categories of an obs column; None if absent."""
        obs = self._adata.obs
        return series_codes(obs[key]) if key in obs.columns else None

    def obsm_keys(self) -> list[str]:
        """Keys of ``obsm``."""
        return sorted(self._adata.obsm)

    def obsm(self, key: str):
        """``obsm[key]`` (array, sparse matrix or DataFrame)."""
        return self._adata.obsm[key]

    def blocks(
        self,
        rows_per_block: int,
        max_entries: int | None = None,
        scratch_dir: str | Path | None = None,
        buffers: int = 0,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(first_row, indptr, indices, data)`` CSR blocks, as :meth:`H5adSource.blocks`
        (``scratch_dir`` and ``buffers`` are not needed: blocks are views of the matrix,
        valid as long as it is)."""
        import scipy.sparse as sp

        x = self._x
        if sp.issparse(x):
            x = x.tocsr()  # the matrix itself when CSR
            indptr = np.asarray(x.indptr, np.int64)
            for a, b in row_ranges(indptr, rows_per_block, max_entries):
                lo, hi = indptr[a], indptr[b]
                yield a, indptr[a : b + 1], x.indices[lo:hi], x.data[lo:hi]
            return
        # dense: a block's entries are its rows times the genes
        sizes = np.arange(self.n_cells + 1, dtype=np.int64) * self.n_vars
        for a, b in row_ranges(sizes, rows_per_block, max_entries):
            blk = sp.csr_matrix(np.asarray(x[a:b]))
            yield a, blk.indptr.astype(np.int64), blk.indices, blk.data

    @property
    def nnz_hint(self) -> int | None:
        """Stored entries of a sparse matrix (None for dense)."""
        import scipy.sparse as sp

        return int(self._x.nnz) if sp.issparse(self._x) else None

    def fingerprint(self) -> str:
        """``content:<sha256>`` of everything a store compiled from this source can depend
        on: the matrix (format, shape, dtype and arrays), its ``var`` (names and columns),
        ``obs`` and ``obsm``. Stands in for a file's fingerprint
        (:func:`concept.store.source_fingerprint`): the same data hashes the same in any
        process. Reads every entry once (about 1 GB/s)."""
        import scipy.sparse as sp

        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        x = self._x
        arrays = (x.data, x.indices, x.indptr) if sp.issparse(x) else (np.asarray(x),)
        fmt = x.format if sp.issparse(x) else "dense"
        h.update(f"{self.x_source}:{fmt}:{tuple(x.shape)}\n".encode())
        for arr in arrays:
            self._hash_array(h, arr)
        for name, frame in (("var", self._var), ("obs", self._adata.obs)):
            h.update(f"{name}\n".encode())
            self._hash_frame(h, frame)
        for key in self.obsm_keys():
            value = self.obsm(key)
            h.update(f"obsm/{key}:{type(value).__name__}\n".encode())
            if hasattr(value, "columns"):
                self._hash_frame(h, value)
            elif sp.issparse(value):
                for arr in (value.data, value.indices, value.indptr):
                    self._hash_array(h, arr)
            else:
                self._hash_array(h, np.asarray(value))
        self._fingerprint = f"content:{h.hexdigest()}"
        return self._fingerprint

    def stat(self) -> dict:
        """What a store records as its source's stat: the bytes :meth:`fingerprint` hashed
        (an AnnData in memory has no file, no mtime: 0)."""
        self.fingerprint()
        return {"size": self._size, "mtime_ns": 0}

    def _hash_array(self, h, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}:{arr.shape}\n".encode())
        if arr.dtype.kind == "O":  # strings or mixed objects: by their text
            arr = np.asarray([str(v) for v in arr.ravel()])
        h.update(memoryview(arr.reshape(-1).view(np.uint8)))
        self._size += arr.nbytes

    def _hash_frame(self, h, frame) -> None:
        """Index, column names and dtypes, and values; categories in their order (codes
        follow it)."""
        import pandas as pd

        h.update(f"{list(map(str, frame.columns))}\n".encode())
        self._hash_array(h, pd.util.hash_pandas_object(frame.index).to_numpy())
        for c in frame.columns:
            col = frame[c]
            h.update(f"{c}:{col.dtype}\n".encode())
            if isinstance(col.dtype, pd.CategoricalDtype):
                h.update(f"{list(map(str, col.cat.categories))}\n".encode())
            self._hash_array(h, pd.util.hash_pandas_object(col, index=False).to_numpy())


def open_source(
    source: str | Path | anndata.AnnData, x_source: str = "auto", name: str | None = None
) -> H5adSource | AnnDataSource:
    """The reader for ``source``: :class:`H5adSource` for a path (``.h5ad`` or AnnData
    ``.zarr``), :class:`AnnDataSource` for an AnnData in memory (``name``: what its
    messages call it)."""
    if isinstance(source, str | Path):
        return H5adSource(source, x_source)
    if getattr(source, "isbacked", False):
        raise InputError(
            f"{name or '<AnnData>'}: a backed AnnData; pass its file ({source.filename}) or "
            "load it into memory (adata.to_memory())"
        )
    return AnnDataSource(source, x_source, name or "<AnnData>")


_TOKENS_OF: dict[tuple[str, str], np.ndarray] = {}  # (vocabulary hash, ids hash) -> tokens
_TOKENS_OF_LOCK = threading.Lock()


def _tokens_of(mapping: TokenMapping, ids: np.ndarray) -> np.ndarray:
    """``mapping.tokens_of(ids)``, remembered for the last few gene lists: the files of a
    corpus often share one, and matching costs ~10 us per gene (a copy is returned)."""
    key = (mapping.sha256, hashlib.sha1(np.ascontiguousarray(ids).tobytes()).hexdigest())
    with _TOKENS_OF_LOCK:  # files compiled on two threads at once (compile_files' lanes)
        tokens = _TOKENS_OF.get(key)
    if tokens is None:
        tokens = mapping.tokens_of(ids)
        with _TOKENS_OF_LOCK:
            if len(_TOKENS_OF) >= 8:
                del _TOKENS_OF[next(iter(_TOKENS_OF))]
            _TOKENS_OF[key] = tokens
    return tokens.copy()


def match_genes(
    src: H5adSource | AnnDataSource, mapping: TokenMapping, species: str, column: str | None = None
) -> tuple[np.ndarray, str, str | None]:
    """Tokens of the file's genes and where their ids came from.

    With ``column=None`` the ids are ``var_names``; when none of them is in the
    vocabulary (symbols in ``var_names``, ids in ``var['gene_ids']``, as scanpy writes
    10x data), the var column that matches the most genes is used instead.

    Returns
    -------
    col_tokens, source, note
        Token of each column (-1 outside the vocabulary), ``"var_names"`` or
        ``"var/<column>"``, and a sentence for the report when a column was chosen here.

    Raises
    ------
    InputError
        No gene overlaps; the message shows sample ids of both sides and the var columns.
    """
    ids = src.var_ids(column)
    tokens = _tokens_of(mapping, ids)
    if (tokens >= 0).any():
        return tokens, "var_names" if column is None else f"var/{column}", None
    columns = src.var_columns()
    if column is None:
        best = None
        for c in columns:
            t = mapping.tokens_of(src.var_ids(c))
            if (t >= 0).sum() > (0 if best is None else (best[1] >= 0).sum()):
                best = (c, t)
        if best is not None:
            c, t = best
            note = (
                f"var_names match no {species} gene id; genes matched on var column {c!r} "
                f"({int((t >= 0).sum())} of {len(t)}): compile.var_column={c} chooses it "
                "explicitly"
            )
            return t, f"var/{c}", note
    where = "var_names" if column is None else f"var column {column!r}"
    vocab = mapping.gene_ids[2:5]
    raise InputError(
        f"{src.path}: no gene overlaps the {species} vocabulary: {where} look like "
        f"{[str(g) for g in ids[:3]]}, the vocabulary's ids ({mapping.path}) like {vocab}; "
        f"no var column matches either (columns: {columns}). Pass compile.var_column=<column "
        "with the vocabulary's ids>, or map the genes to those ids first"
    )
