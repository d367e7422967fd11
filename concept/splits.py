"""Split resolution: the one place that turns split entries into input files.

A split file (``conf/datamodule/split_*/split_*.yaml``) names a ``source_name``, a
``species``, a ``source_path`` and ``train``/``val`` lists of file names. A list entry in
``datamodule.dataset.<name>.split`` is a split dict (its ``train`` list for the train
dataset, its ``val`` list for validation loaders) or ``{source: <split dict>, key:
train|val}`` to choose the section. The compiler and the trainer both call
:func:`resolve_split_list`, so they always agree on which files a config means.

A file's store is named by its path relative to ``source_path``, without the ``.h5ad``
or ``.zarr`` suffix (``sample1/adata.h5ad`` -> ``<source_name>/sample1/adata.zarr``):
unique per file within a source and the same on every run. Two files that would share a
store are an error (:func:`check_store_names`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concept.config import Config, ConfigError

SECTIONS = ("train", "val")


@dataclass(frozen=True)
class SplitFile:
    """One input file of a split."""

    path: Path  # absolute path of the .h5ad file (or .zarr AnnData folder)
    species: str
    source_name: str
    section: str  # "train" or "val"
    name: str  # the split's entry, relative to source_path (``sample1/adata.h5ad``)

    @property
    def stem(self) -> str:
        """The store's name within its source: ``name`` without the file suffix."""
        return self.name.removesuffix(".h5ad").removesuffix(".zarr")


def _file_names(split: dict, key: str, where: str) -> list[str]:
    """A split section's entries, checked: a string is one file; paths stay inside
    ``source_path`` (they name the stores)."""
    names = split.get(key)
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"{where}: split {split['source_name']!r} {key}: expected a list of file names, "
            f"got {names!r}"
        )
    out = []
    for name in names:
        norm = posixpath.normpath(name.strip())
        if posixpath.isabs(norm) or norm.split("/")[0] == "..":
            raise ConfigError(
                f"{where}: split {split['source_name']!r} {key}: {name!r} is outside "
                f"source_path {split['source_path']}; list files relative to source_path "
                "(their stores are named by that path)"
            )
        out.append(norm)
    return out


def _split_dict(entry: Any, default_key: str, where: str) -> tuple[dict, str]:
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{where}: a split entry must be a split dict (source_name, species, source_path, "
            f"train, val) or {{source: <split>, key: train|val}}, got {entry!r}"
        )
    if "source" in entry:
        key = entry.get("key", default_key)
        extra = set(entry) - {"source", "key"}
        if extra:
            raise ConfigError(f"{where}: unknown keys {sorted(extra)} beside 'source'/'key'")
        return _split_dict(entry["source"], key, where)[0], key
    missing = [k for k in ("source_name", "species", "source_path") if not entry.get(k)]
    if missing:
        raise ConfigError(f"{where}: split {entry.get('source_name', '?')!r} lacks {missing}")
    return entry, default_key


def resolve_split_list(
    entries: list[Any], default_key: str, where: str = "split"
) -> list[SplitFile]:
    """Turn split entries into the files they name.

    Parameters
    ----------
    entries
        Resolved entries of a ``datamodule.dataset.<name>.split`` list.
    default_key
        Section used when an entry does not choose one: ``"train"`` or ``"val"``.
    where
        Config location, for error messages.

    Returns
    -------
    list of SplitFile
        In list order; a file named twice is kept once.
    """
    out: dict[Path, SplitFile] = {}
    for entry in entries:
        split, key = _split_dict(entry, default_key, where)
        if key not in SECTIONS:
            raise ConfigError(f"{where}: key={key!r}, expected train or val")
        for name in _file_names(split, key, where):
            path = (Path(split["source_path"]) / name).resolve()
            out.setdefault(path, SplitFile(path, split["species"], split["source_name"], key, name))
    return list(out.values())


def check_store_names(files: list[SplitFile]) -> dict[Path, str]:
    """Files that would share a store with another file, each with the reason.

    Two entries collide when their source name and store name agree but their files differ
    (``a.h5ad`` beside ``a.zarr``, or two splits of one ``source_name`` with different
    ``source_path``). Callers refuse before any work (compile) or report them (verify).
    """
    by_store: dict[tuple[str, str], list[SplitFile]] = {}
    for f in files:
        by_store.setdefault((f.source_name, f.stem), []).append(f)
    out = {}
    for (source, stem), group in by_store.items():
        if len(group) > 1:
            paths = [str(f.path) for f in group]
            for f in group:
                out[f.path] = (
                    f"{f.path}: files {paths} would share the store {source}/{stem}.zarr; "
                    "rename one of them or give their splits different source_name values"
                )
    return out


def train_files(cfg: Config) -> list[SplitFile]:
    """Files of the train dataset."""
    return resolve_split_list(
        cfg.datamodule.dataset.train.split, "train", "datamodule.dataset.train"
    )


def val_files(cfg: Config) -> dict[str, list[SplitFile]]:
    """Files of each validation loader, by loader name (sorted, as the reference)."""
    return {
        name: resolve_split_list(view.split, "val", f"datamodule.dataset.val.{name}")
        for name, view in sorted(cfg.datamodule.dataset.val.items())
    }


def configured_files(cfg: Config, sections: tuple[str, ...] = SECTIONS) -> list[SplitFile]:
    """Every file named by a split the config uses: both lists of each split (deduplicated).

    The train dataset and every validation loader contribute their split dicts; each split
    gives its ``train`` and ``val`` lists (those named in ``sections``), so the compiler
    builds what any loader of the config may read.
    """
    entries = list(cfg.datamodule.dataset.train.split)
    for view in cfg.datamodule.dataset.val.values():
        entries += list(view.split)
    out: dict[Path, SplitFile] = {}
    for i, entry in enumerate(entries):
        split, _ = _split_dict(entry, "train", f"split entry {i}")
        for key in sections:
            for f in resolve_split_list([split], key):
                out.setdefault(f.path, f)
    return list(out.values())
