"""The LightningDataModule: compiled stores -> TokenLoaders with planned views."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from concept.config import Config, ViewConfig
from concept.data.loader import TokenLoader
from concept.data.views import Panels, ViewSpec, make_planner
from concept.splits import SplitFile, train_files, val_files
from concept.store import BYTE_SETTINGS, expected_attrs, stale_reason, store_path
from concept.vocab import TokenMapping, panel_files, read_token_mapping

log = logging.getLogger(__name__)


class StaleStoreError(FileNotFoundError):
    """A store the config needs is missing or older than its inputs."""


@dataclass
class Stores:
    """Store paths of the train dataset and of each validation loader."""

    train: list[Path]
    val: dict[str, list[Path]]


def compile_command(cfg: Config) -> str:
    return f"python -m preprocess.compile PATH.PROJECT_PATH={cfg.PATH.PROJECT_PATH}"


def resolve_stores(cfg: Config, mappings: dict[str, TokenMapping]) -> Stores:
    """Map the configured splits to their compiled stores, checking each is current.

    Raises
    ------
    StaleStoreError
        A store is missing or stale; the message names it and gives the compile command.
    """
    settings = {k: getattr(cfg.compile, k) for k in BYTE_SETTINGS}
    checked: dict[Path, Path] = {}

    def path_of(f: SplitFile) -> Path:
        if f.path not in checked:
            out = store_path(cfg.PATH.COMPILED_ROOT, f.source_name, f.stem)
            if f.species not in mappings:
                raise StaleStoreError(
                    f"{f.path}: species {f.species!r} is not in datamodule.species"
                )
            reason = (
                f"{out}: not compiled (source {f.path} not found)"
                if not f.path.is_file()
                else stale_reason(
                    out,
                    expected_attrs(
                        f.path,
                        mappings[f.species].sha256,
                        panel_files(cfg.PATH.PANELS_PATH, f.species),
                        settings,
                    ),
                )
            )
            if reason:
                raise StaleStoreError(f"{reason}\nrun: {compile_command(cfg)}")
            checked[f.path] = out
        return checked[f.path]

    return Stores(
        train=[path_of(f) for f in train_files(cfg)],
        val={name: [path_of(f) for f in files] for name, files in val_files(cfg).items()},
    )


def read_mappings(cfg: Config) -> dict[str, TokenMapping]:
    root = Path(cfg.PATH.GENE_MAPPINGS_PATH)
    return {s: read_token_mapping(root / f"{s}.csv") for s in cfg.datamodule.species}


def view_spec(cfg: Config, view: ViewConfig, train: bool, seed: int) -> ViewSpec:
    """Resolve one loader's view options (val loaders inherit the train max_tokens)."""
    max_tokens = view.max_tokens or cfg.datamodule.dataset.train.max_tokens
    return ViewSpec(
        max_tokens=max_tokens,
        panel_overlap=float(view.panel_overlap),
        panel_selection=view.panel_selection,
        panel_selection_mixed_prob=view.panel_selection_mixed_prob,
        panel_size_min=view.panel_size_min,
        panel_size_max=view.panel_size_max,
        panel_max_drop_rate=view.panel_max_drop_rate,
        feature_max_drop_rate=view.feature_max_drop_rate,
        qc_threshold=view.qc_threshold,
        max_total_seq_length=view.max_total_seq_length,
        gene_sampling_strategy=cfg.datamodule.gene_sampling_strategy,
        normalization=cfg.datamodule.normalization,
        train=train,
        seed=seed,
    )


class TokenDataModule(L.LightningDataModule):
    """Train and validation TokenLoaders over compiled stores.

    The train loader's position is saved in checkpoints by Lightning (the loader has
    ``state_dict``/``load_state_dict``), so a resumed run continues mid-epoch exactly.
    """

    def __init__(
        self, cfg: Config, stores: Stores, mappings: dict[str, TokenMapping], seed: int = 42
    ):
        super().__init__()
        self.cfg, self.stores, self.seed = cfg, stores, seed
        self.vocab = max(m.size for m in mappings.values())
        dm = cfg.datamodule
        self.panels = {}
        for name, view in [("train", dm.dataset.train), *dm.dataset.val.items()]:
            if view.panel_selection != "random":
                self.panels[name] = Panels.load(
                    cfg.PATH.PANELS_PATH, mappings, view.panel_filter_regex
                )
        self.val_names = sorted(dm.dataset.val)
        self._train: TokenLoader | None = None

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def _loader(self, paths, loader_cfg, spec: ViewSpec, panels, seed: int) -> TokenLoader:
        rank, world = self._rank()
        loader = TokenLoader(
            paths,
            batch_size=loader_cfg.batch_size,
            block_size=self.cfg.datamodule.loader.block_size,
            seed=seed,
            rank=rank,
            world_size=world,
            within_group=loader_cfg.within_group_sampling,
            num_samples=loader_cfg.num_samples,
            num_groups=loader_cfg.num_groups,
            sample_groups_equally=loader_cfg.sample_groups_equally,
            obs_keys=self.cfg.datamodule.obs_keys,
            reader=self.cfg.datamodule.loader.reader,
            prefetch=self.cfg.datamodule.loader.prefetch,
            num_workers=loader_cfg.num_workers,
            pin_memory=loader_cfg.pin_memory,
            plan_views=make_planner(spec, self.vocab, panels),
        )
        for i in loader.sampler.dropped_stores:
            log.warning(
                "%s: fewer cells than one batch (%d): not sampled", paths[i], loader_cfg.batch_size
            )
        if len(loader) == 0:
            log.warning("a loader over %d stores yields no batch: lower its batch_size", len(paths))
        return loader

    def train_dataloader(self) -> TokenLoader:
        dm = self.cfg.datamodule
        if self._train is None:
            spec = view_spec(self.cfg, dm.dataset.train, train=True, seed=self.seed)
            self._train = self._loader(
                self.stores.train, dm.dataloader.train, spec, self.panels.get("train"), self.seed
            )
        return self._train

    def val_dataloader(self) -> list[TokenLoader]:
        dm = self.cfg.datamodule
        loaders = []
        for i, name in enumerate(self.val_names):
            spec = view_spec(self.cfg, dm.dataset.val[name], train=False, seed=1000 + i)
            loaders.append(
                self._loader(
                    self.stores.val[name],
                    dm.dataloader.val[name],
                    spec,
                    self.panels.get(name),
                    1000 + i,
                )
            )
        return loaders
