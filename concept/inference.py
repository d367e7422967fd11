"""Cell embeddings from a loaded model: the one path behind the API and both CLIs.

Cells go through the compiler's path: :class:`~concept.h5ad.H5adSource` reads a file in
row blocks (any layout the compiler accepts; :class:`~concept.h5ad.AnnDataSource` does the
same for an AnnData in memory), genes map to tokens with the compiler's rule (a duplicate after
mapping keeps its first column) and :func:`~concept.tokenize.tokenize_csr` orders each
cell's nonzero genes by value, then token. A cell's sequence is CLS and up to
``max_tokens`` genes chosen by ``gene_sampling_strategy`` as the reference's inference
collate chooses them (``top-nonzero``: its first genes; ``top``: then its unexpressed
genes, token ascending; ``random*``: a random subset, kept in value order), values
normalized as in training; an empty cell is the CLS-only sequence. The encoder returns the
L2-normalized CLS output, under bf16 autocast (``precision="bf16-mixed"``, the
reference's inference, on any device) or in float32 (``"32"``). Cells are sorted by length
and packed into batches under a padded-token budget; the result is in the input's row
order and does not depend on the file's layout. The species is the vocabulary with the
largest gene overlap, unless given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from concept.config import ConfigError
from concept.data.batch import PackedBatch
from concept.data.views import (
    ViewPlan,
    Views,
    ViewSpec,
    build_views,
    place_selection,
    select_genes,
)
from concept.h5ad import AnnDataSource, H5adSource, open_source
from concept.pretrained import Pretrained
from concept.tokenize import (
    TokenizedBlock,
    drop_duplicate_columns,
    normalize,
    take_cells,
    tokenize_csr,
)
from concept.vocab import PAD_TOKEN, InputError, TokenMapping

if TYPE_CHECKING:
    import anndata

PRECISIONS = ("bf16-mixed", "32")
GENE_SAMPLING = ("top-nonzero", "top", "random-nonzero", "random")


def infer_species(ids: np.ndarray, mappings: dict[str, TokenMapping], symbols: bool = False) -> str:
    """The species whose vocabulary shares the most distinct genes with ``ids``.

    Raises
    ------
    InputError
        No overlap with any vocabulary, or two species tie.
    """
    overlap = {}
    for s, m in mappings.items():
        tokens = m.tokens_of_names(ids) if symbols else m.tokens_of(ids)
        overlap[s] = len(np.unique(tokens[tokens >= 0]))
    best = max(overlap.values(), default=0)
    winners = [s for s, n in overlap.items() if n == best]
    hint = "" if symbols else " (symbols in var? pass gene_symbols=true)"
    if best == 0:
        raise InputError(f"no gene overlaps the vocabularies of {sorted(overlap)}{hint}")
    if len(winners) > 1:
        raise InputError(f"species is ambiguous: {overlap} genes overlap; pass species=...")
    return winners[0]


def length_batches(
    lengths: np.ndarray, max_cells: int, max_tokens: int
) -> Iterator[tuple[int, int]]:
    """Contiguous ``[a, b)`` ranges of sequences, each at most ``max_cells`` sequences and
    ``max_tokens`` padded tokens (count x longest); a longer single sequence goes alone."""
    a, n = 0, len(lengths)
    while a < n:
        b, longest = a + 1, int(lengths[a])
        while (
            b < n
            and b - a < max_cells
            and (b - a + 1) * max(longest, int(lengths[b])) <= max_tokens
        ):
            longest = max(longest, int(lengths[b]))
            b += 1
        yield a, b
        a = b


@dataclass
class FileTokens:
    """An open input with its species and per-column tokens."""

    source: H5adSource | AnnDataSource
    species: str
    col_tokens: np.ndarray  # token of each column, -1 unmapped or duplicate

    @property
    def var_tokens(self) -> np.ndarray:
        """The input's gene universe (ascending), as the compiler stores it."""
        return np.unique(self.col_tokens[self.col_tokens >= 0])


class Embedder:
    """A loaded encoder ready for inference, with its vocabularies and settings.

    Parameters
    ----------
    model
        The loaded model (:func:`concept.pretrained.load`).
    max_tokens
        Genes per cell (default: the model's training ``max_tokens``, else 1000).
    batch_size, max_batch_tokens
        Most sequences and padded tokens per forward pass.
    device
        ``auto`` (CUDA if available), ``cpu``, ``cuda``...
    precision
        ``bf16-mixed`` (bf16 autocast on any device, as the reference) or ``32``.
    use_learnable_embs
        Add the learnable residual table to the pretrained gene vectors (the reference's
        ``predict_step``); without a pretrained table the learnable one is the only one.
    gene_sampling_strategy
        Which genes a sequence keeps (default: the model's training strategy).
    seed
        Draws of the ``random*`` strategies.
    """

    def __init__(
        self,
        model: Pretrained,
        max_tokens: int | None = None,
        batch_size: int = 256,
        max_batch_tokens: int = 32768,
        device: str = "auto",
        precision: str = "bf16-mixed",
        use_learnable_embs: bool = True,
        gene_sampling_strategy: str | None = None,
        seed: int = 0,
    ):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
        strategy = gene_sampling_strategy or model.gene_sampling_strategy
        if strategy not in GENE_SAMPLING:
            raise ConfigError(
                f"gene_sampling_strategy={strategy!r}: expected one of {', '.join(GENE_SAMPLING)}"
            )
        self.model = model
        self.checkpoint, self.run_dir = model.files.checkpoint, model.files.folder
        self.run_config = model.config
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        module = model.module.to(self.device).eval()
        module.net.set_backend(self.device)
        self.net = module.net
        self.add_learnable = use_learnable_embs
        self.precision, self.gene_sampling_strategy, self.seed = precision, strategy, seed
        self.normalization = module.normalization  # datamodule.normalization, applied per cell
        self.stored_normalization = model.stored_normalization
        self.max_tokens = max_tokens or model.max_tokens
        cfg = module.cfg
        if cfg.input_encoding == "rank_encoding" and self.max_tokens + 1 > cfg.pe_max_len:
            raise ConfigError(
                f"max_tokens={self.max_tokens} exceeds the model's positions "
                f"(model.pe_max_len={cfg.pe_max_len} includes CLS)"
            )
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.dim = cfg.projection_dim or cfg.dim_model
        self.mappings = model.mappings

    # --- inputs -> tokens -------------------------------------------------------------------

    def open(
        self,
        data: str | Path | anndata.AnnData,
        species: str | None = None,
        gene_id_column: str | None = None,
        gene_symbols: bool = False,
        x_source: str | None = None,
    ) -> FileTokens:
        """Open an ``.h5ad`` file (or wrap an AnnData) and map its genes (the caller closes
        ``.source``)."""
        src = open_source(data, x_source or "auto")
        try:
            if species is None:
                species = infer_species(src.var_ids(gene_id_column), self.mappings, gene_symbols)
            elif species not in self.mappings:
                raise InputError(f"species={species!r}: the model knows {sorted(self.mappings)}")
            mapping = self.mappings[species]
            # the compiler's rule; symbols go through the mapping's gene_name column
            lookup = mapping.tokens_of_names if gene_symbols else mapping.tokens_of
            col_tokens = lookup(src.var_ids(gene_id_column))
            drop_duplicate_columns(col_tokens)
            if not (col_tokens >= 0).any():
                raise InputError(f"{src.path}: no gene overlaps the {species} vocabulary")
        except BaseException:
            src.close()
            raise
        return FileTokens(src, species, col_tokens)

    def blocks(
        self, file: FileTokens, rows_per_read: int = 8192, rows: np.ndarray | None = None
    ) -> Iterator[tuple[int, TokenizedBlock]]:
        """``(first row, tokenized block)`` of the input's cells (only ``rows``, sorted, if
        given). Values stay raw here; :meth:`packed` applies the normalizations."""
        import scipy.sparse as sp

        src = file.source
        for a, indptr, indices, data in src.blocks(rows_per_read):
            m = len(indptr) - 1
            if rows is not None:
                local = rows[(rows >= a) & (rows < a + m)] - a
                if not len(local):
                    continue
                x = sp.csr_matrix((data, indices, indptr - indptr[0]), shape=(m, src.n_vars))[local]
                indptr, indices, data = x.indptr, x.indices, x.data
            try:
                yield a, tokenize_csr(indptr, indices, data, file.col_tokens)
            except InputError as e:
                raise InputError(f"{src.path}: rows {a}..{a + m - 1}: {e}") from None

    def packed(
        self,
        blk: TokenizedBlock,
        cells: np.ndarray,
        species: str,
        var_tokens: np.ndarray | None = None,
        index: int = 0,
    ) -> PackedBatch:
        """A host batch of ``cells`` of a block, values as the stores hold them."""
        counts = np.diff(blk.indptr)[cells]
        cu = np.zeros(len(cells) + 1, np.int32)
        np.cumsum(counts, out=cu[1:])
        buffers = (np.empty(cu[-1], blk.tokens.dtype), np.empty(cu[-1], blk.values.dtype))
        tokens, values = take_cells(blk.indptr, cells, blk.tokens, blk.values, buffers)
        totals = blk.total_counts[cells]
        values = normalize(values, np.repeat(totals, counts), self.stored_normalization)
        var = np.empty(0, np.int64) if var_tokens is None else var_tokens
        return PackedBatch(
            tokens=torch.from_numpy(tokens),
            values=torch.from_numpy(np.asarray(values, np.float32)),
            cu_seqlens=torch.from_numpy(cu),
            total_counts=torch.from_numpy(totals.astype(np.float32)),
            rows=torch.from_numpy(np.asarray(cells, np.int64)),
            store_index=torch.zeros(len(cells), dtype=torch.int32),
            obs={},
            var_tokens=torch.from_numpy(np.asarray(var, np.int64)),
            species=species,
            index=index,
        )

    # --- tokens -> embeddings ---------------------------------------------------------------

    def sequence_plan(self, batch: PackedBatch) -> ViewPlan:
        """One sequence per cell: CLS, then the genes ``gene_sampling_strategy`` keeps
        (expressed ones in the stored value order, then, for ``top``/``random``, unexpressed
        ones of the input, token ascending). An empty cell keeps only CLS."""
        tokens = batch.tokens.numpy()
        cu = batch.cu_seqlens.numpy().astype(np.int64)
        var = batch.var_tokens.numpy()
        spec = ViewSpec(
            max_tokens=self.max_tokens, gene_sampling_strategy=self.gene_sampling_strategy
        )
        rng = np.random.default_rng([self.seed, batch.index])
        sel = select_genes(tokens, np.ones(len(tokens), bool), cu, var, spec, rng)
        n = sel.counts + sel.zero_counts
        out = np.zeros(len(n) + 1, np.int64)
        np.cumsum(n + 1, out=out[1:])
        src = np.full(out[-1], -1, np.int64)  # -1: CLS
        place_selection(src, sel, out[:-1] + 1, len(tokens))
        extra = sel.zero_tokens
        if not len(tokens) + len(extra):  # only empty cells: give the gather one (unused) source
            extra = np.array([PAD_TOKEN], np.int64)
        return ViewPlan(
            src=torch.from_numpy(src),
            extra_tokens=torch.from_numpy(extra),
            cu_seqlens=torch.from_numpy(out.astype(np.int32)),
            max_seqlen=int(n.max(initial=0)) + 1,
            items_mask=torch.ones(len(n), dtype=torch.bool),
            gene_sets=(var, var),
            panel_names=("all", "all"),
        )

    def encode(self, batch: PackedBatch) -> np.ndarray:
        """Embeddings (float32, one row per planned sequence) of a host batch whose
        ``views`` is planned, in chunks under the batch limits."""
        plan: ViewPlan = batch.views
        cu = plan.cu_seqlens.numpy().astype(np.int64)
        views = build_views(batch.to(self.device), self.normalization)
        out = np.empty((len(cu) - 1, self.dim), np.float32)
        for a, b in length_batches(np.diff(cu), self.batch_size, self.max_batch_tokens):
            out[a:b] = self._forward(views, cu, a, b, batch.species)
        return out

    @torch.inference_mode()
    def _forward(self, views: Views, cu: np.ndarray, a: int, b: int, species: str) -> np.ndarray:
        lo, hi = int(cu[a]), int(cu[b])
        cu_dev = views.cu_seqlens[a : b + 1] - lo
        longest = int(np.diff(cu[a : b + 1]).max())
        bf16 = self.precision == "bf16-mixed"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            z, _ = self.net(
                views.tokens[lo:hi],
                views.values[lo:hi],
                cu_dev,
                longest,
                species,
                self.add_learnable,
            )
        return z.float().cpu().numpy()

    def embed_block(
        self, blk: TokenizedBlock, species: str, var_tokens: np.ndarray, progress=None
    ) -> np.ndarray:
        """Embeddings of a block's cells, in its order (cells batched by length)."""
        lengths = np.minimum(np.diff(blk.indptr), self.max_tokens) + 1
        if self.gene_sampling_strategy in ("top", "random"):  # unexpressed genes fill up
            lengths = np.full(len(lengths), min(len(var_tokens), self.max_tokens) + 1)
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(lengths), self.dim), np.float32)
        for i, (a, b) in enumerate(
            length_batches(lengths[order], self.batch_size, self.max_batch_tokens)
        ):
            cells = order[a:b]
            batch = self.packed(blk, cells, species, var_tokens, index=i)
            batch.views = self.sequence_plan(batch)
            out[cells] = self.encode(batch)
            if progress is not None:
                progress.update(len(cells))
        return out

    def embed_file(
        self,
        data: str | Path | anndata.AnnData,
        species: str | None = None,
        gene_id_column: str | None = None,
        gene_symbols: bool = False,
        x_source: str | None = None,
        rows_per_read: int = 8192,
        progress: bool = True,
    ) -> tuple[np.ndarray, str]:
        """Embeddings of every cell of an ``.h5ad`` file or AnnData (row blocks) and the
        species used."""
        from tqdm.auto import tqdm

        file = self.open(data, species, gene_id_column, gene_symbols, x_source)
        name = Path(data).name if isinstance(data, str | Path) else "AnnData"
        with file.source as src:
            out = np.empty((src.n_cells, self.dim), np.float32)
            with tqdm(total=src.n_cells, unit="cell", desc=name, disable=not progress) as bar:
                for a, blk in self.blocks(file, rows_per_read):
                    out[a : a + len(blk.n_genes)] = self.embed_block(
                        blk, file.species, file.var_tokens, bar
                    )
        return out, file.species
