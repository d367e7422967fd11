"""``evaluation.png``: the cells in 2-D, coloured by label and by dataset, the model's
embedding beside the HVG+PCA baseline (t-SNE or PCA)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from concept.baseline import PcaBaseline, highly_variable

if TYPE_CHECKING:
    from concept.evaluate import Cells, EvaluateConfig

MISSING = "(missing)"  # label of cells without one, in the picture


def _to_2d(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    return TSNE(
        2, init="pca", random_state=seed, perplexity=min(30.0, max(len(x) - 1, 1) / 3)
    ).fit_transform(x)


def draw(cells: list[Cells], cfg: EvaluateConfig, path: Path) -> None:
    """Model and baseline in 2-D, coloured by cell type and by dataset (2 x 2 panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_all = sp.vstack([c.x for c in cells]).tocsr()
    base = PcaBaseline(x_all, highly_variable(x_all, cfg.n_hvg), cfg.n_pcs, cfg.seed)
    labels = np.array([MISSING if v is None else v for c in cells for v in c.labels], dtype=object)
    datasets = np.concatenate([[c.spec.name] * len(c.labels) for c in cells]).astype(object)
    n = len(labels)
    pick = np.sort(np.random.default_rng(cfg.seed).permutation(n)[: cfg.plot_cells])
    spaces = {
        "model": np.concatenate([c.model for c in cells])[pick],
        "HVG+PCA baseline": base.transform(x_all[pick]),
    }
    fig, axes = plt.subplots(2, 2, figsize=(14, 11))
    for row, (title, x) in enumerate(spaces.items()):
        xy = _to_2d(x, cfg.plot, cfg.seed)
        for col, (what, values) in enumerate(
            ((cfg.label_key, labels[pick]), ("dataset", datasets[pick]))
        ):
            ax = axes[row, col]
            cats = sorted(set(values))
            cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
            for i, cat in enumerate(cats):
                m = values == cat
                color = "lightgrey" if cat == MISSING else cmap(i % cmap.N)
                ax.scatter(xy[m, 0], xy[m, 1], s=4, color=color, label=cat, rasterized=True)
            ax.set_title(f"{title}: {what} ({cfg.plot})")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
