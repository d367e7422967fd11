"""A deterministic, realistic synthetic single-cell project (CELLxGENE-like ``.h5ad`` files).

:func:`generate_project` writes everything the pipeline reads: eight ``.h5ad`` files for
two species in the layouts met in practice (CSR, ``raw/X`` beside a normalized ``X``, CSC,
dense), per-species token mappings, optional pretrained gene vectors, gene panels and the
split configs that name the files.

Expression model, per species: a heavy-tailed log-normal background profile; 8 cell types,
each with ~300 marker genes raised x8-x20 and two sub-states (a continuum between them);
3 shared cell-state programs (cycling, interferon, stress) that a fraction of the cells
carry. Per file: a multiplicative gene-wise batch effect (log-normal, sd 0.3), 2-4 donors
with a smaller gene-wise shift (sd 0.15) and their own cell-type composition, log-normal
library sizes (median 4,000-6,000 UMIs), Poisson counts. Each cell's expected profile is a
mixture of a few per-file profiles, so a chunk of rates is one small matrix product.

Files are generated in chunks of rows and streamed into HDF5, so memory stays bounded
(well under 2 GB) at 200,000 cells per file. Everything is a function of ``seed``: each
file, vocabulary and panel set draws from its own ``numpy`` generator keyed by
``(seed, purpose, index)``, so the files are independent and byte-reproducible.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
from anndata.io import write_elem
from tqdm.auto import tqdm

CELL_TYPES = (
    "T cell",
    "B cell",
    "monocyte",
    "NK cell",
    "fibroblast",
    "endothelial cell",
    "epithelial cell",
    "neuron",
)
TISSUES = ("blood", "lung", "brain", "gut")
# P(tissue | cell type): immune cells mostly come from blood, neurons from brain (some
# enteric ones from gut), stromal cells from solid tissues. Rows follow CELL_TYPES.
_TISSUE_PROBS = np.array(
    [
        [0.70, 0.20, 0.00, 0.10],
        [0.70, 0.15, 0.00, 0.15],
        [0.60, 0.30, 0.00, 0.10],
        [0.75, 0.15, 0.00, 0.10],
        [0.00, 0.50, 0.00, 0.50],
        [0.00, 0.40, 0.30, 0.30],
        [0.00, 0.50, 0.00, 0.50],
        [0.00, 0.00, 0.90, 0.10],
    ]
)
# Relative library size per cell type: small lymphocytes hold fewer transcripts than
# neurons or epithelial cells.
_TYPE_LIBRARY = np.array([0.8, 0.8, 1.1, 0.8, 1.2, 1.0, 1.2, 1.5])
_N_SUBSTATES = 2
_N_PROGRAMS = 3  # cycling, interferon response, stress

# sd of the background log-rates: calibrated so that ~1,500 of 20,000 genes are detected per
# cell at ~5,000 UMIs, with the top genes taking a realistic few percent of the counts each.
_BASE_LOG_SD = 2.4
_MARKERS_PER_TYPE = 300
_BATCH_SD = 0.3
_DONOR_SD = 0.15
_LIBRARY_LOG_SD = 0.45
_VOCAB_FRACTION_PER_FILE = 0.97
_EXTRA_FRACTION_PER_FILE = 0.03
_VERSIONED_FRACTION = 0.10
_MISSING_LABEL_FRACTION = 0.05
_PRETRAINED_COVERAGE = 0.90

CHUNK_ROWS = 1024  # cells generated at a time (three 1024 x n_genes buffers, ~200 MB at 20k)
_H5_CHUNK = 1 << 18  # HDF5 chunk (elements) of the resizable CSR/CSC datasets
_CSC_BLOCK_NNZ = 1 << 24  # target nonzeros per column block when transposing to CSC
_DENSE_MIN_CELLS = 50


@dataclass(frozen=True)
class _Species:
    name: str
    id_prefix: str
    symbol_prefix: str
    novel_prefix: str
    panels: tuple[tuple[str, int], ...]  # (file stem, nominal size)


SPECIES = (
    _Species(
        "hsapiens",
        "ENSG",
        "HGENE",
        "HNOVEL",
        (("targeted_small", 300), ("targeted_medium", 1000), ("targeted_large", 5000)),
    ),
    _Species(
        "mmusculus",
        "ENSMUSG",
        "Mgene",
        "Mnovel",
        (("targeted_small", 300), ("targeted_large", 5000)),
    ),
)


@dataclass(frozen=True)
class _FileSpec:
    name: str
    species: int  # index into SPECIES
    split: str  # train | val
    layout: str  # csr | raw | csc | dense
    dtype: type  # dtype of the stored counts
    version_suffix: bool = False  # ~10% of var ids carry ".N"
    missing_labels: bool = False  # ~5% of cell_type values are NaN
    tissue: bool = True  # obs has a `tissue` column
    sorted_genes: bool = True  # var in id order (else a file-specific order)


FILES = (
    _FileSpec("hs_csr_a", 0, "train", "csr", np.int32, version_suffix=True),
    _FileSpec("hs_raw_b", 0, "train", "raw", np.float32, missing_labels=True),
    _FileSpec("hs_csc_c", 0, "train", "csc", np.float32, sorted_genes=False),
    _FileSpec("hs_dense_d", 0, "train", "dense", np.float32, tissue=False),
    _FileSpec("hs_csr_e", 0, "val", "csr", np.int32),
    _FileSpec("mm_csr_a", 1, "train", "csr", np.float32),
    _FileSpec("mm_raw_b", 1, "train", "raw", np.float32),
    _FileSpec("mm_csr_c", 1, "val", "csr", np.int32),
)
SOURCE_NAME = "synth_cxg"
H5AD_DIR = Path("data") / SOURCE_NAME / "h5ads"
VOCAB_DIR = Path("references") / "vocabulary" / "token_mappings_per_specie"
EMBEDDING_DIR = Path("references") / "embeddings" / "esm2_t30"
PANEL_DIR = Path("panels")
SPLIT_DIR = Path("conf") / "datamodule"

# Independent random streams: np.random.default_rng([seed, purpose, index]).
_SEED_SPECIES, _SEED_FILE, _SEED_EMBEDDING, _SEED_PANEL = range(4)


# ----------------------------------------------------------------------------------------
# Species: genes, vocabulary and expression programs
# ----------------------------------------------------------------------------------------


@dataclass
class _SpeciesModel:
    """Genes of one species and the file-independent part of its expression model.

    The gene universe is the vocabulary (``n_genes`` ids) followed by a pool of extra ids
    that are absent from the vocabulary (as genes missing from a model's vocabulary are in
    real files); all per-gene arrays are over this universe, in id order.
    """

    spec: _Species
    ids: np.ndarray  # (U,) str, vocabulary first
    symbols: np.ndarray  # (U,) str
    n_vocab: int
    log_base: np.ndarray  # (U,) background log-rates
    type_log_fold: np.ndarray  # (n_types, U)
    substate_log_fold: np.ndarray  # (n_types, n_substates, U)
    program_weight: np.ndarray  # (n_programs, U) nonnegative, zero off-program
    markers: list[np.ndarray]  # universe indices of each type's markers


def _log_uniform(rng: np.random.Generator, low: float, high: float, size: int) -> np.ndarray:
    return rng.uniform(math.log(low), math.log(high), size)


def _species_model(spec: _Species, n_genes: int, rng: np.random.Generator) -> _SpeciesModel:
    n_extra = max(10, round(0.05 * n_genes))
    # Sparse, sorted id numbers like real Ensembl ids; the extras come from a disjoint,
    # higher range so they can never collide with the vocabulary.
    vocab_num = np.sort(rng.choice(3 * n_genes, n_genes, replace=False)) + 100_000
    extra_num = np.sort(rng.choice(3 * n_extra, n_extra, replace=False)) + 100_000 + 3 * n_genes
    numbers = np.concatenate([vocab_num, extra_num])
    ids = np.array([f"{spec.id_prefix}{n:011d}" for n in numbers], dtype=object)
    symbols = np.array(
        [f"{spec.symbol_prefix}{i}" for i in range(n_genes)]
        + [f"{spec.novel_prefix}{j}" for j in range(n_extra)],
        dtype=object,
    )
    n_univ = len(ids)
    log_base = rng.normal(0.0, _BASE_LOG_SD, n_univ)

    n_types = len(CELL_TYPES)
    n_markers = min(_MARKERS_PER_TYPE, n_univ // (4 * n_types))
    # Markers are drawn from the better-expressed 70% of genes: a marker that is never
    # detected separates nothing, in real data as here.
    expressed = np.argsort(log_base)[round(0.3 * n_univ) :]
    type_log_fold = np.zeros((n_types, n_univ))
    substate_log_fold = np.zeros((n_types, _N_SUBSTATES, n_univ))
    markers = []
    for t in range(n_types):
        m = rng.choice(expressed, n_markers, replace=False)
        type_log_fold[t, m] = _log_uniform(rng, 8.0, 20.0, n_markers)
        markers.append(np.sort(m))
        for s in range(_N_SUBSTATES):
            sub = rng.choice(expressed, max(1, n_markers // 6), replace=False)
            substate_log_fold[t, s, sub] = _log_uniform(rng, 3.0, 6.0, len(sub))
    program_weight = np.zeros((_N_PROGRAMS, n_univ))
    for j in range(_N_PROGRAMS):
        g = rng.choice(expressed, max(1, n_markers // 3), replace=False)
        program_weight[j, g] = np.exp(log_base[g]) * np.exp(_log_uniform(rng, 5.0, 10.0, len(g)))
    return _SpeciesModel(
        spec,
        ids,
        symbols,
        n_genes,
        log_base,
        type_log_fold,
        substate_log_fold,
        program_weight,
        markers,
    )


def _write_token_mapping(model: _SpeciesModel, path: Path) -> None:
    lines = ["gene_id,gene_name,token", "<cls>,,0", "<pad>,,1"]
    lines += [
        f"{g},{s},{t}"
        for t, (g, s) in enumerate(
            zip(model.ids[: model.n_vocab], model.symbols[: model.n_vocab], strict=True), start=2
        )
    ]
    _write_text(path, "\n".join(lines) + "\n")


def _write_embeddings(model: _SpeciesModel, dim: int, path: Path, rng: np.random.Generator) -> None:
    """Pretrained-like gene vectors for ~90% of the vocabulary.

    Genes of the same cell-type program lie near each other (a shared latent direction per
    program), as functionally related genes do in protein-language-model embeddings.
    """
    n_vocab, n_latent = model.n_vocab, 16
    latent = rng.normal(0.0, 1.0, (n_vocab, n_latent)).astype(np.float32)
    centers = rng.normal(0.0, 2.0, (len(CELL_TYPES), n_latent))
    for t, m in enumerate(model.markers):
        m = m[m < n_vocab]
        latent[m] += centers[t]
    proj = rng.normal(0.0, 0.25 / math.sqrt(n_latent), (n_latent, dim)).astype(np.float32)
    keep = np.sort(rng.choice(n_vocab, round(_PRETRAINED_COVERAGE * n_vocab), replace=False))
    values = latent[keep] @ proj
    header = "gene_id," + ",".join(str(i) for i in range(dim)) + "\n"
    body = _fixed_width_rows(model.ids[keep], values)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(header.encode())
        body.tofile(fh)


def _fixed_width_rows(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """CSV rows ``id,+0.123,-1.234,...`` as one ``uint8`` array (a row per line).

    Formatting millions of floats one by one takes tens of seconds; here every field has
    the same width (ids of a species share a length, values are clipped to |v| < 10 and
    printed as sign, digit, point, 3 decimals), so the text is a table lookup.
    """
    n, dim = values.shape
    table = np.frombuffer(
        "".join(f"{v / 1000:+.3f}," for v in range(-9999, 10000)).encode(), dtype=np.uint8
    ).reshape(-1, 7)
    q = np.rint(values.astype(np.float32) * 1000)
    np.clip(q, -9999, 9999, out=q)
    cells = table[q.astype(np.int32) + 9999]  # (n, dim, 7)
    cells[:, -1, 6] = ord("\n")
    id_bytes = np.frombuffer("".join(f"{g}," for g in ids).encode(), dtype=np.uint8)
    return np.concatenate([id_bytes.reshape(n, -1), cells.reshape(n, -1)], axis=1)


def _write_panels(model: _SpeciesModel, folder: Path, rng: np.random.Generator) -> None:
    """Targeted-assay panels: half marker genes (as real panels are), half other genes, plus
    a few ids absent from the vocabulary."""
    n_vocab = model.n_vocab
    marker_pool = np.unique(np.concatenate(model.markers))
    marker_pool = marker_pool[marker_pool < n_vocab]
    extra_pool = np.arange(n_vocab, len(model.ids))
    folder.mkdir(parents=True, exist_ok=True)
    for stem, nominal in model.spec.panels:
        size = min(nominal, n_vocab // 2)
        n_absent = min(len(extra_pool), max(3, size // 50))
        n_marker = min(len(marker_pool), (size - n_absent) // 2)
        chosen = rng.choice(marker_pool, n_marker, replace=False)
        others = np.setdiff1d(np.arange(n_vocab), chosen)
        chosen = np.concatenate(
            [
                chosen,
                rng.choice(others, size - n_absent - n_marker, replace=False),
                rng.choice(extra_pool, n_absent, replace=False),
            ]
        )
        rng.shuffle(chosen)
        lines = ["Ensembl_ID,gene_name"]
        lines += [f"{model.ids[i]},{model.symbols[i]}" for i in chosen]
        _write_text(folder / f"{stem}.csv", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------
# Files: per-file profiles, cells, count sampling
# ----------------------------------------------------------------------------------------


@dataclass
class _Cells:
    """Per-cell draws of one file (a few numbers per cell; cheap at 200,000 cells)."""

    cell_type: np.ndarray  # (n,) int
    donor: np.ndarray  # (n,) int
    tissue: np.ndarray  # (n,) int
    substate_mix: np.ndarray  # (n,) weight of sub-state 0 (sub-state 1 gets the rest)
    program: np.ndarray  # (n, n_programs) fraction of the UMIs from each program
    library: np.ndarray  # (n,) expected UMIs


def _file_genes(
    model: _SpeciesModel, spec: _FileSpec, rng: np.random.Generator
) -> tuple[np.ndarray, pd.DataFrame]:
    """Universe indices of the file's genes (in var order) and its ``var`` frame."""
    n_vocab = model.n_vocab
    n_in = round(_VOCAB_FRACTION_PER_FILE * n_vocab)
    n_out = min(len(model.ids) - n_vocab, round(_EXTRA_FRACTION_PER_FILE * n_vocab))
    genes = np.concatenate(
        [
            rng.choice(n_vocab, n_in, replace=False),
            n_vocab + rng.choice(len(model.ids) - n_vocab, n_out, replace=False),
        ]
    )
    genes = np.sort(genes) if spec.sorted_genes else rng.permutation(genes)
    ids = model.ids[genes].copy()
    if spec.version_suffix:
        versioned = rng.random(len(ids)) < _VERSIONED_FRACTION
        suffix = rng.integers(1, 20, versioned.sum())
        ids[versioned] = [f"{g}.{v}" for g, v in zip(ids[versioned], suffix, strict=True)]
    var = pd.DataFrame({"gene_symbols": model.symbols[genes]}, index=pd.Index(ids))
    return genes, var


def _file_profiles(
    model: _SpeciesModel, genes: np.ndarray, n_donors: int, rng: np.random.Generator
) -> np.ndarray:
    """Per-file expression profiles over the file's genes, rows normalized to sum 1.

    Rows ``(t * n_substates + s) * n_donors + d`` hold cell type ``t`` in sub-state ``s`` of
    donor ``d``; the last ``n_programs`` rows hold the shared cell-state programs. The
    batch effect multiplies every row, the donor effect the cell-type rows.
    """
    batch = rng.normal(0.0, _BATCH_SD, len(genes))
    donor = rng.normal(0.0, _DONOR_SD, (n_donors, len(genes)))
    log_rate = (
        model.log_base[genes]
        + model.type_log_fold[:, None, None, genes]
        + model.substate_log_fold[:, :, None, genes]
        + batch
        + donor[None, None]
    ).reshape(-1, len(genes))
    log_rate -= log_rate.max(axis=1, keepdims=True)
    states = np.exp(log_rate)
    programs = model.program_weight[:, genes] * np.exp(batch)
    profiles = np.concatenate([states, programs])
    profiles /= profiles.sum(axis=1, keepdims=True)
    return profiles


def _draw_cells(n_cells: int, n_donors: int, rng: np.random.Generator) -> _Cells:
    n_types = len(CELL_TYPES)
    donor_share = rng.dirichlet(np.full(n_donors, 4.0))
    file_mix = rng.dirichlet(np.full(n_types, 5.0))
    # Each donor's composition scatters around the file's, as samples of one study do.
    donor_mix = rng.dirichlet(30.0 * file_mix + 0.1, size=n_donors)
    donor = rng.choice(n_donors, n_cells, p=donor_share)
    # Inverse-CDF draw of each cell's type from its donor's composition.
    cdf = np.cumsum(donor_mix, axis=1)
    cdf[:, -1] = 1.0
    cell_type = (rng.random(n_cells)[:, None] > cdf[donor]).sum(axis=1)
    cdf = np.cumsum(_TISSUE_PROBS, axis=1)
    cdf[:, -1] = 1.0
    tissue = (rng.random(n_cells)[:, None] > cdf[cell_type]).sum(axis=1)
    substate_mix = rng.beta(0.5, 0.5, n_cells)
    program = np.stack(
        [
            # cycling: a minority of cells, strongly
            np.where(rng.random(n_cells) < 0.1, rng.uniform(0.05, 0.2, n_cells), 0.0),
            # interferon response and stress: most cells a little, some more
            rng.gamma(0.5, 0.03, n_cells),
            rng.gamma(1.0, 0.02, n_cells),
        ],
        axis=1,
    )
    program = np.minimum(program, 0.4)
    median = rng.uniform(4000.0, 6000.0)
    library = median * _TYPE_LIBRARY[cell_type] * rng.lognormal(0.0, _LIBRARY_LOG_SD, n_cells)
    return _Cells(cell_type, donor, tissue, substate_mix, program, library)


def _chunk_weights(cells: _Cells, rows: slice, n_donors: int) -> np.ndarray:
    """Mixture weights (scaled to expected UMIs) of the chunk's cells over the profiles."""
    t, d = cells.cell_type[rows], cells.donor[rows]
    n = len(t)
    n_states = len(CELL_TYPES) * _N_SUBSTATES * n_donors
    w = np.zeros((n, n_states + _N_PROGRAMS))
    lib = cells.library[rows]
    program = cells.program[rows]
    state_share = lib * (1.0 - program.sum(axis=1))
    mix = cells.substate_mix[rows]
    r = np.arange(n)
    w[r, (t * _N_SUBSTATES + 0) * n_donors + d] = state_share * mix
    w[r, (t * _N_SUBSTATES + 1) * n_donors + d] = state_share * (1.0 - mix)
    w[:, n_states:] = lib[:, None] * program
    return w


class _CountSampler:
    """Poisson counts for chunks of rates, returned sparse.

    Equivalent in distribution to ``rng.poisson(rate)`` but several times faster at
    single-cell sparsity, from the Poisson process: with ``E ~ Exp(1)`` the first arrival,
    a count is nonzero iff ``E < rate``, and then it is ``1 + Poisson(rate - E)``. So each
    entry costs one float32 exponential and a compare; only the ~7% nonzero entries get a
    Poisson draw. The chunk-sized buffers are allocated once: fresh 80 MB arrays per chunk
    would spend as long in page faults as in sampling.

    The rates are a float64 matrix product rounded to float32: BLAS kernels differ between
    CPUs (FMA, summation order) only far below float32 resolution, so the counts are the
    same on any machine, not only on one.
    """

    _ROWS_PER_PRODUCT = 256  # rows of the float64 product at a time

    def __init__(self, n_rows: int, n_cols: int):
        self._rate = np.empty((n_rows, n_cols), dtype=np.float32)
        self._arrival = np.empty((n_rows, n_cols), dtype=np.float32)
        self._nonzero = np.empty((n_rows, n_cols), dtype=bool)
        self._product = np.empty((min(n_rows, self._ROWS_PER_PRODUCT), n_cols))

    def sample(
        self, weights: np.ndarray, profiles: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts of cells whose expected counts are ``weights @ profiles``.

        Returns
        -------
        rows, cols, counts
            Chunk-local rows (ascending), columns (ascending within a row), int64 counts
            >= 1.
        """
        n = len(weights)
        rate, arrival, nonzero = self._rate[:n], self._arrival[:n], self._nonzero[:n]
        for start in range(0, n, self._ROWS_PER_PRODUCT):
            block = slice(start, min(n, start + self._ROWS_PER_PRODUCT))
            product = self._product[: block.stop - block.start]
            np.matmul(weights[block], profiles, out=product)
            rate[block] = product
        rng.standard_exponential(out=arrival, dtype=np.float32)
        np.greater(rate, arrival, out=nonzero)
        rows, cols = np.nonzero(nonzero)
        counts = 1 + rng.poisson(rate[rows, cols] - arrival[rows, cols])
        return rows, cols, counts


# ----------------------------------------------------------------------------------------
# Streaming writers of X in anndata's on-disk encoding
# ----------------------------------------------------------------------------------------


def _set_encoding(obj: h5py.Group | h5py.Dataset, kind: str, version: str) -> None:
    obj.attrs["encoding-type"] = kind
    obj.attrs["encoding-version"] = version


class _CsrSink:
    """Appends row chunks to a ``csr_matrix`` group (resizable ``data``/``indices``)."""

    def __init__(self, parent: h5py.Group, key: str, shape: tuple[int, int], dtype: type):
        self._group = parent.create_group(key)
        _set_encoding(self._group, "csr_matrix", "0.1.0")
        self._group.attrs["shape"] = np.array(shape, dtype=np.int64)
        self._n_rows = shape[0]
        self._data = self._resizable("data", dtype)
        self._indices = self._resizable("indices", np.int32)
        self._row_nnz: list[np.ndarray] = []

    def _resizable(self, name: str, dtype: type) -> h5py.Dataset:
        return self._group.create_dataset(
            name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(_H5_CHUNK,)
        )

    def append(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int) -> None:
        start = self._data.shape[0]
        stop = start + len(cols)
        for ds, arr in ((self._data, values), (self._indices, cols)):
            ds.resize((stop,))
            ds[start:stop] = arr.astype(ds.dtype, copy=False)
        self._row_nnz.append(np.bincount(rows, minlength=n))

    def finish(self) -> None:
        row_nnz = np.concatenate(self._row_nnz)
        assert len(row_nnz) == self._n_rows
        indptr = np.zeros(self._n_rows + 1, dtype=np.int64)
        np.cumsum(row_nnz, out=indptr[1:])
        self._group.create_dataset("indptr", data=indptr)


class _CscSink:
    """Builds a ``csc_matrix`` group from row chunks without holding the matrix.

    Row chunks are split by column block into temporary files; at the end each block is
    read back, ordered by column (rows stay ascending: the sort is stable and chunks come
    in row order) and written at its final offset. The blocks are fixed column ranges
    sized from an upper bound on the nonzeros, so they hold at most ~16M entries each.
    """

    def __init__(
        self,
        parent: h5py.Group,
        key: str,
        shape: tuple[int, int],
        dtype: type,
        tmp_dir: Path,
    ):
        self._group = parent.create_group(key)
        _set_encoding(self._group, "csc_matrix", "0.1.0")
        self._group.attrs["shape"] = np.array(shape, dtype=np.int64)
        self._shape, self._dtype, self._tmp = shape, dtype, tmp_dir
        n_rows, n_cols = shape
        # Bound: ~3,000 detected genes per cell at most, on average.
        bound = n_rows * min(n_cols, 3000)
        n_blocks = min(n_cols, max(1, math.ceil(bound / _CSC_BLOCK_NNZ)))
        self._edges = np.linspace(0, n_cols, n_blocks + 1).astype(np.int64)
        self._col_nnz = np.zeros(n_cols, dtype=np.int64)
        self._row0 = 0

    def _paths(self, b: int) -> tuple[Path, Path, Path]:
        return tuple(self._tmp / f"block{b}.{part}" for part in ("rows", "cols", "vals"))

    def append(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int) -> None:
        self._col_nnz += np.bincount(cols, minlength=self._shape[1])
        block = np.searchsorted(self._edges, cols, side="right") - 1
        order = np.argsort(block, kind="stable")
        bounds = np.searchsorted(block[order], np.arange(len(self._edges)))
        for b in range(len(self._edges) - 1):
            sel = order[bounds[b] : bounds[b + 1]]
            if not len(sel):
                continue
            parts = (
                (rows[sel] + self._row0).astype(np.int32),
                cols[sel].astype(np.int32),
                values[sel].astype(self._dtype),
            )
            for path, arr in zip(self._paths(b), parts, strict=True):
                with path.open("ab") as fh:
                    fh.write(arr.tobytes())
        self._row0 += n

    def finish(self) -> None:
        assert self._row0 == self._shape[0]
        indptr = np.zeros(self._shape[1] + 1, dtype=np.int64)
        np.cumsum(self._col_nnz, out=indptr[1:])
        nnz = int(indptr[-1])
        data = self._group.create_dataset(
            "data", shape=(nnz,), dtype=self._dtype, chunks=(min(_H5_CHUNK, max(nnz, 1)),)
        )
        indices = self._group.create_dataset(
            "indices", shape=(nnz,), dtype=np.int32, chunks=(min(_H5_CHUNK, max(nnz, 1)),)
        )
        for b in range(len(self._edges) - 1):
            rows_p, cols_p, vals_p = self._paths(b)
            if not rows_p.exists():
                continue
            rows = np.fromfile(rows_p, dtype=np.int32)
            cols = np.fromfile(cols_p, dtype=np.int32)
            vals = np.fromfile(vals_p, dtype=self._dtype)
            order = np.argsort(cols, kind="stable")
            lo, hi = indptr[self._edges[b]], indptr[self._edges[b + 1]]
            indices[lo:hi] = rows[order]
            data[lo:hi] = vals[order]
            for p in (rows_p, cols_p, vals_p):
                p.unlink()
        self._group.create_dataset("indptr", data=indptr)


class _DenseSink:
    """Writes row chunks into a contiguous 2-D dataset (anndata ``array`` encoding)."""

    def __init__(self, parent: h5py.Group, key: str, shape: tuple[int, int], dtype: type):
        self._ds = parent.create_dataset(key, shape=shape, dtype=dtype)
        _set_encoding(self._ds, "array", "0.2.0")
        self._row0 = 0

    def append(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int) -> None:
        block = np.zeros((n, self._ds.shape[1]), dtype=self._ds.dtype)
        block[rows, cols] = values
        self._ds[self._row0 : self._row0 + n] = block
        self._row0 += n

    def finish(self) -> None:
        assert self._row0 == self._ds.shape[0]


# ----------------------------------------------------------------------------------------
# One file
# ----------------------------------------------------------------------------------------


def _obs_frame(
    spec: _FileSpec,
    cells: _Cells,
    n_counts: np.ndarray,
    n_donors: int,
    rng: np.random.Generator,
) -> pd.DataFrame:
    n = len(cells.cell_type)
    width = max(6, len(str(n - 1)))
    codes = cells.cell_type.copy()
    if spec.missing_labels:
        codes[rng.random(n) < _MISSING_LABEL_FRACTION] = -1  # -1 = NaN in a Categorical
    obs = {
        "cell_type": pd.Categorical.from_codes(codes, categories=list(CELL_TYPES)),
        "donor_id": pd.Categorical.from_codes(
            cells.donor, categories=[f"{spec.name}_donor{d}" for d in range(n_donors)]
        ),
    }
    if spec.tissue:
        obs["tissue"] = pd.Categorical.from_codes(cells.tissue, categories=list(TISSUES))
    obs["n_counts"] = n_counts.astype(np.float32)
    index = pd.Index([f"{spec.name}_cell{i:0{width}d}" for i in range(n)])
    return pd.DataFrame(obs, index=index)


def _write_file(
    path: Path,
    spec: _FileSpec,
    model: _SpeciesModel,
    n_cells: int,
    rng: np.random.Generator,
    progress: bool,
) -> None:
    genes, var = _file_genes(model, spec, rng)
    n_donors = int(rng.integers(2, 5))
    profiles = _file_profiles(model, genes, n_donors, rng)
    cells = _draw_cells(n_cells, n_donors, rng)
    shape = (n_cells, len(genes))
    n_counts = np.zeros(n_cells)
    sampler = _CountSampler(min(n_cells, CHUNK_ROWS), len(genes))

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, h5py.File(path, "w") as f:
        _set_encoding(f, "anndata", "0.1.0")
        if spec.layout == "csr":
            sinks = {"counts": _CsrSink(f, "X", shape, spec.dtype)}
        elif spec.layout == "csc":
            sinks = {"counts": _CscSink(f, "X", shape, spec.dtype, Path(tmp))}
        elif spec.layout == "dense":
            sinks = {"counts": _DenseSink(f, "X", shape, spec.dtype)}
        else:  # raw: counts in raw/X, log1p(CP10k) in X, as CELLxGENE curators store them
            raw = f.create_group("raw")
            _set_encoding(raw, "raw", "0.1.0")
            sinks = {
                "counts": _CsrSink(raw, "X", shape, spec.dtype),
                "log1p": _CsrSink(f, "X", shape, np.float32),
            }

        starts = range(0, n_cells, CHUNK_ROWS)
        for start in tqdm(starts, desc=spec.name, leave=False, disable=not progress):
            chunk = slice(start, min(n_cells, start + CHUNK_ROWS))
            n = chunk.stop - chunk.start
            weights = _chunk_weights(cells, chunk, n_donors)
            rows, cols, counts = sampler.sample(weights, profiles, rng)
            totals = np.bincount(rows, weights=counts, minlength=n)
            n_counts[chunk] = totals
            sinks["counts"].append(rows, cols, counts, n)
            if "log1p" in sinks:
                normed = np.log1p(counts / totals[rows] * 1e4).astype(np.float32)
                sinks["log1p"].append(rows, cols, normed, n)
        for sink in sinks.values():
            sink.finish()

        write_elem(f, "obs", _obs_frame(spec, cells, n_counts, n_donors, rng))
        write_elem(f, "var", var)
        if spec.layout == "raw":
            write_elem(f["raw"], "var", var)
            write_elem(f["raw"], "varm", {})
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})


# ----------------------------------------------------------------------------------------
# The project
# ----------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _split_yaml(species: int) -> str:
    files = [f for f in FILES if f.species == species]
    lines = [
        f"source_name: {SOURCE_NAME}",
        f"species: {SPECIES[species].name}",
        "source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads",
    ]
    for split in ("train", "val"):
        lines.append(f"{split}:")
        lines += [f"- {f.name}.h5ad" for f in files if f.split == split]
    return "\n".join(lines) + "\n"


def generate_project(
    project_path: str | Path,
    *,
    seed: int = 0,
    n_cells: int = 2000,
    n_genes: int = 20000,
    pretrained_dim: int = 640,
    progress: bool = True,
) -> dict:
    """Write a complete synthetic project; return a summary dict {relative file path: n_cells, ...}.

    Layout under ``project_path``::

        data/synth_cxg/h5ads/{hs_csr_a,hs_raw_b,hs_csc_c,hs_dense_d,hs_csr_e,
                              mm_csr_a,mm_raw_b,mm_csr_c}.h5ad
        references/vocabulary/token_mappings_per_specie/{hsapiens,mmusculus}.csv
        references/embeddings/esm2_t30/{hsapiens,mmusculus}.csv   (if pretrained_dim > 0)
        panels/{hsapiens,mmusculus}/targeted_*.csv
        conf/datamodule/split_cellxgene_{species}/split_synth_{species}.yaml
        model_checkpoints/

    Parameters
    ----------
    project_path
        Project root (created if missing; existing files of the same names are replaced).
    seed
        Non-negative seed; the same seed gives byte-identical matrices and labels.
    n_cells
        Cells per file (the dense file gets a quarter, at least 50).
    n_genes
        Genes per species vocabulary; each file holds ~97% of them plus ~3% of ids that
        are absent from the vocabulary.
    pretrained_dim
        Width of the pretrained gene vectors; 0 writes none.
    progress
        Show tqdm progress bars over files and row chunks.

    Returns
    -------
    dict
        ``{"data/synth_cxg/h5ads/<file>.h5ad": number of cells}`` for the eight files.
    """
    if seed < 0 or n_cells < 1 or n_genes < 100 or pretrained_dim < 0:
        raise ValueError(
            f"need seed >= 0, n_cells >= 1, n_genes >= 100, pretrained_dim >= 0; got "
            f"{seed=}, {n_cells=}, {n_genes=}, {pretrained_dim=}"
        )
    root = Path(project_path)
    models = []
    for i, spec in enumerate(SPECIES):
        model = _species_model(spec, n_genes, np.random.default_rng([seed, _SEED_SPECIES, i]))
        models.append(model)
        _write_token_mapping(model, root / VOCAB_DIR / f"{spec.name}.csv")
        if pretrained_dim > 0:
            _write_embeddings(
                model,
                pretrained_dim,
                root / EMBEDDING_DIR / f"{spec.name}.csv",
                np.random.default_rng([seed, _SEED_EMBEDDING, i]),
            )
        panel_dir = root / PANEL_DIR / spec.name
        if panel_dir.is_dir():  # panels of an earlier generation may have other names
            shutil.rmtree(panel_dir)
        _write_panels(model, panel_dir, np.random.default_rng([seed, _SEED_PANEL, i]))
        _write_text(
            root / SPLIT_DIR / f"split_cellxgene_{spec.name}" / f"split_synth_{spec.name}.yaml",
            _split_yaml(i),
        )
    (root / "model_checkpoints").mkdir(parents=True, exist_ok=True)
    (root / H5AD_DIR).mkdir(parents=True, exist_ok=True)

    summary = {}
    for i, spec in enumerate(tqdm(FILES, desc="synthetic files", disable=not progress)):
        n = max(_DENSE_MIN_CELLS, n_cells // 4) if spec.layout == "dense" else n_cells
        path = root / H5AD_DIR / f"{spec.name}.h5ad"
        rng = np.random.default_rng([seed, _SEED_FILE, i])
        _write_file(path, spec, models[spec.species], n, rng, progress)
        # A cheap check that anndata reads the hand-written encoding (metadata only).
        adata = anndata.read_h5ad(path, backed="r")
        try:
            if adata.shape[0] != n:
                raise RuntimeError(f"{path}: read back {adata.shape[0]} cells, wrote {n}")
        finally:
            adata.file.close()
        summary[(H5AD_DIR / path.name).as_posix()] = n
    return summary


def write_file(
    project_path: str | Path,
    name: str,
    *,
    seed: int = 0,
    n_cells: int,
    n_genes: int = 20000,
    progress: bool = True,
) -> Path:
    """Rewrite one file of a generated project (e.g. ``hs_csr_a``) with ``n_cells`` cells.

    Uses the random streams :func:`generate_project` uses for that file and species, so
    the genes and the expression model match the rest of the project: benchmarks make one
    large file without generating every file at that size.
    """
    index = next(i for i, spec in enumerate(FILES) if spec.name == name)
    spec = FILES[index]
    rng_species = np.random.default_rng([seed, _SEED_SPECIES, spec.species])
    model = _species_model(SPECIES[spec.species], n_genes, rng_species)
    path = Path(project_path) / H5AD_DIR / f"{name}.h5ad"
    _write_file(
        path, spec, model, n_cells, np.random.default_rng([seed, _SEED_FILE, index]), progress
    )
    return path


LARGE_CELLS = 200_000


def run(cfg) -> int:
    """``python -m preprocess.synth PATH.PROJECT_PATH=P [synth.seed=S synth.n_cells=N ...]``."""
    s = cfg.synth
    n_cells = LARGE_CELLS if s.large else s.n_cells
    summary = generate_project(
        cfg.PATH.PROJECT_PATH,
        seed=s.seed,
        n_cells=n_cells,
        n_genes=s.n_genes,
        pretrained_dim=s.pretrained_dim,
    )
    total = sum(summary.values())
    print(f"wrote {len(summary)} h5ad files ({total} cells) to {cfg.PATH.PROJECT_PATH}")
    print(f"next: python -m preprocess.compile PATH.PROJECT_PATH={cfg.PATH.PROJECT_PATH}")
    return 0


if __name__ == "__main__":
    from concept.cli import entry_point

    entry_point(run)()


def synthetic_store(
    out: str | Path,
    genes_per_cell: np.ndarray,
    vocab_size: int,
    vocab_sha256: str,
    rng: np.random.Generator,
    species: str = "hsapiens",
    name: str | None = None,
    obs: dict[str, tuple[np.ndarray, list[str]]] | None = None,
    settings: dict | None = None,
) -> Path:
    """Write a token store of random cells straight through the compiler's writer (no h5ad).

    For loader and corpus-scale tests and benchmarks, where millions of cells must be
    written quickly. Cell ``i`` holds ``genes_per_cell[i]`` distinct tokens, one drawn in
    each of that many consecutive slices of the gene tokens (so they ascend), with integer counts
    that fall with the token's rank in the cell (so the stored order, value descending
    then token ascending, is the order drawn: no sort). Not a model of expression.

    Parameters
    ----------
    out
        The store folder (must not exist).
    genes_per_cell
        Nonzero genes of each cell (each at most ``vocab_size - 2``).
    vocab_size
        Tokens 0 and 1 are reserved (padding, CLS); genes use ``2 .. vocab_size - 1``.
    vocab_sha256
        The vocabulary the store claims (``TokenMapping.sha256`` of the token mapping that
        training will check it against).
    rng
        The random generator.
    species, name
        Root attributes (``name`` defaults to the folder's stem).
    obs
        Obs columns: ``{key: (int32 codes per cell, categories)}``.
    settings
        Compile byte settings (default: :class:`concept.config.CompileConfig`'s).
    """
    from concept import store as fmt
    from concept.config import CompileConfig
    from preprocess.writer import StoreWriter

    out = Path(out)
    defaults = CompileConfig()
    s = {k: getattr(defaults, k) for k in fmt.BYTE_SETTINGS} | (settings or {})
    obs = obs or {}
    s["obs_keys"] = list(obs)
    k = np.asarray(genes_per_cell, np.int64)
    n, genes = len(k), vocab_size - 2
    if n and k.max() > genes:
        raise ValueError(f"a cell with {k.max()} genes; the vocabulary has {genes}")
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(k, out=indptr[1:])
    nnz = int(indptr[-1])
    tdtype = fmt.token_dtype(vocab_size)
    out.mkdir(parents=True)
    writer = StoreWriter(out, s, nnz, tdtype, np.dtype(np.uint16))
    step = max(1, (1 << 22) // max(int(k.mean()) if n else 1, 1))  # ~4M entries at a time
    total_counts = np.zeros(n, np.float32)
    for a in range(0, n, step):
        b = min(a + step, n)
        kk = k[a:b]
        cell = np.repeat(np.arange(b - a), kk)
        rank = np.arange(int(indptr[b] - indptr[a])) - np.repeat(indptr[a:b] - indptr[a], kk)
        kc = kk[cell]
        lo = rank * genes // kc  # the rank's slice [lo, hi) of the genes: never empty
        hi = (rank + 1) * genes // kc
        tokens = 2 + lo + (rng.random(len(rank)) * (hi - lo)).astype(np.int64)
        top = rng.integers(1, 64, b - a)[cell]
        values = 1 + (top * (1 - rank / kc) ** 4).astype(np.int64)
        writer.append(tokens.astype(tdtype), values.astype(np.uint16))
        total_counts[a:b] = np.bincount(cell, values, minlength=b - a)
    writer.close_entries()
    writer.cells(fmt.INDPTR, indptr)
    writer.cells(fmt.VAR_TOKENS, np.arange(2, vocab_size, dtype=tdtype))
    writer.cells(fmt.TOTAL_COUNTS, total_counts)
    writer.cells(fmt.N_GENES, k.astype(np.int32))
    writer.cells(fmt.ROW, np.arange(n, dtype=np.int64))
    for key, (codes, cats) in obs.items():
        writer.cells(f"{fmt.OBS_GROUP}/{key}", np.asarray(codes, np.int32), {"categories": cats})
    writer.finish(
        {
            "format_version": fmt.FORMAT_VERSION,
            "compiler_version": fmt.COMPILER_VERSION,
            "species": species,
            "source_name": "synthetic",
            "source_file": name or out.stem,
            "source_fingerprint": "fast:synthetic",
            "source_stat": {"size": 0, "mtime_ns": 0},
            "vocab_sha256": vocab_sha256,
            "settings": s,
            "n_cells": n,
            "nnz": nnz,
            "n_var_mapped": genes,
            "n_var_source": genes,
            "x_source": "X",
            "var_source": "var_names",
            "normalization": "raw",
            "value_dtype": "uint16",
            "shuffle_seed": s["shuffle_seed"],
            "obs_keys": list(obs),
            "precomp_embs_dim": None,
            "n_cells_unmapped": 0,
            "duplicate_genes": 0,
        }
    )
    return out
