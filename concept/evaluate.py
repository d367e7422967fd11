"""Held-out evaluation of a checkpoint beside an HVG+PCA baseline computed on the same cells.

``python -m concept.evaluate checkpoint=RUN_DIR`` (or ``checkpoint=latest
PATH.PROJECT_PATH=P``) prints one table (rows: metrics; columns: model, baseline), writes
it as ``evaluation.json`` and ``evaluation.md`` into the run folder and draws
``evaluation.png``: the cells in 2-D, coloured by cell type and by dataset, the model
beside the baseline.

Which files
    By default the run config's splits: *query* = their ``val`` files (held out from
    training), *reference* = their ``train`` files. ``query=[...]`` and
    ``reference=[...]`` name the files instead (``query`` alone keeps the run's train files
    as reference); ``inputs=[...]`` evaluates leave-one-dataset-out: each file in turn is
    the query and the others its reference, pooled over all files. At most
    ``max_cells_per_file`` cells are drawn from each file (seeded).

kNN cell-type transfer
    Each query cell gets the majority label (``label_key``) of its ``knn_k`` nearest
    reference cells of the same species (reference datasets -> query datasets, never a
    split of cells of one dataset); accuracy and sklearn's macro-F1 are pooled over all
    query cells with a label. A query label absent from the reference counts as an error.

View retrieval recall@1, panel sizes ``panel_sizes``
    The training validation's views: query cells are shuffled into batches of
    ``view_batch_size`` (a remainder is dropped when at least one full batch exists);
    each batch draws two disjoint random gene sets of P genes from the file's mapped genes
    (:func:`~concept.data.views.plan_views`, ``panel_selection=random``), each cell's view
    keeps its top ``max_tokens`` nonzero genes of the set, and recall@1 is the fraction of
    views whose nearest view (cosine) in the batch is the other view of the same cell (both
    directions). A size P with 2P above a file's mapped genes is left out (``n/a``).

The baseline
    log1p(CP10k) of the mapped genes (CP10k on each cell's total over all its genes).
    kNN: the ``n_hvg`` genes of highest normalized dispersion on the reference cells
    (Seurat flavour: variance/mean of CP10k, log, z-scored within 20 bins of mean
    expression), centred and reduced to ``n_pcs`` components by PCA fitted on the
    reference; kNN in that space. Views: random panels barely meet 2,000 HVGs, so a
    second PCA (same preprocessing, every gene expressed in the reference, fitted on at
    most ``pca_fit_cells`` reference cells) is used, and each view is projected with
    the loadings of its own genes only, the other genes held at the reference mean; the
    baseline sees every gene of a view, the model its top ``max_tokens``.

The picture shows the cells of the first query file's species: the model's embedding and
the baseline's HVG+PCA (fitted on the shown cells' files), each in 2-D by t-SNE (``plot=
tsne``) or PCA (``plot=pca``), at most ``plot_cells`` cells.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from concept.baseline import PcaBaseline, highly_variable, log_cp10k
from concept.cli import entry_point
from concept.config import ConfigError, validate_schema
from concept.data.views import ViewSpec, plan_views
from concept.embed import EmbedOptions
from concept.eval_metrics import classification_scores, knn_predict, view_recall
from concept.inference import Embedder
from concept.plots import draw
from concept.splits import configured_files, resolve_split_list
from concept.tokenize import TokenizedBlock

log = logging.getLogger("concept.evaluate")
REPORTED_SETTINGS = (
    "label_key",
    "knn_k",
    "panel_sizes",
    "view_batch_size",
    "max_cells_per_file",
    "n_hvg",
    "n_pcs",
    "pca_fit_cells",
    "seed",
)


@dataclass
class EvaluateConfig(EmbedOptions):
    """``python -m concept.evaluate`` (``conf/evaluate.yaml``)."""

    inputs: list[str] | None = None
    reference: list[str] | None = None
    query: list[str] | None = None
    label_key: str = "cell_type"
    knn_k: int = 15
    panel_sizes: list[int] = field(default_factory=lambda: [200, 800, 6400])
    view_batch_size: int = 256
    max_cells_per_file: int = 5000
    n_hvg: int = 2000
    n_pcs: int = 50
    pca_fit_cells: int = 3000
    plot: str = "tsne"
    plot_cells: int = 3000
    seed: int = 0
    output_dir: str | None = None  # None: the run folder (else the checkpoint's folder)
    # split files chosen on the command line (datamodule/split_<group>=<name>, --config-dir),
    # mounted here as in the training config; they replace the run config's splits
    datamodule: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.plot not in ("tsne", "pca"):
            raise ConfigError(f"plot={self.plot!r}: expected tsne or pca")
        if self.inputs and (self.reference or self.query):
            raise ConfigError("inputs=[...] (leave-one-out) excludes reference=/query=")
        if self.reference and not self.query:
            raise ConfigError("reference=[...] needs query=[...]")
        if self.inputs is not None and len(self.inputs) < 2:
            raise ConfigError("inputs=[...] needs at least two files (leave-one-dataset-out)")


# --- cells ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    """One input file and how to read it."""

    path: str
    species: str | None
    x_source: str
    gene_id_column: str | None
    gene_symbols: bool

    @property
    def name(self) -> str:
        return Path(self.path).name.removesuffix(".h5ad")


@dataclass
class Cells:
    """The drawn cells of one file, tokenized, embedded and normalized for the baseline."""

    spec: FileSpec
    species: str
    blk: TokenizedBlock
    labels: np.ndarray  # object: label strings, None where missing
    var_tokens: np.ndarray
    n_total: int
    model: np.ndarray  # (n, d) embeddings
    x: sp.csr_matrix  # log1p(CP10k), columns = tokens


def concat_blocks(blocks: list[TokenizedBlock]) -> TokenizedBlock:
    """One block of the cells of several (in order)."""
    offsets = np.cumsum([0] + [int(b.indptr[-1]) for b in blocks])
    indptr = np.concatenate(
        [[0]] + [b.indptr[1:] + o for b, o in zip(blocks, offsets, strict=False)]
    )
    return TokenizedBlock(
        indptr,
        np.concatenate([b.tokens for b in blocks]),
        np.concatenate([b.values for b in blocks]),
        np.concatenate([b.total_counts for b in blocks]),
        np.concatenate([b.n_genes for b in blocks]),
    )


def load_cells(embedder: Embedder, spec: FileSpec, cfg: EvaluateConfig) -> Cells:
    """Draw, tokenize and embed a file's cells (at most ``max_cells_per_file``)."""
    from tqdm.auto import tqdm

    file = embedder.open(
        spec.path, spec.species, spec.gene_id_column, spec.gene_symbols, spec.x_source
    )
    with file.source as src:
        n = src.n_cells
        rows = None
        if n > cfg.max_cells_per_file:
            rows = np.sort(
                np.random.default_rng(cfg.seed).choice(n, cfg.max_cells_per_file, replace=False)
            )
        blk = concat_blocks([b for _, b in embedder.blocks(file, cfg.rows_per_read, rows)])
        obs = src.obs_column(cfg.label_key)
    labels = np.full(n, None, dtype=object)
    if obs is None:
        log.warning("%s: no obs column %r: no kNN labels", spec.path, cfg.label_key)
    else:
        codes, cats = obs
        labels[codes >= 0] = np.asarray(cats, dtype=object)[codes[codes >= 0]]
    labels = labels if rows is None else labels[rows]
    with tqdm(total=len(labels), unit="cell", desc=spec.name, disable=not cfg.progress) as bar:
        model = embedder.embed_block(blk, file.species, file.var_tokens, bar)
    n_tokens = embedder.mappings[file.species].size
    return Cells(
        spec, file.species, blk, labels, file.var_tokens, n, model, log_cp10k(blk, n_tokens)
    )


def plan_folds(
    cfg: EvaluateConfig, embedder: Embedder
) -> list[tuple[list[FileSpec], list[FileSpec]]]:
    """``(reference files, query files)`` of each fold (see the module docstring)."""

    def explicit(paths: list[str]) -> list[FileSpec]:
        return [
            FileSpec(
                str(Path(p).absolute()),
                cfg.species,
                cfg.x_source or "auto",
                cfg.gene_id_column,
                cfg.gene_symbols,
            )
            for p in paths
        ]

    if cfg.inputs:
        files = explicit(cfg.inputs)
        return [([f for f in files if f != q], [q]) for q in files]
    rc = embedder.run_config
    split: dict[str, list[FileSpec]] = {"train": [], "val": []}
    chosen = [v for k, v in cfg.datamodule.items() if k.startswith("split_")]
    if chosen:
        for section in split:
            for f in resolve_split_list(chosen, section, "datamodule.split_*"):
                split[section].append(
                    FileSpec(
                        str(f.path),
                        cfg.species or f.species,
                        cfg.x_source or "auto",
                        cfg.gene_id_column,
                        cfg.gene_symbols,
                    )
                )
    elif rc is not None:
        for f in configured_files(rc):
            split[f.section].append(
                FileSpec(
                    str(f.path),
                    cfg.species or f.species,
                    cfg.x_source or rc.compile.x_source,
                    cfg.gene_id_column or rc.compile.var_column,
                    cfg.gene_symbols,
                )
            )
    if cfg.query:
        reference = explicit(cfg.reference) if cfg.reference else split["train"]
        if not reference:
            raise ConfigError(
                "query=[...] without reference=[...] needs a run config with train files"
            )
        return [(reference, explicit(cfg.query))]
    if not split["val"] or not split["train"]:
        where = (
            f"{embedder.run_dir}/config.yaml" if rc else f"{embedder.checkpoint} (no run config)"
        )
        raise ConfigError(f"{where} names no train and val files: pass inputs=[...] or query=[...]")
    return [(split["train"], split["val"])]


# --- evaluation -------------------------------------------------------------------------------


def _labelled(cells: list[Cells], what) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a label of the cells' ``what`` (embedding), and those labels."""
    x = np.concatenate([what(c) for c in cells])
    y = np.concatenate([c.labels for c in cells])
    keep = np.array([v is not None for v in y], bool)
    return x[keep], y[keep].astype(str)


def _views(
    embedder: Embedder, cells: Cells, size: int, base: PcaBaseline | None, cfg: EvaluateConfig
) -> np.ndarray | None:
    """Over the batches of one file: summed recall@1 of the model and of the baseline (NaN
    without one), cells, and cells / batch size (for chance); None if the size does not fit."""
    if 2 * size > len(cells.var_tokens):
        return None
    n = len(cells.labels)
    order = np.random.default_rng([cfg.seed, size]).permutation(n)
    bs = cfg.view_batch_size
    spec = ViewSpec(
        max_tokens=embedder.max_tokens,
        panel_selection="random",
        panel_size_min=size,
        panel_size_max=size,
        gene_sampling_strategy="top-nonzero",
        normalization=embedder.normalization,
        train=False,
        seed=cfg.seed,
    )
    vocab = embedder.mappings[cells.species].size
    out = np.zeros(4)
    for i in range(max(n // bs, 1)):
        rows = order[i * bs : (i + 1) * bs]
        batch = embedder.packed(cells.blk, rows, cells.species, cells.var_tokens, index=i)
        batch.views = plan_views(batch, spec, vocab)
        z = embedder.encode(batch)
        m = len(rows)
        out[0] += view_recall(z[:m], z[m:]) * m
        if base is None:
            out[1] = math.nan
        else:
            g1, g2 = batch.views.gene_sets
            x = cells.x[rows]
            out[1] += view_recall(base.project_view(x, g1), base.project_view(x, g2)) * m
        out[2:] += m, 1.0
    return out


def _species_metrics(
    embedder: Embedder, ref: list[Cells], query: list[Cells], cfg: EvaluateConfig, knn, views
) -> None:
    """Add one fold's kNN predictions and view sums for one species to ``knn`` and ``views``."""
    full = None
    if ref:
        x_ref = sp.vstack([c.x for c in ref]).tocsr()
        fit = x_ref
        if x_ref.shape[0] > cfg.pca_fit_cells:
            pick = np.random.default_rng(cfg.seed).choice(
                x_ref.shape[0], cfg.pca_fit_cells, replace=False
            )
            fit = x_ref[np.sort(pick)]
        expressed = np.flatnonzero(np.asarray(fit.sum(0)).ravel() > 0)
        full = PcaBaseline(fit, expressed, cfg.n_pcs, cfg.seed)
        hvg = PcaBaseline(x_ref, highly_variable(x_ref, cfg.n_hvg), cfg.n_pcs, cfg.seed)
        for col, what in (("model", lambda c: c.model), ("baseline", lambda c: hvg.transform(c.x))):
            ref_x, ref_y = _labelled(ref, what)
            q_x, q_y = _labelled(query, what)
            if len(ref_y) and len(q_y):
                knn[col][0].append(q_y)
                knn[col][1].append(knn_predict(ref_x, ref_y, q_x, cfg.knn_k))
    else:
        log.warning(
            "no reference file of the species: kNN skipped for %s", [c.spec.name for c in query]
        )
    for c in query:
        for size in cfg.panel_sizes:
            out = _views(embedder, c, size, full, cfg)
            if out is not None:
                views[size] += out


def evaluate(cfg: EvaluateConfig, embedder: Embedder | None = None) -> dict:
    """Compute the metrics, write ``evaluation.{json,md,png}`` and return the report."""
    embedder = embedder or cfg.embedder()
    folds = plan_folds(cfg, embedder)
    loaded: dict[FileSpec, Cells] = {}
    for ref, query in folds:
        for spec in [*query, *ref]:
            if spec not in loaded:
                loaded[spec] = load_cells(embedder, spec, cfg)

    knn = {"model": ([], []), "baseline": ([], [])}  # truth and predictions
    views = {p: np.zeros(4) for p in cfg.panel_sizes}  # see _views
    roles: dict[FileSpec, set[str]] = {s: set() for s in loaded}
    for ref, query in folds:
        for spec in ref:
            roles[spec].add("reference")
        for spec in query:
            roles[spec].add("query")
        for species in sorted({loaded[s].species for s in query}):
            r = [loaded[s] for s in ref if loaded[s].species == species]
            q = [loaded[s] for s in query if loaded[s].species == species]
            _species_metrics(embedder, r, q, cfg, knn, views)

    metrics, chance = {}, {}
    key = cfg.label_key
    for col, (truth, pred) in knn.items():
        scores = classification_scores(np.concatenate(truth), np.concatenate(pred)) if truth else {}
        for name in ("accuracy", "macro_f1"):
            metrics.setdefault(f"knn_{name}_{key}", {})[col] = scores.get(name)
    for size, (m, b, n, batches) in views.items():
        name = f"view_recall@1_P{size}"
        metrics[name] = {
            "model": float(m / n) if n else None,
            "baseline": float(b / n) if n and not math.isnan(b) else None,
        }
        chance[name] = float(batches / n) if n else None  # 1 / cells per batch, on average
    report = {
        "checkpoint": str(embedder.checkpoint),
        "max_tokens": embedder.max_tokens,
        "metrics": metrics,
        "chance": chance,
        "files": [
            {
                "path": s.path,
                "species": c.species,
                "role": "+".join(sorted(roles[s])),
                "cells": len(c.labels),
                "cells_in_file": c.n_total,
            }
            for s, c in loaded.items()
        ],
        "settings": {k: v for k, v in asdict(cfg).items() if k in REPORTED_SETTINGS},
    }
    out_dir = Path(cfg.output_dir or embedder.run_dir or embedder.checkpoint.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["picture"] = str(out_dir / "evaluation.png")
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "evaluation.md").write_text(markdown(report))
    first_query = folds[0][1][0]
    shown = [c for c in loaded.values() if c.species == loaded[first_query].species]
    draw(shown, cfg, Path(report["picture"]))
    return report


# --- output -------------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table(report: dict) -> str:
    """The metrics as an aligned text table."""
    rows = [("metric", "model", "baseline")]
    rows += [(k, _fmt(v["model"]), _fmt(v["baseline"])) for k, v in report["metrics"].items()]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b:>8}  {c:>8}" for a, b, c in rows)


def markdown(report: dict) -> str:
    """The report as markdown: the table, the chance levels and the files."""
    lines = ["# Evaluation", "", f"checkpoint: `{report['checkpoint']}`", ""]
    lines += ["| metric | model | baseline |", "| --- | ---: | ---: |"]
    lines += [
        f"| {k} | {_fmt(v['model'])} | {_fmt(v['baseline'])} |"
        for k, v in report["metrics"].items()
    ]
    lines += [
        "",
        "Chance recall@1 (1 / cells per batch): "
        + ", ".join(f"{k}: {_fmt(v)}" for k, v in report["chance"].items()),
    ]
    st = report["settings"]
    lines += [
        "",
        f"kNN: k={st['knn_k']}, `{st['label_key']}` transferred from the reference files to the "
        f"query files. View retrieval: batches of {st['view_batch_size']} cells, two disjoint "
        f"random panels per batch, the model's views keep their top {report['max_tokens']} "
        "genes.",
        "",
        f"Baseline: log1p(CP10k) -> {st['n_hvg']} HVGs -> PCA({st['n_pcs']}) fitted on the "
        "reference, for kNN; for view retrieval, PCA of every reference-expressed gene, each "
        "view projected with its own genes' loadings (the other genes at the reference mean).",
        "",
    ]
    lines += ["| file | species | role | cells |", "| --- | --- | --- | ---: |"]
    lines += [
        f"| {Path(f['path']).name} | {f['species']} | {f['role']} | {f['cells']} of {f['cells_in_file']} |"
        for f in report["files"]
    ]
    lines += ["", f"![embeddings]({Path(report['picture']).name})", ""]
    return "\n".join(lines)


def run(cfg: EvaluateConfig) -> int:
    report = evaluate(cfg)
    print(table(report))
    print(f"picture: {report['picture']}")
    return 0


main = entry_point(run, "evaluate", partial(validate_schema, schema=EvaluateConfig))

if __name__ == "__main__":
    main()
