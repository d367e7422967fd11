"""Cell embeddings from a trained checkpoint (scConcept ``extract_embeddings``).

``python -m concept.embed checkpoint=RUN_DIR_OR_CKPT input=IN.h5ad output=OUT.h5ad`` copies
``IN.h5ad`` to ``OUT.h5ad`` and adds the embedding as ``obsm["X_concept"]``; from Python,
:func:`embed` returns it as an array.

Cells go through the compiler's path: :class:`~concept.h5ad.H5adSource` reads the file in
row blocks (any layout the compiler accepts), genes map to tokens with the compiler's rule
(a duplicate after mapping keeps its first column) and :func:`~concept.tokenize.tokenize_csr`
orders each cell's nonzero genes by value, then token. A cell's sequence is CLS and its
first ``max_tokens`` genes, normalized as in training; the encoder returns the
L2-normalized CLS output. Cells are sorted by length and packed into batches under a
padded-token budget; the result is in the file's row order and does not depend on the
file's layout. The species is the vocabulary with the largest gene overlap, unless given.

``checkpoint`` is a ``.ckpt`` file, a run folder (its ``latest/last.ckpt``, else its newest
``.ckpt``) or ``latest``: the newest run folder under ``PATH.CHECKPOINT_ROOT`` (default
``PATH.PROJECT_PATH/model_checkpoints``). The run folder's ``config.yaml`` gives the token
mappings, the training ``max_tokens`` and normalization; a bare checkpoint needs
``gene_mappings=DIR``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf

from concept.cli import entry_point
from concept.config import Config, ConfigError, validate, validate_schema
from concept.data.batch import PackedBatch
from concept.data.views import ViewPlan, Views, build_views
from concept.h5ad import H5adSource
from concept.tokenize import (
    TokenizedBlock,
    drop_duplicate_columns,
    gather_cells,
    normalize,
    tokenize_csr,
)
from concept.vocab import InputError, TokenMapping, read_token_mapping

if TYPE_CHECKING:
    import anndata

log = logging.getLogger("concept.embed")
OBSM_KEY = "X_concept"
DEFAULT_MAX_TOKENS = 1000  # the reference's inference default, for checkpoints without a run config


# --- configuration ----------------------------------------------------------------------


@dataclass
class RunPaths:
    """Where ``checkpoint=latest`` looks (the training config's ``PATH`` keys)."""

    PROJECT_PATH: str | None = None
    CHECKPOINT_ROOT: str | None = None  # None: PROJECT_PATH/model_checkpoints


@dataclass
class EmbedOptions:
    """Keys shared by ``concept.embed`` and ``concept.evaluate``."""

    checkpoint: str = MISSING
    species: str | None = None  # None: the vocabulary with the largest gene overlap
    gene_id_column: str | None = None  # var column with gene ids (None: var_names)
    gene_symbols: bool = False  # ids are symbols, matched to the mappings' gene_name
    x_source: str | None = None  # auto | X | raw | layers/<name>; None: auto
    gene_mappings: str | None = None  # folder of <species>.csv (None: the run's)
    max_tokens: int | None = None  # None: the run's training max_tokens (else 1000)
    batch_size: int = 256  # most cells per forward pass
    max_batch_tokens: int = 32768  # most padded tokens per forward pass
    rows_per_read: int = 8192  # file rows read and tokenized at a time
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    PATH: RunPaths = field(default_factory=RunPaths)

    def __post_init__(self) -> None:
        xs = self.x_source
        if xs is not None and not (xs in ("auto", "X", "raw") or xs.startswith("layers/")):
            raise ConfigError(f"x_source={xs!r}: expected auto, X, raw or layers/<name>")
        for name in ("max_tokens", "batch_size", "max_batch_tokens", "rows_per_read"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: must be >= 1")

    @property
    def checkpoint_root(self) -> str | None:
        if self.PATH.CHECKPOINT_ROOT:
            return self.PATH.CHECKPOINT_ROOT
        return (
            str(Path(self.PATH.PROJECT_PATH) / "model_checkpoints")
            if self.PATH.PROJECT_PATH
            else None
        )


@dataclass
class EmbedConfig(EmbedOptions):
    """``python -m concept.embed`` (``conf/embed.yaml``)."""

    input: str = MISSING
    output: str = MISSING


# --- checkpoints --------------------------------------------------------------------------


def newest_run(root: str | Path) -> Path:
    """The run folder under ``root`` whose newest checkpoint is the most recent."""
    root = Path(root)
    runs = (
        [d for d in root.iterdir() if d.is_dir() and any(d.rglob("*.ckpt"))]
        if root.is_dir()
        else []
    )
    if not runs:
        raise InputError(f"checkpoint=latest: no run folder with a checkpoint under {root}")
    return max(runs, key=lambda d: max(p.stat().st_mtime for p in d.rglob("*.ckpt")))


def resolve_checkpoint(
    checkpoint: str | Path, checkpoint_root: str | None = None
) -> tuple[Path, Path | None]:
    """The checkpoint file and its run folder (None when no ``config.yaml`` is beside it).

    Raises
    ------
    InputError
        No such file or folder, or a folder without a checkpoint.
    ConfigError
        ``latest`` without a checkpoint root.
    """
    if str(checkpoint) == "latest":
        if not checkpoint_root:
            raise ConfigError("checkpoint=latest needs PATH.PROJECT_PATH (or PATH.CHECKPOINT_ROOT)")
        checkpoint = newest_run(checkpoint_root)
    path = Path(checkpoint).expanduser().absolute()
    if path.is_dir():
        last = path / "latest" / "last.ckpt"
        found = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not last.exists() and not found:
            raise InputError(f"{path}: run folder without a checkpoint")
        ckpt = last if last.exists() else found[-1]
        return ckpt, path if (path / "config.yaml").is_file() else None
    if not path.is_file():
        raise InputError(f"checkpoint={checkpoint}: no such checkpoint file or run folder")
    # run/latest/last.ckpt, run/steps/step=N.ckpt or run/x.ckpt
    run = next(
        (d for d in (path.parent, path.parent.parent) if (d / "config.yaml").is_file()), None
    )
    return path, run


# --- the model ------------------------------------------------------------------------------


def infer_species(ids: np.ndarray, mappings: dict[str, TokenMapping], symbols: bool = False) -> str:
    """The species whose vocabulary shares the most genes with ``ids``.

    Raises
    ------
    InputError
        No overlap with any vocabulary, or two species tie.
    """
    overlap = {
        s: int(((m.tokens_of_names(ids) if symbols else m.tokens_of(ids)) >= 0).sum())
        for s, m in mappings.items()
    }
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
    """An open input file with its species and per-column tokens."""

    source: H5adSource
    species: str
    col_tokens: np.ndarray  # token of each column, -1 unmapped or duplicate

    @property
    def var_tokens(self) -> np.ndarray:
        """The file's gene universe (ascending), as the compiler stores it."""
        return np.unique(self.col_tokens[self.col_tokens >= 0])


class Embedder:
    """A trained encoder ready for inference, with its vocabularies and settings.

    Parameters
    ----------
    checkpoint
        ``.ckpt`` file, run folder or ``latest`` (see the module docstring).
    checkpoint_root
        Where ``latest`` looks.
    gene_mappings
        Folder of ``<species>.csv`` token mappings (default: the run config's).
    max_tokens
        Genes per cell (default: the run's training ``max_tokens``, else 1000).
    batch_size, max_batch_tokens
        Most sequences and padded tokens per forward pass.
    device
        ``auto`` (CUDA if available), ``cpu``, ``cuda``...
    """

    @classmethod
    def from_options(cls, opts: EmbedOptions) -> Embedder:
        """An embedder configured by the ``embed``/``evaluate`` command-line options."""
        return cls(
            opts.checkpoint,
            opts.checkpoint_root,
            opts.gene_mappings,
            opts.max_tokens,
            opts.batch_size,
            opts.max_batch_tokens,
            opts.device,
        )

    def __init__(
        self,
        checkpoint: str | Path,
        checkpoint_root: str | None = None,
        gene_mappings: str | None = None,
        max_tokens: int | None = None,
        batch_size: int = 256,
        max_batch_tokens: int = 32768,
        device: str = "auto",
    ):
        from concept.lit import ContrastiveModule

        self.checkpoint, self.run_dir = resolve_checkpoint(checkpoint, checkpoint_root)
        self.run_config: Config | None = (
            validate(OmegaConf.load(self.run_dir / "config.yaml")) if self.run_dir else None
        )
        module = ContrastiveModule.load_from_checkpoint(self.checkpoint, map_location="cpu")
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        module.to(self.device).eval()
        module.net.set_backend(self.device)
        self.net = module.net
        # validation's rule: add the learnable residual tables whenever training used them
        self.add_learnable = module.inference_add_learnable
        self.normalization = module.normalization  # datamodule.normalization, applied per cell
        rc = self.run_config
        # values as the stores held them (compile.normalization), before the model's own
        self.stored_normalization = rc.compile.normalization if rc else "raw"
        self.max_tokens = max_tokens or (
            rc.datamodule.dataset.train.max_tokens if rc else DEFAULT_MAX_TOKENS
        )
        cfg = module.cfg
        if cfg.input_encoding == "rank_encoding" and self.max_tokens + 1 > cfg.pe_max_len:
            raise ConfigError(
                f"max_tokens={self.max_tokens} exceeds the model's positions "
                f"(model.pe_max_len={cfg.pe_max_len} includes CLS)"
            )
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.dim = cfg.projection_dim or cfg.dim_model
        self.mappings = self._read_mappings(module.hparams["vocab_sizes"], gene_mappings)

    def _read_mappings(
        self, vocab_sizes: dict[str, int], folder: str | None
    ) -> dict[str, TokenMapping]:
        if folder is None:
            if self.run_config is None:
                raise ConfigError(
                    f"{self.checkpoint}: no run config.yaml beside it; pass gene_mappings=DIR "
                    "(the folder of <species>.csv token mappings)"
                )
            folder = self.run_config.PATH.GENE_MAPPINGS_PATH
        out = {}
        for species, size in vocab_sizes.items():
            mapping = read_token_mapping(Path(folder) / f"{species}.csv")
            if mapping.size != size:
                raise InputError(
                    f"{mapping.path}: {mapping.size} tokens, the checkpoint's {species} "
                    f"vocabulary has {size}"
                )
            out[species] = mapping
        return out

    # --- files -> tokens ------------------------------------------------------------------

    def open(
        self,
        path: str | Path,
        species: str | None = None,
        gene_id_column: str | None = None,
        gene_symbols: bool = False,
        x_source: str | None = None,
    ) -> FileTokens:
        """Open an ``.h5ad`` file and map its genes (the caller closes ``.source``)."""
        src = H5adSource(path, x_source or "auto")
        try:
            if species is None:
                species = infer_species(src.var_ids(gene_id_column), self.mappings, gene_symbols)
            elif species not in self.mappings:
                raise InputError(
                    f"species={species!r}: the checkpoint knows {sorted(self.mappings)}"
                )
            mapping = self.mappings[species]
            # the compiler's rule; symbols go through the mapping's gene_name column
            lookup = mapping.tokens_of_names if gene_symbols else mapping.tokens_of
            col_tokens = lookup(src.var_ids(gene_id_column))
            drop_duplicate_columns(col_tokens)
            if not (col_tokens >= 0).any():
                raise InputError(f"{path}: no gene overlaps the {species} vocabulary")
        except BaseException:
            src.close()
            raise
        return FileTokens(src, species, col_tokens)

    def blocks(
        self, file: FileTokens, rows_per_read: int = 8192, rows: np.ndarray | None = None
    ) -> Iterator[tuple[int, TokenizedBlock]]:
        """``(first row, tokenized block)`` of the file's cells (only ``rows``, sorted, if given).

        Values stay raw here; :meth:`packed` applies the normalizations."""
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
        idx = gather_cells(blk.indptr, cells)
        counts = np.diff(blk.indptr)[cells]
        cu = np.zeros(len(cells) + 1, np.int32)
        np.cumsum(counts, out=cu[1:])
        totals = blk.total_counts[cells]
        values = normalize(blk.values[idx], np.repeat(totals, counts), self.stored_normalization)
        var = np.empty(0, np.int64) if var_tokens is None else var_tokens
        return PackedBatch(
            tokens=torch.from_numpy(blk.tokens[idx]),
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

    def top_genes_plan(self, batch: PackedBatch) -> ViewPlan:
        """One sequence per cell: CLS and its first ``max_tokens`` genes (the stored order)."""
        cu = batch.cu_seqlens.numpy().astype(np.int64)
        keep = np.minimum(np.diff(cu), self.max_tokens)
        out = np.zeros(len(keep) + 1, np.int64)
        np.cumsum(keep + 1, out=out[1:])
        cell = np.repeat(np.arange(len(keep)), keep + 1)
        pos = np.arange(out[-1]) - out[:-1][cell]
        src = np.where(pos > 0, cu[:-1][cell] + pos - 1, -1)
        return ViewPlan(
            src=torch.from_numpy(src),
            extra_tokens=torch.zeros(0, dtype=torch.int64),
            cu_seqlens=torch.from_numpy(out.astype(np.int32)),
            max_seqlen=int(keep.max(initial=0)) + 1,
            items_mask=torch.ones(len(keep), dtype=torch.bool),
            gene_sets=(batch.var_tokens.numpy(), batch.var_tokens.numpy()),
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
        cuda = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            z, _ = self.net(
                views.tokens[lo:hi],
                views.values[lo:hi],
                cu_dev,
                longest,
                species,
                self.add_learnable,
            )
        return z.float().cpu().numpy()

    def embed_block(self, blk: TokenizedBlock, species: str, progress=None) -> np.ndarray:
        """Embeddings of a block's cells, in its order (cells batched by length)."""
        lengths = np.minimum(np.diff(blk.indptr), self.max_tokens) + 1
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(lengths), self.dim), np.float32)
        for a, b in length_batches(lengths[order], self.batch_size, self.max_batch_tokens):
            cells = order[a:b]
            batch = self.packed(blk, cells, species)
            batch.views = self.top_genes_plan(batch)
            out[cells] = self.encode(batch)
            if progress is not None:
                progress.update(len(cells))
        return out

    def embed_file(
        self,
        path: str | Path,
        species: str | None = None,
        gene_id_column: str | None = None,
        gene_symbols: bool = False,
        x_source: str | None = None,
        rows_per_read: int = 8192,
        progress: bool = True,
    ) -> tuple[np.ndarray, str]:
        """Embeddings of every cell of a file (row blocks) and the species used."""
        from tqdm.auto import tqdm

        file = self.open(path, species, gene_id_column, gene_symbols, x_source)
        with file.source as src:
            out = np.empty((src.n_cells, self.dim), np.float32)
            with tqdm(
                total=src.n_cells, unit="cell", desc=Path(path).name, disable=not progress
            ) as bar:
                for a, blk in self.blocks(file, rows_per_read):
                    out[a : a + len(blk.n_genes)] = self.embed_block(blk, file.species, bar)
        return out, file.species


# --- the public function and the CLI --------------------------------------------------------


def embed(
    adata_or_path: anndata.AnnData | str | Path,
    checkpoint: str | Path | Embedder,
    *,
    species: str | None = None,
    gene_id_column: str | None = None,
    gene_symbols: bool = False,
    x_source: str | None = None,
    max_tokens: int | None = None,
    batch_size: int = 256,
    max_batch_tokens: int = 32768,
    device: str = "auto",
    gene_mappings: str | None = None,
    checkpoint_root: str | None = None,
    rows_per_read: int = 8192,
    progress: bool = True,
) -> np.ndarray:
    """Embed the cells of an ``.h5ad`` file or an AnnData object.

    Parameters
    ----------
    adata_or_path
        A file path, or an AnnData (written to a temporary file, so both take one path).
    checkpoint
        ``.ckpt``, run folder, ``latest`` (with ``checkpoint_root``) or a loaded
        :class:`Embedder` (whose settings then apply).
    species, gene_id_column, gene_symbols, x_source
        How to read genes (see the module docstring).
    max_tokens, batch_size, max_batch_tokens, device, gene_mappings
        See :class:`Embedder`.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, dim)`` float32, L2-normalized rows, in the input's cell order.
    """
    embedder = (
        checkpoint
        if isinstance(checkpoint, Embedder)
        else Embedder(
            checkpoint,
            checkpoint_root,
            gene_mappings,
            max_tokens,
            batch_size,
            max_batch_tokens,
            device,
        )
    )
    options = dict(
        species=species,
        gene_id_column=gene_id_column,
        gene_symbols=gene_symbols,
        x_source=x_source,
        rows_per_read=rows_per_read,
        progress=progress,
    )
    if isinstance(adata_or_path, str | Path):
        return embedder.embed_file(adata_or_path, **options)[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adata.h5ad"
        adata_or_path.write_h5ad(path)
        return embedder.embed_file(path, **options)[0]


def write_embedding(
    source: str | Path, output: str | Path, embedding: np.ndarray, key: str = OBSM_KEY
) -> None:
    """Copy ``source`` to ``output`` and store ``embedding`` as ``obsm[key]`` there.

    The copy is written under a temporary name and renamed, so a failed write leaves no
    partial output; the source is only read.
    """
    import h5py
    from anndata.io import write_elem

    source, output = Path(source), Path(output)
    if output.exists() and output.resolve() == source.resolve():
        raise InputError(f"output={output} is the input file: the input is never modified")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    try:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "a") as f:
            if "obsm" not in f:
                write_elem(f, "obsm", {})
            if key in f["obsm"]:
                del f["obsm"][key]
            write_elem(f["obsm"], key, embedding)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def run(cfg: EmbedConfig) -> int:
    embedder = Embedder.from_options(cfg)
    start = time.perf_counter()
    emb, species = embedder.embed_file(
        cfg.input,
        cfg.species,
        cfg.gene_id_column,
        cfg.gene_symbols,
        cfg.x_source,
        cfg.rows_per_read,
        cfg.progress,
    )
    seconds = time.perf_counter() - start
    write_embedding(cfg.input, cfg.output, emb)
    print(
        f"{cfg.output}: obsm[{OBSM_KEY!r}] {emb.shape[0]} x {emb.shape[1]} ({species}, "
        f"max_tokens={embedder.max_tokens}, {embedder.checkpoint}; {emb.shape[0] / seconds:.0f} cells/s "
        f"on {embedder.device})"
    )
    return 0


main = entry_point(run, "embed", partial(validate_schema, schema=EmbedConfig))

if __name__ == "__main__":
    main()
