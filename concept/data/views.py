"""The two panel views of every cell (the scConcept augmentation), packed.

Split in two so that no device-to-host sync is ever needed:

* :func:`plan_views` runs on the host, on the loader's reading thread. It draws the two
  gene sets of the batch (reference semantics: random / mixed / preselected panels,
  log-uniform sizes, panel gene dropout, overlap or disjoint views, the targeted-assay
  rule), decides per cell which genes each view keeps (``gene_sampling_strategy``,
  ``feature_max_drop_rate``, ``max_tokens``, ``qc_threshold``, ``max_total_seq_length``),
  and lays out the packed output: ``cu_seqlens`` and ``max_seqlen`` are therefore known
  on the host before the batch reaches the device. All of it is vectorized numpy over
  the batch's flat tokens; cells were stored in value-descending order, so the
  "top-nonzero" selection of a view is a filtered prefix and needs no sort.
* :func:`build_views` runs on the model's device: it normalizes values per cell
  (``datamodule.normalization``) and gathers the planned entries into two packed views,
  CLS first, in one indexing pass.

Random draws come from ``numpy.random.default_rng((seed, epoch, batch index))``: every
rank draws the same gene sets for the same global batch.

Panel sizes follow the reference except where it would fail or leave a view empty
(:func:`draw_gene_sets` lists those cases; so does the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from concept.data.batch import PackedBatch
from concept.vocab import CLS_TOKEN, TokenMapping, panel_files, read_panel

TARGETED_ASSAY_GENES = 10_000  # files with fewer mapped genes never use predesigned panels


@dataclass(frozen=True)
class ViewSpec:
    """Everything that decides a loader's views (resolved from the config)."""

    max_tokens: int = 1000
    panel_overlap: float = 0.0
    panel_selection: str = "random"
    panel_selection_mixed_prob: float = 0.25
    panel_size_min: float = 0.02
    panel_size_max: float = 60000
    panel_max_drop_rate: float | None = None
    feature_max_drop_rate: float | None = None
    qc_threshold: float | None = None
    max_total_seq_length: int | None = None
    gene_sampling_strategy: str = "top-nonzero"
    normalization: str = "raw"
    train: bool = True  # qc_threshold and max_total_seq_length apply to training only
    seed: int = 0


@dataclass
class Panels:
    """Predesigned panels per species, as token arrays (sorted, vocabulary genes only)."""

    names: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | Path, mappings: dict[str, TokenMapping], regex: str = ".*") -> Panels:
        out = cls()
        for species, mapping in mappings.items():
            panels = [read_panel(p) for p in panel_files(root, species, regex)]
            out.names[species] = [p.name for p in panels]
            toks = [mapping.tokens_of(p.gene_ids) for p in panels]
            out.tokens[species] = [np.unique(t[t >= 0]) for t in toks]
        return out


@dataclass
class ViewPlan:
    """Where each position of the two packed views comes from.

    The views are packed as 2B sequences, view 1 of every cell then view 2, each
    ``[CLS, genes...]``. ``src[p]`` is the entry of the batch (or, past the batch's
    entries, of ``extra_tokens``: zero-valued genes of the ``top``/``random`` strategies)
    that fills position ``p``; -1 marks CLS.
    """

    src: torch.Tensor  # (T,) int64
    extra_tokens: torch.Tensor  # (E,) int64
    cu_seqlens: torch.Tensor  # (2B+1,) int32, CLS included
    max_seqlen: int
    items_mask: torch.Tensor  # (B,) bool: False = dropped by qc / token budget
    gene_sets: tuple[np.ndarray, np.ndarray]  # token sets of view 1 and view 2
    panel_names: tuple[str, str]

    def to(self, device, non_blocking: bool = True) -> ViewPlan:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            src=move(self.src),
            extra_tokens=move(self.extra_tokens),
            cu_seqlens=move(self.cu_seqlens),
            items_mask=move(self.items_mask),
        )

    def pin_memory(self) -> ViewPlan:
        return replace(
            self,
            src=self.src.pin_memory(),
            extra_tokens=self.extra_tokens.pin_memory(),
            cu_seqlens=self.cu_seqlens.pin_memory(),
            items_mask=self.items_mask.pin_memory(),
        )


@dataclass
class Views:
    """Two packed views on the device: sequences 0..B-1 are view 1, B..2B-1 view 2."""

    tokens: torch.Tensor  # (T,) int64, CLS first in every sequence
    values: torch.Tensor  # (T,) float32, 0 at CLS
    cu_seqlens: torch.Tensor  # (2B+1,) int32
    max_seqlen: int
    items_mask: torch.Tensor  # (B,) bool
    n_cells: int


# --- gene sets -----------------------------------------------------------------------


def loguniform_int(rng: np.random.Generator, a: int, b: int) -> int:
    """The reference's panel size: ``int(2**U(log2 a, log2 b))`` clamped to ``[a, b]``;
    ``a`` when ``a >= b`` (as the reference's ``log_int_samping``)."""
    if b <= a:
        return a
    return int(np.clip(int(2 ** rng.uniform(math.log2(a), math.log2(b))), a, b))


def _size(x: float, n: int) -> int:
    """A fraction in (0, 1) of the store's genes (rounded up), else an absolute count."""
    return math.ceil(x * n) if 0 < x < 1 else int(x)


def draw_gene_sets(
    var_tokens: np.ndarray, panels: list[np.ndarray], panel_names: list[str], spec: ViewSpec, rng
) -> tuple[np.ndarray, np.ndarray, str]:
    """The batch's two gene sets (tokens, unordered) and view 1's panel name.

    ``var_tokens`` is the store's gene universe (ascending); panels are ascending too.
    The sizes follow the reference (REFERENCE.md 3.5) except where it would fail or give
    an empty view (the README's list of differences):

    * ``panel_size_min`` below one gene counts as one (the reference takes ``log2(0)``);
    * disjoint views with ``panel_size_min`` at least the store's gene count (P6400 on a
      500-gene file): view 1 takes a random half of the genes, view 2 the rest (the
      reference leaves view 1 empty);
    * a predesigned panel that shares no gene with the store, or that holds all of its
      genes while the views are disjoint, gives a random view 1 (the reference leaves view
      1, or view 2, empty).
    """
    n = len(var_tokens)
    overlap = rng.random() <= float(spec.panel_overlap)
    pmin, pmax = max(_size(spec.panel_size_min, n), 1), _size(spec.panel_size_max, n)
    random_case = (
        spec.panel_selection == "random"
        or (spec.panel_selection == "mixed" and rng.random() <= spec.panel_selection_mixed_prob)
        or n < TARGETED_ASSAY_GENES
        or not panels
    )
    g1, name = var_tokens[:0], "random"
    if not random_case:
        k = int(rng.integers(len(panels)))
        panel = panels[k]
        if spec.panel_max_drop_rate:
            rate = rng.uniform(0, spec.panel_max_drop_rate)
            panel = panel[rng.random(len(panel)) >= rate]
        at = np.searchsorted(var_tokens, panel).clip(max=max(n - 1, 0))
        g1 = panel[var_tokens[at] == panel] if n else g1  # panel genes this store has
        name = panel_names[k]
        if len(g1) == n and not overlap:  # no gene would be left for view 2
            g1 = var_tokens[:0]
    if len(g1) == 0:  # random case, or a panel this store cannot use
        avail = n if overlap else max(n - pmin, 0)
        k1 = loguniform_int(rng, min(pmin, avail), min(pmax, avail))
        if k1 == 0:  # disjoint views and pmin >= n: split the genes instead
            k1 = n // 2
        perm = rng.permutation(n)
        g1, name = var_tokens[perm[:k1]], "random"
        pool = var_tokens[perm[k1:]]  # already in random order: the complement of view 1
    else:
        rest = np.ones(n, bool)
        rest[np.searchsorted(var_tokens, g1)] = False
        pool = var_tokens[rest]
        pool = pool[rng.permutation(len(pool))]
    if overlap:
        pool = var_tokens[rng.permutation(n)]
    k2 = loguniform_int(rng, min(pmin, len(pool)), min(pmax, len(pool)))
    return g1, pool[:k2], name


# --- per-cell selection ---------------------------------------------------------------


@dataclass
class Selection:
    """One view of the batch: chosen entries (flat, cell-major) and zero-valued genes."""

    entries: np.ndarray  # indices into the batch's flat tokens, grouped by cell
    counts: np.ndarray  # (B,) entries per cell
    zero_tokens: np.ndarray  # genes of the view a cell did not express (top / random)
    zero_counts: np.ndarray  # (B,)


def _entries(member: np.ndarray, cu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the True entries (cell-major) and where each cell's run starts among them."""
    entries = np.flatnonzero(member)
    return entries, np.searchsorted(entries, cu)


def select_genes(
    tokens: np.ndarray,
    expressed: np.ndarray,
    cu: np.ndarray,
    genes: np.ndarray,
    spec: ViewSpec,
    rng: np.random.Generator,
) -> Selection:
    """Which entries (and which zero-valued genes) view ``genes`` keeps in each cell.

    ``expressed`` marks the batch entries whose gene is in the view. Each cell's sequence is
    its selected entries (value descending, as stored) followed by its zero genes (token
    ascending), which only the ``top`` and ``random`` strategies use.
    """
    b, limit, strategy = len(cu) - 1, spec.max_tokens, spec.gene_sampling_strategy
    lengths = np.diff(cu)
    member = expressed
    rate = None
    if spec.feature_max_drop_rate:
        rate = rng.uniform(0, spec.feature_max_drop_rate, b)
        member = expressed & (rng.random(len(tokens)) >= np.repeat(rate, lengths))
    zero_tok = np.empty(0, np.int64)
    zero_counts = np.zeros(b, np.int64)
    if strategy in ("top", "random"):
        genes = np.sort(genes)
        cell = np.repeat(np.arange(b), lengths)
        # the view's genes this cell did not express (value 0) are candidates too
        absent = np.ones((b, len(genes)), bool)
        absent[cell[expressed], np.searchsorted(genes, tokens[expressed])] = False
        if rate is not None:
            absent &= rng.random(absent.shape) >= rate[:, None]
        if strategy == "random" and len(genes) > limit:
            # a uniform sample of max_tokens among all candidates, expressed or not
            keys = np.full((b, len(genes)), np.inf, np.float32)
            keys[absent] = rng.random(int(absent.sum()), dtype=np.float32)
            m_cells, m_pos = cell[member], np.searchsorted(genes, tokens[member])
            keys[m_cells, m_pos] = rng.random(len(m_cells), dtype=np.float32)
            chosen = keys <= np.partition(keys, limit - 1, axis=1)[:, limit - 1][:, None]
            member = member.copy()
            member[np.flatnonzero(member)] = chosen[m_cells, m_pos]
            absent &= chosen
        elif strategy == "top":
            nonzero = np.diff(_entries(member, cu)[1])
            absent &= np.cumsum(absent, axis=1) <= (limit - np.minimum(nonzero, limit))[:, None]
        zero_cell, zpos = np.nonzero(absent)
        zero_tok = genes[zpos].astype(np.int64)
        zero_counts = np.bincount(zero_cell, minlength=b)
    entries, bounds = _entries(member, cu)
    counts = np.diff(bounds)
    if counts.max(initial=0) > limit:
        cell = np.repeat(np.arange(b), counts)
        if strategy == "random-nonzero":  # a random subset of max_tokens, kept in stored order
            order = np.lexsort((rng.random(len(entries)), cell))  # shuffled within each cell
            rank = np.empty(len(entries), np.int64)
            rank[order] = np.arange(len(entries)) - bounds[:-1][cell[order]]
        else:  # top: the first max_tokens members of each cell (cells are value-descending)
            rank = np.arange(len(entries)) - bounds[:-1][cell]
        keep = rank < limit
        entries = entries[keep]
        counts = np.minimum(counts, limit)
    return Selection(entries, counts, zero_tok, zero_counts)


def place_selection(src: np.ndarray, sel: Selection, start: np.ndarray, n_extra: int) -> None:
    """Write a view's gather sources into ``src``: each cell's entries from ``start[i]`` on
    (value order), then its zero genes, as sources ``n_extra + j`` (extra tokens)."""
    first = np.cumsum(sel.counts) - sel.counts
    src[np.repeat(start - first, sel.counts) + np.arange(len(sel.entries))] = sel.entries
    zfirst = np.cumsum(sel.zero_counts) - sel.zero_counts
    zpos = np.repeat(start + sel.counts - zfirst, sel.zero_counts) + np.arange(len(sel.zero_tokens))
    src[zpos] = n_extra + np.arange(len(sel.zero_tokens))


def plan_views(
    batch: PackedBatch,
    spec: ViewSpec,
    vocab_size: int,
    panels: Panels | None = None,
) -> ViewPlan:
    """Plan both views of a host batch (see the module docstring)."""
    rng = np.random.default_rng([spec.seed, batch.epoch, batch.index])
    tokens = batch.tokens.numpy()
    cu = batch.cu_seqlens.numpy().astype(np.int64)
    b = len(cu) - 1
    var = batch.var_tokens.numpy()
    names = panels.names.get(batch.species, []) if panels else []
    toks = panels.tokens.get(batch.species, []) if panels else []
    g1, g2, name1 = draw_gene_sets(var, toks, names, spec, rng)
    # one lookup for both views: bit 0 = gene in view 1, bit 1 = gene in view 2
    lut = np.zeros(vocab_size, np.uint8)
    lut[g1] = 1
    lut[g2] |= 2
    label = lut[tokens]
    in_views = ((label & 1).view(bool), (label >> 1).view(bool))
    views = [
        select_genes(tokens, e, cu, g, spec, rng) for e, g in zip(in_views, (g1, g2), strict=True)
    ]
    keep = np.ones(b, bool)
    lengths = [v.counts + v.zero_counts for v in views]
    if spec.train and spec.qc_threshold is not None:
        for length, g in zip(lengths, (g1, g2), strict=True):
            keep &= length > spec.qc_threshold * len(g)
    if spec.train and spec.max_total_seq_length is not None:
        # the reference's adapt_batch_size: cells dropped by qc count 0; over budget, the
        # cells from the first whose running total reaches the budget on are dropped
        total = np.cumsum((lengths[0] + lengths[1]) * keep)
        if total.max(initial=0) > spec.max_total_seq_length:
            keep &= total < spec.max_total_seq_length
    # lay out 2B sequences [CLS, entries..., zero genes...]; dropped cells keep only CLS
    seq = np.concatenate([np.where(keep, n, 0) for n in lengths]) + 1
    cu_out = np.zeros(2 * b + 1, np.int64)
    np.cumsum(seq, out=cu_out[1:])
    src = np.full(cu_out[-1], -1, np.int64)
    extra, n_extra = [], len(tokens)
    for v, sel in enumerate(views):
        entries, counts, ztok, zcounts = sel.entries, sel.counts, sel.zero_tokens, sel.zero_counts
        if not keep.all():
            entries, ztok = entries[np.repeat(keep, counts)], ztok[np.repeat(keep, zcounts)]
            counts, zcounts = counts * keep, zcounts * keep
        start = cu_out[v * b : (v + 1) * b] + 1  # first gene position of each sequence
        place_selection(src, Selection(entries, counts, ztok, zcounts), start, n_extra)
        extra.append(ztok)
        n_extra += len(ztok)
    return ViewPlan(
        src=torch.from_numpy(src),
        extra_tokens=torch.from_numpy(np.concatenate(extra)),
        cu_seqlens=torch.from_numpy(cu_out.astype(np.int32)),
        max_seqlen=int(seq.max(initial=1)),
        items_mask=torch.from_numpy(keep),
        gene_sets=(g1, g2),
        panel_names=(name1, "random"),
    )


# --- on the device ---------------------------------------------------------------------


def normalize_values(batch: PackedBatch, method: str) -> torch.Tensor:
    """Per-cell normalization of a device batch's values (float32)."""
    v = batch.values.float()
    if method == "raw":
        return v
    if method == "log1p":
        return torch.log1p(v)
    counts = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    cell = torch.repeat_interleave(
        torch.arange(len(counts), device=v.device), counts, output_size=len(v)
    )
    if method.startswith("binning/"):
        # per-cell quantile bins of the nonzero values, 1..N; the stored order (value desc,
        # token asc) is the rank, so ties are split by token instead of random jitter
        n_bins = int(method.split("/", 1)[1])
        rank = torch.arange(len(v), device=v.device) - batch.cu_seqlens[:-1].long()[cell]
        return n_bins - torch.div(rank * n_bins, counts[cell], rounding_mode="floor").float()
    scaled = v / (batch.total_counts[cell] + 1e-3) * 1e4
    if method == "totalcount":
        return scaled
    return torch.log1p(scaled)  # totalcount_log1p, totalcount/log1p


def build_views(batch: PackedBatch, normalization: str = "raw") -> Views:
    """Gather a device batch's planned views (``batch.views``) into packed tensors."""
    plan: ViewPlan = batch.views
    values = normalize_values(batch, normalization)
    # the gather's source starts with CLS, so plan.src = -1 reads it; it is never empty,
    # even when no cell of the batch expresses a gene (CLS-only sequences, as the reference)
    tokens = batch.tokens.long()
    src_tokens = torch.cat([tokens.new_full((1,), CLS_TOKEN), tokens, plan.extra_tokens.long()])
    src_values = torch.cat([values.new_zeros(1), values, values.new_zeros(len(plan.extra_tokens))])
    idx = plan.src + 1
    return Views(
        src_tokens[idx],
        src_values[idx],
        plan.cu_seqlens,
        plan.max_seqlen,
        plan.items_mask,
        len(batch),
    )


def make_planner(spec: ViewSpec, vocab_size: int, panels: Panels | None = None):
    """``fn(batch) -> ViewPlan`` for :class:`~concept.data.loader.TokenLoader`'s ``plan_views``."""

    def plan(batch: PackedBatch) -> ViewPlan:
        return plan_views(batch, spec, vocab_size, panels)

    return plan
