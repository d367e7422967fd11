"""``python -m concept.train PATH.PROJECT_PATH=P [dotted overrides]``: contrastive pre-training.

Resolves the splits to compiled stores, or ``datamodule.collection=<key>`` to the stores of
a LaminDB collection (a missing or stale store is an error that prints the compile command),
builds the data module, the model and a Lightning Trainer, and
fits. Run folder: ``PATH.CHECKPOINT_ROOT/<run_id>/`` with ``config.yaml``, ``metrics.csv``,
``steps/`` and ``latest/`` (``last.ckpt``). Resume with ``initialize.resume=true
initialize.run_id=ID initialize.checkpoint=latest/last.ckpt``. Continue pre-training from a
model (a published one too) in a new run with ``initialize.checkpoint=<folder, name or .ckpt>
initialize.create_new_run=true`` (:func:`concept.pretrained.start_from`); the project's
vocabulary must be the model's, unless ``model.training.train_vocab_only=true`` adapts the
model to it (:func:`concept.pretrained.with_vocabulary`: only the gene tables train).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from omegaconf import OmegaConf

from concept import pretrained as pretrained_model
from concept.callbacks import CSVLog, RunFolder, Throughput
from concept.cli import entry_point
from concept.config import Config, ConfigError, validate
from concept.datamodule import TokenDataModule, read_mappings, resolve_stores
from concept.lit import ContrastiveModule
from concept.vocab import InputError, TokenMapping

log = logging.getLogger("concept.train")
SEED = 42


def load_pretrained(cfg: Config, mappings: dict[str, TokenMapping]) -> dict[str, np.ndarray] | None:
    """Per-species gene vectors aligned to tokens (CLS, PAD and unknown genes stay zero)."""
    root = cfg.PATH.PRETRAINED_VOCABULARY
    if root is None:
        return None
    if not Path(root).is_dir():
        raise InputError(
            f"PATH.PRETRAINED_VOCABULARY={root}: no such directory (set it to null to train without)"
        )
    out = {}
    for species, mapping in mappings.items():
        path = Path(root) / f"{species}.csv"
        if not path.is_file():
            raise InputError(f"{path}: pretrained vectors for {species} not found")
        with path.open() as fh:
            fh.readline()
            ids = []
            rows = []
            for line in fh:
                gene, _, rest = line.partition(",")
                ids.append(gene)
                rows.append(rest)
        vectors = np.loadtxt(rows, delimiter=",", dtype=np.float32, ndmin=2)
        if vectors.shape[1] != cfg.model.dim_pretrained_vocab:
            raise InputError(
                f"{path}: vectors have {vectors.shape[1]} columns, model.dim_pretrained_vocab is "
                f"{cfg.model.dim_pretrained_vocab}"
            )
        table = np.zeros((mapping.size, vectors.shape[1]), np.float32)
        tokens = mapping.tokens_of(ids)
        table[tokens[tokens >= 0]] = vectors[tokens >= 0]
        log.info(
            "%s: %d of %d genes have pretrained vectors",
            species,
            (tokens >= 0).sum(),
            mapping.size - 2,
        )
        out[species] = table
    return out


def new_run_id() -> str:
    """A new run's id when ``wandb.run_name`` is unset: the reference's timestamp."""
    return dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _run_id(cfg: Config) -> str:
    """This rank's proposal; under DDP, rank 0's is used (:class:`RunFolder`)."""
    ini = cfg.initialize
    if ini.resume and not ini.create_new_run:
        if not ini.run_id:
            raise ConfigError("initialize.resume=true needs initialize.run_id")
        return ini.run_id
    return cfg.wandb.run_name or new_run_id()


def resume_config(cfg: Config, overrides: list[str]) -> Config:
    """The run folder's saved config (or ``initialize.config_file``) with CLI keys on top."""
    ini = cfg.initialize
    path = (
        Path(ini.config_file)
        if ini.config_file
        else Path(cfg.PATH.CHECKPOINT_ROOT) / str(ini.run_id) / "config.yaml"
    )
    if not path.is_file():
        raise ConfigError(f"initialize.resume: no saved config at {path}")
    saved = OmegaConf.load(path)
    cli = OmegaConf.from_dotlist(
        [o.lstrip("+") for o in overrides if "=" in o and not o.startswith("~")]
    )
    return validate(OmegaConf.merge(saved, cli))


def build_trainer(cfg: Config, run_id: str) -> L.Trainer:
    t = cfg.model.training
    gpu = t.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if t.accelerator in ("gpu", "cuda") and not gpu:
        raise ConfigError(
            "model.training.accelerator=gpu but no GPU is visible: pass model.training.accelerator=cpu"
        )
    devices = t.devices if (gpu or t.devices != -1) else 1
    num_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", t.num_nodes))
    n_dev = torch.cuda.device_count() if (gpu and devices == -1) else devices
    strategy = "ddp" if (n_dev > 1 or num_nodes > 1) else "auto"
    step_every = 100_000 if t.max_steps > 100_000 else 10_000
    root = Path(cfg.PATH.CHECKPOINT_ROOT)
    run_dir = root / run_id  # the proposal: RunFolder moves everything to rank 0's run
    saved = asdict(cfg)
    saved["initialize"] = asdict(type(cfg.initialize)())  # a saved config starts fresh
    callbacks = [
        RunFolder(root, run_id, saved),
        ModelCheckpoint(
            run_dir / "steps",
            "step={step}",
            every_n_train_steps=step_every,
            save_top_k=-1,
            save_last="link",
            auto_insert_metric_name=False,
        ),
        ModelCheckpoint(
            run_dir / "latest",
            "step={step}",
            every_n_train_steps=min(20_000, t.max_steps),
            save_top_k=1,  # no monitor: the newest (also after a fresh_training restart)
            save_last="link",
            auto_insert_metric_name=False,
        ),
        LearningRateMonitor("step"),
        Throughput(),
        # the bar reads its metrics back from the device: only on logging steps
        TQDMProgressBar(refresh_rate=t.log_every_n_steps),
    ]
    loggers = [CSVLog()]
    if cfg.wandb.enabled:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                name=cfg.wandb.run_name,
                entity=cfg.wandb.entity,
                project=cfg.wandb.project,
                id=run_id,
                save_dir=cfg.PATH.PROJECT_PATH,
                offline=cfg.wandb.mode == "offline",
                resume="allow",
            )
        )
    profiler = None
    if cfg.profiler.enabled:
        from lightning.pytorch.profilers import PyTorchProfiler

        profiler = PyTorchProfiler(
            dirpath=run_dir / "profiler",
            filename="profiler",
            record_shapes=True,
            profile_memory=True,
            with_stack=True,
            schedule=torch.profiler.schedule(
                skip_first=170, wait=10, warmup=10, active=20, repeat=1
            ),
        )
    val_interval = t.val_check_interval
    val_interval = float(val_interval) if val_interval <= 1 else int(val_interval)
    return L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision="bf16-mixed" if gpu else "32-true",
        max_steps=t.max_steps,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=val_interval,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        callbacks=callbacks,
        logger=loggers,
        profiler=profiler,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=root,
    )


def train(cfg: Config, overrides: list[str] | None = None) -> dict:
    """Build everything and fit; returns the final validation metrics (floats)."""
    if cfg.initialize.resume:
        cfg = resume_config(cfg, overrides or [])
    start = pretrained_model.start_from(cfg)  # a model's weights, into a new run
    if start is not None:
        cfg, start = start
    train_max = cfg.datamodule.dataset.train.max_tokens
    if cfg.model.pe_max_len < train_max + 1:
        raise ConfigError(
            f"model.pe_max_len={cfg.model.pe_max_len} must be >= max_tokens + 1 = {train_max + 1}"
        )
    L.seed_everything(SEED, workers=True, verbose=False)
    mappings = read_mappings(cfg)
    if start is not None and cfg.model.training.train_vocab_only:  # adapt to this vocabulary
        vectors = load_pretrained(cfg, mappings) if start.pretrained_tables() else None
        start = pretrained_model.with_vocabulary(start, mappings, vectors)
    elif start is not None:
        pretrained_model.check_same_vocabulary(mappings, start)
    # datamodule.collection: resolved through the registry by rank 0 in the data module's setup
    stores = None if cfg.datamodule.collection else resolve_stores(cfg, mappings)
    pretrained = load_pretrained(cfg, mappings) if start is None else start.pretrained_tables()
    data = TokenDataModule(cfg, stores, mappings, seed=SEED)
    module = ContrastiveModule(
        ContrastiveModule.hparams_for(cfg.model, pretrained),
        start.vocab_sizes if start else {s: m.size for s, m in mappings.items()},
        cfg.datamodule.normalization,
        data.val_names,
        cfg.datamodule.obs_keys,
        pretrained,
    )
    run_id = _run_id(cfg)
    ckpt = None
    ini = cfg.initialize
    if ini.fresh_training and not ini.resume:
        raise ConfigError(
            "initialize.fresh_training=true restarts from a checkpoint: also pass "
            "initialize.resume=true initialize.run_id=... initialize.checkpoint=..."
        )
    if start is not None:  # weights only, into a new run
        pretrained_model.load_weights(module, start)
    elif ini.resume:  # everything; fresh_training drops the step, epoch and loader position
        source = Path(cfg.PATH.CHECKPOINT_ROOT) / str(ini.run_id) / str(ini.checkpoint)
        if not source.exists():
            raise ConfigError(f"initialize.checkpoint: {source} does not exist")
        ckpt = str(source)
        module.fresh_training = ini.fresh_training
    trainer = build_trainer(cfg, run_id)
    if cfg.model.training.validate_before_training and ckpt is None and data.val_names:
        trainer.validate(module, datamodule=data)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def run(cfg: Config) -> int:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    metrics = train(cfg, overrides)
    for key in sorted(k for k in metrics if k.startswith("val/")):
        print(f"{key:<50} {metrics[key]:.4f}")
    return 0


main = entry_point(run)

if __name__ == "__main__":
    main()
