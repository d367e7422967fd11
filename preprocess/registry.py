"""Register compiled Zarr stores in a local, offline LaminDB instance.

Each compiled store ``<storage_root>/<source_name>/<name>.zarr`` becomes one LaminDB artifact
(key ``compiled/<source_name>/<name>.zarr``; ``<name>`` may contain folders, see
``concept.splits``) annotated with a fixed set of features, and each split section becomes a
LaminDB collection of the current artifacts, key ``compiled/<source_name>_<species>/<section>``
(:func:`collection_key`), its members in the split's order. Training reads a collection back
with :func:`resolve_collections` (``datamodule.collection=<key>``).

Speed: registering or resolving any number of stores costs a constant number of queries (keys
in chunks of ``_QUERY_CHUNK``), plus one insert per new artifact; feature values are written
in bulk. 1,000 stores take seconds (``benchmarks/registry.py``).

The instance is local and offline: SQLite, storage root = the compiled root, settings and cache
under ``lamin_root``. All lamindb work runs in a child process (``python -m preprocess.registry
<request.json>``) because lamindb is slow to import and keeps global, per-process instance state;
the parent only validates inputs, spawns the child and reads its JSON result.

Content identity
----------------
lamindb hashes a directory artifact by reading every file (md5 of each file up to 50 MB), which
costs a full read of stores that can be many GB. The compiler already knows a fingerprint of each
store's content version (source fingerprint + compile settings), so the child passes a
pseudo-hash derived from (key, relative path, fingerprint) as the artifact's precomputed stats and
lamindb never reads the store. The fingerprint is also kept in the artifact description.

Idempotency
-----------
For each store the child looks up all versions of the key:

* the latest version carries the expected pseudo-hash -> unchanged (features are refreshed in
  place when they differ, e.g. a store moved to another split);
* an older version carries it (the store went back to an earlier fingerprint) -> that version is
  made the latest again, because lamindb forbids two artifacts with the same key and hash;
* otherwise -> a new artifact version revising the latest one (or a new artifact).

Collections follow the same rule on their set of member artifacts, so re-running never duplicates
records and a collection always points at the current version of each store.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import numbers
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concept import objstore

INSTANCE_NAME = "concept-compiled"
FEATURE_DTYPES: dict[str, type] = {
    "species": str,
    "split": str,
    "source_name": str,
    "n_cells": int,
    "nnz": int,
    "format_version": int,
    "vocab_sha256": str,
}
# Marks artifact hashes as fingerprint-derived pseudo-hashes rather than lamindb's "md5-d".
HASH_TYPE = "concept-store-fingerprint"
_DESCRIPTION_PREFIX = "compiled Zarr store; fingerprint="
_STDERR_TAIL_LINES = 40
# Keys per ``__in`` query: below SQLite's limit on bound variables.
_QUERY_CHUNK = 900
# The child is started as ``-m preprocess.registry``, which needs the project root importable
# whatever the caller's working directory is.
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class StoreRecord:
    """One compiled store to register.

    Attributes
    ----------
    path
        Absolute path of the ``.zarr`` directory; must lie inside the storage root.
    key
        Artifact key, ``"compiled/<source_name>/<name>.zarr"``.
    features
        Exactly the features of ``FEATURE_DTYPES`` (species, split, source_name, n_cells, nnz,
        format_version, vocab_sha256).
    fingerprint
        Identifies the store's content version; a new value makes a new artifact version.
    """

    path: str
    key: str
    features: dict
    fingerprint: str


def collection_key(source_name: str, species: str, section: str) -> str:
    """The key of the collection of one split section's stores,
    ``"compiled/<source_name>_<species>/<section>"`` (e.g.
    ``compiled/synth_cxg_hsapiens/train``): the value of ``datamodule.collection``."""
    return f"compiled/{source_name}_{species}/{section}"


def store_fingerprint(attrs: dict) -> str:
    """A store's content version from its root attributes: what the registry records
    (a new value makes a new artifact version) and what a resolved store must still have."""
    return attrs["source_fingerprint"] + attrs["vocab_sha256"] + attrs["created_at"]


def register_stores(
    lamin_root: str | Path,
    storage_root: str | Path,
    stores: list[StoreRecord],
    collections: dict[str, list[str]],
    optional_members: list[str] = (),
    timeout_s: float = 1800.0,
) -> dict:
    """Register stores as artifacts and splits as collections; idempotent.

    The instance is created on first use and connected to afterwards. Inputs are validated
    before lamindb is started, so a bad path never reaches it. A constant number of queries
    serves any number of stores (one insert per new artifact): 1,000 stores take seconds.

    Parameters
    ----------
    lamin_root
        Directory for the instance's settings and cache (e.g. ``<project>/.lamin``).
    storage_root
        The instance's storage root: the compiled root that contains every store.
    stores
        Stores to register; keys must be unique.
    collections
        Collection key (e.g. ``"compiled/train"``) -> artifact keys, in the order the
        collection keeps. Keys may refer to stores registered by an earlier call.
    optional_members
        Artifact keys of ``collections`` that join a collection when registered and are
        left out otherwise (the stores of other compile shards, which may not be built
        yet); a collection without any registered member is not created.
    timeout_s
        Limit for the child process in seconds.

    Returns
    -------
    dict
        ``artifacts_created``, ``artifacts_unchanged``, ``artifacts_updated`` (new version,
        reinstated earlier version or refreshed features), ``collections`` (number ensured), and
        ``collections_created``, ``collections_unchanged``, ``collections_updated``.

    Raises
    ------
    ValueError
        Invalid stores or collections (checked before lamindb runs).
    RuntimeError
        The lamindb child process failed or timed out; the message holds its stderr tail.
    """
    root = _resolve_storage_root(storage_root)
    keys = [store.key for store in stores]
    duplicates = sorted(key for key, n in Counter(keys).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate store keys: {duplicates}")
    request = {
        "op": "register",
        "stores": [_validate_store(store, root) for store in stores],
        "collections": _validate_collections(collections),
        "optional_members": [str(key) for key in optional_members],
    }
    return _run_child(lamin_root, root, request, timeout_s)


def lookup_stores(
    lamin_root: str | Path,
    storage_root: str | Path,
    keys: list[str],
    timeout_s: float = 600.0,
) -> dict[str, str | None]:
    """Map artifact keys to the local paths of their current versions.

    Parameters
    ----------
    lamin_root
        Directory for the instance's settings and cache.
    storage_root
        The instance's storage root.
    keys
        Artifact keys, e.g. ``"compiled/<source_name>/<name>.zarr"``.
    timeout_s
        Limit for the child process in seconds.

    Returns
    -------
    dict
        Key -> absolute store path, or ``None`` when the key is not registered. Like
        `register_stores`, creates the (empty) instance when it does not exist yet.

    Raises
    ------
    RuntimeError
        The lamindb child process failed or timed out.
    """
    root = _resolve_storage_root(storage_root)
    request = {"op": "lookup", "keys": [str(key) for key in keys]}
    return _run_child(lamin_root, root, request, timeout_s)


class UnknownCollectionError(KeyError):
    """A collection key that the registry does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def resolve_collections(
    lamin_root: str | Path,
    storage_root: str | Path,
    keys: list[str],
    optional: list[str] = (),
    timeout_s: float = 600.0,
) -> dict[str, list[dict]]:
    """The member stores of the latest version of each collection, in the order they were
    first registered in (the split's order), in one child process.

    Parameters
    ----------
    lamin_root
        Directory for the instance's settings and cache.
    storage_root
        The instance's storage root.
    keys
        Collection keys (:func:`collection_key`).
    optional
        More collection keys, resolved when registered and left out otherwise.
    timeout_s
        Limit for the child process in seconds.

    Returns
    -------
    dict
        Collection key (of ``keys``, and of ``optional`` when registered) -> members, each
        ``{"key", "path", "fingerprint", "features"}``
        (``features`` as registered: species, split, source_name, n_cells, ...).

    Raises
    ------
    UnknownCollectionError
        A key is not registered; the message lists the keys that are.
    RuntimeError
        The lamindb child process failed or timed out.
    """
    root = _resolve_storage_root(storage_root)
    request = {
        "op": "collections",
        "keys": [str(key) for key in keys],
        "optional": [str(key) for key in optional],
    }
    result = _run_child(lamin_root, root, request, timeout_s)
    if "unknown" in result:
        existing = "\n  ".join(result["existing"]) or "(none: compile with compile.register=true)"
        raise UnknownCollectionError(
            f"no LaminDB collection {', '.join(map(repr, result['unknown']))} in the instance "
            f"under {Path(lamin_root).expanduser().resolve()}; registered collections:\n  "
            f"{existing}"
        )
    return result["members"]


# --------------------------------------------------------------------------- parent side


def _resolve_storage_root(storage_root: str | Path) -> Path | str:
    """The storage root: a local directory (resolved), or an ``s3://`` URI (normalized)."""
    if objstore.is_uri(storage_root):
        return str(objstore.Uri.parse(storage_root))
    root = Path(storage_root).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"storage root {root} is not an existing directory")
    return root


def _validate_store(store: StoreRecord, root: Path | str) -> dict:
    if isinstance(root, str):  # s3://: published by the compiler (root zarr.json last)
        path = str(objstore.Uri.parse(store.path))
        if not path.startswith(root + "/"):
            raise ValueError(f"store {path} (key {store.key!r}) is not under storage root {root}")
        relpath = path[len(root) + 1 :]
    else:
        path = Path(store.path).expanduser().resolve()
        # lamindb registers a path outside its storage root by copying it or by asking the
        # hub about the foreign location, and the hub is unreachable offline.
        if path == root or not path.is_relative_to(root):
            raise ValueError(f"store {path} (key {store.key!r}) is not inside storage root {root}")
        relpath = path.relative_to(root).as_posix()
        if not (path / "zarr.json").is_file():
            raise ValueError(f"store {path} is not a Zarr v3 directory store (no zarr.json)")
    if relpath.split("/")[0] == ".lamindb":
        raise ValueError(f"store {path} lies in lamindb's managed folder .lamindb of {root}")
    if not isinstance(store.key, str) or not store.key or store.key.startswith("/"):
        raise ValueError(f"store {path}: key must be a non-empty relative path, got {store.key!r}")
    if ".lamindb/" in store.key:
        raise ValueError(f"store {path}: key {store.key!r} must not contain '.lamindb/'")
    if not isinstance(store.fingerprint, str) or not store.fingerprint:
        raise ValueError(f"store {path}: fingerprint must be a non-empty string")
    return {
        "path": str(path),
        "relpath": relpath,
        "key": store.key,
        "features": _normalize_features(store.features, store.key),
        "fingerprint": store.fingerprint,
    }


def _normalize_features(features: dict, key: str) -> dict:
    if not isinstance(features, dict) or set(features) != set(FEATURE_DTYPES):
        got = sorted(features) if isinstance(features, dict) else type(features).__name__
        raise ValueError(
            f"store {key!r}: features must be exactly {sorted(FEATURE_DTYPES)}, got {got}"
        )
    normalized: dict[str, Any] = {}
    for name, dtype in FEATURE_DTYPES.items():
        value = features[name]
        if dtype is int:
            # numpy integers come straight from the compiler; bool is an int subclass but a bug.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"store {key!r}: feature {name!r} must be an int, got {value!r}")
            normalized[name] = int(value)
        else:
            if not isinstance(value, str):
                raise ValueError(f"store {key!r}: feature {name!r} must be a str, got {value!r}")
            normalized[name] = value
    return normalized


def _validate_collections(collections: dict[str, list[str]]) -> dict[str, list[str]]:
    validated: dict[str, list[str]] = {}
    for key, artifact_keys in collections.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"collection key must be a non-empty string, got {key!r}")
        members = list(artifact_keys)
        if not members:
            raise ValueError(f"collection {key!r} has no artifacts")
        if len(set(members)) != len(members):
            raise ValueError(f"collection {key!r} lists an artifact key twice")
        validated[key] = [str(member) for member in members]
    return validated


def _run_child(lamin_root: str | Path, storage_root: Path | str, request: dict, timeout_s: float):
    if importlib.util.find_spec("lamindb") is None:  # no import: the check costs nothing
        raise RuntimeError(
            f"LaminDB ({request['op']}) needs lamindb, which {sys.executable} does not have: "
            "pip install lamindb, or do without the registry (compile.register=false; train "
            "from the splits instead of datamodule.collection)"
        )
    lamin_dir = Path(lamin_root).expanduser().resolve()
    lamin_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    with tempfile.TemporaryDirectory(prefix="lamin-registry-") as tmp:
        request_path = Path(tmp) / "request.json"
        result_path = Path(tmp) / "result.json"
        request = {
            **request,
            "lamin_root": str(lamin_dir),
            "storage_root": str(storage_root),
            "result_path": str(result_path),
        }
        request_path.write_text(json.dumps(request))
        cmd = [sys.executable, "-m", "preprocess.registry", str(request_path)]
        try:
            # cwd = lamin_root: lamindb_setup.init() writes a "dev dir" marker
            # (<cwd>/.lamin/current_instance) and refuses $HOME as cwd.
            proc = subprocess.run(
                cmd, cwd=lamin_dir, env=env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(
                f"lamindb registry child timed out after {timeout_s} s ({request['op']});\n"
                f"stderr tail:\n{_tail(err.stderr)}"
            ) from err
        if proc.returncode != 0 or not result_path.is_file():
            raise RuntimeError(
                f"lamindb registry child failed ({request['op']}, exit code {proc.returncode});\n"
                f"stderr tail:\n{_tail(proc.stderr)}"
            )
        return json.loads(result_path.read_text())


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-_STDERR_TAIL_LINES:])


# --------------------------------------------------------------------------- child side


def _connect(lamin_root: Path, storage_root: str):
    """Create or connect the instance; the imported ``lamindb`` module and the storage
    record of ``storage_root``.

    A local storage root is the instance's own. An ``s3://`` root is a second storage
    record of the instance (whose own root is then ``<lamin_root>/storage``), with the
    ``AWS_ENDPOINT_URL`` as lamindb notes endpoints (``?endpoint_url=``).
    """
    # Must precede the first lamindb_setup import: the settings location is read at import.
    os.environ["LAMIN_SETTINGS_DIR"] = str(lamin_root / "settings")
    os.environ["LAMIN_CACHE_DIR"] = str(lamin_root / "cache")
    import lamindb_setup

    on_s3 = objstore.is_uri(storage_root)
    own = lamin_root / "storage" if on_s3 else Path(storage_root)
    # init() creates the instance, or connects when its settings file exists; lamindb must only
    # be imported afterwards, otherwise it auto-connects to nothing.
    lamindb_setup.init(storage=str(own), name=INSTANCE_NAME)
    import lamindb as ln

    ln.settings.verbosity = "error"
    if on_s3:
        return ln, _s3_storage(ln, storage_root)
    actual = Path(str(ln.setup.settings.storage.root)).resolve()
    if actual != own:
        raise RuntimeError(
            f"instance {INSTANCE_NAME!r} under {lamin_root} has storage root {actual}, "
            f"not {storage_root}; use another lamin_root or the original storage root"
        )
    return ln, ln.setup.settings.storage.record


def _lamin_uri(uri: str) -> str:
    """``uri`` as lamindb writes an S3 location at a custom endpoint."""
    endpoint = objstore.endpoint()
    return f"{uri}?endpoint_url={endpoint}" if endpoint else uri


def _s3_storage(ln, root: str):
    """The storage record of the ``s3://`` root, created when missing.

    lamindb asks LaminHub whether the instance is on the hub (``instance.is_on_hub``)
    before it records a cloud storage or a cloud artifact, and the hub is unreachable
    offline (README, "Object storage"). The instance is local, so the answer is known:
    it is set first in the instance settings' cache (``_is_on_hub``, a private attribute).
    """
    instance = ln.setup.settings.instance
    if not hasattr(instance, "_is_on_hub"):
        raise RuntimeError(
            "lamindb's instance settings have no _is_on_hub (lamindb changed): registering "
            "s3:// stores offline needs it; use the lamindb version of pyproject.toml, or "
            "compile.register=false"
        )
    instance._is_on_hub = False
    uri = _lamin_uri(root)
    record = ln.Storage.filter(root=uri).one_or_none()
    if record is None:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        record = ln.Storage(
            root=uri, region=region or "us-east-1", skip_mark_storage_root=True
        ).save()
    return record


def _s3_root(storage_record) -> str:
    """An s3 storage record's root without lamindb's ``?endpoint_url=``."""
    return storage_record.root.split("?")[0]


def _s3_stats(root: str) -> dict[str, tuple[int, int]]:
    """Store prefix (relative to ``root``) -> (bytes, objects), from one listing of ``root``."""
    stats: dict[str, list[int]] = {}
    for key, size in objstore.list_objects(root).items():
        store, sep, _ = key.partition(".zarr/")
        if sep:
            entry = stats.setdefault(store + ".zarr", [0, 0])
            entry[0] += size
            entry[1] += 1
    return {k: (v[0], v[1]) for k, v in stats.items()}


def _pseudo_hash(key: str, relpath: str, fingerprint: str) -> str:
    from lamindb_setup.core.hashing import HASH_LENGTH

    # The key is part of the hash so two stores with equal fingerprints still get distinct
    # hashes: lamindb refuses collections whose artifacts share a hash.
    digest = hashlib.sha256(f"{key}\n{relpath}\n{fingerprint}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:HASH_LENGTH]


def _dir_stats(path: Path) -> tuple[int, int]:
    size = n_files = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            size += os.stat(os.path.join(dirpath, name)).st_size
            n_files += 1
    return size, n_files


def _ensure_features(ln) -> dict:
    """The features of ``FEATURE_DTYPES`` by name, created when missing."""
    existing = {f.name: f for f in ln.Feature.filter(name__in=list(FEATURE_DTYPES))}
    for name, dtype in FEATURE_DTYPES.items():
        feature = existing.get(name)
        if feature is None:
            existing[name] = ln.Feature(name=name, dtype=dtype).save()
        elif feature.dtype_as_str != dtype.__name__:
            raise RuntimeError(
                f"feature {name!r} exists with dtype {feature.dtype_as_str!r}, "
                f"expected {dtype.__name__!r}"
            )
    return existing


def _chunks(items: list, size: int = _QUERY_CHUNK):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _feature_values(ln, features: dict, artifact_ids: list[int]) -> dict[int, dict]:
    """Artifact id -> its values of our features, in one query per chunk of artifacts."""
    from lamindb.models import ArtifactJsonValue

    values: dict[int, dict] = {i: {} for i in artifact_ids}
    for ids in _chunks(artifact_ids):
        rows = ArtifactJsonValue.objects.filter(
            artifact_id__in=ids, jsonvalue__feature__in=list(features.values())
        ).values_list("artifact_id", "jsonvalue__feature__name", "jsonvalue__value")
        for artifact_id, name, value in rows:
            values[artifact_id][name] = value
    return values


def _set_feature_values(ln, features: dict, annotations: dict[int, dict]) -> None:
    """Replace our features' values of many artifacts (artifact id -> values) in bulk.

    What ``artifact.features.set_values`` stores for plain ``str``/``int`` features, one
    ``JsonValue`` per (feature, value hash) and one ``ArtifactJsonValue`` link per artifact
    and feature, without its per-artifact validation queries (about 70 ms an artifact).
    """
    from lamindb.models import ArtifactJsonValue, JsonValue
    from lamindb_setup.core.hashing import hash_string

    ids = list(annotations)
    wanted = {
        (features[name].id, hash_string(str(value))): value
        for values in annotations.values()
        for name, value in values.items()
    }
    known: dict[tuple[int, str], int] = {}
    for pairs in _chunks(list(wanted)):
        rows = JsonValue.objects.filter(
            feature_id__in={f for f, _ in pairs}, hash__in=[h for _, h in pairs]
        ).values_list("feature_id", "hash", "id")
        known.update({(f, h): i for f, h, i in rows})
    new = [
        JsonValue(feature_id=f, hash=h, value=value)
        for (f, h), value in wanted.items()
        if (f, h) not in known
    ]
    JsonValue.objects.bulk_create(new, batch_size=_QUERY_CHUNK)
    known.update({(v.feature_id, v.hash): v.id for v in new})
    for chunk in _chunks(ids):
        ArtifactJsonValue.objects.filter(
            artifact_id__in=chunk, jsonvalue__feature__in=list(features.values())
        ).delete()
    links = [
        ArtifactJsonValue(
            artifact_id=artifact_id,
            jsonvalue_id=known[(features[name].id, hash_string(str(value)))],
        )
        for artifact_id, values in annotations.items()
        for name, value in values.items()
    ]
    ArtifactJsonValue.objects.bulk_create(links, batch_size=_QUERY_CHUNK)


def _make_latest(model, record, current) -> None:
    # lamindb flips is_latest with queryset updates as well; save() would re-run versioning.
    if current is not None:
        model.objects.filter(pk=current.pk).update(is_latest=False)
    model.objects.filter(pk=record.pk).update(is_latest=True)
    record.refresh_from_db()


def _versions(ln, keys: list[str], storage_record) -> dict[str, list]:
    """Key -> all artifact versions of that key in our storage, newest first."""
    out: dict[str, list] = {key: [] for key in keys}
    for chunk in _chunks(keys):
        query = ln.Artifact.filter(key__in=chunk, storage=storage_record).order_by("-created_at")
        for artifact in query:
            out[artifact.key].append(artifact)
    return out


def _register_artifacts(ln, stores: list[dict], storage_record, features: dict) -> dict:
    """Register every store with a constant number of queries (plus one insert each new
    artifact); returns the number of stores per outcome."""
    versions = _versions(ln, [store["key"] for store in stores], storage_record)
    on_s3 = storage_record.type == "s3"
    listed = _s3_stats(_s3_root(storage_record)) if on_s3 else {}
    status: dict[str, str] = {}
    current: dict[int, dict] = {}  # artifact id -> features, of the unchanged versions
    new, new_features = [], []
    for store in stores:
        key = store["key"]
        expected = _pseudo_hash(key, store["relpath"], store["fingerprint"])
        latest = next((a for a in versions[key] if a.is_latest), None)
        same = next((a for a in versions[key] if a.hash == expected), None)
        if same is None:
            if on_s3:
                if store["relpath"] not in listed:
                    raise ValueError(f"store {store['path']} (key {key!r}): no objects on S3")
                size, n_files = listed[store["relpath"]]
            else:
                size, n_files = _dir_stats(Path(store["path"]))
            new.append(
                ln.Artifact(
                    _lamin_uri(store["path"]) if on_s3 else store["path"],
                    key=key,
                    description=_DESCRIPTION_PREFIX + store["fingerprint"],
                    revises=latest,
                    storage=storage_record,
                    skip_hash_lookup=True,  # the versions of the key were queried above
                    skip_check_exists=True,  # checked: a local zarr.json, or the listing
                    # Any otype skips lamindb's probe for AnnData/MuData/SpatialData (three
                    # zarr opens, 8 ms an artifact); a token store is none, so it is reset
                    # to None below, what the probe would give.
                    otype="",
                    # Precomputed stats stop lamindb from hashing every byte of the store.
                    _stats={
                        "size": size,
                        "n_files": n_files,
                        "hash": expected,
                        "hash_type": HASH_TYPE,
                    },
                )
            )
            new_features.append(store["features"])
            status[key] = "created" if latest is None else "updated"
            continue
        status[key] = "unchanged"
        if not same.is_latest:
            _make_latest(ln.Artifact, same, latest)
            status[key] = "updated"
        current[same.id] = store
    for artifact in new:
        artifact.otype = None
    if new:
        ln.save(new)
    stale = {}
    for artifact_id, values in _feature_values(ln, features, list(current)).items():
        store = current[artifact_id]
        if values != store["features"]:  # e.g. a store moved to another split
            stale[artifact_id] = store["features"]
            status[store["key"]] = "updated"
    annotations = {a.id: f for a, f in zip(new, new_features, strict=True)} | stale
    if annotations:
        _set_feature_values(ln, features, annotations)
    return {s: sum(v == s for v in status.values()) for s in ("created", "unchanged", "updated")}


def _register_collection(ln, key: str, artifact_keys: list[str], optional: set[str]) -> str:
    order = {artifact_key: i for i, artifact_key in enumerate(artifact_keys)}
    artifacts = []
    for chunk in _chunks(artifact_keys):
        artifacts += list(ln.Artifact.filter(key__in=chunk, is_latest=True))
    artifacts.sort(key=lambda artifact: order[artifact.key])  # the members' order is kept
    missing = sorted(set(artifact_keys) - optional - {artifact.key for artifact in artifacts})
    if missing:
        raise ValueError(f"collection {key!r} refers to unregistered artifact keys: {missing}")
    if not artifacts:  # only optional members, none registered yet
        return "skipped"
    wanted = {artifact.id for artifact in artifacts}
    versions = list(ln.Collection.filter(key=key).order_by("-created_at"))
    latest = next((collection for collection in versions if collection.is_latest), None)
    for collection in versions:
        if set(collection.artifacts.values_list("id", flat=True)) == wanted:
            if collection.is_latest:
                return "unchanged"
            # An earlier membership came back; a new version would violate the unique
            # (key, hash) constraint, so reinstate the earlier one.
            _make_latest(ln.Collection, collection, latest)
            return "updated"
    # Cross-key hash lookup would hand back another split's collection with equal members.
    ln.Collection(artifacts, key=key, revises=latest, skip_hash_lookup=True).save()
    return "created" if latest is None else "updated"


def _register(ln, storage_record, request: dict) -> dict:
    from django.db import transaction

    summary = {f"collections_{s}": 0 for s in ("created", "unchanged", "updated", "skipped")}
    # One transaction: a failure leaves the registry as it was rather than half-updated.
    with transaction.atomic():
        features = _ensure_features(ln)
        counts = _register_artifacts(ln, request["stores"], storage_record, features)
        optional = set(request["optional_members"])
        for key, artifact_keys in request["collections"].items():
            summary["collections_" + _register_collection(ln, key, artifact_keys, optional)] += 1
    summary = {f"artifacts_{s}": n for s, n in counts.items()} | summary
    summary["collections"] = len(request["collections"]) - summary.pop("collections_skipped")
    return summary


def _artifact_path(artifact) -> str:
    """The local path or ``s3://`` URI of an artifact registered in place (lamindb's own
    storage key rule; ``artifact.path`` would look the storage up once per artifact)."""
    from lamindb.core.storage.paths import auto_storage_key_from_artifact

    key = auto_storage_key_from_artifact(artifact)
    if artifact.storage.type == "s3":
        return objstore.join(_s3_root(artifact.storage), key)
    return str(Path(artifact.storage.root) / key)


def _lookup(ln, storage_record, request: dict) -> dict[str, str | None]:
    found = {}
    for chunk in _chunks(request["keys"]):
        query = ln.Artifact.filter(key__in=chunk, is_latest=True).select_related("storage")
        found.update({artifact.key: _artifact_path(artifact) for artifact in query})
    return {key: found.get(key) for key in request["keys"]}


def _collections(ln, storage_record, request: dict) -> dict:
    """Members of the latest version of each collection key, in the order they were
    registered in (the split's), or the unknown keys with the keys that exist."""
    keys = request["keys"]
    wanted = [*keys, *request["optional"]]
    collections = {c.key: c for c in ln.Collection.filter(key__in=wanted, is_latest=True)}
    unknown = [key for key in keys if key not in collections]
    if unknown:
        existing = ln.Collection.filter(is_latest=True).values_list("key", flat=True)
        return {"unknown": unknown, "existing": sorted(existing)}
    features = {f.name: f for f in ln.Feature.filter(name__in=list(FEATURE_DTYPES))}
    members: dict[str, list[dict]] = {}
    for key, collection in collections.items():
        artifacts = list(collection.ordered_artifacts.select_related("storage"))
        values = _feature_values(ln, features, [artifact.id for artifact in artifacts])
        members[key] = [
            {
                "key": artifact.key,
                "path": _artifact_path(artifact),
                "fingerprint": (artifact.description or "").removeprefix(_DESCRIPTION_PREFIX),
                "features": values[artifact.id],
            }
            for artifact in artifacts
        ]
    return {"members": members}


def main(argv: list[str] | None = None) -> int:
    """Run one registry request in this process (the child side).

    Parameters
    ----------
    argv
        ``[request_json_path]``; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit code, 0 on success (errors propagate as exceptions).
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m preprocess.registry <request.json>", file=sys.stderr)
        return 2
    request = json.loads(Path(args[0]).read_text())
    ln, storage_record = _connect(Path(request["lamin_root"]), request["storage_root"])
    handlers = {"register": _register, "lookup": _lookup, "collections": _collections}
    result = handlers[request["op"]](ln, storage_record, request)
    Path(request["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
