"""The LightningDataModule: compiled stores -> TokenLoaders with planned views."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np

from concept import objstore
from concept.config import Config, ConfigError, ViewConfig
from concept.data.loader import TokenLoader
from concept.data.views import Panels, ViewSpec, make_planner
from concept.splits import SplitFile, train_files, val_files
from concept.store import (
    BYTE_SETTINGS,
    StoreError,
    check_store,
    compile_command,
    read_attrs,
    store_path,
)
from concept.vocab import TokenMapping, read_token_mapping

log = logging.getLogger(__name__)
SPEED_CHECK_FILES = 5  # datamodule.model_speed_sanity_check trains on this many files


class StaleStoreError(FileNotFoundError):
    """A store the config needs is missing or older than its inputs."""


@dataclass
class Stores:
    """Store paths of the train dataset and of each validation loader, and the source
    file each store was compiled from (checked, when present, by :func:`source_problems`)."""

    train: list[Path]
    val: dict[str, list[Path]]
    sources: dict[Path, Path] = field(default_factory=dict)


def rebuild_command(cfg: Config, attrs: dict | None) -> str:
    """The compile command for a store, with the overrides it was compiled with (``attrs``,
    its root attributes; None for a missing store: a plain compile)."""
    settings = {k: getattr(cfg.compile, k) for k in BYTE_SETTINGS}
    command = compile_command(attrs or {}, cfg.PATH.PROJECT_PATH, settings)
    if cfg.datamodule.precomp_embs_key is not None:  # compile.precomp_embs_key follows it
        command += f" datamodule.precomp_embs_key={cfg.datamodule.precomp_embs_key}"
    return command


def store_problem(
    path: Path, species: str, mapping: TokenMapping, embs_key: str | None = None
) -> tuple[str, dict | None]:
    """Why a store cannot be trained on, judged from its own metadata ('' when fine), and
    its root attributes (None when it is not a store)."""
    reason = check_store(path, vocab_sha256=mapping.sha256)
    try:
        attrs = read_attrs(path)
    except StoreError:
        return reason or f"{path}: not a store", None
    if reason:
        return reason, attrs
    if attrs.get("species") != species:
        return f"{path}: holds species {attrs.get('species')!r}, the split says {species!r}", attrs
    if embs_key is not None and attrs.get("settings", {}).get("precomp_embs_key") != embs_key:
        return f"{path}: has no obsm/{embs_key} (compile with this precomp_embs_key)", attrs
    return "", attrs


def source_problems(cfg: Config, sources: dict[Path, Path]) -> str | None:
    """Stores whose source changed since they were compiled: a stat per present source
    (:func:`concept.store.check_store`); absent sources are not needed and not checked."""
    problems = []
    for store, source in sources.items():
        if source.exists() and (reason := check_store(store, source)):
            problems.append(f"{reason}\nrun: {rebuild_command(cfg, read_attrs(store))}")
    return "\n".join(problems) or None


def resolve_stores(cfg: Config, mappings: dict[str, TokenMapping]) -> Stores:
    """Map the configured splits to their compiled stores, checking each from its own
    metadata. The source files are not needed (nor read): see :func:`source_problems`.

    Raises
    ------
    StaleStoreError
        A store is missing or unusable; the message names each and gives the compile
        command, with the compile settings the store was built with.
    """
    checked: dict[Path, Path] = {}
    sources: dict[Path, Path] = {}
    problems: list[str] = []

    def path_of(f: SplitFile) -> Path:
        if f.path not in checked:
            out = store_path(cfg.PATH.COMPILED_ROOT, f.source_name, f.stem)
            if f.species not in mappings:
                raise StaleStoreError(
                    f"{f.path}: species {f.species!r} is not in datamodule.species"
                )
            key = cfg.datamodule.precomp_embs_key
            reason, attrs = store_problem(out, f.species, mappings[f.species], key)
            if reason:
                if attrs is None and not f.path.exists():
                    reason += f" (and its source {f.path} is not there either)"
                problems.append(f"{reason}\nrun: {rebuild_command(cfg, attrs)}")
            checked[f.path], sources[out] = out, f.path
        return checked[f.path]

    stores = Stores(
        train=[path_of(f) for f in train_files(cfg)],
        val={name: [path_of(f) for f in files] for name, files in val_files(cfg).items()},
        sources=sources,
    )
    if problems:
        raise StaleStoreError("\n".join(problems))
    return stores


def val_collection_key(train_key: str) -> str | None:
    """The collection the validation loaders read beside a train collection: the val
    section of the same split (``.../train`` -> ``.../val``); None for another key."""
    return train_key.removesuffix("/train") + "/val" if train_key.endswith("/train") else None


def registry_stores(cfg: Config, mappings: dict[str, TokenMapping]) -> Stores:
    """The stores of ``datamodule.collection``, resolved through LaminDB (one child
    process; no split config and no source file read), each checked from its own
    metadata as :func:`resolve_stores` checks a split's stores, and against the version
    the registry holds.

    Every validation loader reads the val collections of the same splits
    (:func:`val_collection_key`); none registered: no validation.

    Raises
    ------
    preprocess.registry.UnknownCollectionError
        A key of ``datamodule.collection`` is not registered (the message lists those that
        are).
    StaleStoreError
        A registered store is missing, unusable, of a species not in
        ``datamodule.species``, or not the registered version; the message names each
        with its collection and the compile command.
    """
    from preprocess.registry import resolve_collections, store_fingerprint

    train_keys = list(cfg.datamodule.collection)
    val_keys = [k for k in map(val_collection_key, train_keys) if k is not None]
    members = resolve_collections(
        cfg.PATH.LAMIN_ROOT, cfg.PATH.COMPILED_ROOT, train_keys, optional=val_keys
    )
    problems: list[str] = []

    def checked(collection: str, member: dict) -> Path:
        path = member["path"] if objstore.is_uri(member["path"]) else Path(member["path"])
        species = member["features"].get("species")
        where = f"(registered as {member['key']} in collection {collection})"
        if species not in mappings:
            problems.append(
                f"{path} {where}: species {species!r} is not in datamodule.species "
                f"{sorted(mappings)}: add it, e.g. datamodule.species=[{','.join(mappings)},"
                f"{species}]"
            )
            return path
        reason, attrs = store_problem(
            path, species, mappings[species], cfg.datamodule.precomp_embs_key
        )
        if not reason and store_fingerprint(attrs) != member["fingerprint"]:
            reason = f"{path}: not the version the registry holds (compiled since, unregistered)"
        if reason:
            gone = attrs is None and isinstance(path, Path) and not path.exists()
            missing = " (not on disk)" if gone else ""
            problems.append(f"{reason}{missing} {where}\nrun: {rebuild_command(cfg, attrs)}")
        return path

    train = [checked(k, m) for k in train_keys for m in members[k]]
    val = [checked(k, m) for k in val_keys if k in members for m in members[k]]
    if problems:
        raise StaleStoreError("\n".join(problems))
    return Stores(train=train, val={name: val for name in cfg.datamodule.dataset.val})


def on_rank_zero(trainer, fn):
    """``fn()`` on global rank 0 only, its result (or the exception it raised) on every rank,
    so that all ranks stop together and no rank repeats rank 0's work."""
    outcome = None
    if trainer.is_global_zero:
        try:
            outcome = (fn(), None)
        except Exception as e:  # every rank raises it below, rank 0 included
            outcome = (None, e)
    value, error = trainer.strategy.broadcast(outcome, src=0)
    if error is not None:
        raise error
    return value


# --- PATH.LOCAL_DIR: stores copied to node-local disk ------------------------------------


def local_path(store: Path | str, compiled_root: Path | str, local_dir: Path) -> Path:
    """Where ``store`` (a folder or an ``s3://`` URI) is copied under ``PATH.LOCAL_DIR``:
    its path below the compiled root."""
    if objstore.is_uri(store):
        uri, root = str(objstore.Uri.parse(store)), str(compiled_root).rstrip("/")
        if uri.startswith(root + "/"):
            return local_dir / uri[len(root) + 1 :]
        return local_dir.joinpath(*uri.split("/")[-2:])
    try:
        return local_dir / store.relative_to(compiled_root)
    except ValueError:
        return local_dir / store.parent.name / store.name


def localize(stores: list[Path | str], compiled_root: Path | str, local_dir: Path) -> None:
    """Copy stores (folders, or ``s3://`` stores: downloaded) to ``local_dir``,
    incrementally. A copy whose ``zarr.json`` equals the store's is current and kept (the
    root attributes change with every compile); others are copied under a temporary name
    and renamed into place, so a partial copy is never at the final path and never used."""
    tag = f"{socket.gethostname()}-{os.getpid()}"
    for store in stores:
        dst = local_path(store, compiled_root, local_dir)
        on_s3 = objstore.is_uri(store)
        meta = _root_meta(store)
        if (dst / "zarr.json").is_file() and (dst / "zarr.json").read_bytes() == meta:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp, old = dst.parent / f".{dst.name}.copy-{tag}", dst.parent / f".{dst.name}.old-{tag}"
        shutil.rmtree(tmp, ignore_errors=True)
        if on_s3:  # the commit marker last, and only if the store did not change meanwhile
            objstore.download(store, tmp, skip=(objstore.COMMIT,))
            if _root_meta(store) != meta:
                raise StaleStoreError(
                    f"{store}: replaced while being copied to {dst} (compiled again): "
                    "start the run again"
                )
            (tmp / objstore.COMMIT).write_bytes(meta)
        else:
            shutil.copytree(store, tmp)
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
        log.info("%s: copied to %s", store, dst)


def _root_meta(store: Path | str) -> bytes:
    """A store's root ``zarr.json`` (its version: the attributes change with every compile)."""
    if objstore.is_uri(store):
        return objstore.read(objstore.join(store, objstore.COMMIT))
    return (store / "zarr.json").read_bytes()


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

    ``stores`` None: those of ``datamodule.collection``, resolved in :meth:`setup`
    (:func:`registry_stores`). The train loader's position is saved in checkpoints by
    Lightning (the loader has ``state_dict``/``load_state_dict``), so a resumed run
    continues mid-epoch exactly.
    """

    def __init__(
        self,
        cfg: Config,
        stores: Stores | None,
        mappings: dict[str, TokenMapping],
        seed: int = 42,
    ):
        super().__init__()
        self.cfg, self.stores, self.mappings, self.seed = cfg, stores, mappings, seed
        self.vocab = max(m.size for m in mappings.values())
        dm = cfg.datamodule
        self.panels = {}
        for name, view in [("train", dm.dataset.train), *dm.dataset.val.items()]:
            if view.panel_selection != "random":
                self.panels[name] = Panels.load(
                    cfg.PATH.PANELS_PATH, mappings, view.panel_filter_regex
                )
        self.val_names = sorted(dm.dataset.val)
        for name, loader_cfg in [("train", dm.dataloader.train), *dm.dataloader.val.items()]:
            where = "train" if name == "train" else f"val.{name}"
            for key in ("shuffle", "drop_last"):
                if getattr(loader_cfg, key) is not True:
                    raise ConfigError(
                        f"datamodule.dataloader.{where}.{key}={getattr(loader_cfg, key)}: must be "
                        f"true (the reference asserts it: batches are shuffled and always full)"
                    )
        self._train: TokenLoader | None = None
        self._resolved = False

    def setup(self, stage: str) -> None:
        """Rank 0 resolves ``datamodule.collection`` through the registry (when set) or else
        checks the stores against their sources (when present); every rank gets the
        outcome, so all stop together on a stale store and the registry is asked once."""
        if self._resolved:
            return
        trainer = self.trainer
        if self.stores is None:
            self.stores = on_rank_zero(trainer, lambda: registry_stores(self.cfg, self.mappings))
        reason = on_rank_zero(trainer, lambda: source_problems(self.cfg, self.stores.sources))
        self._resolved = True
        if reason:
            raise StaleStoreError(reason)
        local = self.cfg.PATH.LOCAL_DIR
        if local:  # one copy per node (local rank 0); the other ranks wait for it
            needed = sorted(
                {*self.stores.train, *(p for v in self.stores.val.values() for p in v)}, key=str
            )
            root = self.cfg.PATH.COMPILED_ROOT
            root = root if objstore.is_uri(root) else Path(root)
            if trainer.local_rank == 0:
                localize(needed, root, Path(local))
            trainer.strategy.barrier("PATH.LOCAL_DIR")
            where = {p: local_path(p, root, Path(local)) for p in needed}
            self.stores = Stores(
                train=[where[p] for p in self.stores.train],
                val={k: [where[p] for p in v] for k, v in self.stores.val.items()},
                sources=self.stores.sources,
            )

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def _loader(
        self, paths, loader_cfg, spec: ViewSpec, panels, seed: int, in_memory: bool = False
    ) -> TokenLoader:
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
            in_memory=in_memory,
            embeddings_key=self.cfg.datamodule.precomp_embs_key,
            rows=False,
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
            paths, in_memory = self.stores.train, dm.model_speed_sanity_check
            if in_memory:  # the reference: 5 random train files, held in memory
                pick = np.random.default_rng(self.seed).permutation(len(paths))[:SPEED_CHECK_FILES]
                paths = [paths[i] for i in sorted(pick)]
                log.warning(
                    "datamodule.model_speed_sanity_check: training on %d stores held in memory",
                    len(paths),
                )
            self._train = self._loader(
                paths, dm.dataloader.train, spec, self.panels.get("train"), self.seed, in_memory
            )
        return self._train

    def val_dataloader(self) -> list[TokenLoader]:
        dm = self.cfg.datamodule
        if self.val_names and not any(self.stores.val.values()):
            log.warning("no validation store (no val collection registered): no validation")
            return []
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
