"""The Python API: :class:`Concept`, a loaded model (the reference's ``scConcept``).

>>> model = Concept.from_pretrained("corpus40M-model30M")          # doctest: +SKIP
>>> emb = model.embed(adata)                                        # doctest: +SKIP

Loading is :mod:`concept.pretrained`, embedding :mod:`concept.inference` (the path the
``concept.embed`` and ``concept.evaluate`` command lines take), light adaptation the
compiler and the trainer of this project.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import OmegaConf

from concept.config import Config, ConfigError, DataModuleConfig, PathConfig
from concept.h5ad import open_source
from concept.inference import Embedder, infer_species
from concept.pretrained import Pretrained, load, to_reference_names
from concept.vocab import InputError, read_token_mapping

if TYPE_CHECKING:
    import anndata


def estimate_mutual_information(
    emb1: np.ndarray | torch.Tensor, emb2: np.ndarray | torch.Tensor, logit_scale: float
) -> float:
    """The reference's estimate: ``log(n) - CE(s * emb1 @ emb2.T, arange(n))``.

    Parameters
    ----------
    emb1, emb2
        ``(n, d)`` embeddings of the same cells (two views); not re-normalized.
    logit_scale
        ``s``, the model's ``exp(logit_scale)``.
    """
    e1 = torch.as_tensor(np.asarray(emb1, np.float32))
    e2 = torch.as_tensor(np.asarray(emb2, np.float32))
    logits = e1 @ e2.T * logit_scale
    ce = torch.nn.functional.cross_entropy(logits, torch.arange(len(e1)))
    return float(np.log(len(e1)) - ce)


class Concept:
    """A trained scConcept model: embed cells, adapt, save.

    Build one with :meth:`from_pretrained`.
    """

    def __init__(self, model: Pretrained):
        self.model = model

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        gene_mappings: str | Path | None = None,
        checkpoint_root: str | Path | None = None,
    ) -> Concept:
        """Load a model.

        Parameters
        ----------
        source
            A folder in the Hugging Face layout (``model.ckpt``, ``config.yaml``,
            ``gene_mappings/``; Lightning or Fabric checkpoint), a run folder or ``.ckpt``
            of this project, ``latest`` (with ``checkpoint_root``), or a published model's
            name (``corpus40M-model30M``; needs ``huggingface_hub``, reads its cache when
            offline).
        gene_mappings
            Folder of ``<species>.csv`` token mappings (default: the model's).
        checkpoint_root
            Where ``latest`` looks.

        Raises
        ------
        concept.vocab.InputError
            Missing files; a weight missing, unexpected or of the wrong shape (named).
        """
        return cls(
            load(
                source,
                None if checkpoint_root is None else str(checkpoint_root),
                None if gene_mappings is None else str(gene_mappings),
            )
        )

    # --- what it is ---------------------------------------------------------------------

    @property
    def species(self) -> list[str]:
        """Species with a vocabulary in this model."""
        return list(self.model.mappings)

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)``: the contrastive temperature's inverse."""
        return float(self.model.module.logit_scale.detach().exp())

    def _mapping(self, species: str):
        if species not in self.model.mappings:
            raise InputError(f"species={species!r}: the model knows {self.species}")
        return self.model.mappings[species]

    def map_gene_names_to_ids(self, species: str, gene_names: list[str]) -> list[str | None]:
        """Gene ids of symbols through the mapping's ``gene_name`` column
        (case-insensitive; None where unknown)."""
        m = self._mapping(species)
        tokens = m.tokens_of_names(gene_names)
        return [m.gene_ids[t] if t >= 0 else None for t in tokens]

    def map_gene_ids_to_names(self, species: str, gene_ids: list[str]) -> list[str | None]:
        """Gene symbols of ids (None where unknown or without a name)."""
        m = self._mapping(species)
        return [m.gene_names[t] or None if t >= 0 else None for t in m.tokens_of(gene_ids)]

    def estimate_mutual_information(self, emb1, emb2) -> float:
        """:func:`estimate_mutual_information` with this model's scale."""
        return estimate_mutual_information(emb1, emb2, self.logit_scale)

    # --- inference ----------------------------------------------------------------------

    def embedder(self, **options) -> Embedder:
        """The inference engine with ``options`` (see :class:`~concept.inference.Embedder`)."""
        return Embedder(self.model, **options)

    def embed(
        self,
        adata: anndata.AnnData | str | Path,
        species: str | None = None,
        gene_id_column: str | None = None,
        batch_size: int = 32,
        max_tokens: int | None = None,
        gene_sampling_strategy: str | None = None,
        use_learnable_embs: bool = True,
        return_type: str = "numpy",
        precision: str = "bf16-mixed",
        *,
        gene_symbols: bool = False,
        x_source: str | None = None,
        device: str = "auto",
        max_batch_tokens: int = 32768,
        rows_per_read: int = 8192,
        progress: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """Cell embeddings (the reference's ``extract_embeddings``).

        Parameters
        ----------
        adata
            An AnnData (read in memory, no copy) or an ``.h5ad`` path (read in row blocks).
        species
            None: the species whose vocabulary shares the most genes.
        gene_id_column
            var column with Ensembl ids (None: ``var_names``).
        batch_size
            Most cells per forward pass.
        max_tokens
            Genes per cell (None: the model's training ``max_tokens``).
        gene_sampling_strategy
            ``top-nonzero``, ``top``, ``random-nonzero`` or ``random`` (None: the model's).
        use_learnable_embs
            Add the learnable residual table to pretrained gene vectors.
        return_type
            ``numpy`` or ``torch``.
        precision
            ``bf16-mixed`` (bf16 autocast, the reference's inference, CPU included) or ``32``.
        gene_symbols
            The ids are symbols, matched to the mapping's ``gene_name`` column.
        x_source
            ``auto`` (default: ``raw`` when present, else ``X``), ``X``, ``raw`` or
            ``layers/<name>``; the reference reads ``X``.

        Returns
        -------
        numpy.ndarray or torch.Tensor
            ``(n_cells, dim)`` float32, L2-normalized rows, in the input's cell order.
        """
        if return_type not in ("numpy", "torch"):
            raise ValueError(f"return_type={return_type!r}: expected numpy or torch")
        embedder = self.embedder(
            max_tokens=max_tokens,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            device=device,
            precision=precision,
            use_learnable_embs=use_learnable_embs,
            gene_sampling_strategy=gene_sampling_strategy,
        )
        out, _ = embedder.embed_file(
            adata, species, gene_id_column, gene_symbols, x_source, rows_per_read, progress
        )
        return torch.from_numpy(out) if return_type == "torch" else out

    # --- light adaptation ---------------------------------------------------------------

    def adapt(
        self,
        adatas: list[anndata.AnnData | str | Path] | anndata.AnnData | str | Path,
        species: str | None = None,
        max_steps: int = 1000,
        batch_size: int = 32,
        *,
        lr: float = 1e-4,
        warmup: int = 10,
        max_tokens: int | None = None,
        train_vocab_only: bool = False,
        gene_mappings: str | Path | None = None,
        folder: str | Path | None = None,
        overrides: list[str] | None = None,
    ) -> Concept:
        """Fine-tune on AnnData objects or ``.h5ad`` files (the reference's ``train``).

        The inputs become a project of their own (in ``folder``, else a temporary folder)
        whose token mappings are the model's (or ``gene_mappings``). The project's compiler
        builds the stores, reading AnnData objects in memory (in this process, no file
        written; see :class:`concept.h5ad.AnnDataSource`) and files where they are. The
        project's trainer continues from this model (``initialize.checkpoint``, strict),
        without validation, on one device (CPU unless CUDA is visible).

        Parameters
        ----------
        adatas
            AnnData objects and/or ``.h5ad`` paths (raw counts; ids in ``var_names``).
        species
            The species of every input (None: inferred per input).
        max_steps, batch_size, lr, warmup
            ``model.training.max_steps``, ``datamodule.dataloader.train.batch_size``,
            ``model.training.lr``, ``model.training.warmup``.
        max_tokens
            Genes per view (default: the model's training ``max_tokens``).
        train_vocab_only
            Train only the learnable gene tables, everything else frozen
            (``model.training.train_vocab_only``); with ``gene_mappings``, the model is
            first moved to that vocabulary (:func:`concept.pretrained.with_vocabulary`).
        gene_mappings
            Folder of ``<species>.csv`` token mappings to adapt to (needs
            ``train_vocab_only``); the adapted model keeps these files' paths.
        folder
            Where the project (stores, run folder ``model_checkpoints/adapted``) is
            written; kept when given. Adapting again into it rebuilds only stores whose
            input changed (an AnnData's content is fingerprinted) and replaces the run.
        overrides
            More dotted config overrides (``datamodule.dataset.train.panel_selection=random``).

        Returns
        -------
        Concept
            The adapted model (this one is unchanged).

        Raises
        ------
        concept.vocab.InputError
            An input the compiler cannot read, or ``gene_mappings`` sharing no gene with the
            model's vocabulary.
        """
        from concept.config import compose, validate
        from concept.train import train
        from preprocess.compile import run as compile_run

        inputs = adatas if isinstance(adatas, list | tuple) else [adatas]
        if not inputs:
            raise InputError("adapt: no inputs")
        if gene_mappings is not None and not train_vocab_only:
            raise ConfigError(
                "adapt: gene_mappings (a vocabulary other than the model's) needs "
                "train_vocab_only=True"
            )
        mappings = dict(self.model.mappings)
        if gene_mappings is not None:
            for p in sorted(Path(gene_mappings).glob("*.csv")):
                mappings[p.stem] = read_token_mapping(p)
        keep = folder is not None
        root = Path(folder) if keep else Path(tempfile.mkdtemp(prefix="concept-adapt-"))
        try:
            data = root / "data" / "adapt" / "inputs"
            data.mkdir(parents=True, exist_ok=True)
            by_species: dict[str, list[str]] = {}
            in_memory = {}
            for i, item in enumerate(inputs):
                if getattr(item, "isbacked", False):  # a backed AnnData: its file
                    item = item.filename
                if isinstance(item, str | Path):
                    name = f"input_{i}{Path(item).suffix or '.h5ad'}"
                    (data / name).unlink(missing_ok=True)
                    (data / name).symlink_to(Path(item).absolute())
                else:
                    name = f"input_{i}"  # no file: the store's name
                    in_memory[data / name] = item
                with open_source(item) as src:
                    sp_ = species or infer_species(src.var_ids(), mappings)
                by_species.setdefault(sp_, []).append(name)
            vocab = root / "references" / "vocabulary" / "token_mappings_per_specie"
            vocab.mkdir(parents=True, exist_ok=True)
            for s, mapping in mappings.items():
                shutil.copyfile(mapping.path, vocab / f"{s}.csv")
            self.save(root / "model")
            run_dir = root / "model_checkpoints" / "adapted"
            shutil.rmtree(run_dir, ignore_errors=True)  # an earlier adapt's run
            accelerator = "gpu" if torch.cuda.is_available() else "cpu"
            raw = compose(
                [
                    f"PATH.PROJECT_PATH={root}",
                    "compile.register=false",
                    "compile.workers=1",
                    "initialize.checkpoint=" + str(root / "model"),
                    "initialize.create_new_run=true",
                    "wandb.run_name=adapted",
                    f"model.training.accelerator={accelerator}",
                    "model.training.devices=1",
                    f"model.training.max_steps={max_steps}",
                    f"model.training.warmup={warmup}",
                    f"model.training.lr={lr}",
                    f"model.training.train_vocab_only={train_vocab_only}",
                    "model.training.validate_before_training=false",
                    "model.training.val_check_interval=1000000000",
                    f"datamodule.dataloader.train.batch_size={batch_size}",
                    f"model.dropout={self.model.module.cfg.dropout}",  # the model's own
                    *(overrides or []),
                ]
            )
            model_cfg = self.config()
            raw.datamodule.dataset.val, raw.datamodule.dataloader.val = {}, {}  # no validation
            raw.datamodule.species = sorted(by_species)
            raw.datamodule.normalization = model_cfg.datamodule.normalization
            raw.datamodule.gene_sampling_strategy = model_cfg.datamodule.gene_sampling_strategy
            raw.datamodule.dataset.train.max_tokens = max_tokens or self.model.max_tokens
            raw.datamodule.dataset.train.split = [
                {
                    "source_name": "adapt",
                    "species": s,
                    "source_path": str(data),
                    "train": files,
                    "val": [],
                }
                for s, files in sorted(by_species.items())
            ]
            cfg = validate(raw)
            if compile_run(cfg, in_memory) != 0:
                raise InputError(f"adapt: compiling the inputs failed (report in {root}/compiled)")
            train(cfg)
            adapted = load(run_dir)
            # the temporary project goes: the vocabularies are the caller's own files
            return Concept(replace(adapted, mappings={**adapted.mappings, **mappings}))
        finally:
            if not keep:
                shutil.rmtree(root, ignore_errors=True)

    # --- saving -------------------------------------------------------------------------

    def config(self) -> Config:
        """The model's config (built from its settings when it came without one)."""
        module = self.model.module
        base = self.model.config or Config(
            PATH=PathConfig(PROJECT_PATH="."),
            datamodule=DataModuleConfig(species=self.species, normalization=module.normalization),
        )
        return replace(base, model=module.cfg)

    def save(self, folder: str | Path) -> Path:
        """Write the Hugging Face layout (``model.ckpt`` with the reference's parameter
        names, ``config.yaml``, ``gene_mappings/``, ``panels/`` when the model has them),
        which :meth:`from_pretrained` reads back.

        Returns
        -------
        pathlib.Path
            The folder.
        """
        import lightning

        folder = Path(folder)
        (folder / "gene_mappings").mkdir(parents=True, exist_ok=True)
        module = self.model.module
        cfg = module.cfg
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        torch.save(
            {
                "state_dict": to_reference_names(state, cfg.pe_max_len, cfg.dim_model),
                "pytorch-lightning_version": lightning.__version__,
            },
            folder / "model.ckpt",
        )
        config = asdict(self.config())
        config["initialize"] = asdict(type(self.config().initialize)())
        OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
        for species, mapping in self.model.mappings.items():
            shutil.copyfile(mapping.path, folder / "gene_mappings" / f"{species}.csv")
        panels = self.model.files.folder / "panels"
        if self.model.files.published and panels.is_dir() and panels != folder / "panels":
            shutil.copytree(panels, folder / "panels", dirs_exist_ok=True)
        return folder
