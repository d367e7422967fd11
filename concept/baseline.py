"""The HVG+PCA baseline of :mod:`concept.evaluate`: log1p(CP10k), highly variable genes
(Seurat flavour) and a PCA that projects a view with its own genes' loadings."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from concept.tokenize import TokenizedBlock, normalize


def log_cp10k(blk: TokenizedBlock, n_tokens: int) -> sp.csr_matrix:
    """log1p(CP10k) of a block's cells, columns = tokens."""
    counts = np.diff(blk.indptr)
    values = normalize(blk.values, np.repeat(blk.total_counts, counts), "totalcount_log1p")
    x = sp.csr_matrix(
        (values.astype(np.float32), blk.tokens, blk.indptr), shape=(len(counts), n_tokens)
    )
    x.sort_indices()
    return x


def highly_variable(x: sp.csr_matrix, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Columns of the ``n_top`` highest normalized dispersions (ascending column order).

    Seurat flavour on log1p(CP10k) input: dispersion = variance / mean of CP10k, logged,
    then z-scored within ``n_bins`` equal-width bins of log1p(mean); a bin of one gene
    (no spread) gives z = 0.
    """
    e = x.copy()
    e.data = np.expm1(e.data)
    n = e.shape[0]
    mean = np.asarray(e.mean(0)).ravel()
    var = (np.asarray(e.multiply(e).mean(0)).ravel() - mean**2) * n / max(n - 1, 1)
    cols = np.flatnonzero((mean > 0) & (var > 0))
    disp = np.log(var[cols] / mean[cols])
    level = np.log1p(mean[cols])
    edges = np.linspace(level.min(), level.max(), n_bins + 1)
    b = np.clip(np.digitize(level, edges[1:-1]), 0, n_bins - 1)
    size = np.bincount(b, minlength=n_bins)
    mu = np.bincount(b, disp, n_bins) / np.maximum(size, 1)
    sq = np.bincount(b, (disp - mu[b]) ** 2, n_bins)
    sd = np.sqrt(sq / np.maximum(size - 1, 1))
    z = np.where(sd[b] > 0, (disp - mu[b]) / np.where(sd[b] > 0, sd[b], 1), 0.0)
    top = np.argsort(-z, kind="stable")[:n_top]
    return np.sort(cols[top])


class PcaBaseline:
    """Centred PCA of chosen columns (genes) of log1p(CP10k), fitted on reference cells."""

    def __init__(self, x: sp.csr_matrix, genes: np.ndarray, n_pcs: int, seed: int):
        from sklearn.decomposition import PCA

        self.genes = genes
        xs = x[:, genes]
        k = max(min(n_pcs, xs.shape[0] - 1, len(genes) - 1), 1)
        # arpack centres sparse input implicitly (no dense copy) and is seeded
        self.pca = PCA(k, svd_solver="arpack", random_state=seed).fit(xs)

    def transform(self, x: sp.csr_matrix) -> np.ndarray:
        return self.pca.transform(x[:, self.genes])

    def project_view(self, x: sp.csr_matrix, view_genes: np.ndarray) -> np.ndarray:
        """PC scores from a view's genes alone (the other genes at the reference mean)."""
        pos = np.searchsorted(self.genes, view_genes)
        known = (pos < len(self.genes)) & (
            self.genes[np.minimum(pos, len(self.genes) - 1)] == view_genes
        )
        pos, cols = pos[known], view_genes[known]
        w = self.pca.components_[:, pos].T  # (genes of the view, k)
        return np.asarray(x[:, cols] @ w) - self.pca.mean_[pos] @ w
