"""Trained models from any of their forms: published folders, this project's runs, names.

A *source* is one of

* a folder in the Hugging Face layout of the published scConcept models: ``model.ckpt``
  (a Lightning checkpoint with ``state_dict``, or the reference's Fabric checkpoint with
  the weights under ``model``), ``config.yaml`` (the reference's composed config),
  ``gene_mappings/<species>.csv`` and optionally ``panels/`` and
  ``pretrained_vocabulary/`` (whose values are in the checkpoint: only the weights'
  shapes are used here);
* a run folder or ``.ckpt`` of this project (``config.yaml`` in the run folder), or
  ``latest``: the newest run under a checkpoint root;
* a model name (``corpus40M-model30M``), fetched from the Hugging Face repo
  ``theislab/scConcept`` with ``huggingface_hub`` (the optional ``hf`` extra) into its
  usual cache; with ``HF_HUB_OFFLINE=1`` it resolves from that cache.

The architecture comes from the config's ``model`` section; keys it lacks take the
values the reference's code falls back to (``norm_scheme: post``, ``activation: relu``,
``dim_gene_embs`` = ``dim_model``, ``decoder_head: true``), not this project's YAML
defaults. Vocabulary sizes and pretrained-table shapes come from the weights. The
reference's parameter names map to ours one to one; its saved positional table must equal
ours (it is then dropped: ours is computed). Every missing, unexpected or mis-shaped
weight is an error that names it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from concept.config import Config, ConfigError, validate
from concept.lit import ContrastiveModule
from concept.model.network import sinusoid_table
from concept.vocab import InputError, TokenMapping, read_token_mapping

log = logging.getLogger(__name__)

HF_REPO = "theislab/scConcept"
DEFAULT_MAX_TOKENS = 1000  # the reference's inference default, for checkpoints without a config
# what the reference's model code (and its compatibility pass) use when a config lacks a key
REFERENCE_MODEL_DEFAULTS = {"norm_scheme": "post", "activation": "relu", "decoder_head": True}

# reference parameter-name prefix <-> ours (one to one, both directions)
NAME_MAP = (
    ("gene_token_encoder.learnable_embs.", "net.genes.learnable."),
    ("gene_token_encoder.pretrained_embs.", "net.genes.pretrained."),
    ("gene_token_encoder.adapter1.", "net.genes.adapter1."),
    ("gene_token_encoder.adapter2.", "net.genes.adapter2."),
    ("gene_token_encoder.enc_norm.", "net.genes.norm."),
    ("value_encoder.linear1.", "net.value_encoder.0."),
    ("value_encoder.linear2.", "net.value_encoder.2."),
    ("value_encoder.norm.", "net.value_encoder.3."),
    ("transformer_encoder.layers.", "net.layers."),
    ("expression_decoder.fc.", "net.decoder."),
    ("projection.", "net.projection."),
    ("cls_embedding", "net.cls_embedding"),
    ("logit_scale", "logit_scale"),
)
REFERENCE_PE = "positional_encoder.pe"


# --- where the files are ------------------------------------------------------------------


@dataclass
class ModelFiles:
    """The files of one model."""

    checkpoint: Path
    config: Path | None  # config.yaml (None: a bare checkpoint of this project)
    gene_mappings: Path | None  # folder of <species>.csv (None: the config's PATH)
    folder: Path  # the model or run folder

    @property
    def published(self) -> bool:
        """Hugging Face layout (gene mappings inside the folder)."""
        return self.gene_mappings is not None


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


def _hf_folder(folder: Path) -> bool:
    return (folder / "gene_mappings").is_dir() and (folder / "config.yaml").is_file()


def download(name: str, repo_id: str = HF_REPO, cache_dir: str | Path | None = None) -> Path:
    """The folder of model ``name`` of ``repo_id`` in the Hugging Face cache (fetched when
    online and missing; ``HF_HUB_OFFLINE=1`` only reads the cache).

    Raises
    ------
    InputError
        ``huggingface_hub`` is not installed, or the model is neither cached nor reachable.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise InputError(
            f"{name!r} is not a local folder or checkpoint; to fetch the published model of "
            "that name install huggingface_hub (pip install 'concept-store[hf]')"
        ) from None
    try:
        root = snapshot_download(repo_id, allow_patterns=[f"{name}/*"], cache_dir=cache_dir)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise InputError(
            f"model {name!r} of {repo_id}: not in the Hugging Face cache and not downloadable "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    folder = Path(root) / name
    if not (folder / "model.ckpt").is_file():
        raise InputError(f"{repo_id} has no model {name!r} (no {name}/model.ckpt in {root})")
    return folder


def resolve(source: str | Path, checkpoint_root: str | None = None) -> ModelFiles:
    """Find the checkpoint, config and gene mappings of ``source`` (module docstring).

    Raises
    ------
    InputError
        No such file or folder, a folder without a checkpoint, or an unknown model name.
    ConfigError
        ``latest`` without a checkpoint root.
    """
    text = str(source)
    if text == "latest":
        if not checkpoint_root:
            raise ConfigError("checkpoint=latest needs PATH.PROJECT_PATH (or PATH.CHECKPOINT_ROOT)")
        source = newest_run(checkpoint_root)
    path = Path(source).expanduser().absolute()
    if not path.exists():
        if text.endswith(".ckpt") or "/" in text or text.startswith("."):
            raise InputError(f"checkpoint={text}: no such checkpoint file or model folder")
        path = download(text)
    if path.is_dir():
        if _hf_folder(path) and (path / "model.ckpt").is_file():
            return ModelFiles(
                path / "model.ckpt", path / "config.yaml", path / "gene_mappings", path
            )
        last = path / "latest" / "last.ckpt"
        found = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not last.exists() and not found:
            raise InputError(f"{path}: neither a model folder nor a run folder with a checkpoint")
        config = path / "config.yaml"
        return ModelFiles(
            last if last.exists() else found[-1], config if config.is_file() else None, None, path
        )
    if _hf_folder(path.parent):
        return ModelFiles(
            path, path.parent / "config.yaml", path.parent / "gene_mappings", path.parent
        )
    # this project: run/latest/last.ckpt, run/steps/step=N.ckpt or run/x.ckpt
    run = next(
        (d for d in (path.parent, path.parent.parent) if (d / "config.yaml").is_file()), None
    )
    return ModelFiles(path, run / "config.yaml" if run else None, None, run or path.parent)


# --- config and weights ------------------------------------------------------------------


def read_config(path: Path, published: bool = False) -> Config:
    """A model's ``config.yaml`` (the reference's or ours), with the reference's fallbacks
    for architecture keys it lacks. A published config's split file lists name the
    reference's training files, which mean nothing here: they are emptied."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if published:
        for key, split in raw.get("datamodule", {}).items():
            if key.startswith("split_") and isinstance(split, dict):
                split.update({s: [] for s in ("train", "val") if s in split})
    model = raw.setdefault("model", {})
    for key, value in REFERENCE_MODEL_DEFAULTS.items():
        model.setdefault(key, value)
    if "dim_model" in model:
        model.setdefault("dim_gene_embs", model["dim_model"])
    try:
        return validate(OmegaConf.create(raw))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _rename(name: str, pairs) -> str | None:
    for a, b in pairs:
        if name == a or (a.endswith(".") and name.startswith(a)):
            return b + name[len(a) :]
    return None


def from_reference_names(state: dict[str, torch.Tensor], pe_max_len: int) -> dict:
    """The reference's state dict in this project's names (its positional table checked
    against ours, then dropped).

    Raises
    ------
    InputError
        A name without a counterpart here, or a positional table that is not ours.
    """
    out, unknown = {}, []
    for name, value in state.items():
        if name == REFERENCE_PE:
            ours = sinusoid_table(pe_max_len, value.shape[-1])
            if value.shape[-2] != pe_max_len or not torch.allclose(
                value.reshape(ours.shape).float(), ours, atol=1e-6
            ):
                raise InputError(
                    f"{REFERENCE_PE} {tuple(value.shape)} differs from the sinusoidal table "
                    f"of model.pe_max_len={pe_max_len}"
                )
            continue
        new = _rename(name, NAME_MAP)
        if new is None:
            unknown.append(name)
        out[new] = value
    if unknown:
        raise InputError(f"unexpected weights (no counterpart in this model): {unknown}")
    return out


def to_reference_names(state: dict[str, torch.Tensor], pe_max_len: int, dim: int) -> dict:
    """This project's state dict in the reference's names (with its positional table)."""
    out = {_rename(k, [(b, a) for a, b in NAME_MAP]): v for k, v in state.items()}
    if "net.value_encoder.0.weight" not in state:
        out[REFERENCE_PE] = sinusoid_table(pe_max_len, dim)[None]
    return out


def _tables(state: dict, kind: str) -> dict[str, tuple[int, ...]]:
    pattern = re.compile(rf"^net\.genes\.{kind}\.([^.]+)\.weight$")
    return {m.group(1): tuple(v.shape) for k, v in state.items() if (m := pattern.match(k))}


def load_strict(module: torch.nn.Module, state: dict, where: Path) -> None:
    """``load_state_dict(strict=True)`` with an error that names every mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {names}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if names
    ]
    if problems:
        raise InputError(
            f"{where}: weights do not fit the config's architecture; " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


# --- the loaded model -----------------------------------------------------------------------


@dataclass
class Pretrained:
    """A loaded model: the module (weights), its config, its vocabularies and files."""

    module: ContrastiveModule
    config: Config | None
    mappings: dict[str, TokenMapping]
    files: ModelFiles

    @property
    def max_tokens(self) -> int:
        """The training ``max_tokens`` (inference default)."""
        return (
            self.config.datamodule.dataset.train.max_tokens if self.config else DEFAULT_MAX_TOKENS
        )

    @property
    def gene_sampling_strategy(self) -> str:
        return self.config.datamodule.gene_sampling_strategy if self.config else "top-nonzero"

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {s: m.size for s, m in self.mappings.items()}

    def pretrained_tables(self) -> dict[str, np.ndarray] | None:
        """Zero tables of the pretrained vectors' shapes (the values are in the weights)."""
        tables = self.module.net.genes.pretrained
        if tables is None:
            return None
        return {s: np.zeros(tuple(e.weight.shape), np.float32) for s, e in tables.items()}

    @property
    def stored_normalization(self) -> str:
        """Values as this project's stores held them in training (``compile.normalization``)."""
        return (
            "raw" if self.files.published or not self.config else self.config.compile.normalization
        )


def read_checkpoint(files: ModelFiles) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The weights (this project's names) and, for this project's checkpoints, the saved
    hyper-parameters."""
    try:
        # published checkpoints hold tensors and plain types only; ours also loader state
        ck = torch.load(files.checkpoint, map_location="cpu", weights_only=files.published)
    except Exception as e:
        raise InputError(f"{files.checkpoint}: unreadable checkpoint ({e})") from None
    if "state_dict" in ck:
        state = ck["state_dict"]
    elif "model" in ck and isinstance(ck["model"], dict):  # the reference's Fabric format
        state = ck["model"]
    else:
        raise InputError(
            f"{files.checkpoint}: no 'state_dict' (Lightning) or 'model' (Fabric) in the checkpoint"
        )
    return dict(state), ck.get("hyper_parameters")


def load(
    source: str | Path, checkpoint_root: str | None = None, gene_mappings: str | None = None
) -> Pretrained:
    """Load a model from ``source`` (see the module docstring).

    Parameters
    ----------
    source
        Model folder, run folder, ``.ckpt``, ``latest`` or a published model's name.
    checkpoint_root
        Where ``latest`` looks.
    gene_mappings
        Folder of ``<species>.csv`` token mappings (default: the model folder's, else the
        run config's ``PATH.GENE_MAPPINGS_PATH``).

    Raises
    ------
    InputError
        Missing files, weights that do not fit the architecture, a token mapping whose size
        differs from the weights' vocabulary.
    ConfigError
        A config the schema rejects.
    """
    files = resolve(source, checkpoint_root)
    config = read_config(files.config, files.published) if files.config else None
    state, hparams = read_checkpoint(files)
    if config is not None:
        model_cfg = config.model
    elif hparams is not None:
        model_cfg = ContrastiveModule(**hparams).cfg
    else:
        raise InputError(
            f"{files.checkpoint}: no config.yaml beside it and no saved hyper-parameters"
        )
    if not any(k.startswith("net.") for k in state):
        state = from_reference_names(state, model_cfg.pe_max_len)
    vocab = {s: shape[0] for s, shape in _tables(state, "learnable").items()}
    if not vocab:
        raise InputError(f"{files.checkpoint}: no gene embedding table in the weights")
    pretrained = {
        s: np.zeros(shape, np.float32) for s, shape in _tables(state, "pretrained").items()
    }
    if pretrained:
        model_cfg.dim_pretrained_vocab = next(iter(pretrained.values())).shape[1]
    if config is not None:
        normalization = config.datamodule.normalization
    else:
        normalization = hparams.get("normalization", "raw")
    module = ContrastiveModule(
        ContrastiveModule.hparams_for(model_cfg, pretrained or None),
        vocab,
        normalization,
        pretrained=pretrained or None,
    )
    load_strict(module, state, files.checkpoint)
    module.eval()
    folder = gene_mappings or files.gene_mappings
    if folder is None:
        if config is None:
            raise ConfigError(
                f"{files.checkpoint}: no config.yaml beside it; pass gene_mappings=DIR "
                "(the folder of <species>.csv token mappings)"
            )
        folder = config.PATH.GENE_MAPPINGS_PATH
    mappings = {}
    for species, size in vocab.items():
        mapping = read_token_mapping(Path(folder) / f"{species}.csv")
        if mapping.size != size:
            raise InputError(
                f"{mapping.path}: {mapping.size} tokens, the checkpoint's {species} "
                f"vocabulary has {size}"
            )
        mappings[species] = mapping
    return Pretrained(module, config, mappings, files)


# --- continuing pre-training from a model ------------------------------------------------

# model.* keys that define the network: taken from the model, never from the project
ARCHITECTURE = (
    "dim_gene_embs",
    "dim_pretrained_vocab",
    "dim_model",
    "num_head",
    "dim_hid",
    "projection_dim",
    "nlayers",
    "decoder_head",
    "norm_scheme",
    "activation",
    "pe_max_len",
    "input_encoding",
    "cls_value",
    "mask_value",
)


def check_same_vocabulary(project: dict[str, TokenMapping], model: Pretrained) -> None:
    """The project's token mappings must be the model's (its stores hold those tokens).

    Raises
    ------
    InputError
        A species the model lacks, or a gene whose token differs (the first one named).
    """
    for species, mine in project.items():
        theirs = model.mappings.get(species)
        if theirs is None:
            raise InputError(
                f"{mine.path}: the model {model.files.folder} has no {species} vocabulary "
                f"(it has {sorted(model.mappings)})"
            )
        if mine.gene_ids != theirs.gene_ids:
            diff = next(
                (
                    t
                    for t, (a, b) in enumerate(zip(mine.gene_ids, theirs.gene_ids, strict=False))
                    if a != b
                ),
                min(mine.size, theirs.size),
            )
            a = mine.gene_ids[diff] if diff < mine.size else "(none)"
            b = theirs.gene_ids[diff] if diff < theirs.size else "(none)"
            raise InputError(
                f"{mine.path} differs from the model's {theirs.path} ({mine.size} vs "
                f"{theirs.size} tokens; token {diff}: {a} vs {b}): set "
                f"PATH.GENE_MAPPINGS_PATH={theirs.path.parent} and compile again, or adapt "
                "the model to this vocabulary with model.training.train_vocab_only=true"
            )


def with_vocabulary(
    model: Pretrained,
    project: dict[str, TokenMapping],
    vectors: dict[str, np.ndarray] | None = None,
) -> Pretrained:
    """``model`` with the project's vocabularies (``model.training.train_vocab_only``).

    Every weight but the gene tables is the model's (loaded strictly). A species of the
    project gets tables of its vocabulary's size: a gene both vocabularies hold (matched by
    id, as :meth:`~concept.vocab.TokenMapping.tokens_of` matches) keeps its rows of the
    model's tables; a new gene starts as the reference starts a fresh table (learnable
    rows N(0, 1) without pretrained vectors, zeros as the residual beside them; pretrained
    rows from ``vectors``, else zeros). Species the project lacks keep theirs.

    Parameters
    ----------
    model
        The loaded model.
    project
        The project's token mappings, by species.
    vectors
        The project's pretrained gene vectors (:func:`concept.train.load_pretrained`),
        for the new genes of a model with a pretrained table.

    Raises
    ------
    InputError
        A species the model lacks, or a vocabulary sharing no gene with the model's.
    """
    sizes, mappings, shared = dict(model.vocab_sizes), dict(model.mappings), {}
    for species, mine in project.items():
        theirs = model.mappings.get(species)
        if theirs is None:
            raise InputError(
                f"{mine.path}: the model {model.files.folder} has no {species} vocabulary "
                f"(it has {sorted(model.mappings)}): train_vocab_only adapts a vocabulary, "
                "it does not add a species"
            )
        old = theirs.tokens_of(mine.gene_ids)  # the model's token of each project token
        new = np.flatnonzero(old >= 0)
        if not (new >= 2).any():  # <cls> and <pad> always match
            raise InputError(
                f"{mine.path} shares no gene with the model's {species} vocabulary "
                f"{theirs.path} (ids like {mine.gene_ids[2:4]} vs {theirs.gene_ids[2:4]}): "
                "map the genes to the model's ids first"
            )
        sizes[species], mappings[species], shared[species] = mine.size, mine, (new, old[new])
        log.info(
            "%s: %d genes kept from the model, %d new, %d of the model's dropped",
            species,
            int((new >= 2).sum()),
            mine.size - len(new),
            theirs.size - len(new),
        )
    genes = model.module.net.genes
    pretrained = None
    if genes.pretrained is not None:
        pretrained = {}
        for s, emb in genes.pretrained.items():
            if s not in shared:
                pretrained[s] = emb.weight.detach().numpy()
            elif vectors is not None and s in vectors:
                pretrained[s] = vectors[s]
            else:
                pretrained[s] = np.zeros((sizes[s], emb.weight.shape[1]), np.float32)
    module = ContrastiveModule(
        ContrastiveModule.hparams_for(model.module.cfg, pretrained),
        sizes,
        model.module.normalization,
        pretrained=pretrained,
    )
    state, fresh = model.module.state_dict(), module.state_dict()
    for s, (new, old) in shared.items():
        for kind in ("learnable", "pretrained"):
            key = f"net.genes.{kind}.{s}.weight"
            if key in state:
                table = fresh[key].clone()
                table[torch.as_tensor(new)] = state[key][torch.as_tensor(old)]
                state[key] = table
    load_strict(module, state, model.files.checkpoint)
    module.eval()
    return Pretrained(module, model.config, mappings, model.files)


def start_from(cfg: Config) -> tuple[Config, Pretrained] | None:
    """The model a new run starts from (``initialize.create_new_run=true`` with
    ``initialize.checkpoint``), and the run's config with the model's architecture.

    ``initialize.checkpoint`` is anything :func:`load` takes (with ``initialize.resume``:
    a path inside the run ``initialize.run_id``). Training keys stay the project's.
    """
    ini = cfg.initialize
    if not (ini.create_new_run and ini.checkpoint) or ini.fresh_training:
        return None  # fresh_training restores the whole checkpoint (weights and optimizer)
    source = ini.checkpoint
    if ini.resume:
        source = Path(cfg.PATH.CHECKPOINT_ROOT) / str(ini.run_id) / str(ini.checkpoint)
        if not source.exists():
            raise ConfigError(f"initialize.checkpoint: {source} does not exist")
    model = load(source)
    arch = {k: getattr(model.module.cfg, k) for k in ARCHITECTURE}
    changed = {k: (getattr(cfg.model, k), v) for k, v in arch.items() if getattr(cfg.model, k) != v}
    if changed:
        log.info("architecture from %s (project's values replaced): %s", source, changed)
    for key, value in arch.items():
        setattr(cfg.model, key, value)
    return cfg, model


def load_weights(module: ContrastiveModule, model: Pretrained) -> None:
    """Copy ``model``'s weights into a freshly built ``module`` (strict)."""
    load_strict(module, model.module.state_dict(), model.files.checkpoint)
