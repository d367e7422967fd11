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
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT = "concept-token-store"
FORMAT_VERSION = 1

INDPTR, TOKENS, VALUES, VAR_TOKENS = "indptr", "tokens", "values", "var_tokens"
TOTAL_COUNTS, N_GENES, ROW = "cell/total_counts", "cell/n_genes", "cell/row"
OBS_GROUP = "obs"

# Root attributes every valid store carries.
ROOT_ATTRS = (
    "format",
    "format_version",
    "species",
    "source_name",
    "source_file",
    "source_fingerprint",
    "vocab_sha256",
    "panels_sha256",
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


COMPILER_VERSION = "1"

# Compile settings that change a store's bytes: part of its fingerprint.
BYTE_SETTINGS = (
    "x_source",
    "var_column",
    "normalization",
    "value_dtype",
    "obs_keys",
    "shuffle_seed",
    "group_by",
    "chunk_elements",
    "shard_elements",
    "cell_chunk",
    "compressor",
)


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


def store_path(compiled_root: str | Path, source_name: str, stem: str) -> Path:
    """``<COMPILED_ROOT>/<source_name>/<stem>.zarr``."""
    return Path(compiled_root) / source_name / f"{stem}.zarr"


def store_key(source_name: str, stem: str) -> str:
    """Registry key of a store."""
    return f"compiled/{source_name}/{stem}.zarr"


def source_fingerprint(path: str | Path) -> str:
    """Size, mtime and the first and last MiB: cheap, and changes whenever the file does."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(st.st_size - (1 << 20), 0))
        h.update(fh.read(1 << 20))
    return h.hexdigest()


def expected_attrs(
    source: Path | str, vocab_sha256: str, panels: list[Path], settings: dict
) -> dict:
    """The attributes a current store of ``source`` carries (compared to decide staleness)."""
    from concept.vocab import file_sha256

    return {
        "format_version": FORMAT_VERSION,
        "source_fingerprint": source_fingerprint(source),
        "vocab_sha256": vocab_sha256,
        "panels_sha256": file_sha256(*panels),
        "settings": {k: settings[k] for k in BYTE_SETTINGS},
        "compiler_version": COMPILER_VERSION,
    }


def stale_reason(path: str | Path, expected: dict) -> str | None:
    """Why the store at ``path`` is missing or out of date (None when current)."""
    try:
        attrs = read_attrs(path)
    except StoreError as e:
        return str(e)
    for key, value in expected.items():
        if attrs.get(key) != value:
            return f"{path}: {key} differs from the current inputs"
    return None


def read_attrs(path: str | Path) -> dict:
    """Root attributes of a store (plain JSON read; raises StoreError when not a store)."""
    meta = Path(path) / "zarr.json"
    try:
        node = json.loads(meta.read_text())
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
