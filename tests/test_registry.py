"""Tests for registering compiled Zarr stores in a local, offline LaminDB instance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from preprocess.registry import INSTANCE_NAME, StoreRecord, lookup_stores, register_stores

# Reads the instance directly with lamindb (not through preprocess.registry) so the tests check
# what is really stored. Runs in a child process: lamindb keeps per-process instance state.
_QUERY_SCRIPT = """
import json, os, sys
lamin_root, storage_root, name, out = sys.argv[1:]
os.environ["LAMIN_SETTINGS_DIR"] = os.path.join(lamin_root, "settings")
os.environ["LAMIN_CACHE_DIR"] = os.path.join(lamin_root, "cache")
import lamindb_setup
lamindb_setup.init(storage=storage_root, name=name)
import lamindb as ln
artifacts = [
    {"uid": a.uid, "key": a.key, "is_latest": a.is_latest, "hash": a.hash,
     "path": str(a.path), "description": a.description, "n_files": a.n_files,
     "features": a.features.get_values(external_only=True)}
    for a in ln.Artifact.filter().order_by("created_at")
]
collections = [
    {"uid": c.uid, "key": c.key, "is_latest": c.is_latest,
     "members": sorted(a.uid for a in c.artifacts.all())}
    for c in ln.Collection.filter().order_by("created_at")
]
with open(out, "w") as f:
    json.dump({"artifacts": artifacts, "collections": collections}, f)
"""


def _query(project: Path) -> dict:
    out = project / "query.json"
    args = [str(project / ".lamin"), str(project / "compiled"), INSTANCE_NAME, str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", _QUERY_SCRIPT, *args],
        cwd=project / ".lamin",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _write_store(path: Path, n_cells: int, offset: int = 0) -> None:
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("counts", data=np.arange(n_cells * 4, dtype="int32").reshape(n_cells, 4))
    group.create_array("offset", data=np.full(3, offset, dtype="int64"))
    group.attrs["n_cells"] = n_cells


def _record(project: Path, source: str, stem: str, split: str, fingerprint: str) -> StoreRecord:
    path = project / "compiled" / source / f"{stem}.zarr"
    return StoreRecord(
        path=str(path),
        key=f"compiled/{source}/{stem}.zarr",
        features={
            "species": "human" if source == "srcA" else "mouse",
            "split": split,
            "source_name": source,
            "n_cells": np.int64(5),  # numpy ints, as the compiler produces them
            "nnz": 17,
            "format_version": 1,
            "vocab_sha256": "f" * 64,
        },
        fingerprint=fingerprint,
    )


def _make_project(project: Path) -> tuple[list[StoreRecord], dict[str, list[str]]]:
    stores = [
        _record(project, "srcA", "a1", "train", "fp-a1-v1"),
        _record(project, "srcA", "a2", "train", "fp-a2-v1"),
        _record(project, "srcB", "b1", "val", "fp-b1-v1"),
    ]
    for store in stores:
        _write_store(Path(store.path), n_cells=5)
    collections = {
        "compiled/train": [stores[0].key, stores[1].key],
        "compiled/val": [stores[2].key],
    }
    return stores, collections


def _register(project: Path, stores, collections) -> dict:
    return register_stores(project / ".lamin", project / "compiled", stores, collections)


def _latest(query: dict, kind: str, key: str) -> dict:
    matches = [r for r in query[kind] if r["key"] == key and r["is_latest"]]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One project registered once and shared: instance creation is the slow part."""
    project = tmp_path_factory.mktemp("project")
    stores, collections = _make_project(project)
    summary = _register(project, stores, collections)
    return project, stores, collections, summary


def test_first_registration(registered):
    project, stores, collections, summary = registered
    assert summary == {
        "artifacts_created": 3,
        "artifacts_unchanged": 0,
        "artifacts_updated": 0,
        "collections_created": 2,
        "collections_unchanged": 0,
        "collections_updated": 0,
        "collections": 2,
    }
    keys = [store.key for store in stores]
    assert lookup_stores(project / ".lamin", project / "compiled", keys) == {
        store.key: str(Path(store.path).resolve()) for store in stores
    }

    query = _query(project)
    assert len(query["artifacts"]) == 3
    for store in stores:
        artifact = _latest(query, "artifacts", store.key)
        assert artifact["path"] == str(Path(store.path).resolve())
        assert artifact["features"] == {**store.features, "n_cells": 5}
        assert artifact["description"].endswith(store.fingerprint)
        assert artifact["n_files"] == sum(1 for p in Path(store.path).rglob("*") if p.is_file())
    uid_by_key = {a["key"]: a["uid"] for a in query["artifacts"]}
    assert len(query["collections"]) == 2
    for key, members in collections.items():
        collection = _latest(query, "collections", key)
        assert collection["members"] == sorted(uid_by_key[m] for m in members)


def test_rerun_is_idempotent(registered):
    project, stores, collections, _ = registered
    before = _query(project)
    summary = _register(project, stores, collections)
    assert summary["artifacts_unchanged"] == 3
    assert summary["collections_unchanged"] == 2
    assert summary["artifacts_created"] == summary["artifacts_updated"] == 0
    assert summary["collections_created"] == summary["collections_updated"] == 0
    assert _query(project) == before


def test_unregistered_key_is_none(registered):
    project, stores, _, _ = registered
    result = lookup_stores(project / ".lamin", project / "compiled", ["compiled/x/y.zarr"])
    assert result == {"compiled/x/y.zarr": None}


def test_child_failure_is_clear_and_atomic(registered):
    project, _, _, _ = registered
    new = _record(project, "srcC", "c1", "train", "fp-c1-v1")
    _write_store(Path(new.path), n_cells=5)
    with pytest.raises(RuntimeError, match="unregistered artifact keys"):
        _register(project, [new], {"compiled/test": ["compiled/missing/z.zarr"]})
    # The failed call ran in one transaction, so the new store was not registered either.
    assert lookup_stores(project / ".lamin", project / "compiled", [new.key]) == {new.key: None}


def test_other_storage_root_for_same_instance_is_refused(registered, tmp_path):
    project, stores, _, _ = registered
    with pytest.raises(RuntimeError, match="has storage root"):
        lookup_stores(project / ".lamin", tmp_path, [stores[0].key])


def test_changed_store_versions(tmp_path):
    stores, collections = _make_project(tmp_path)
    _register(tmp_path, stores, collections)
    first = _query(tmp_path)
    a1 = stores[0]
    old_uid = _latest(first, "artifacts", a1.key)["uid"]

    # New content + new fingerprint -> new version of the same key, collection follows it.
    _write_store(Path(a1.path), n_cells=7, offset=1)
    a1.fingerprint = "fp-a1-v2"
    summary = _register(tmp_path, stores, collections)
    assert (summary["artifacts_updated"], summary["artifacts_unchanged"]) == (1, 2)
    assert (summary["collections_updated"], summary["collections_unchanged"]) == (1, 1)
    query = _query(tmp_path)
    versions = [a for a in query["artifacts"] if a["key"] == a1.key]
    assert len(versions) == 2
    current = _latest(query, "artifacts", a1.key)
    assert current["uid"] != old_uid and current["description"].endswith("fp-a1-v2")
    train = _latest(query, "collections", "compiled/train")
    assert current["uid"] in train["members"] and old_uid not in train["members"]
    assert len([c for c in query["collections"] if c["key"] == "compiled/train"]) == 2

    # A feature-only change (store moved to another split) updates in place, no new version.
    a1.features["split"] = "val"
    summary = _register(tmp_path, stores, collections)
    assert summary["artifacts_updated"] == 1
    query = _query(tmp_path)
    assert len([a for a in query["artifacts"] if a["key"] == a1.key]) == 2
    assert _latest(query, "artifacts", a1.key)["features"]["split"] == "val"

    # Back to the first fingerprint: the first version is reinstated instead of duplicated.
    _write_store(Path(a1.path), n_cells=5)
    a1.fingerprint = "fp-a1-v1"
    summary = _register(tmp_path, stores, collections)
    assert (summary["artifacts_updated"], summary["collections_updated"]) == (1, 1)
    query = _query(tmp_path)
    assert len(query["artifacts"]) == 4 and len(query["collections"]) == 3
    assert _latest(query, "artifacts", a1.key)["uid"] == old_uid
    assert old_uid in _latest(query, "collections", "compiled/train")["members"]
    paths = lookup_stores(tmp_path / ".lamin", tmp_path / "compiled", [a1.key])
    assert paths == {a1.key: str(Path(a1.path).resolve())}


def test_store_outside_storage_root_fails_before_lamindb(tmp_path):
    (tmp_path / "compiled").mkdir()
    outside = tmp_path / "elsewhere" / "srcA" / "a1.zarr"
    _write_store(outside, n_cells=2)
    record = _record(tmp_path, "srcA", "a1", "train", "fp")
    record.path = str(outside)
    with pytest.raises(ValueError, match="not inside storage root"):
        _register(tmp_path, [record], {})
    assert not (tmp_path / ".lamin").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nnz": True}, "must be an int"),
        ({"species": 3}, "must be a str"),
        ({"extra": "x"}, "features must be exactly"),
    ],
)
def test_invalid_features_fail_before_lamindb(tmp_path, change, message):
    record = _record(tmp_path, "srcA", "a1", "train", "fp")
    _write_store(Path(record.path), n_cells=2)
    record.features.update(change)
    with pytest.raises(ValueError, match=message):
        _register(tmp_path, [record], {})
    assert not (tmp_path / ".lamin").exists()


def test_non_zarr_directory_is_rejected(tmp_path):
    record = _record(tmp_path, "srcA", "a1", "train", "fp")
    Path(record.path).mkdir(parents=True)
    with pytest.raises(ValueError, match="not a Zarr v3 directory store"):
        _register(tmp_path, [record], {})


# --- compile registers, training resolves ------------------------------------------------

HUMAN_TRAIN = ["hs_csr_a", "hs_raw_b", "hs_csc_c", "hs_dense_d"]  # the split's order
TRAIN_KEY = "compiled/synth_cxg_hsapiens/train"
VAL_LOADERS = ("same_as_train", "within_P200_B256", "within_P800_B256", "within_P6400_B256")
NO_SPLITS = [  # nothing from the split configs: the registry names every store
    "datamodule.dataset.train.split=[]",
    *(f"datamodule.dataset.val.{name}.split=[]" for name in VAL_LOADERS),
]


@pytest.fixture(scope="module")
def compiled_registered(synth_project, tmp_path_factory) -> Path:
    """Both species compiled and registered in two compile shards (read-only)."""
    from conftest import config

    from preprocess.compile import run

    project = tmp_path_factory.mktemp("registered") / "project"
    shutil.copytree(synth_project, project)
    for shard in (0, 1):  # each shard registers its stores; the last completes the collections
        overrides = [
            "datamodule=DataModuleSynthMultiSpecies",
            "compile.register=true",
            "compile.workers=1",
            "compile.num_shards=2",
            f"compile.shard_index={shard}",
        ]
        assert run(config(project, *overrides)) == 0
    return project


def _train_cfg(project: Path, tmp_path: Path, *extra: str):
    from test_train import _cfg

    return _cfg(
        project,
        "model.training.max_steps=3",
        "model.training.val_check_interval=3",
        "model.training.log_every_n_steps=1",
        f"PATH.CHECKPOINT_ROOT={tmp_path / 'runs'}",
        *extra,
    )


def test_collections_keep_the_split_order_across_shards(compiled_registered):
    from preprocess.registry import resolve_collections

    project = compiled_registered
    keys = [TRAIN_KEY, "compiled/synth_cxg_mmusculus/train"]
    members = resolve_collections(project / ".lamin", project / "compiled", keys)
    assert [m["key"] for m in members[TRAIN_KEY]] == [
        f"compiled/synth_cxg/{n}.zarr" for n in HUMAN_TRAIN
    ]
    assert [(m["key"], m["features"]["species"]) for m in members[keys[1]]] == [
        ("compiled/synth_cxg/mm_csr_a.zarr", "mmusculus"),
        ("compiled/synth_cxg/mm_raw_b.zarr", "mmusculus"),
    ]
    for m in members[TRAIN_KEY]:
        assert m["path"] == str(project / "compiled" / m["key"].removeprefix("compiled/"))
        assert m["features"]["split"] == "train" and m["features"]["n_cells"] > 0


def test_training_from_a_collection_equals_training_from_the_splits(
    compiled_registered, tmp_path, monkeypatch
):
    """datamodule.collection: the registered stores, in the split's order, with no split
    config and no source file: the same losses and validation metrics as the splits."""
    from test_train import _train_losses

    import concept.datamodule as dm
    from concept.train import train

    project = compiled_registered
    by_splits = train(_train_cfg(project, tmp_path, "wandb.run_name=splits"))
    opened = []

    class Recording(dm.TokenLoader):
        def __init__(self, paths, *args, **kwargs):
            opened.append([Path(p).name for p in paths])
            super().__init__(paths, *args, **kwargs)

    monkeypatch.setattr(dm, "TokenLoader", Recording)
    (project / "data").rename(tmp_path / "data")  # only compiled/ and .lamin/ remain
    try:
        collection = [*NO_SPLITS, f"datamodule.collection={TRAIN_KEY}", "wandb.run_name=reg"]
        by_registry = train(_train_cfg(project, tmp_path, *collection))
    finally:
        (tmp_path / "data").rename(project / "data")
    assert opened[0] == [f"{n}.zarr" for n in HUMAN_TRAIN]
    assert opened[1:] == [["hs_csr_e.zarr"]] * len(VAL_LOADERS)  # the split's val collection
    runs = tmp_path / "runs"
    assert _train_losses(runs / "reg") == _train_losses(runs / "splits")
    assert sorted(_train_losses(runs / "reg")) == [0, 1, 2]
    val = sorted(k for k in by_splits if k.startswith("val/"))
    assert "val/within_P800_B256/recall@1" in val
    assert {k: by_registry[k] for k in val} == {k: by_splits[k] for k in val}


def test_collection_errors_name_the_problem_and_the_fix(compiled_registered, tmp_path):
    from concept.datamodule import StaleStoreError
    from concept.train import train
    from preprocess.registry import UnknownCollectionError

    project = compiled_registered

    def attempt(key: str, *extra: str) -> str:
        with pytest.raises((StaleStoreError, UnknownCollectionError)) as err:
            train(_train_cfg(project, tmp_path, *NO_SPLITS, f"datamodule.collection={key}", *extra))
        return str(err.value)

    msg = attempt("compiled/synth_cxg_hsapiens/tran")
    assert "no LaminDB collection 'compiled/synth_cxg_hsapiens/tran'" in msg
    for key in (TRAIN_KEY, "compiled/synth_cxg_hsapiens/val", "compiled/synth_cxg_mmusculus/val"):
        assert f"\n  {key}" in msg

    msg = attempt("compiled/synth_cxg_mmusculus/train")
    assert "species 'mmusculus' is not in datamodule.species ['hsapiens']" in msg

    store = project / "compiled" / "synth_cxg" / "hs_raw_b.zarr"
    store.rename(tmp_path / "moved.zarr")
    try:
        msg = attempt(TRAIN_KEY)
    finally:
        (tmp_path / "moved.zarr").rename(store)
    assert f"{store}: not a token store (no zarr.json) (not on disk)" in msg
    assert f"(registered as compiled/synth_cxg/hs_raw_b.zarr in collection {TRAIN_KEY})" in msg
    assert f"run: python -m preprocess.compile PATH.PROJECT_PATH={project}" in msg
    assert "hs_csr_a" not in msg  # only the missing store

    meta = project / "compiled" / "synth_cxg" / "hs_csr_a.zarr" / "zarr.json"
    saved = meta.read_bytes()
    node = json.loads(saved)
    node["attributes"]["created_at"] = "2000-01-01T00:00:00+00:00"  # compiled, not registered
    meta.write_text(json.dumps(node))
    try:
        msg = attempt(TRAIN_KEY)
    finally:
        meta.write_bytes(saved)
    assert "hs_csr_a.zarr: not the version the registry holds" in msg


def test_adding_files_rebuilds_and_registers_only_those(synth_project, tmp_path, monkeypatch):
    """Two files added to a compiled, registered split: only they are compiled and new
    artifacts; the others are skipped and unchanged; the collection follows the split."""
    import preprocess.compile as cli
    from concept.config import load_config
    from preprocess.registry import resolve_collections

    project = tmp_path / "project"
    shutil.copytree(synth_project, project)
    conf = tmp_path / "conf" / "datamodule" / "split_cellxgene_hsapiens"
    conf.mkdir(parents=True)
    summaries = []
    register = cli.register
    monkeypatch.setattr(cli, "register", lambda *a: summaries.append(register(*a)) or {})

    def compile_split(train_files: list[str]) -> dict[str, str]:
        (conf / "split_inc.yaml").write_text(
            "source_name: synth_cxg\nspecies: hsapiens\n"
            "source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads\n"
            f"train: {json.dumps([f'{n}.h5ad' for n in train_files])}\nval: [hs_csr_e.h5ad]\n"
        )
        overrides = [
            f"PATH.PROJECT_PATH={project}",
            "datamodule/split_cellxgene_hsapiens=split_inc",
            "compile.workers=1",
        ]
        assert cli.run(load_config(overrides, config_dir=tmp_path / "conf")) == 0
        report = json.loads((project / "compiled" / "compile_report.json").read_text())
        return {Path(f["file"]).stem: f["status"] for f in report["files"]}

    assert set(compile_split(HUMAN_TRAIN[:2]).values()) == {"compiled"}
    status = compile_split(HUMAN_TRAIN)
    assert status == {
        "hs_csr_a": "skipped",
        "hs_raw_b": "skipped",
        "hs_csc_c": "compiled",
        "hs_dense_d": "compiled",
        "hs_csr_e": "skipped",
    }
    assert summaries[1]["artifacts_created"] == 2 and summaries[1]["artifacts_unchanged"] == 3
    assert (summaries[1]["collections_updated"], summaries[1]["collections_unchanged"]) == (1, 1)
    members = resolve_collections(project / ".lamin", project / "compiled", [TRAIN_KEY])
    assert [m["key"] for m in members[TRAIN_KEY]] == [
        f"compiled/synth_cxg/{n}.zarr" for n in HUMAN_TRAIN
    ]
    assert len(_query(project)["artifacts"]) == 5
