"""Cells to tokens: the one implementation the compiler and the embedder share.

Input is a CSR block of raw rows (all genes of the file); output is, per cell, the
vocabulary-mapped nonzero genes ordered by value descending then token ascending, the
order the scConcept "top-nonzero" selection needs. The order is decided on the exact
input values, before any normalization or dtype cast.

The order is computed cell by cell in one compiled pass (:func:`_order_cells`, numba,
GIL released): each cell's kept entries are gathered into a small buffer and put in order
by stable counting/radix passes (token, then value), so the cost is linear in the
entries and does not depend on a SIMD sort. A cell whose kept tokens already ascend
(the file's genes in vocabulary order) skips the token passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from concept.vocab import InputError

COUNTING_MAX = 2048  # cells whose largest value key is below this sort values by counting


@dataclass
class TokenizedBlock:
    """Cells of one block, packed: cell i owns ``[indptr[i], indptr[i+1])``."""

    indptr: np.ndarray  # int64 (n+1)
    tokens: np.ndarray  # int64 (nnz), or the dtype the caller asked for
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


def value_keys(data: np.ndarray) -> np.ndarray:
    """Unsigned integers in the order of the (non-negative) values, 0 exactly for 0.

    Integers as themselves; floats as their bit patterns, which order non-negative floats
    (``-0.0`` is made ``0.0`` first). :func:`key_values` turns keys back into values.
    """
    if data.dtype.kind in "iu":
        if data.dtype.itemsize == 8:
            return data.view(np.uint64)
        return data.view(np.uint32) if data.dtype.itemsize == 4 else data.astype(np.uint32)
    wide = data.dtype.itemsize == 8
    floats = data.astype(np.float64 if wide else np.float32) + 0.0  # a copy without -0.0
    return floats.view(np.uint64 if wide else np.uint32)


def key_values(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The values of :func:`value_keys` ``keys``, in ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return keys.view(dtype) if dtype.itemsize == keys.itemsize else keys.astype(dtype)
    floats = keys.view(np.float64 if keys.itemsize == 8 else np.float32)
    return floats if floats.dtype == dtype else floats.astype(dtype)


@numba.njit(nogil=True, cache=True, inline="always")
def _digit(tokens, keys, q, shift, on_token):
    """Byte ``shift`` of entry ``q``'s token (ascending), or its complement in the value
    key (so that larger values come first)."""
    if on_token:
        return (np.int64(tokens[q]) >> shift) & 0xFF
    return 255 - ((np.int64(keys[q]) >> shift) & 0xFF)


@numba.njit(nogil=True, cache=True)
def _stable_pass(src_t, src_k, dst_t, dst_k, off, n, shift, on_token, hist):
    """One stable counting pass over the byte ``shift`` of the tokens (ascending) or of
    the value keys (descending), from ``src[:n]`` into ``dst[off:off+n]``."""
    hist[:257] = 0
    for q in range(n):
        hist[_digit(src_t, src_k, q, shift, on_token) + 1] += 1
    for b in range(256):
        hist[b + 1] += hist[b]
    for q in range(n):
        x = _digit(src_t, src_k, q, shift, on_token)
        p = hist[x]
        hist[x] = p + 1
        dst_t[off + p] = src_t[q]
        dst_k[off + p] = src_k[q]


@numba.njit(nogil=True, cache=True)
def _counting_pass(src_t, src_k, dst_t, dst_k, off, n, kmax, hist):
    """Stable counting sort by value key descending (keys at most ``kmax``)."""
    hist[: kmax + 2] = 0
    for q in range(n):
        hist[kmax - np.int64(src_k[q]) + 1] += 1
    for b in range(kmax + 1):
        hist[b + 1] += hist[b]
    for q in range(n):
        x = kmax - np.int64(src_k[q])
        p = hist[x]
        hist[x] = p + 1
        dst_t[off + p] = src_t[q]
        dst_k[off + p] = src_k[q]


@numba.njit(nogil=True, cache=True)
def _order_cells(indptr, indices, keys, col_tokens, cells, out_t, out_k, kept, n_genes, sums):
    """Kept entries of ``cells`` (in that order) into ``out_t``/``out_k``, each cell by
    value key descending then token ascending; ``kept``, ``n_genes`` and the float64 sum
    of the keys (the row sum, where the keys are the values) per emitted cell.
    Returns the number of entries written."""
    longest = 0
    for i in range(len(indptr) - 1):
        longest = max(longest, indptr[i + 1] - indptr[i])
    a_t = np.empty(longest, out_t.dtype)
    a_k = np.empty(longest, keys.dtype)
    b_t = np.empty(longest, out_t.dtype)
    b_k = np.empty(longest, keys.dtype)
    hist = np.zeros(max(COUNTING_MAX, 256) + 2, np.int64)
    pos = 0
    for c in range(len(cells)):
        i = cells[c]
        n = 0
        nonzero = 0
        ascending = True
        prev = -1
        t_or, t_and = 0, -1
        k_or, k_and, kmax = np.int64(0), np.int64(-1), np.int64(0)
        total = 0.0
        for j in range(indptr[i], indptr[i + 1]):
            k = keys[j]
            if k == 0:
                continue
            nonzero += 1
            total += k
            t = np.int64(col_tokens[indices[j]])
            if t < 0:
                continue
            a_t[n] = t
            a_k[n] = k
            n += 1
            ascending = ascending and t > prev
            prev = t
            t_or |= t
            t_and &= t
            kk = np.int64(k)
            k_or |= kk
            k_and &= kk
            kmax = max(kmax, kk)
        kept[c] = n
        n_genes[c] = nonzero
        sums[c] = total
        # the passes to run: varying token bytes (unless ascending), then the value key
        t_diff = 0 if ascending else t_or ^ t_and
        k_diff = k_or ^ k_and
        counting = k_diff != 0 and 0 <= kmax < COUNTING_MAX
        steps = 1 if counting else 0
        for s in range(0, 64, 8):
            steps += (((t_diff >> s) & 0xFF) != 0) + (not counting and ((k_diff >> s) & 0xFF) != 0)
        src_t, src_k, dst_t, dst_k = a_t, a_k, b_t, b_k
        for s in range(0, 64 if t_diff else 0, 8):
            if (t_diff >> s) & 0xFF:
                steps -= 1
                if steps == 0:
                    _stable_pass(src_t, src_k, out_t, out_k, pos, n, s, True, hist)
                else:
                    _stable_pass(src_t, src_k, dst_t, dst_k, 0, n, s, True, hist)
                    src_t, src_k, dst_t, dst_k = dst_t, dst_k, src_t, src_k
        if counting:
            _counting_pass(src_t, src_k, out_t, out_k, pos, n, kmax, hist)
        else:
            for s in range(0, 64 if k_diff else 0, 8):
                if (k_diff >> s) & 0xFF:
                    steps -= 1
                    if steps == 0:
                        _stable_pass(src_t, src_k, out_t, out_k, pos, n, s, False, hist)
                    else:
                        _stable_pass(src_t, src_k, dst_t, dst_k, 0, n, s, False, hist)
                        src_t, src_k, dst_t, dst_k = dst_t, dst_k, src_t, src_k
        if t_diff == 0 and k_diff == 0:  # nothing to sort
            out_t[pos : pos + n] = a_t[:n]
            out_k[pos : pos + n] = a_k[:n]
        pos += n
    return pos


def tokenize_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    col_tokens: np.ndarray,
    normalization: str = "raw",
    cells: np.ndarray | None = None,
    token_dtype: np.dtype = np.int64,
    out: tuple[np.ndarray, np.ndarray] | None = None,
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
    cells
        The block's rows to emit, in this order (default: all, in order); every field of
        the result follows it.
    token_dtype
        The dtype of the returned tokens (the compiler asks for the store's).
    out
        Buffers to reuse: ``len(data)`` tokens of ``token_dtype`` and ``len(data)`` value
        keys (:func:`value_keys`, at most 8 bytes each) at least; the result's tokens (and
        raw values, where the keys are the values) are views into them. Default: new
        arrays.

    Raises
    ------
    InputError
        Negative, NaN or infinite values (the caller adds the file name).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indptr = indptr - indptr[0]
    data = data[: indptr[-1]]
    if data.size:
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise InputError("NaN or infinite expression values")
        if data.min() < 0:
            raise InputError(f"negative expression values (min {data.min()})")
    cells = np.arange(len(indptr) - 1) if cells is None else np.asarray(cells, np.int64)
    keys = value_keys(data)
    if out is None:
        tokens, ordered = np.empty(len(data), token_dtype), np.empty(len(data), keys.dtype)
    else:
        tokens = out[0]
        ordered = out[1].view(np.uint8)[: len(data) * keys.itemsize].view(keys.dtype)
    kept = np.empty(len(cells), np.int64)
    n_genes = np.empty(len(cells), np.int32)
    sums = np.empty(len(cells), np.float64)
    col_tokens = np.asarray(col_tokens, np.int32)
    args = (indptr, indices, keys, col_tokens, cells, tokens, ordered, kept, n_genes, sums)
    total = _order_cells(*args)
    out_indptr = np.zeros(len(cells) + 1, np.int64)
    np.cumsum(kept, out=out_indptr[1:])
    values = key_values(ordered[:total], data.dtype)
    # Integer keys of 32 bits are the values and their float64 sums exact in any order;
    # other sums are numpy's (its summation order, as the stores have always held them).
    exact = data.dtype.kind in "iu" and keys.itemsize == 4
    total_counts = sums if exact else row_sums(indptr, data)[cells]
    if normalization != "raw":
        values = normalize(values, np.repeat(total_counts, kept), normalization)
    return TokenizedBlock(out_indptr, tokens[:total], values, total_counts, n_genes)


@numba.njit(nogil=True, cache=True)
def _take_cells(indptr, order, tokens, values, out_tokens, out_values):
    pos = 0
    for c in range(len(order)):
        a, b = indptr[order[c]], indptr[order[c] + 1]
        out_tokens[pos : pos + b - a] = tokens[a:b]
        out_values[pos : pos + b - a] = values[a:b]
        pos += b - a
    return pos


def take_cells(
    indptr: np.ndarray,
    order: np.ndarray,
    tokens: np.ndarray,
    values: np.ndarray,
    out: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Packed cells (``indptr``) put in ``order``: their tokens and values copied into the
    ``out`` buffers (of the same dtypes, long enough); returns the filled views."""
    raw = f"u{values.itemsize}"  # copied as bytes (numba has no float16)
    n = _take_cells(
        indptr, np.asarray(order, np.int64), tokens, values.view(raw), out[0], out[1].view(raw)
    )
    return out[0][:n], out[1][:n]


def drop_duplicate_columns(col_tokens: np.ndarray) -> int:
    """Keep the first source column of each token; later duplicates (e.g. two versions of
    one Ensembl gene) become -1. Returns how many were dropped."""
    mapped = np.flatnonzero(col_tokens >= 0)
    _, first = np.unique(col_tokens[mapped], return_index=True)
    first_of_token = np.zeros(len(col_tokens), bool)
    first_of_token[mapped[first]] = True
    dup = mapped[~first_of_token[mapped]]
    col_tokens[dup] = -1
    return len(dup)
