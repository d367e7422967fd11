"""``python -m concept.embed checkpoint=MODEL input=IN.h5ad output=OUT.h5ad``.

Copies ``IN.h5ad`` to ``OUT.h5ad`` and adds the cell embedding as ``obsm["X_concept"]``.
``checkpoint`` is anything :func:`concept.pretrained.load` takes: a published model's
folder (Hugging Face layout) or name, a run folder or ``.ckpt`` of this project, or
``latest`` (the newest run under ``PATH.CHECKPOINT_ROOT``, default
``PATH.PROJECT_PATH/model_checkpoints``). The embedding is computed by
:mod:`concept.inference`, the path :meth:`concept.Concept.embed` takes too; the options
are that method's arguments.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from omegaconf import MISSING

from concept.cli import entry_point
from concept.config import ConfigError, validate_schema
from concept.inference import GENE_SAMPLING, PRECISIONS, Embedder
from concept.pretrained import load
from concept.vocab import InputError

log = logging.getLogger("concept.embed")
OBSM_KEY = "X_concept"


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
    gene_mappings: str | None = None  # folder of <species>.csv (None: the model's)
    max_tokens: int | None = None  # None: the model's training max_tokens (else 1000)
    gene_sampling_strategy: str | None = None  # None: the model's training strategy
    use_learnable_embs: bool = True  # add the learnable residual to pretrained vectors
    precision: str = "bf16-mixed"  # bf16-mixed (the reference, any device) | 32
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
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}"
            )
        strategy = self.gene_sampling_strategy
        if strategy is not None and strategy not in GENE_SAMPLING:
            raise ConfigError(
                f"gene_sampling_strategy={strategy!r}: expected one of {', '.join(GENE_SAMPLING)}"
            )

    @property
    def checkpoint_root(self) -> str | None:
        if self.PATH.CHECKPOINT_ROOT:
            return self.PATH.CHECKPOINT_ROOT
        return (
            str(Path(self.PATH.PROJECT_PATH) / "model_checkpoints")
            if self.PATH.PROJECT_PATH
            else None
        )

    def embedder(self) -> Embedder:
        """The model these options name, ready for inference."""
        return Embedder(
            load(self.checkpoint, self.checkpoint_root, self.gene_mappings),
            self.max_tokens,
            self.batch_size,
            self.max_batch_tokens,
            self.device,
            self.precision,
            self.use_learnable_embs,
            self.gene_sampling_strategy,
        )


@dataclass
class EmbedConfig(EmbedOptions):
    """``python -m concept.embed`` (``conf/embed.yaml``)."""

    input: str = MISSING
    output: str = MISSING


def check_output(source: str | Path, output: str | Path) -> None:
    """Refuse an output that is the input file (checked before any work).

    Raises
    ------
    InputError
        ``output`` is ``source``.
    """
    source, output = Path(source), Path(output)
    if output.exists() and output.resolve() == source.resolve():
        raise InputError(f"output={output} is the input file: the input is never modified")


def write_embedding(
    source: str | Path, output: str | Path, embedding: np.ndarray, key: str = OBSM_KEY
) -> None:
    """Copy ``source`` to ``output`` and store ``embedding`` as ``obsm[key]`` there.

    ``source`` is an ``.h5ad`` file or an AnnData ``.zarr`` folder; the output has the same
    kind. The copy is written under a temporary name and renamed, so a failed write leaves
    no partial output; the source is only read.
    """
    from anndata.io import write_elem

    check_output(source, output)
    source, output = Path(source), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    try:
        if source.is_dir():  # AnnData .zarr
            import zarr

            shutil.copytree(source, tmp)
            # the consolidated metadata is bypassed for the write and rebuilt after it
            group = zarr.open_group(tmp, mode="a", use_consolidated=False)
            _write_obsm(group, key, embedding, write_elem)
            zarr.consolidate_metadata(tmp)
            if output.is_dir():
                shutil.rmtree(output)
        else:
            import h5py

            shutil.copyfile(source, tmp)
            with h5py.File(tmp, "a") as f:
                _write_obsm(f, key, embedding, write_elem)
        os.replace(tmp, output)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)


def _write_obsm(group, key: str, embedding: np.ndarray, write_elem) -> None:
    """``obsm[key] = embedding`` in an open h5py or zarr group of an AnnData."""
    if "obsm" not in group:
        write_elem(group, "obsm", {})
    if key in group["obsm"]:
        del group["obsm"][key]
    write_elem(group["obsm"], key, embedding)


def run(cfg: EmbedConfig) -> int:
    check_output(cfg.input, cfg.output)
    if not Path(cfg.input).exists():  # an .h5ad file or an AnnData .zarr folder
        raise InputError(f"input={cfg.input}: no such file")
    embedder = cfg.embedder()
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
