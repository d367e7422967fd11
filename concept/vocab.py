"""Token mappings (per-species vocabularies) and gene panels.

Read with the ``csv`` module only: this is on the training import path, which must not
need pandas.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLS_TOKEN = 0
PAD_TOKEN = 1
_ENSEMBL_ID = re.compile(r"^(ENS[A-Z]*\d{6,})(\.\d+)?$", re.IGNORECASE)


class InputError(ValueError):
    """An input file is malformed; the message names the file and the problem."""


def normalize_gene_id(gene_id: str) -> str:
    """The form genes are matched in, on the file side and the vocabulary side alike.

    Ensembl ids lose their version suffix and are upper-cased (``ensg00000000003.5`` ->
    ``ENSG00000000003``); other ids only lose surrounding whitespace.
    """
    gene_id = gene_id.strip()
    m = _ENSEMBL_ID.match(gene_id)
    return m.group(1).upper() if m else gene_id


def _read_csv(path: Path, what: str, required: tuple[str, ...]) -> tuple[list[dict], dict]:
    """Rows of a CSV (UTF-8, a byte-order mark allowed) and its headers by lower-cased name
    (columns match case-insensitively).

    Raises
    ------
    InputError
        A required column is missing; the message lists the columns found.
    """
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        found = list(reader.fieldnames or [])
        header = {f.strip().lower(): f for f in found}
        missing = [c for c in required if c.lower() not in header]
        if missing:
            raise InputError(f"{path}: {what} lacks column(s) {missing} (columns found: {found})")
        return list(reader), header


def file_sha256(*paths: Path) -> str:
    """Hash of the names and bytes of files (order-independent on names)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class TokenMapping:
    """A species' vocabulary: ``gene_id -> token`` with ``<cls>=0`` and ``<pad>=1``."""

    path: Path
    gene_ids: list[str]  # index = token
    gene_names: list[str]
    sha256: str

    @property
    def size(self) -> int:
        return len(self.gene_ids)

    @property
    def token_dtype(self) -> np.dtype:
        from concept.store import token_dtype

        return token_dtype(self.size)

    def tokens_of(self, ids: list[str] | np.ndarray) -> np.ndarray:
        """Tokens of gene ids (both sides through :func:`normalize_gene_id`); -1 where not in
        the vocabulary."""
        lookup = self._lookup
        return np.fromiter(
            (lookup.get(normalize_gene_id(str(g)), -1) for g in ids), np.int64, len(ids)
        )

    def tokens_of_names(self, names: list[str] | np.ndarray) -> np.ndarray:
        """Tokens of gene symbols (case-insensitive); -1 where unknown."""
        by_name = {n.upper(): t for t, n in enumerate(self.gene_names) if n}
        return np.fromiter((by_name.get(str(n).upper(), -1) for n in names), np.int64, len(names))

    def __post_init__(self) -> None:
        self._lookup = {normalize_gene_id(g): t for t, g in enumerate(self.gene_ids)}


def read_token_mapping(path: str | Path) -> TokenMapping:
    """Read and check ``<species>.csv`` with columns ``gene_id,gene_name,token``.

    A byte-order mark is allowed and headers match case-insensitively. Ids are compared
    as :func:`normalize_gene_id` gives them, so ``ENSG00000000003.15`` matches a file's
    ``ENSG00000000003``.

    Raises
    ------
    InputError
        Missing file or columns, duplicate ids (also after normalization), non-contiguous
        tokens, or ``<cls>``/``<pad>`` not at tokens 0/1.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: token mapping not found")
    rows, header = _read_csv(path, "token mapping", ("gene_id", "token"))
    try:
        tokens = np.array([int(r[header["token"]]) for r in rows], dtype=np.int64)
    except ValueError as e:
        raise InputError(f"{path}: non-integer token ({e})") from None
    ids = [r[header["gene_id"]].strip() for r in rows]
    seen: dict[str, str] = {}
    for g in ids:
        key = normalize_gene_id(g)
        if key in seen:
            same = f" ({seen[key]!r} and {g!r} without version suffix)" if seen[key] != g else ""
            raise InputError(f"{path}: duplicate gene_id {key!r}{same}")
        seen[key] = g
    order = np.argsort(tokens)
    if not np.array_equal(tokens[order], np.arange(len(tokens))):
        raise InputError(f"{path}: tokens must be contiguous 0..{len(tokens) - 1}")
    ids = [ids[i] for i in order]
    names = [rows[i].get(header.get("gene_name", "")) or "" for i in order]
    if ids[:2] != ["<cls>", "<pad>"]:
        raise InputError(f"{path}: <cls> must have token 0 and <pad> token 1, got {ids[:2]}")
    return TokenMapping(path, ids, names, file_sha256(path))


@dataclass
class Panel:
    """A gene panel of a real targeted assay (view 1 in the predesigned case)."""

    name: str  # "<species>/<file>.csv", as the reference reports it
    gene_ids: list[str]


def panel_files(panels_root: str | Path, species: str, regex: str = ".*") -> list[Path]:
    """``PANELS_PATH/<species>/*.csv`` whose names match ``regex`` (sorted)."""
    folder = Path(panels_root) / species
    pattern = re.compile(regex)
    return (
        sorted(p for p in folder.glob("*.csv") if pattern.search(p.name)) if folder.is_dir() else []
    )


def read_panel(path: str | Path) -> Panel:
    """Read a panel CSV: column ``Ensembl_ID`` (any case, a byte-order mark allowed); other
    columns are ignored."""
    path = Path(path)
    rows, header = _read_csv(path, "panel CSV", ("Ensembl_ID",))
    ids = [normalize_gene_id(r[header["ensembl_id"]] or "") for r in rows]
    return Panel(f"{path.parent.name}/{path.name}", [g for g in ids if g])
