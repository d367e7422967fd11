"""Which cells each rank reads at each step: a block sampler over compiled stores.

Cells were shuffled once inside each store at compile time, so a run of contiguous cells
is a uniform random sample of its file. Every global batch comes from one *group*: by
default a store (the reference's ``within_group_sampling: dataset``: one file, one
species, one gene universe); any other grouping gives a group id to every store or to
every cell (:class:`TokenLoader <concept.data.loader.TokenLoader>` makes them from obs
columns), and a group's cells may lie in several stores. Each epoch, deterministically
from ``(seed, epoch)``:

* each group's cells in each store (a *part*, in store order) are cut into blocks of
  ``block_size`` consecutive cells, on a grid that moves by a random offset each epoch
  (so a cell's block partners change from epoch to epoch: cells ``d`` apart share a
  block in about ``1 - d / block_size`` of the epochs);
* a group's blocks (of all its parts) are shuffled and cut into global batches of
  ``batch_size`` cells; a group's remainder is not used that epoch, and groups smaller
  than one batch are never used, as in the reference (:attr:`BlockSampler.dropped_stores`
  lists the stores that lose every cell that way);
* the batches of all groups are shuffled together.

A block of a part whose cells are not contiguous in the store (an obs group of a store
that was not compiled with ``compile.group_by`` on that column) is read as one run per
contiguous stretch, which is slower but the same cells.

Rank ``r`` of ``W`` reads the ``r``-th contiguous slice of ``batch_size // W`` cells of
every global batch, so all ranks see the same number of batches, from the same group.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Reads(NamedTuple):
    """Contiguous runs of cells: run ``j`` is cells ``[start[j], stop[j])`` of store
    ``store[j]``."""

    store: np.ndarray  # int32
    start: np.ndarray  # int64
    stop: np.ndarray  # int64


@dataclass(frozen=True)
class Schedule:
    """An epoch's global batches as arrays: batch ``i`` is the runs
    ``offsets[i]:offsets[i + 1]`` of ``reads``, in order (no object per batch or block)."""

    reads: Reads
    offsets: np.ndarray  # int64, (n_batches + 1,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, i: int) -> Reads:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Reads(*(x[a:b] for x in self.reads))


@dataclass(frozen=True)
class _Part:
    """The cells of one group in one store: ``cells`` (ascending), or None for the first
    ``size`` cells of the store."""

    store: int
    size: int
    cells: np.ndarray | None = None

    def head(self, k: int) -> _Part:
        return _Part(self.store, k, None if self.cells is None else self.cells[:k])


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the system: glibc keeps the building's temporaries
    (several times the schedule's size) as the process's own otherwise."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def _parts(sizes: np.ndarray, groups: list[int | np.ndarray]) -> list[list[_Part]]:
    """Each group's parts, in group id order (cells of group -1 are left out)."""
    out: dict[int, list[_Part]] = {}
    for store, (size, g) in enumerate(zip(sizes, groups, strict=True)):
        if np.ndim(g) == 0:
            if g >= 0:
                out.setdefault(int(g), []).append(_Part(store, int(size)))
            continue
        g = np.asarray(g)
        if len(g) != size:
            raise ValueError(f"store {store}: {len(g)} group ids for {size} cells")
        order = np.argsort(g, kind="stable")  # cells of each group, ascending
        order = order.astype(np.int32 if size < 2**31 else np.int64)  # half the bytes
        ids, starts = np.unique(g[order], return_index=True)
        for gid, cells in zip(ids, np.split(order, starts[1:]), strict=True):
            if gid >= 0:
                out.setdefault(int(gid), []).append(_Part(store, len(cells), cells))
    return [out[k] for k in sorted(out)]


def _share(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over parts in proportion to ``sizes`` (largest remainders first)."""
    exact = total * sizes / max(int(sizes.sum()), 1)
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(out - exact, kind="stable")[: total - int(out.sum())]] += 1
    return out


class BlockSampler:
    """Deterministic global batches over stores, sliced per rank.

    Parameters
    ----------
    sizes
        Number of cells in each store.
    batch_size
        Global batch size (all ranks together); must be divisible by ``world_size``.
    block_size
        Consecutive cells of a part read together.
    seed
        Base seed; epoch ``e`` uses ``(seed, e)``.
    rank, world_size
        This process's slice of every global batch.
    groups
        Per store, the group id of the whole store (an int) or of each of its cells (an
        int array; -1: never sampled). Default: one group per store.
    num_samples
        Cap on cells per epoch, split across groups in proportion to their size, each
        group keeping at least one batch (fixed for all epochs: the first cells of each
        part, already a random sample).
    num_groups
        Keep only this many groups, chosen once with ``seed``.
    sample_groups_equally
        With ``num_samples``: every group contributes ``max(num_samples // n_groups,
        batch_size)`` cells instead of a proportional share.
    """

    def __init__(
        self,
        sizes: list[int],
        batch_size: int,
        block_size: int = 32,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        groups: list[int | np.ndarray] | None = None,
        num_samples: int | None = None,
        num_groups: int | None = None,
        sample_groups_equally: bool = False,
    ):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0  # position: global batches already yielded
        sizes = np.asarray(sizes, dtype=np.int64)
        parts = _parts(sizes, list(range(len(sizes))) if groups is None else groups)
        grouped = {p.store for g in parts for p in g}
        if num_groups is not None and num_groups < len(parts):
            keep = np.random.default_rng(seed).choice(len(parts), num_groups, replace=False)
            parts = [parts[i] for i in sorted(keep)]
        group_sizes = np.array([sum(p.size for p in g) for g in parts], np.int64)
        if num_samples is not None:
            if sample_groups_equally:
                share = np.full(len(parts), max(num_samples // max(len(parts), 1), batch_size))
            else:
                total = max(int(group_sizes.sum()), 1)
                share = np.maximum(num_samples * group_sizes // total, batch_size)
            for i, g in enumerate(parts):
                if share[i] < group_sizes[i]:
                    ks = _share(np.array([p.size for p in g]), int(share[i]))
                    parts[i] = [p.head(int(k)) for p, k in zip(g, ks, strict=True) if k]
            group_sizes = np.minimum(group_sizes, share)
        self.groups = [g for g, n in zip(parts, group_sizes, strict=True) if n >= batch_size]
        self.sizes = np.zeros(len(sizes), np.int64)  # cells of each store in use
        for g in self.groups:
            for p in g:
                self.sizes[p.store] += p.size
        # stores none of whose cells is sampled (but not those num_groups left out)
        chosen = {p.store for g in parts for p in g}
        self.dropped_stores = [
            s for s in range(len(sizes)) if not self.sizes[s] and (s in chosen or s not in grouped)
        ]
        self._n_batches = int(sum(sum(p.size for p in g) // batch_size for g in self.groups))
        self._flatten()
        self._cached: tuple[int, Schedule] | None = None  # the last epoch's schedule

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self._n_batches

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (from its first batch); the current epoch keeps its position,
        so a trainer calling this after a mid-epoch resume does not rewind."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _flatten(self) -> None:
        """The groups' parts as arrays, for :meth:`global_batches`: a *position* is a cell's
        index in all parts laid end to end (groups in order, parts in order)."""
        parts = [p for g in self.groups for p in g]
        self._group_parts = np.cumsum([0] + [len(g) for g in self.groups])
        self._part_store = np.array([p.store for p in parts], np.int32)
        self._part_size = np.array([p.size for p in parts], np.int64)
        self._part_pos = np.concatenate([[0], np.cumsum(self._part_size)])
        listed = [p.cells is not None for p in parts]
        self._part_listed = np.array(listed, bool)  # cells listed (else the first ``size``)
        lists = [p.cells for p in parts if p.cells is not None]
        self._cells = np.concatenate(lists) if lists else np.empty(0, np.int64)
        self._part_cells = np.cumsum([0] + [p.size if p.cells is not None else 0 for p in parts])
        # where a listed part's cells stop being consecutive: a run of reads starts there
        breaks = [
            self._part_pos[i] + np.flatnonzero(np.diff(p.cells) != 1) + 1
            for i, p in enumerate(parts)
            if p.cells is not None
        ]
        self._breaks = np.concatenate([*breaks, [np.iinfo(np.int64).max]]).astype(np.int64)

    def global_batches(self, epoch: int) -> Schedule:
        """The epoch's global batches (see the module's description), as arrays."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._build(epoch))
            _release_freed_memory()  # the building's temporaries are gone by now
        return self._cached[1]

    def _build(self, epoch: int) -> Schedule:
        if not self.groups:
            empty = np.empty(0, np.int64)
            return Schedule(Reads(empty.astype(np.int32), empty, empty), np.zeros(1, np.int64))
        rng = np.random.default_rng([self.seed, epoch])
        bs, size = self.block_size, self._part_size
        # the random calls of the epoch, in their order: a grid offset per part, then the
        # block order of each group; the batch order last
        offset = np.empty(len(size), np.int64)
        perms = []
        for g in range(len(self.groups)):
            a, b = self._group_parts[g], self._group_parts[g + 1]
            n = 0
            for p in range(a, b):
                offset[p] = o = int(rng.integers(bs))
                n += max(-(-(int(size[p]) - o) // bs), 0) + (o > 0 or not size[p])
            perms.append(rng.permutation(n))
        # blocks of each part: one short block before the grid (unless it starts at 0)
        lead = ((offset > 0) | (size == 0)).astype(np.int64)
        count = np.maximum(-(-(size - offset) // bs), 0) + lead
        part = np.repeat(np.arange(len(size)), count)
        j = np.arange(len(part)) - np.repeat(np.cumsum(count) - count, count)
        o, lp = offset[part], lead[part]
        starts = np.where(j < lp, 0, o + (j - lp) * bs)
        stops = np.where(
            j < lp, np.minimum(o, size[part]), np.minimum(o + (j - lp + 1) * bs, size[part])
        )
        # each group's blocks shuffled, the groups' streams laid end to end
        first = np.cumsum([0] + [len(x) for x in perms])
        order = np.concatenate([x + f for x, f in zip(perms, first[:-1], strict=True)])
        part, starts, lengths = part[order], starts[order], (stops - starts)[order]
        ends = np.cumsum(lengths)
        # cut each group's stream into batches: pieces between block and batch boundaries
        gsize = np.diff(self._part_pos[self._group_parts])
        gbase = np.concatenate([[0], np.cumsum(gsize)])
        nb = gsize // self.batch_size
        cuts = [gbase[g] + np.arange(nb[g] + 1) * self.batch_size for g in range(len(nb))]
        points = np.concatenate([[0], ends, *cuts])
        points.sort(kind="stable")  # two sorted runs: merged
        points = points[np.diff(points, prepend=-1) > 0]
        x, y = points[:-1], points[1:]
        g = np.searchsorted(gbase, x, "right") - 1
        used = x < gbase[g] + nb[g] * self.batch_size  # a group's remainder is not used
        x, y, g = x[used], y[used], g[used]
        batch = np.concatenate([[0], np.cumsum(nb)])[g] + (x - gbase[g]) // self.batch_size
        blk = np.searchsorted(ends, x, "right")
        p = part[blk]
        a = self._part_pos[p] + starts[blk] + x - (ends[blk] - lengths[blk])  # positions
        b = a + (y - x)
        # pieces of listed parts: one run per stretch of consecutive cells
        lo = np.searchsorted(self._breaks, a, "right")
        extra = np.searchsorted(self._breaks, b, "left") - lo
        piece = np.repeat(np.arange(len(a)), extra + 1)
        r = np.arange(len(piece)) - np.repeat(np.cumsum(extra + 1) - extra - 1, extra + 1)
        ra = np.where(r == 0, a[piece], self._breaks[lo[piece] + r - 1])
        rb = np.where(r == extra[piece], b[piece], self._breaks[lo[piece] + r])
        p, batch = p[piece], batch[piece]
        ra, rb = ra - self._part_pos[p], rb - self._part_pos[p]  # within the part
        listed = self._part_listed[p]
        if listed.any():
            c = self._part_cells[p]
            ra = np.where(listed, self._cells[np.where(listed, c + ra, 0)], ra)
            rb = np.where(listed, self._cells[np.where(listed, c + rb - 1, 0)] + 1, rb)
        # the batches of all groups in a random order
        rank = np.empty(int(nb.sum()), np.int64)
        rank[rng.permutation(len(rank))] = np.arange(len(rank))
        batch = rank[batch]
        runs = np.argsort(batch, kind="stable")
        return Schedule(
            Reads(self._part_store[p][runs], ra[runs].astype(np.int64), rb[runs].astype(np.int64)),
            np.searchsorted(batch[runs], np.arange(len(rank) + 1)).astype(np.int64),
        )

    def rank_slice(self, batch: Reads) -> Reads:
        """This rank's contiguous share of a global batch."""
        per = self.batch_size // self.world_size
        n = batch.stop - batch.start
        before = np.cumsum(n) - n  # cells of the batch before each run
        a = np.clip(self.rank * per - before, 0, n)
        b = np.clip((self.rank + 1) * per - before, 0, n)
        keep = a < b
        return Reads(batch.store[keep], (batch.start + a)[keep], (batch.start + b)[keep])

    def remaining(self) -> tuple[int, int, Schedule]:
        """``(epoch, first batch index, global batches)`` still to read in this epoch.

        A finished epoch starts over (validation loaders run the same batches each time).
        """
        batches = self.global_batches(self.epoch)
        if self.position >= len(batches):
            self.position = 0
        return self.epoch, self.position, batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly: the next batch is the one an uninterrupted run would yield next."""
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint sampler seed {state['seed']} != configured {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
