"""Typed configuration: the schema every entry point validates its Hydra config against.

Hydra composes the YAML files in ``conf/``; :func:`validate` resolves the result and
merges it into these dataclasses, so a misspelled key or a value of the wrong type
fails with the key's full name before any work starts. Only entry points touch the
raw config; components receive the typed objects.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    ValidationError,
)

from concept import objstore

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

NORMALIZATIONS = ("raw", "log1p", "totalcount", "totalcount_log1p")
GENE_SAMPLING = ("top-nonzero", "top", "random-nonzero", "random")
PANEL_SELECTION = ("random", "mixed", "preselected")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(str, choices))}")


def check_normalization(name: str, value: str) -> None:
    """Accept the reference's normalizations, including ``binning/<N>`` with N >= 2."""
    if value.startswith("binning/"):
        n = value.split("/", 1)[1]
        if not n.isdigit() or int(n) < 2:
            raise ConfigError(f"{name}={value!r}: binning needs an integer N >= 2 (binning/<N>)")
        return
    _check_choice(name, value, (*NORMALIZATIONS, "totalcount/log1p", "binning/<N>"))


@dataclass
class PathConfig:
    PROJECT_PATH: str
    LOCAL_DIR: str | None = None
    CHECKPOINT_ROOT: str = ""
    PANELS_PATH: str = ""
    GENE_MAPPINGS_PATH: str = ""
    PRETRAINED_VOCABULARY: str | None = None
    COMPILED_ROOT: str = ""
    LAMIN_ROOT: str = ""
    SPECIES: list[str] | None = None  # the reference's key; read by nothing (accepted)

    def __post_init__(self) -> None:
        # absolute paths: worker processes and the registry child run in other folders
        # (s3:// URIs stay as they are: concept.objstore)
        for name, value in vars(self).items():
            if isinstance(value, str) and value and not objstore.is_uri(value):
                setattr(self, name, str(Path(value).expanduser().absolute()))


@dataclass
class WandbConfig:
    enabled: bool = False
    run_name: str | None = None
    entity: str | None = None
    project: str | None = None
    mode: str = "online"


@dataclass
class InitializeConfig:
    resume: bool = False
    run_id: str | None = None
    checkpoint: str | None = None
    create_new_run: bool = False
    fresh_training: bool = False
    config_file: str | None = None


@dataclass
class ProfilerConfig:
    enabled: bool = False


@dataclass
class CompileConfig:
    """Settings of ``python -m preprocess.compile``."""

    x_source: str = "auto"  # auto | X | raw | layers/<name>
    var_column: str | None = None  # var column with Ensembl ids (None: var_names)
    normalization: str = "raw"
    value_dtype: str = "float16"  # storage dtype of non-integer values
    obs_keys: list[str] = field(default_factory=list)
    precomp_embs_key: str | None = None  # obsm key compiled as per-cell embeddings
    shuffle_seed: int = 0
    group_by: str | None = None  # obs column whose cells are laid out together
    chunk_elements: int = 65536
    shard_elements: int = 4194304
    cell_chunk: int = 32768
    compressor: str | None = None  # None | zstd | blosc
    rows_per_read: int = 8192
    entries_per_read: int = 2_097_152
    workers: int | None = None
    num_shards: int = 1
    shard_index: int = 0
    force: bool = False
    fingerprint: str = "fast"  # fast | full: how a source's changes are noticed
    register: bool = True
    splits: list[str] = field(default_factory=lambda: ["train", "val"])

    def __post_init__(self) -> None:
        if not (self.x_source in ("auto", "X", "raw") or self.x_source.startswith("layers/")):
            raise ConfigError(
                f"compile.x_source={self.x_source!r}: expected auto, X, raw or layers/<name>"
            )
        _check_choice("compile.normalization", self.normalization, NORMALIZATIONS)
        _check_choice("compile.value_dtype", self.value_dtype, ("float16", "float32"))
        _check_choice("compile.compressor", self.compressor, (None, "zstd", "blosc"))
        _check_choice("compile.fingerprint", self.fingerprint, ("fast", "full"))
        if self.group_by is not None and self.group_by not in self.obs_keys:
            raise ConfigError(
                f"compile.group_by={self.group_by!r} is not among compile.obs_keys "
                f"{self.obs_keys}: add it to datamodule.obs_keys"
            )
        if self.shard_elements % self.chunk_elements:
            raise ConfigError("compile.shard_elements must be a multiple of compile.chunk_elements")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"compile.shard_index={self.shard_index} must be in [0, compile.num_shards="
                f"{self.num_shards})"
            )
        for s in self.splits:
            _check_choice("compile.splits", s, ("train", "val"))


@dataclass
class SynthConfig:
    seed: int = 0
    n_cells: int = 2000
    n_genes: int = 20000
    large: bool = False
    pretrained_dim: int = 640


@dataclass
class TrainingConfig:
    validate_before_training: bool = True
    masking_rate: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer_class: str = "AdamW"
    scheduler: str = "warmup"
    freeze_pretrained_vocabulary: bool = False
    use_learnable_embs_freq: float | None = None
    train_vocab_only: bool = False
    warmup: int = 10000
    max_steps: int = 10_000_000
    min_lr: float = 0.0
    accelerator: str = "gpu"
    devices: int = -1
    num_nodes: int = 1
    limit_train_batches: float = 1.0
    val_check_interval: float = 100000
    check_val_every_n_epoch: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 100
    resume_from_checkpoint: Any = None  # the reference's key; read by nothing (accepted)

    def __post_init__(self) -> None:
        _check_choice("model.training.optimizer_class", self.optimizer_class, ("AdamW", "Adam"))
        _check_choice("model.training.scheduler", self.scheduler, ("warmup", "warmup_cosine"))


@dataclass
class ModelConfig:
    name: str = "ContrastiveModel"
    flash_attention: bool = True
    dim_gene_embs: int = 512
    dim_pretrained_vocab: int = 640
    dim_model: int = 512
    num_head: int = 8
    dim_hid: int = 1024
    projection_dim: int | None = None
    nlayers: int = 8
    dropout: float = 0.1
    decoder_head: bool = False
    mask_value: float = -1.0
    cls_value: float = -2.0
    norm_scheme: str = "pre"
    activation: str = "gelu"
    values_only_sanity_check: bool = False
    data_loading_speed_sanity_check: bool = False
    mlm_loss_weight: float = 0.0
    cont_loss_weight: float = 1.0
    contrastive_loss: str = "multiclass"
    logit_scale_init_value: float = 3.0
    pe_max_len: int = 5000
    input_encoding: str = "rank_encoding"
    loss_switch_step: int = 10000
    # set by the reference's compatibility pass on older configs; read by nothing (accepted)
    min_tokens: int | None = None
    max_tokens: int | None = None
    mask_padding: bool | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        _check_choice("model.norm_scheme", self.norm_scheme, ("pre", "post"))
        _check_choice("model.activation", self.activation, ("gelu", "relu"))
        _check_choice("model.contrastive_loss", self.contrastive_loss, ("multiclass", "binary"))
        _check_choice(
            "model.input_encoding", self.input_encoding, ("rank_encoding", "value_encoding")
        )
        if self.dim_model % self.num_head:
            raise ConfigError("model.dim_model must be divisible by model.num_head")


@dataclass
class ViewConfig:
    """How one loader builds the two panel views (reference ``Collate`` options)."""

    split: list[Any] = field(default_factory=list)
    max_tokens: int | None = None  # None on a val loader: inherit the train value
    panel_overlap: Any = False  # bool, or a probability
    panel_selection: str = "random"
    panel_selection_mixed_prob: float = 0.25
    panel_filter_regex: str = ".*"
    panel_size_min: float = 0.02  # < 1: fraction of the store's genes; >= 1: absolute
    panel_size_max: float = 60000
    panel_max_drop_rate: float | None = None
    feature_max_drop_rate: float | None = None
    qc_threshold: float | None = None
    max_total_seq_length: int | None = None

    def __post_init__(self) -> None:
        _check_choice("panel_selection", self.panel_selection, PANEL_SELECTION)
        if not isinstance(self.panel_overlap, bool | int | float):
            raise ConfigError(f"panel_overlap={self.panel_overlap!r}: a bool or a probability")


@dataclass
class DatasetsConfig:
    train: ViewConfig = field(default_factory=lambda: ViewConfig(panel_selection="mixed"))
    val: dict[str, ViewConfig] = field(default_factory=dict)


@dataclass
class LoaderConfig:
    """The compiled-store loader (new keys: ``datamodule.loader.*``)."""

    block_size: int = 32
    prefetch: int = 4
    reader: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("datamodule.loader.reader", self.reader, ("auto", "tensorstore", "raw"))


@dataclass
class DataLoaderConfig:
    within_group_sampling: Any = "dataset"
    batch_size: int = 128
    shuffle: bool = True
    num_workers: int = 0
    pin_memory: bool = True
    drop_last: bool = True
    num_samples: int | None = None
    num_groups: int | None = None
    sample_groups_equally: bool = False


@dataclass
class DataLoadersConfig:
    train: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    val: dict[str, DataLoaderConfig] = field(default_factory=dict)


@dataclass
class DataModuleConfig:
    name: str = "DataModule"
    species: list[str] = field(default_factory=lambda: ["hsapiens"])
    obs_keys: list[str] = field(default_factory=list)
    normalization: str = "raw"
    gene_sampling_strategy: str = "top-nonzero"
    model_speed_sanity_check: bool = False
    precomp_embs_key: str | None = None
    # new: train from LaminDB collection key(s) instead of the splits (a key or a list)
    collection: Any = None
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    dataset: DatasetsConfig = field(default_factory=DatasetsConfig)
    dataloader: DataLoadersConfig = field(default_factory=DataLoadersConfig)

    def __post_init__(self) -> None:
        check_normalization("datamodule.normalization", self.normalization)
        _check_choice(
            "datamodule.gene_sampling_strategy", self.gene_sampling_strategy, GENE_SAMPLING
        )
        if isinstance(self.collection, str):
            self.collection = [self.collection]
        if self.collection is not None and (
            not isinstance(self.collection, list)
            or not self.collection
            or not all(isinstance(k, str) and k for k in self.collection)
        ):
            raise ConfigError(
                f"datamodule.collection={self.collection!r}: expected a collection key such as "
                "compiled/<source_name>_<species>/train, or a list of keys"
            )
        missing = set(self.dataset.val) ^ set(self.dataloader.val)
        if missing:
            raise ConfigError(
                "datamodule.dataset.val and datamodule.dataloader.val must name the same "
                f"loaders; unmatched: {sorted(missing)}"
            )


@dataclass
class Config:
    PATH: PathConfig
    wandb: WandbConfig = field(default_factory=WandbConfig)
    initialize: InitializeConfig = field(default_factory=InitializeConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    datamodule: DataModuleConfig = field(default_factory=DataModuleConfig)
    # Split dicts mounted under datamodule.split_<name> (not part of the schema: any name).
    splits: dict[str, Any] = field(default_factory=dict)


def suggest(err: ConfigKeyError) -> str:
    """Name the close matches of an unknown key, from the schema at that level."""
    key = getattr(err, "key", None)
    parent = getattr(err, "object_type", None)
    if key is None or parent is None or not hasattr(parent, "__dataclass_fields__"):
        return ""
    close = difflib.get_close_matches(str(key), list(parent.__dataclass_fields__), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def validate_schema(cfg: DictConfig | dict, schema: type):
    """Resolve a config and merge it into the dataclass ``schema`` (strict).

    Raises
    ------
    ConfigError
        A mandatory value is missing, a key is unknown or a value has the wrong type.
    """
    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    except (MissingMandatoryValue, InterpolationToMissingValueError) as e:
        missing = re.search(r"Missing mandatory value: (\S+)", str(e))
        key = missing.group(1) if missing else e.full_key
        raise ConfigError(
            f"missing value for {key}: pass it on the command line, e.g. {key}=..."
        ) from None
    plain = {k: v for k, v in dict(plain).items() if k != "hydra"}
    if schema is Config:  # split dicts mounted under datamodule.split_<name>: any name
        dm = dict(plain.get("datamodule", {}))
        mounted = {k: dm.pop(k) for k in list(dm) if k.startswith("split_")}
        plain["splits"] = {**plain.get("splits", {}), **mounted}  # asdict(Config) round-trips
        plain["datamodule"] = dm
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing value for {e.full_key}: pass it on the command line") from None
    except ConfigKeyError as e:
        raise ConfigError(f"unknown config key {e.full_key!r}{suggest(e)}") from None
    except ValidationError as e:
        raise ConfigError(f"bad value for {e.full_key!r}: {e.msg.splitlines()[0]}") from None


def validate(cfg: DictConfig | dict) -> Config:
    """Resolve a composed ``conf/config.yaml`` and check it against :class:`Config`."""
    return validate_schema(cfg, Config)


def compose(overrides: list[str] | None = None, config_dir: str | Path | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with dotted overrides (for tests and notebooks).

    ``config_dir`` is searched before the package's own ``conf/``, as ``--config-dir`` does
    on the command line.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    search = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=[*(overrides or []), *search])


def load_config(overrides: list[str] | None = None, config_dir: str | Path | None = None) -> Config:
    """Compose and validate in one call."""
    return validate(compose(overrides, config_dir))
