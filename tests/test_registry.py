"""Tests for registering compiled Zarr stores in a local, offline LaminDB instance."""

from __future__ import annotations

import json
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
