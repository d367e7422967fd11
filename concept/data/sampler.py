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

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Read:
    """A contiguous run of cells ``[start, stop)`` of store ``store``."""

    store: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Part:
    """The cells of one group in one store: ``cells`` (ascending), or None for the first
    ``size`` cells of the store."""

    store: int
    size: int
    cells: np.ndarray | None = None

    def head(self, k: int) -> _Part:
        return _Part(self.store, k, None if self.cells is None else self.cells[:k])

    def reads(self, a: int, b: int) -> list[Read]:
        """Positions ``[a, b)`` of the part as contiguous reads of its store."""
        if self.cells is None:
            return [Read(self.store, a, b)]
        c = self.cells[a:b]
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(c) != 1) + 1, [len(c)]])
        return [
            Read(self.store, int(c[i]), int(c[j - 1]) + 1)
            for i, j in zip(bounds[:-1], bounds[1:], strict=True)
        ]


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

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self._n_batches

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (from its first batch); the current epoch keeps its position,
        so a trainer calling this after a mid-epoch resume does not rewind."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _blocks(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocks ``(starts, lengths)`` of a part of ``size`` cells on this epoch's grid:
        blocks start at a random offset (and one shorter block before it)."""
        starts = np.union1d(0, np.arange(int(rng.integers(self.block_size)), size, self.block_size))
        return starts, np.diff(starts, append=size)

    def global_batches(self, epoch: int) -> list[list[Read]]:
        """The epoch's global batches, each a list of contiguous reads."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for group in self.groups:
            blocks = [self._blocks(rng, p.size) for p in group]
            part = np.concatenate([np.full(len(s), i) for i, (s, _) in enumerate(blocks)])
            starts = np.concatenate([s for s, _ in blocks])
            lengths = np.concatenate([n for _, n in blocks])
            order = rng.permutation(len(starts))
            batches += self._cut(group, part[order], starts[order], lengths[order])
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def _cut(
        self, group: list[_Part], part: np.ndarray, starts: np.ndarray, lengths: np.ndarray
    ) -> list[list[Read]]:
        """Cut a stream of blocks into global batches of ``batch_size`` cells (rest dropped)."""
        n_batches = int(lengths.sum() // self.batch_size)
        batches, b0, offset = [], 0, 0  # offset: cells of block b0 already used
        for _ in range(n_batches):
            need, reads = self.batch_size, []
            while need:
                take = min(int(lengths[b0]) - offset, need)
                start = int(starts[b0]) + offset
                reads += group[part[b0]].reads(start, start + take)
                need -= take
                offset += take
                if offset == lengths[b0]:
                    b0, offset = b0 + 1, 0
            batches.append(reads)
        return batches

    def rank_slice(self, batch: list[Read]) -> list[Read]:
        """This rank's contiguous share of a global batch."""
        per = self.batch_size // self.world_size
        lo, hi = self.rank * per, (self.rank + 1) * per
        out, pos = [], 0
        for r in batch:
            n = r.stop - r.start
            a, b = max(lo - pos, 0), min(hi - pos, n)
            if a < b:
                out.append(Read(r.store, r.start + a, r.start + b))
            pos += n
        return out

    def remaining(self) -> tuple[int, int, list[list[Read]]]:
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
