"""Split resolution: the one place that turns split entries into input files.

A split file (``conf/datamodule/split_*/split_*.yaml``) names a ``source_name``, a
``species``, a ``source_path`` and ``train``/``val`` lists of file names. A list entry in
``datamodule.dataset.<name>.split`` is a split dict (its ``train`` list for the train
dataset, its ``val`` list for validation loaders) or ``{source: <split dict>, key:
train|val}`` to choose the section. The compiler and the trainer both call
:func:`resolve_split_list`, so they always agree on which files a config means.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concept.config import Config, ConfigError

SECTIONS = ("train", "val")


@dataclass(frozen=True)
class SplitFile:
    """One input file of a split."""

    path: Path  # absolute path of the .h5ad file
    species: str
    source_name: str
    section: str  # "train" or "val"

    @property
    def stem(self) -> str:
        return self.path.name.removesuffix(".h5ad")


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
        names = split.get(key) or []
        for name in names:
            path = (Path(split["source_path"]) / name).resolve()
            out.setdefault(path, SplitFile(path, split["species"], split["source_name"], key))
    return list(out.values())


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
