"""The token store format (version 1): names, dtypes, attributes, and a reader.

One Zarr v3 group per compiled input file. The compiler in ``preprocess`` writes it,
everything in ``concept`` reads it through :class:`TokenStore`; both import the constants
from here. The reader uses plain JSON, raw byte reads, ``torch.from_file`` mappings and
tensorstore (compressed stores), so it runs where only torch and tensorstore are installed.

Layout (DESIGN.md section 5)::

    indptr              int64  (n_cells+1)  cell i owns [indptr[i], indptr[i+1])
    tokens              uint16|uint32 (nnz) vocabulary tokens, per cell by value desc, token asc
    values              uint*|float16|float32 (nnz)
    var_tokens          as tokens (n_var_mapped)  the file's gene universe, ascending
    cell/total_counts   float32 (n_cells)   row sum over all genes, before vocabulary masking
    cell/n_genes        int32   (n_cells)   nonzeros before masking
    cell/row            int64   (n_cells)   source row of the stored cell (undoes the shuffle)
    obs/<key>           int32   (n_cells)   category codes, -1 = missing; attrs["categories"]
    obsm/<key>          float32 (n_cells, k) the source's obsm[key] (compile.precomp_embs_key)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import json
import os
import resource
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from concept import objstore

FORMAT = "concept-token-store"
FORMAT_VERSION = 1

INDPTR, TOKENS, VALUES, VAR_TOKENS = "indptr", "tokens", "values", "var_tokens"
TOTAL_COUNTS, N_GENES, ROW = "cell/total_counts", "cell/n_genes", "cell/row"
OBS_GROUP = "obs"
OBSM_GROUP = "obsm"  # obsm/<key>: float32 (n_cells, k), precomputed per-cell embeddings

# Root attributes every valid store carries.
ROOT_ATTRS = (
    "format",
    "format_version",
    "species",
    "source_name",
    "source_file",
    "source_fingerprint",
    "source_stat",
    "vocab_sha256",
    "n_cells",
    "nnz",
    "n_var_mapped",
    "x_source",
    "normalization",
    "value_dtype",
    "shuffle_seed",
    "compiler_version",
    "created_at",
    "settings",
)


# Bumped whenever the compiler's output for the same inputs changes (2: total_counts of
# cells before trailing empty rows, float32 for float values beyond float16).
COMPILER_VERSION = "2"

# Compile settings that change a store's bytes: recorded in its ``settings`` attribute.
BYTE_SETTINGS = (
    "x_source",
    "var_column",
    "normalization",
    "value_dtype",
    "obs_keys",
    "precomp_embs_key",
    "shuffle_seed",
    "group_by",
    "chunk_elements",
    "shard_elements",
    "cell_chunk",
    "compressor",
)

FINGERPRINTS = ("fast", "full")
_MIB = 1 << 20
_SAMPLES, _SAMPLE_BYTES = 64, 64 << 10  # strided samples of the fast fingerprint
_RACY_NS = 2_000_000_000  # a file changed this recently may change within its ctime's tick


class StoreError(ValueError):
    """A path is not a complete token store of a supported version."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def uint_dtype_for(max_value: float) -> np.dtype:
    """Smallest unsigned integer dtype holding ``max_value``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"value {max_value} does not fit uint64")


def float_dtype_for(requested: str, max_value: float) -> np.dtype:
    """``requested`` (float16|float32) unless the largest value does not fit float16.

    Raises
    ------
    ValueError
        ``max_value`` does not fit float32 either.
    """
    if max_value > float(np.finfo(np.float32).max):
        raise ValueError(f"value {max_value:.6g} does not fit float32")
    if requested == "float16" and max_value > float(np.finfo(np.float16).max):
        return np.dtype(np.float32)
    return np.dtype(requested)


def store_path(compiled_root: str | Path, source_name: str, stem: str) -> Path | str:
    """``<COMPILED_ROOT>/<source_name>/<stem>.zarr``; ``stem`` is the source file's path
    relative to its split's ``source_path`` without suffix (``sample1/adata``). A string
    for an ``s3://`` root (:mod:`concept.objstore`)."""
    if objstore.is_uri(compiled_root):
        return objstore.join(compiled_root, source_name, f"{stem}.zarr")
    return Path(compiled_root) / source_name / f"{stem}.zarr"


def store_key(source_name: str, stem: str) -> str:
    """Registry key of a store."""
    return f"compiled/{source_name}/{stem}.zarr"


def source_fingerprint(path: str | Path, mode: str = "fast") -> str:
    """A source file's fingerprint, ``"<mode>:<sha256 hex>"``.

    Parameters
    ----------
    path
        The source file.
    mode
        ``fast``: size, mtime, inode and ctime, the first and last MiB and 64 strided
        samples of 64 KiB (reads about 6 MiB; an in-place rewrite that restores size and
        mtime, as ``cp -p`` or ``rsync -a --inplace`` do, still changes the ctime; a copy
        of the file is a new inode). ``full``: size and a sha256 of every byte (reads the
        whole file; a byte-identical copy has the same fingerprint). An in-memory source
        (:class:`concept.h5ad.AnnDataSource`) gives its content's, whatever the mode.
    """
    if hasattr(path, "fingerprint"):  # an AnnData in memory: no file
        return path.fingerprint()
    path = Path(path)
    if path.is_dir():  # an AnnData .zarr folder: its files' paths, sizes and mtimes
        return f"{mode}:{_tree_fingerprint(path)}"
    with path.open("rb") as fh:
        st = os.fstat(fh.fileno())
        if mode == "full":
            h = hashlib.sha256(f"{st.st_size}".encode())
            while chunk := fh.read(16 * _MIB):
                h.update(chunk)
        elif mode == "fast":
            h = hashlib.sha256(
                f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}".encode()
            )
            stride = max(st.st_size // _SAMPLES, 1)
            for offset in (0, max(st.st_size - _MIB, 0)):
                fh.seek(offset)
                h.update(fh.read(_MIB))
            for offset in range(0, st.st_size, stride):
                h.update(os.pread(fh.fileno(), _SAMPLE_BYTES, offset))
        else:
            raise ValueError(f"fingerprint mode {mode!r}: expected one of {FINGERPRINTS}")
    return f"{mode}:{h.hexdigest()}"


def source_stat(path: str | Path, identity: bool = False) -> dict:
    """Size and mtime of a source: the check training can afford (no bytes read).

    For an AnnData ``.zarr`` folder: the total size and the newest mtime of its files (a
    folder's own mtime does not change when a chunk inside it is rewritten). An in-memory
    source gives its own (:meth:`concept.h5ad.AnnDataSource.stat`). With ``identity``, a
    file's inode and ctime too, unless its ctime is under ``_RACY_NS`` old: a write in
    the same timestamp tick could then leave all four as they are (:func:`stale_reason`).
    """
    if hasattr(path, "fingerprint"):
        return path.stat()
    path = Path(path)
    if path.is_dir():
        stats = [q.stat() for q in path.rglob("*") if q.is_file()]
        return {
            "size": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
        }
    st = path.stat()
    out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if identity and time.time_ns() - st.st_ctime_ns >= _RACY_NS:
        out |= {"ino": st.st_ino, "ctime_ns": st.st_ctime_ns}
    return out


def _tree_fingerprint(path: Path) -> str:
    """Every file's relative path, size and mtime under a folder."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(path).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint_mode(attrs: dict) -> str:
    """The fingerprint mode a store was compiled with (``fast`` for stores before modes)."""
    mode = str(attrs.get("source_fingerprint", "")).split(":", 1)[0]
    return mode if mode in FINGERPRINTS else "fast"


def current_attrs(source: str | Path, vocab_sha256: str, settings: dict, mode: str) -> dict:
    """What a store compiled now from ``source`` records about its inputs.

    Panels are not among them: they are read at training time and never change a store's
    bytes.
    """
    return {
        "format_version": FORMAT_VERSION,
        "compiler_version": COMPILER_VERSION,
        # fingerprint before stat: a change in between makes compile, not training, see
        # it; the stat (with the file's identity) is taken before the build reads a byte
        "source_fingerprint": source_fingerprint(source, mode),
        "source_stat": source_stat(source, identity=True),
        "vocab_sha256": vocab_sha256,
        "settings": {k: settings[k] for k in BYTE_SETTINGS},
    }


def changed_settings(attrs: dict, settings: dict) -> list[str]:
    """The byte settings of ``settings`` under which a compile would write other bytes.

    ``value_dtype`` matters only for float values: a store of integer counts is the same
    under either, and a store that float16 could not hold (so stored float32) is the same
    under ``float32``.
    """
    recorded = attrs.get("settings", {})
    stored = str(attrs.get("value_dtype", ""))
    changed = []
    for k in BYTE_SETTINGS:
        if k == "value_dtype" and (stored.startswith("uint") or settings[k] == stored):
            continue
        if recorded.get(k) != settings[k]:
            changed.append(k)
    return changed


def _version_and_vocab(path, attrs: dict, vocab_sha256: str | None) -> str | None:
    if attrs.get("compiler_version") != COMPILER_VERSION:
        return (
            f"{path}: compiled by compiler version {attrs.get('compiler_version')} "
            f"(this is {COMPILER_VERSION})"
        )
    if vocab_sha256 is not None and attrs.get("vocab_sha256") != vocab_sha256:
        return f"{path}: the vocabulary changed since it was compiled"
    return None


def stale_reason(
    path: str | Path,
    source: str | Path,
    vocab_sha256: str,
    settings: dict,
    attrs: dict | None = None,
) -> str | None:
    """Why the store at ``path`` is missing or out of date for a compile (None when current).

    A store is current when the compiler version, the vocabulary, every byte setting and
    the source's fingerprint match. The fingerprint is taken in the mode the store
    recorded, so a change of ``compile.fingerprint`` alone rebuilds nothing. Only inputs
    that change the store's bytes count. Under the ``fast`` fingerprint a file whose size,
    mtime, inode and ctime are those recorded before the build read it is current
    without a byte read: every write changes the ctime, which the fingerprint hashes.
    ``attrs``: the store's root attributes, when read already.
    """
    if attrs is None:
        try:
            attrs = read_attrs(path)
        except StoreError as e:
            return str(e)
    if reason := _version_and_vocab(path, attrs, vocab_sha256):
        return reason
    if changed := changed_settings(attrs, settings):
        return f"{path}: compile.{changed[0]} differs from the store's"
    mode = fingerprint_mode(attrs)
    recorded = attrs.get("source_stat", {})
    if mode == "fast" and "ino" in recorded and source_stat(source, identity=True) == recorded:
        return None
    if attrs.get("source_fingerprint") != source_fingerprint(source, mode):
        return f"{path}: the source {source} changed since it was compiled"
    return None


def check_store(
    path: str | Path, source: str | Path | None = None, vocab_sha256: str | None = None
) -> str | None:
    """Why a store cannot be trained on as it is (None when it can): for the trainer.

    Judged against the store's own recorded settings, never against a config's
    ``compile.*``: a complete store of this compiler version serves, whatever it was
    compiled with.

    Parameters
    ----------
    path
        The store.
    source
        Its source file. When given and present, a stat-only check (no byte read): the
        size, and under the ``fast`` fingerprint also the mtime, must be those recorded.
        When absent, only the store is checked.
    vocab_sha256
        When given, the vocabulary the store must have been compiled with.
    """
    try:
        attrs = read_attrs(path)
        if reason := _version_and_vocab(path, attrs, vocab_sha256):
            return reason
        _check_complete(path, attrs)
    except StoreError as e:
        return str(e)
    if source is not None and Path(source).exists():  # a file or a .zarr folder
        now, then = source_stat(source), attrs["source_stat"]
        keys = ("size",) if fingerprint_mode(attrs) == "full" else ("size", "mtime_ns")
        if any(now[k] != then[k] for k in keys):
            return f"{path}: the source {source} changed since it was compiled"
    return None


def _check_complete(path: str | Path, attrs: dict) -> None:
    """Every array present with its recorded length, every token and value shard there
    (metadata and directory entries only: a store cut short by a partial copy fails). An
    ``s3://`` store is checked against one listing of its objects."""
    n, nnz = attrs["n_cells"], attrs["nnz"]
    want = {INDPTR: n + 1, TOKENS: nnz, VALUES: nnz, VAR_TOKENS: attrs["n_var_mapped"]}
    want |= {k: n for k in (TOTAL_COUNTS, N_GENES, ROW)}
    want |= {f"{OBS_GROUP}/{k}": n for k in attrs.get("obs_keys", [])}
    files = _files(path)
    listing = objstore.list_objects(path) if objstore.is_uri(path) else None
    for name, length in want.items():
        try:
            shape = tuple(json.loads(files.text(f"{name}/zarr.json"))["shape"])
        except (FileNotFoundError, json.JSONDecodeError):
            raise StoreError(f"{path}: incomplete store (array {name!r} missing)") from None
        if shape != (length,):
            raise StoreError(f"{path}: array {name!r} does not have {length} elements")
    shards = [
        f"{name}/c/{i}"
        for name in (TOKENS, VALUES)
        for i in range(-(-nnz // attrs["settings"]["shard_elements"]))
    ]
    if listing is None:
        missing = [k for k in shards if not (Path(path) / k).is_file()]
    else:
        missing = [k for k in shards if k not in listing]
    if missing:
        raise StoreError(
            f"{path}: incomplete store ({missing[0].split('/c/')[0]!r} shards missing)"
        )


def _override(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(map(_override, value)) + "]"
    return str(value)


def compile_command(attrs: dict, project_path: str | Path, base: dict | None = None) -> str:
    """The compile command that rebuilds a store with the settings it was compiled with.

    Parameters
    ----------
    attrs
        The store's root attributes (:func:`read_attrs`).
    project_path
        ``PATH.PROJECT_PATH`` of the command.
    base
        The byte settings a plain compile of the project uses (e.g. the training config's
        ``compile.*``): only the settings that differ become overrides. None: all of them.
    """
    recorded = attrs.get("settings", {})
    overrides = [
        f"compile.{k}={_override(recorded[k])}"
        for k in BYTE_SETTINGS
        if k in recorded and (base is None or base.get(k) != recorded[k])
    ]
    if fingerprint_mode(attrs) != "fast":
        overrides.append(f"compile.fingerprint={fingerprint_mode(attrs)}")
    return " ".join(
        ["python -m preprocess.compile", f"PATH.PROJECT_PATH={project_path}", *overrides]
    )


def read_attrs(path: str | Path) -> dict:
    """Root attributes of a store (plain JSON read; raises StoreError when not a store).

    An ``s3://`` store exists once its ``zarr.json``, uploaded last, does
    (:func:`concept.objstore.publish`).
    """
    return _root_attrs(path, _files(path))


def _interned(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object with its keys and short strings interned: the root attributes of
    thousands of stores stay in memory, and those repeat from store to store."""
    return {
        sys.intern(k): sys.intern(v) if isinstance(v, str) and len(v) <= 64 else v for k, v in pairs
    }


class _ArrayMeta:
    """What a reader keeps of an array's ``zarr.json``: its shape, dtype and attributes."""

    __slots__ = ("attributes", "dtype", "shape")

    def __init__(self, node: dict):
        self.shape = tuple(node["shape"])
        self.dtype = np.dtype(node["data_type"])
        self.attributes = node.get("attributes") or {}


def _root_attrs(path, files: _LocalFiles | objstore.S3Files) -> dict:
    """The root attributes in a store's ``zarr.json``, checked."""
    try:
        node = json.loads(files.text("zarr.json"), object_pairs_hook=_interned)
    except FileNotFoundError:
        raise StoreError(f"{path}: not a token store (no zarr.json)") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: unreadable zarr.json ({e})") from None
    attrs = node.get("attributes", {})
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not a {FORMAT} (format={attrs.get('format')!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{path}: format_version {attrs.get('format_version')} is not supported "
            f"(this version reads {FORMAT_VERSION}); recompile with python -m preprocess.compile"
        )
    return attrs


# --- reading ---------------------------------------------------------------------------

_MAX_FDS = 256
_MISSING = np.uint64(2**64 - 1)  # shard index entry of an inner chunk never written
_owners = iter(range(1 << 62))  # a unique key per open store (ids of dead objects recur)


def _fd_capacity() -> int:
    """Descriptors the pool keeps open: 256, or a quarter of ``RLIMIT_NOFILE``'s soft limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _MAX_FDS if soft == resource.RLIM_INFINITY else max(min(_MAX_FDS, soft // 4), 4)


class _FdPool:
    """The process's open store files: one LRU of descriptors shared by every reader.

    At most :func:`_fd_capacity` descriptors stay open, whatever the number of stores (a
    store has a file per shard and per chunk). One evicted while a read uses it is
    closed when that read ends. A forked child closes those it inherited and starts empty.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple[int, str], list[int]] = OrderedDict()  # [fd, users]
        self._gone: list[int] = []  # owners whose descriptors are to be closed

    def acquire(self, owner: int, root: str, name: str) -> tuple[tuple[int, str], list[int]]:
        """A read-only descriptor (``entry[0]``) of file ``root/name``, in use until
        :meth:`release` (a plain pair of calls: a context manager costs more than a read)."""
        key = (owner, name)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                self._close_gone()
                excess = len(self._open) + 1 - _fd_capacity()
                self._drop(list(itertools.islice(self._open, max(excess, 0))))
                entry = self._open[key] = [os.open(f"{root}/{name}", os.O_RDONLY | os.O_CLOEXEC), 0]
            else:
                self._open.move_to_end(key)
            entry[1] += 1
        return key, entry

    def release(self, key: tuple[int, str], entry: list[int]) -> None:
        with self._lock:
            entry[1] -= 1
            if not entry[1] and self._open.get(key) is not entry:
                os.close(entry[0])  # evicted or forgotten while in use

    def _drop(self, keys: list) -> None:
        for key in keys:
            fd, users = self._open.pop(key)
            if not users:
                os.close(fd)

    def _close_gone(self) -> None:
        while self._gone:
            owner = self._gone.pop()
            self._drop([k for k in self._open if k[0] == owner])

    def forget(self, owner: int) -> None:
        """Close an owner's descriptors at the next open (a store garbage-collected: a
        finalizer may run while this thread holds the lock, so it must not take it)."""
        self._gone.append(owner)

    def close(self, owner: int) -> None:
        """Close an owner's descriptors now (a store closed)."""
        with self._lock:
            self.forget(owner)
            self._close_gone()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        for fd, _ in self._open.values():
            os.close(fd)
        self._open, self._gone = OrderedDict(), []


_FDS = _FdPool()
os.register_at_fork(after_in_child=_FDS._after_fork)


class _LocalFiles:
    """A store's files on the local file system: the reader's only access to their bytes.

    Names are relative to the store (``tokens/c/3``). The other backend,
    :class:`concept.objstore.S3Files` (``concurrent``), has the same methods, except that
    its reads return futures (its :meth:`read_many` starts many at once) and it cannot
    map, so the per-cell arrays of an ``s3://`` store are private copies.
    """

    concurrent = False  # reads finish when they return

    def __init__(self, root: Path):
        self.root, self._owner = str(root), next(_owners)  # names are joined as strings
        weakref.finalize(self, _FDS.forget, self._owner)

    def text(self, name: str) -> str:
        """A whole small file (metadata); FileNotFoundError when absent."""
        fd = os.open(f"{self.root}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:  # os-level reads: a text-mode open costs three times as much
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode()

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Bytes ``[offset, offset + len(out))`` of a file; FileNotFoundError when absent."""
        key, entry = _FDS.acquire(self._owner, self.root, name)
        try:
            got = os.preadv(entry[0], [out], offset)
        finally:
            _FDS.release(key, entry)
        if got != len(out):
            raise OSError(f"{self.root}/{name}: short read ({got} of {len(out)} bytes)")

    def read_cached(self, name: str, offset: int, out: memoryview) -> int:
        """Copy what the page cache holds of bytes ``[offset, offset + len(out))`` of a file
        into ``out``, from the start on, without waiting for the disk (``preadv`` with
        ``RWF_NOWAIT``), and ask the kernel to start reading the rest
        (``POSIX_FADV_WILLNEED``); returns the bytes copied (all of them where the file
        system cannot read without waiting). FileNotFoundError when absent."""
        key, entry = _FDS.acquire(self._owner, self.root, name)
        try:
            try:
                got = os.preadv(entry[0], [out], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                got = os.preadv(entry[0], [out], offset)
            if got < len(out):
                os.posix_fadvise(entry[0], offset + got, len(out) - got, os.POSIX_FADV_WILLNEED)
        finally:
            _FDS.release(key, entry)
        return got

    def advise(self, name: str, offset: int, n: int) -> None:
        """Ask the kernel to start reading bytes ``[offset, offset + n)`` of a file into the
        page cache (``POSIX_FADV_WILLNEED``), without waiting; FileNotFoundError when
        absent."""
        key, entry = _FDS.acquire(self._owner, self.root, name)
        try:
            os.posix_fadvise(entry[0], offset, n, os.POSIX_FADV_WILLNEED)
        finally:
            _FDS.release(key, entry)

    def tail(self, name: str, n: int) -> bytes:
        """The last ``n`` bytes of a file; FileNotFoundError when absent."""
        key, entry = _FDS.acquire(self._owner, self.root, name)
        try:
            return os.pread(entry[0], n, os.fstat(entry[0]).st_size - n)
        finally:
            _FDS.release(key, entry)

    def map(self, name: str, dtype: np.dtype) -> np.ndarray:
        """A whole file as a read-only array, memory-mapped; FileNotFoundError when absent.

        The mapping is private (copy on write, never written), so its pages are the page
        cache's: every process mapping the file shares them. ``torch.from_file`` closes
        its descriptor once mapped (``mmap.mmap`` and ``np.memmap`` keep one open per
        mapping).
        """
        import torch

        path = f"{self.root}/{name}"
        size = os.stat(path).st_size
        if not size:
            return np.empty(0, dtype)
        mapped = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
        out = mapped.numpy().view(dtype)
        out.flags.writeable = False
        return out

    def close(self) -> None:
        _FDS.close(self._owner)


def _files(path: str | Path) -> _LocalFiles | objstore.S3Files:
    """The file backend of the store at ``path`` (a local folder or an ``s3://`` URI)."""
    return objstore.S3Files(path) if objstore.is_uri(path) else _LocalFiles(Path(path))


class NotRaw(ValueError):
    """The array's encoding needs a codec (compression): read it with tensorstore."""


class _RawArray:
    """Byte-level reads of a 1-D, uncompressed Zarr v3 array (sharded or not): which file
    holds each element range, and where (a shard's index gives its inner chunks' offsets)."""

    def __init__(self, files: _LocalFiles, name: str, meta: dict):
        self.files, self.name = files, name
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value", 0)
        self.outer = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        enc = meta["chunk_key_encoding"]
        sep = enc.get("configuration", {}).get("separator", "/")
        self._base = f"{name}/{'c' + sep if enc['name'] == 'default' else ''}"
        codecs = meta["codecs"]

        def plain(chain: list[dict]) -> bool:  # bytes codec only (endian may be omitted)
            return [c["name"] for c in chain] == ["bytes"] and chain[0].get(
                "configuration", {}
            ).get("endian", "little") == "little"

        if codecs[0]["name"] == "sharding_indexed":
            conf = codecs[0]["configuration"]
            if not plain(conf["codecs"]) or len(codecs) > 1:
                raise NotRaw(f"{files.root}/{name}: compressed chunks")
            self.inner = conf["chunk_shape"][0]
            self._index_at_end = conf.get("index_location", "end") == "end"
            self._index: dict[int, np.ndarray | None] = {}
        elif plain(codecs):
            self.inner = None
        else:
            raise NotRaw(f"{files.root}/{name}: codecs {[c['name'] for c in codecs]}")

    def file(self, k: int) -> str:
        """Chunk (or shard) ``k``'s file."""
        return self._base + str(k)

    def _shard_index(self, k: int) -> np.ndarray | None:
        """(n_inner, 2) offsets/lengths of shard k's inner chunks; None if the shard is absent."""
        if k not in self._index:
            n = self.outer // self.inner
            size = n * 16 + 4  # uint64 (offset, nbytes) per chunk + crc32c
            try:
                if self._index_at_end:
                    raw = self.files.tail(self.file(k), size)
                else:
                    raw = bytearray(size)
                    read = self.files.read_into(self.file(k), 0, memoryview(raw))
                    if self.files.concurrent and not read.result():
                        raw = None
            except FileNotFoundError:
                raw = None
            self._index[k] = None if raw is None else np.frombuffer(raw[:-4], "<u8").reshape(n, 2)
        return self._index[k]

    def _pieces(self, start: int, stop: int):
        """(file number, byte offset or None if absent, element lo, element hi) pieces: one
        per file, except that a shard's inner chunks are one piece only while they lie one
        after the other in the shard file (the compiler writes them in order; the index
        says), so a range across inner chunks is one read (``preadv``, or one GET)."""
        size, run = self.dtype.itemsize, None
        for piece in self._chunk_pieces(start, stop):
            if (
                run is not None
                and piece[0] == run[0]
                and piece[1] is not None
                and run[1] is not None
                and run[1] + (run[3] - run[2]) * size == piece[1]
            ):
                run = (run[0], run[1], run[2], piece[3])
                continue
            if run is not None:
                yield run
            run = piece
        if run is not None:
            yield run

    def _chunk_pieces(self, start: int, stop: int):
        """:meth:`_pieces`, one per inner chunk (or chunk)."""
        step = self.inner or self.outer
        for c0 in range(start - start % step, stop, step):
            lo, hi = max(start, c0), min(stop, c0 + step)
            k = c0 // self.outer
            if self.inner is None:
                yield k, (lo - c0) * self.dtype.itemsize, lo, hi
                continue
            index = self._shard_index(k)
            entry = None if index is None else index[(c0 % self.outer) // self.inner]
            if entry is None or entry[0] == _MISSING:
                yield k, None, lo, hi
            else:
                yield k, int(entry[0]) + (lo - c0) * self.dtype.itemsize, lo, hi

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy elements ``[start, stop)`` into ``out`` (a contiguous array of this dtype)."""
        if self.files.concurrent:
            return self.submit(start, stop, out)()
        self.start_local(start, stop, out)()

    def start_local(self, start: int, stop: int, out: np.ndarray):
        """:meth:`read_into` on local files, started: what the page cache holds is copied
        now, and the kernel is asked to read the rest from the disk while the caller goes
        on (:meth:`_LocalFiles.read_cached`); the returned call copies that rest."""
        view = memoryview(out.view(np.uint8))
        size = self.dtype.itemsize
        rest = []
        for k, offset, lo, hi in self._pieces(start, stop):
            a, b = (lo - start) * size, (hi - start) * size
            if offset is not None:
                try:
                    got = self.files.read_cached(self.file(k), offset, view[a:b])
                    if got < b - a:
                        rest.append((self.file(k), offset + got, view[a + got : b]))
                    continue
                except FileNotFoundError:  # an unwritten chunk holds the fill value
                    pass
            out[lo - start : hi - start] = self.fill
        if not rest:
            return done

        def finish() -> None:
            for name, offset, part in rest:
                self.files.read_into(name, offset, part)

        return finish

    def submit(self, start: int, stop: int, out: np.ndarray):
        """:meth:`read_into` on a ``concurrent`` backend: every piece's request is started
        at once (one hand-over to the S3 event loop); returns a call that waits for them."""
        view = memoryview(out.view(np.uint8))
        size = self.dtype.itemsize
        reads, spans = [], []
        for k, offset, lo, hi in self._pieces(start, stop):
            if offset is None:
                out[lo - start : hi - start] = self.fill
            else:
                reads.append(
                    (self.file(k), offset, view[(lo - start) * size : (hi - start) * size])
                )
                spans.append((lo - start, hi - start))
        future = self.files.read_many(reads)

        def finish() -> None:
            for found, (a, b) in zip(future.result(), spans, strict=True):
                if not found:  # an unwritten chunk holds the fill value
                    out[a:b] = self.fill

        return finish


class _Column:
    """A whole per-cell array (``indptr``, ``cell/*``, ``obs/<key>``) or ``var_tokens``,
    sliced by the loader.

    Uncompressed stores: each chunk file is memory-mapped read-only on first use, so the
    ranks of a node share its pages (the page cache) instead of each holding a copy; a
    slice across chunks is a concatenation. Compressed stores, and ``s3://`` stores
    (objects cannot be mapped), hold a private copy, read whole on first use (on S3, all
    its chunks' requests at once).
    """

    def __init__(self, store: TokenStore, name: str):
        self.store, self.name = store, name
        self.length = store.shape(name)[0]
        raw = store._raw(name) if store.mode == "raw" else None
        plain = raw is not None and raw.inner is None and not store.files.concurrent
        self._raw = raw if plain else None  # plain chunk files, mapped
        self._chunks: dict[int, np.ndarray] = {}
        self._copy: np.ndarray | None = None

    def __len__(self) -> int:
        return self.length

    def map(self) -> None:
        """Map every chunk file now (a mapped array; a private copy stays for first use)."""
        if self._raw is not None:
            for k in range(-(-self.length // self._raw.outer)):
                self._chunk(k)

    def advise(self, a: int, b: int) -> None:
        """Ask the kernel to read the mapped pages of elements ``[a, b)`` ahead of their use
        (their first touch is then no wait on the disk). Nothing for a private copy."""
        raw, n = self._raw, self._raw and self._raw.outer
        if raw is None or b <= a:
            return
        size = raw.dtype.itemsize
        for k in range(a // n, (b - 1) // n + 1):
            lo, hi = max(a, k * n), min(b, k * n + n)
            with contextlib.suppress(FileNotFoundError):  # unwritten: the fill value
                raw.files.advise(raw.file(k), (lo - k * n) * size, (hi - lo) * size)

    def _chunk(self, k: int) -> np.ndarray:
        chunk = self._chunks.get(k)
        if chunk is None:
            raw = self._raw
            try:
                chunk = raw.files.map(raw.file(k), raw.dtype)
            except FileNotFoundError:  # an unwritten chunk holds the fill value
                chunk = np.full(raw.outer, raw.fill, raw.dtype)
            self._chunks[k] = chunk
        return chunk

    def __getitem__(self, s: slice) -> np.ndarray:
        """Elements ``[s.start, s.stop)`` (non-negative bounds within the array, or None)."""
        a = 0 if s.start is None else s.start
        b = self.length if s.stop is None else s.stop
        if self._raw is None:
            if self._copy is None:
                self._copy = self.store.read(self.name, 0, self.length)
            return self._copy[a:b]
        n = self._raw.outer
        if b <= a:
            return np.empty(0, self._raw.dtype)
        k0, k1 = a // n, (b - 1) // n
        if k0 == k1:
            return self._chunk(k0)[a - k0 * n : b - k0 * n]
        return np.concatenate(
            [self._chunk(k)[max(a - k * n, 0) : min(b - k * n, n)] for k in range(k0, k1 + 1)]
        )


_UNREAD = object()


def done() -> None:
    """The completion :meth:`TokenStore.submit` returns for a read that finished when it
    started (from memory, or a page cache that held every byte)."""
    return None


class TokenStore:
    """One compiled store: metadata, whole per-cell arrays and contiguous range reads.

    The one reader of the format, for tools (:func:`open_store`) and for the training
    loader. Opening reads the root ``zarr.json``; an array's metadata is read on its
    first use, its bytes only when asked for. Every read is a contiguous range of one 1-D
    array. Uncompressed stores (the compiler's default) are read as raw bytes (*raw*
    mode): the shard index gives where a range lies and ``preadv`` puts it straight into
    the destination, with no decode and no copy. Compressed stores go through
    tensorstore; both give the same bytes (tested). File descriptors come from one
    process-wide pool, so their number does not grow with the stores. Safe across fork
    (DataLoader workers): descriptors and tensorstore handles are opened afresh in a
    child, and the per-cell arrays' mappings are inherited.

    An ``s3://`` store (a string) is read through :class:`concept.objstore.S3Files`: a
    read's range requests are all started at once and completed by the call
    :meth:`submit` returns, and the per-cell arrays are private copies (objects cannot
    be mapped); tensorstore reads it through its ``s3`` kvstore.

    Parameters
    ----------
    path
        The store's ``.zarr`` directory, or its ``s3://bucket/prefix`` URI.
    mode
        ``auto`` (raw bytes when the store is uncompressed, else tensorstore), ``raw`` or
        ``tensorstore``.
    """

    def __init__(self, path: str | Path, mode: str = "auto"):
        self.path = path if objstore.is_uri(path) else Path(path)
        self.files = _files(self.path)
        self.attrs = _root_attrs(self.path, self.files)
        if mode not in ("auto", "raw", "tensorstore"):
            raise ValueError(f"reader mode {mode!r}: expected auto, raw or tensorstore")
        if mode == "auto":
            mode = "raw" if self.attrs["settings"].get("compressor") is None else "tensorstore"
        self.mode = mode
        self._meta: dict[str, _ArrayMeta | None] = {}  # None: no such array
        self._raws: dict[str, _RawArray] = {}
        self._not_raw: dict[str, str] = {}  # why an array of a raw-mode store is not raw
        self._columns: dict[str, _Column] = {}
        self._memory: dict[str, np.ndarray] = {}  # whole arrays, when held in memory
        self._ts: dict[str, object] = {}
        self._ts_pid = os.getpid()
        if self.shape(INDPTR) != (len(self) + 1,):
            raise StoreError(f"{self.path}: indptr length does not match n_cells")

    # --- metadata ------------------------------------------------------------------------

    def _array_meta(self, name: str) -> _ArrayMeta:
        """Array ``name``'s shape, dtype and attributes, from its ``zarr.json`` (read once;
        in raw mode the array's byte layout is taken from the same parse)."""
        meta = self._meta.get(name, _UNREAD)
        if meta is _UNREAD:
            try:
                node = json.loads(self.files.text(f"{name}/zarr.json"))
            except FileNotFoundError:
                node = None  # remembered: a complete store's arrays do not change
            meta = self._meta[name] = None if node is None else _ArrayMeta(node)
            if meta is not None and self.mode == "raw":
                try:
                    self._raws[name] = _RawArray(self.files, name, node)
                except NotRaw as e:
                    self._not_raw[name] = str(e)
        if meta is None:
            raise StoreError(f"{self.path}: incomplete store (array {name!r} missing)")
        return meta

    def has(self, name: str) -> bool:
        """Whether array ``name`` is on disk."""
        try:
            self._array_meta(name)
        except StoreError:
            return False
        return True

    def shape(self, name: str) -> tuple[int, ...]:
        return self._array_meta(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._array_meta(name).dtype

    def categories(self, key: str) -> list[str] | None:
        """Category names of obs column ``key`` (None when the store has no such array)."""
        name = f"{OBS_GROUP}/{key}"
        return list(self._array_meta(name).attributes["categories"]) if self.has(name) else None

    # --- reads ---------------------------------------------------------------------------

    def _raw(self, name: str) -> _RawArray:
        arr = self._raws.get(name)
        if arr is None:
            self._array_meta(name)
            if name in self._not_raw:
                raise NotRaw(self._not_raw[name])
            arr = self._raws[name]
        return arr

    def _tensorstore(self, name: str):
        if self._ts_pid != os.getpid():  # forked: a handle from the parent kills the child
            self._ts, self._ts_pid = {}, os.getpid()
        arr = self._ts.get(name)
        if arr is None:
            import tensorstore as ts

            if objstore.is_uri(self.path):
                kvstore = objstore.tensorstore_kvstore(objstore.join(self.path, name))
            else:
                kvstore = {"driver": "file", "path": str(self.path / name)}
            spec = {"driver": "zarr3", "kvstore": kvstore}
            try:
                arr = self._ts[name] = ts.open(spec, open=True, read=True).result()
            except ValueError as e:
                raise StoreError(f"{self.path}: cannot open array {name!r} ({e})") from None
        return arr

    def read(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``[start, stop)`` of the 1-D array ``name`` (into ``out`` when given)."""
        if out is None:
            out = np.empty(stop - start, dtype=self.dtype(name))
        self.submit(name, start, stop, out)()
        return out

    def submit(self, name: str, start: int, stop: int, out: np.ndarray):
        """Start reading ``[start, stop)`` into ``out``; returns a call that completes it.

        Local raw reads copy what the page cache holds at once and ask the kernel for the
        rest, which the returned call reads (:func:`done` when nothing is left); reads
        from S3 and tensorstore reads run concurrently until completed, so a batch issues
        all its reads before waiting on any.
        """
        held = self._memory.get(name)
        if held is not None:
            out[...] = held[start:stop]
            return done
        if out.dtype != self.dtype(name):  # e.g. a batch widened to a common dtype
            tmp = np.empty(stop - start, dtype=self.dtype(name))
            inner = self.submit(name, start, stop, tmp)
            if inner is done:
                out[...] = tmp
                return done

            def widen() -> None:
                inner()
                out[...] = tmp

            return widen
        if self.mode == "raw":
            if self.files.concurrent:  # S3: the requests run while the caller goes on
                return self._raw(name).submit(start, stop, out)
            return self._raw(name).start_local(start, stop, out)
        future = self._tensorstore(name)[start:stop].read()

        def finish() -> None:
            out[...] = future.result()

        return finish

    def column(self, name: str) -> _Column:
        """A per-cell array to slice (``column(name)[a:b]``): shared memory-mapped chunks
        in uncompressed stores (no copy per process), a private copy otherwise."""
        col = self._columns.get(name)
        if col is None:
            col = self._columns[name] = _Column(self, name)
        return col

    def obsm_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the 2-D ``obsm/<key>``."""
        return self._tensorstore(f"{OBSM_GROUP}/{key}")[start:stop].read().result()

    def prepare(self, columns: Iterable[str], ranges: Iterable[str]) -> None:
        """Open now what later reads use, instead of at their first read: the per-cell
        arrays ``columns`` mapped, the metadata and byte layout of ``ranges``. A missing
        array is an error here, before any read. Local stores only: on S3 each of these
        is a request, made on first use."""
        if self.files.concurrent:
            return
        for name in columns:
            self.column(name).map()
        for name in ranges:
            self._array_meta(name)

    def hold_in_memory(self) -> None:
        """Read ``tokens`` and ``values`` whole; later reads copy from memory."""
        for name in (TOKENS, VALUES):
            self._memory[name] = self.read(name, 0, int(self.attrs["nnz"]))

    def close(self) -> None:
        """Close the store's descriptors and handles (a later read opens them again)."""
        self.files.close()
        self._ts.clear()

    # --- whole arrays and cells ----------------------------------------------------------

    def __len__(self) -> int:
        return int(self.attrs["n_cells"])

    def __repr__(self) -> str:
        a = self.attrs
        return f"TokenStore({a['species']}/{a['source_file']}: {len(self)} cells, nnz={a['nnz']})"

    @functools.cached_property
    def indptr(self) -> np.ndarray:
        """Cell i owns entries ``[indptr[i], indptr[i + 1])``."""
        return self.column(INDPTR)[:]

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and values of stored cell ``i``, in stored order (value desc, token asc)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"cell {i} out of range for {len(self)} cells")
        i %= len(self)
        a, b = (int(x) for x in self.column(INDPTR)[i : i + 2])
        return self.read(TOKENS, a, b), self.read(VALUES, a, b)

    def cells(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat tokens, values and local ``indptr`` of stored cells ``[start, stop)``."""
        ip = self.column(INDPTR)[start : stop + 1]
        a, b = int(ip[0]), int(ip[-1])
        return self.read(TOKENS, a, b), self.read(VALUES, a, b), ip - a

    def value_range(self, start: int, stop: int) -> np.ndarray:
        """Stored values of entries ``[start, stop)`` (across cells)."""
        return self.read(VALUES, start, min(stop, int(self.attrs["nnz"])))

    @property
    def rows(self) -> np.ndarray:
        """Source row of each stored cell."""
        return self.column(ROW)[:]

    @property
    def var_tokens(self) -> np.ndarray:
        """The file's mapped gene universe (ascending tokens; read-only, mapped like the
        per-cell arrays)."""
        return self.column(VAR_TOKENS)[:]

    @property
    def total_counts(self) -> np.ndarray:
        return self.column(TOTAL_COUNTS)[:]

    @property
    def n_genes(self) -> np.ndarray:
        return self.column(N_GENES)[:]

    @property
    def obs_keys(self) -> list[str]:
        return list(self.attrs.get("obs_keys", []))

    def obs(self, key: str) -> tuple[np.ndarray, list[str]]:
        """Codes (int32, -1 = missing) and category names of an obs column."""
        if key not in self.obs_keys:
            raise KeyError(f"{self.path}: no obs column {key!r} (has {self.obs_keys})")
        return self.column(f"{OBS_GROUP}/{key}")[:], self.categories(key) or []


def open_store(path: str | Path, mode: str = "auto") -> TokenStore:
    """Open a compiled token store, checking its format and version.

    Parameters
    ----------
    path
        The store's ``.zarr`` directory or ``s3://`` URI.
    mode
        ``auto``, ``raw`` or ``tensorstore`` (see :class:`TokenStore`).

    Raises
    ------
    StoreError
        Not a store, an incomplete one, or an unsupported format version.
    """
    return TokenStore(path, mode)
