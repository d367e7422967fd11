"""Which cells each rank reads at each step: a block sampler over compiled stores.

Cells were shuffled once inside each store at compile time, so a run of contiguous cells
is a uniform random sample of its file. Each epoch, deterministically from
``(seed, epoch)``:

* every store is cut into blocks of ``block_size`` contiguous cells, on a grid that moves
  by a random offset each epoch (so a cell's block partners change from epoch to epoch:
  cells ``d`` apart share a block in about ``1 - d / block_size`` of the epochs); the
  blocks are shuffled inside the store and concatenated;
* ``within_group=True`` (the reference's ``within_group_sampling: dataset``): each store's
  block stream is cut into global batches of ``batch_size`` cells, and the batches of all
  stores are shuffled together, so every global batch comes from one store (one file, one
  species, one gene universe). A store's remainder (fewer than ``batch_size`` cells) is
  not used that epoch, and stores smaller than one batch are never used, as in the
  reference; :attr:`BlockSampler.dropped_stores` lists them;
* ``within_group=False``: the blocks of all stores are shuffled together before cutting
  into batches, so a batch mixes stores.

Rank ``r`` of ``W`` reads the ``r``-th contiguous slice of ``batch_size // W`` cells of
every global batch, so all ranks see the same number of batches, from the same store.
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


class BlockSampler:
    """Deterministic global batches over stores, sliced per rank.

    Parameters
    ----------
    sizes
        Number of cells in each store.
    batch_size
        Global batch size (all ranks together); must be divisible by ``world_size``.
    block_size
        Contiguous cells read together.
    seed
        Base seed; epoch ``e`` uses ``(seed, e)``.
    rank, world_size
        This process's slice of every global batch.
    within_group
        Every global batch from one store (default) or mixed.
    num_samples
        Cap on cells per epoch, split across stores in proportion to their size, each store
        keeping at least one batch (fixed for all epochs: the first cells of each store,
        already a random sample).
    num_groups
        Keep only this many stores, chosen once with ``seed``.
    sample_groups_equally
        With ``num_samples``: every store contributes ``max(num_samples // n_stores,
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
        within_group: bool = True,
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
        self.within_group = within_group
        self.epoch, self.position = 0, 0  # position: global batches already yielded
        sizes = np.asarray(sizes, dtype=np.int64)
        used = np.ones(len(sizes), bool)
        if num_groups is not None and num_groups < len(sizes):
            keep = np.random.default_rng(seed).choice(len(sizes), num_groups, replace=False)
            used[:] = False
            used[keep] = True
        if num_samples is not None:
            n_used = max(int(used.sum()), 1)
            if sample_groups_equally:
                share = np.full(len(sizes), max(num_samples // n_used, batch_size))
            else:
                total = max(int(sizes[used].sum()), 1)
                share = np.maximum(num_samples * sizes // total, batch_size)
            sizes = np.minimum(sizes, share)
        if within_group:
            too_small = used & (sizes < batch_size)
            self.dropped_stores = [int(i) for i in np.flatnonzero(too_small)]
            used &= ~too_small
        else:
            self.dropped_stores = []
        self.sizes = np.where(used, sizes, 0)
        if within_group:
            self._n_batches = int((self.sizes // batch_size).sum())
        else:
            self._n_batches = int(self.sizes.sum() // batch_size)

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self._n_batches

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (from its first batch); the current epoch keeps its position,
        so a trainer calling this after a mid-epoch resume does not rewind."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _blocks(self, rng: np.random.Generator, store: int) -> tuple[np.ndarray, np.ndarray]:
        """Shuffled blocks ``(starts, lengths)`` of one store, on this epoch's grid: blocks
        start at a random offset (and one shorter block before it)."""
        size, bs = int(self.sizes[store]), self.block_size
        starts = np.union1d(0, np.arange(int(rng.integers(bs)), size, bs))
        lengths = np.diff(starts, append=size)
        order = rng.permutation(len(starts))
        return starts[order], lengths[order]

    def global_batches(self, epoch: int) -> list[list[Read]]:
        """The epoch's global batches, each a list of contiguous reads in cell order."""
        rng = np.random.default_rng([self.seed, epoch])
        streams = [(int(s), *self._blocks(rng, int(s))) for s in np.flatnonzero(self.sizes)]
        if self.within_group:
            batches = [
                b
                for s, starts, lengths in streams
                for b in self._cut(np.full(len(starts), s), starts, lengths)
            ]
        elif streams:
            stores = np.concatenate([np.full(len(st), s) for s, st, _ in streams])
            starts = np.concatenate([st for _, st, _ in streams])
            lengths = np.concatenate([ln for *_, ln in streams])
            order = rng.permutation(len(starts))
            batches = self._cut(stores[order], starts[order], lengths[order])
        else:
            batches = []
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def _cut(self, stores: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[list[Read]]:
        """Cut a stream of blocks into global batches of ``batch_size`` cells (rest dropped)."""
        ends = np.cumsum(lengths)
        n_batches = int(ends[-1] // self.batch_size) if len(ends) else 0
        batches, b0, offset = [], 0, 0  # offset: cells of block b0 already used
        for _ in range(n_batches):
            need, reads = self.batch_size, []
            while need:
                take = min(int(lengths[b0]) - offset, need)
                start = int(starts[b0]) + offset
                reads.append(Read(int(stores[b0]), start, start + take))
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
