"""The token store format (version 1): names, dtypes, attributes, and a reader.

One Zarr v3 group per compiled input file. The compiler in ``preprocess`` writes it,
everything in ``concept`` reads it; both import the constants from here. The reader uses
tensorstore and plain JSON, so it runs where only torch and tensorstore are installed.

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

import hashlib
import json
import os
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
        whole file; a byte-identical copy has the same fingerprint).
    """
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


def source_stat(path: str | Path) -> dict:
    """Size and mtime of a source: the check training can afford (no bytes read).

    For an AnnData ``.zarr`` folder: the total size and the newest mtime of its files (a
    folder's own mtime does not change when a chunk inside it is rewritten).
    """
    path = Path(path)
    if path.is_dir():
        stats = [q.stat() for q in path.rglob("*") if q.is_file()]
        return {
            "size": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
        }
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


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
        # fingerprint before stat: a change in between makes compile, not training, see it
        "source_fingerprint": source_fingerprint(source, mode),
        "source_stat": source_stat(source),
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
    path: str | Path, source: str | Path, vocab_sha256: str, settings: dict
) -> str | None:
    """Why the store at ``path`` is missing or out of date for a compile (None when current).

    A store is current when the compiler version, the vocabulary, every byte setting and
    the source's fingerprint match. The fingerprint is taken in the mode the store
    recorded, so a change of ``compile.fingerprint`` alone rebuilds nothing. Only inputs
    that change the store's bytes count.
    """
    try:
        attrs = read_attrs(path)
    except StoreError as e:
        return str(e)
    if reason := _version_and_vocab(path, attrs, vocab_sha256):
        return reason
    if changed := changed_settings(attrs, settings):
        return f"{path}: compile.{changed[0]} differs from the store's"
    if attrs.get("source_fingerprint") != source_fingerprint(source, fingerprint_mode(attrs)):
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
        _check_complete(Path(path), attrs)
    except StoreError as e:
        return str(e)
    if source is not None and Path(source).exists():  # a file or a .zarr folder
        now, then = source_stat(source), attrs["source_stat"]
        keys = ("size",) if fingerprint_mode(attrs) == "full" else ("size", "mtime_ns")
        if any(now[k] != then[k] for k in keys):
            return f"{path}: the source {source} changed since it was compiled"
    return None


def _array_shape(path: Path, name: str) -> tuple[int, ...]:
    try:
        meta = json.loads((path / name / "zarr.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise StoreError(f"{path}: incomplete store (array {name!r} missing)") from None
    return tuple(meta["shape"])


def _check_complete(path: Path, attrs: dict) -> None:
    """Every array present with its recorded length, every token and value shard on disk
    (metadata and directory entries only: a store cut short by a partial copy fails)."""
    n, nnz = attrs["n_cells"], attrs["nnz"]
    want = {INDPTR: n + 1, TOKENS: nnz, VALUES: nnz, VAR_TOKENS: attrs["n_var_mapped"]}
    want |= {k: n for k in (TOTAL_COUNTS, N_GENES, ROW)}
    want |= {f"{OBS_GROUP}/{k}": n for k in attrs.get("obs_keys", [])}
    for name, length in want.items():
        if _array_shape(path, name) != (length,):
            raise StoreError(f"{path}: array {name!r} does not have {length} elements")
    shards = -(-nnz // attrs["settings"]["shard_elements"])
    for name in (TOKENS, VALUES):
        if any(not (path / name / "c" / str(i)).is_file() for i in range(shards)):
            raise StoreError(f"{path}: incomplete store ({name!r} shards missing)")


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
    try:
        if objstore.is_uri(path):
            node = json.loads(objstore.read_text(objstore.join(path, "zarr.json")))
        else:
            node = json.loads((Path(path) / "zarr.json").read_text())
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


def _open_array(path: Path):
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return ts.open(spec, open=True, read=True).result()


class TokenStore:
    """Random access to one compiled store.

    Use :func:`open_store`. The per-cell index (``indptr``) is read once; token and value
    ranges are read on demand.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.attrs = read_attrs(self.path)
        self._arrays: dict[str, object] = {}
        self.indptr = self._read(INDPTR)
        if len(self.indptr) != self.attrs["n_cells"] + 1:
            raise StoreError(f"{self.path}: indptr length does not match n_cells")

    def _array(self, name: str):
        if name not in self._arrays:
            try:
                self._arrays[name] = _open_array(self.path / name)
            except ValueError as e:
                raise StoreError(f"{self.path}: cannot open array {name!r} ({e})") from None
        return self._arrays[name]

    def _read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        return self._array(name)[start:stop].read().result()

    def __len__(self) -> int:
        return int(self.attrs["n_cells"])

    def __repr__(self) -> str:
        a = self.attrs
        return f"TokenStore({a['species']}/{a['source_file']}: {len(self)} cells, nnz={a['nnz']})"

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and values of stored cell ``i``, in stored order (value desc, token asc)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"cell {i} out of range for {len(self)} cells")
        i %= len(self)
        a, b = int(self.indptr[i]), int(self.indptr[i + 1])
        return self._read(TOKENS, a, b), self._read(VALUES, a, b)

    def cells(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat tokens, values and local ``indptr`` of stored cells ``[start, stop)``."""
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        return self._read(TOKENS, a, b), self._read(VALUES, a, b), self.indptr[start : stop + 1] - a

    def value_range(self, start: int, stop: int) -> np.ndarray:
        """Stored values of entries ``[start, stop)`` (across cells)."""
        return self._read(VALUES, start, min(stop, int(self.attrs["nnz"])))

    @property
    def rows(self) -> np.ndarray:
        """Source row of each stored cell."""
        return self._read(ROW)

    @property
    def var_tokens(self) -> np.ndarray:
        """The file's mapped gene universe (ascending tokens)."""
        return self._read(VAR_TOKENS)

    @property
    def total_counts(self) -> np.ndarray:
        return self._read(TOTAL_COUNTS)

    @property
    def n_genes(self) -> np.ndarray:
        return self._read(N_GENES)

    @property
    def obs_keys(self) -> list[str]:
        return list(self.attrs.get("obs_keys", []))

    def obs(self, key: str) -> tuple[np.ndarray, list[str]]:
        """Codes (int32, -1 = missing) and category names of an obs column."""
        if key not in self.obs_keys:
            raise KeyError(f"{self.path}: no obs column {key!r} (has {self.obs_keys})")
        meta = json.loads((self.path / OBS_GROUP / key / "zarr.json").read_text())
        return self._read(f"{OBS_GROUP}/{key}"), list(meta["attributes"]["categories"])


def open_store(path: str | Path) -> TokenStore:
    """Open a compiled token store, checking its format and version.

    Parameters
    ----------
    path
        The store's ``.zarr`` directory.

    Raises
    ------
    StoreError
        Not a store, an incomplete one, or an unsupported format version.
    """
    return TokenStore(path)
