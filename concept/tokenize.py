"""Cells to tokens: the one implementation the compiler and the embedder share.

Input is a CSR block of raw rows (all genes of the file); output is, per cell, the
vocabulary-mapped nonzero genes ordered by value descending then token ascending, the
order the scConcept "top-nonzero" selection needs. The order is decided on the exact
input values, before any normalization or dtype cast, with one ``np.sort`` of packed
64-bit keys per block (several times faster than ``np.lexsort``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from concept.vocab import InputError


@dataclass
class TokenizedBlock:
    """Cells of one block, packed: cell i owns ``[indptr[i], indptr[i+1])``."""

    indptr: np.ndarray  # int64 (n+1)
    tokens: np.ndarray  # int64 (nnz)
    values: np.ndarray  # exact input values (raw) or normalized float64
    total_counts: np.ndarray  # float64 (n): row sum over all genes before masking
    n_genes: np.ndarray  # int32 (n): nonzeros before masking


def normalize(values: np.ndarray, totals: np.ndarray, method: str) -> np.ndarray:
    """Per-cell normalization of ``values`` given each entry's cell total (reference formulas)."""
    if method == "raw":
        return values
    if method == "log1p":
        return np.log1p(values.astype(np.float64))
    scaled = values / (totals + 1e-3) * 1e4
    if method == "totalcount":
        return scaled
    if method in ("totalcount_log1p", "totalcount/log1p"):
        return np.log1p(scaled)
    raise ValueError(f"unknown normalization {method!r}")


def _bits(n: int) -> int:
    return max(int(n).bit_length(), 1)


def row_sums(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Float64 sum of every CSR row (``indptr`` starting at 0), without per-entry row ids.

    ``np.add.reduceat`` runs over the nonempty rows only: their starts strictly increase
    and each segment ends where the next nonempty row starts (or at ``indptr[-1]``), so
    no entry is missed, whatever empty rows lie between or after them.
    """
    sums = np.zeros(len(indptr) - 1, np.float64)
    nonempty = np.flatnonzero(indptr[1:] > indptr[:-1])
    if len(nonempty):
        entries = data[: indptr[-1]]
        sums[nonempty] = np.add.reduceat(entries, indptr[nonempty], dtype=np.float64)
    return sums


def tokenize_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    col_tokens: np.ndarray,
    normalization: str = "raw",
) -> TokenizedBlock:
    """Tokenize a CSR block of cells.

    Parameters
    ----------
    indptr, indices, data
        CSR arrays of the block (``indptr`` may start at any offset).
    col_tokens
        Token of each source column, -1 for genes outside the vocabulary (and for
        duplicates after mapping, which the caller drops).
    normalization
        ``raw`` (values unchanged), ``log1p``, ``totalcount`` or ``totalcount_log1p``.

    Raises
    ------
    InputError
        Negative, NaN or infinite values (the caller adds the file name).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indptr = indptr - indptr[0]
    n = len(indptr) - 1
    if data.size:
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise InputError("NaN or infinite expression values")
        if data.min() < 0:
            raise InputError(f"negative expression values (min {data.min()})")
    total_counts = row_sums(indptr, data)
    nonzero = data != 0
    n_genes = np.diff(np.searchsorted(np.flatnonzero(nonzero), indptr)).astype(np.int32)

    tok = col_tokens[indices]
    keep = np.flatnonzero(nonzero & (tok >= 0))
    bounds = np.searchsorted(keep, indptr)  # kept entries of cell i: keep[bounds[i]:bounds[i+1]]
    out_indptr = bounds - bounds[0]
    kept = np.diff(bounds)
    tok, val = tok[keep], data[keep]
    row = np.repeat(np.arange(n, dtype=np.uint64), kept)

    # Packed key: cell | descending value rank | token. Integer values rank as themselves;
    # other values by their position among the block's distinct values.
    integral = val.dtype.kind in "iu" or (val.size and np.array_equal(val, np.floor(val)))
    vmax = val.max() if val.size else 0
    if integral and vmax < 2**40:
        vkey, vbits, uniq = None, _bits(int(vmax)), None
    else:
        uniq, inv = np.unique(val, return_inverse=True)
        vkey = (len(uniq) - 1 - inv).astype(np.uint64)
        vbits = _bits(len(uniq))
    tbits = _bits(int(col_tokens.max(initial=0)))
    if _bits(n) + vbits + tbits <= 64:
        # build the key in place: row, then value rank, then token
        key = row
        key <<= np.uint64(vbits)
        if vkey is None:
            key |= (int(vmax) - val.astype(np.int64)).astype(np.uint64)
        else:
            key |= vkey
        key <<= np.uint64(tbits)
        key |= tok.astype(np.uint64)
        key.sort()
        tok = (key & np.uint64((1 << tbits) - 1)).astype(np.int64)
        key >>= np.uint64(tbits)
        key &= np.uint64((1 << vbits) - 1)
        if uniq is None:
            val = (int(vmax) - key.astype(np.int64)).astype(val.dtype)
        else:
            val = uniq[len(uniq) - 1 - key.astype(np.int64)]
    else:  # keys too wide for 64 bits: slower but exact
        order = np.lexsort((tok, -val.astype(np.float64), row))
        tok, val = tok[order].astype(np.int64), val[order]
    if normalization == "raw":
        return TokenizedBlock(out_indptr, tok, val, total_counts, n_genes)
    cell_totals = np.repeat(total_counts, kept)
    return TokenizedBlock(
        out_indptr, tok, normalize(val, cell_totals, normalization), total_counts, n_genes
    )


def drop_duplicate_columns(col_tokens: np.ndarray) -> int:
    """Keep the first source column of each token; later duplicates (e.g. two versions of
    one Ensembl gene) become -1. Returns how many were dropped."""
    mapped = np.flatnonzero(col_tokens >= 0)
    _, first = np.unique(col_tokens[mapped], return_index=True)
    dup = np.setdiff1d(mapped, mapped[first])
    col_tokens[dup] = -1
    return len(dup)


def gather_cells(indptr: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Entry indices that put packed cells in ``order`` (vectorized segment gather)."""
    counts = np.diff(indptr)[order]
    starts = indptr[:-1][order]
    out_starts = np.cumsum(counts) - counts
    total = int(counts.sum())
    itype = np.int32 if indptr[-1] < 2**31 else np.int64  # half the bytes when it fits
    out = np.repeat((starts - out_starts).astype(itype), counts)
    out += np.arange(total, dtype=itype)
    return out
