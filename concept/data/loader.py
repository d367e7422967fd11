"""``TokenLoader``: packed batches from compiled stores, read ahead on a thread.

The loader asks the :class:`~concept.data.sampler.BlockSampler` for this rank's reads,
reads each contiguous range straight into the batch's buffers
(:class:`~concept.store.TokenStore`), and optionally plans the two panel views
(:mod:`concept.data.views`) on the same background thread. A batch's reads start
``prefetch`` batches before it is handed out: from local files, what the page cache
holds is copied then and the rest is hinted to the kernel (read from the disk while the
batches before it are built) and read when the batch is finished; once reads miss the
page cache, the per-cell array pages of the batches ahead are hinted too. ``num_workers=0`` (default)
keeps everything in the main process: handing batches between processes costs more than
reading them. With workers, a torch DataLoader runs one reader per worker, each taking
every k-th batch, which keeps the batch order.
"""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from concept import objstore
from concept import store as fmt
from concept.data.batch import PackedBatch
from concept.data.sampler import BlockSampler, Reads
from concept.store import TokenStore

_DONE = object()


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection inside: building many long-lived objects at once otherwise
    sets off full collections over the growing heap, again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Categories:
    """Per obs key: the union of the stores' categories, and each store's code remap."""

    def __init__(self, stores: list[TokenStore], keys: list[str]):
        self.keys = keys
        self.names: dict[str, list[str]] = {}
        self.remap: dict[str, list[np.ndarray]] = {}
        for key in keys:
            per_store = [s.categories(key) for s in stores]
            names = sorted({c for cats in per_store if cats for c in cats})
            lookup = {c: i for i, c in enumerate(names)}
            self.names[key] = names
            # index 0 of each table is code -1 (missing); a store without the key maps all to -1
            self.remap[key] = [
                np.array([-1] + [lookup[c] for c in (cats or [])], dtype=np.int32)
                for cats in per_store
            ]


class TokenLoader:
    """Packed batches over compiled token stores.

    Parameters
    ----------
    store_paths
        The stores (``.zarr`` directories or ``s3://`` URIs).
    batch_size
        Global batch size; each rank yields ``batch_size // world_size`` cells per batch.
    block_size
        Contiguous cells read together (see :class:`BlockSampler`).
    within_group
        The reference's ``within_group_sampling``: ``"dataset"`` (every global batch from
        one store), ``None`` (batches mix the stores of one species), or obs column(s)
        (every batch holds cells of one value, across the stores of one species; a list
        is a joint key, and with ``"dataset"`` in it, within one store). Cells without a
        value are not sampled.
    seed, rank, world_size, num_samples, num_groups, sample_groups_equally
        Passed to :class:`BlockSampler`.
    obs_keys
        Obs columns to load as int32 codes (into :attr:`categories`).
    reader
        ``auto``, ``raw`` or ``tensorstore``.
    prefetch
        Batches read ahead: the reading thread starts the reads of up to this many
        batches before it waits for the oldest (on S3 their requests are all in flight at
        once, which hides the request latency), and as many finished batches wait for
        the consumer.
    num_workers
        0: a background thread in this process; k > 0: k DataLoader worker processes.
    pin_memory
        Pin host buffers (only ever when CUDA is available; False turns it off), always
        in this process: by the reading thread, or by the DataLoader's pinning thread
        when worker processes read (pinning inside a forked worker is unsafe).
    plan_views
        Optional ``fn(batch) -> ViewPlan`` run on the reading thread.
    in_memory
        Read every store's tokens and values into memory first
        (``datamodule.model_speed_sanity_check``: no disk reads while training).
    embeddings_key
        Deliver each cell's ``obsm/<key>`` row as ``batch.embeddings``
        (``datamodule.precomp_embs_key``).
    rows
        Deliver each cell's source row (``cell/row``) as ``batch.rows``; training has no
        use for them (None there).

    Only store metadata is read here (and the obs columns that ``within_group`` groups
    by). The per-cell arrays of local stores are mapped here, not read: their pages are
    shared by the processes of a node. Those of ``s3://`` stores are read on first use.
    """

    batch_sampler = (
        None  # Lightning inspects DataLoader-like attributes; ``sampler`` gets set_epoch
    )

    def __init__(
        self,
        store_paths: list[str | Path],
        batch_size: int = 128,
        block_size: int = 32,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        within_group: str | list[str] | None = "dataset",
        num_samples: int | None = None,
        num_groups: int | None = None,
        sample_groups_equally: bool = False,
        obs_keys: list[str] | tuple[str, ...] = (),
        reader: str = "auto",
        prefetch: int = 4,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        plan_views: Callable | None = None,
        in_memory: bool = False,
        embeddings_key: str | None = None,
        rows: bool = True,
    ):
        self.paths = [p if objstore.is_uri(p) else Path(p) for p in store_paths]
        if not self.paths:
            raise ValueError("TokenLoader needs at least one store")
        # the per-cell arrays a batch reads (their pages are hinted ahead on a cold cache)
        columns = [fmt.INDPTR, fmt.TOTAL_COUNTS] + ([fmt.ROW] if rows else [])
        obs = [f"{fmt.OBS_GROUP}/{k}" for k in obs_keys]
        self._cell_columns = columns + obs
        self._missed = False  # the last batch started found bytes outside the page cache
        with _gc_paused():  # thousands of stores' objects: no collections while they grow
            self.readers = [TokenStore(p, reader) for p in self.paths]
            for r in self.readers:
                mapped = columns + [fmt.VAR_TOKENS] + [c for c in obs if r.has(c)]
                r.prepare(mapped, (fmt.TOKENS, fmt.VALUES))
                if in_memory:
                    r.hold_in_memory()
        self.species = [r.attrs["species"] for r in self.readers]
        keys = [within_group] if isinstance(within_group, str) else list(within_group or [])
        self._per_store = "dataset" in keys  # else a batch's genes: all of its species'
        self.sampler = BlockSampler(
            [len(r) for r in self.readers],
            batch_size,
            block_size,
            seed,
            rank,
            world_size,
            self._groups(keys, within_group),
            num_samples,
            num_groups,
            sample_groups_equally,
        )
        self.obs_keys = list(obs_keys)
        self.categories = _Categories(self.readers, self.obs_keys)
        self.rows = rows
        self.prefetch, self.num_workers = prefetch, num_workers
        self.pin = torch.cuda.is_available() and pin_memory is not False
        self.plan_views = plan_views
        self.embeddings = embeddings_key
        self._var_cache: dict[int, torch.Tensor] = {}
        self._species_var: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        """Position after the last batch handed out (not the read-ahead)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    # --- reading --------------------------------------------------------------------

    def _groups(self, keys: list[str], setting) -> list[int | np.ndarray]:
        """The sampler's group ids: per store (by store or species), or per cell (a joint
        code of the species or store and the obs columns; -1 where a value is missing)."""
        names = sorted(set(self.species))
        base = [i if self._per_store else names.index(s) for i, s in enumerate(self.species)]
        cols = [k for k in keys if k != "dataset"]
        if not cols:
            return base
        for r in self.readers:
            for key in cols:
                if not r.has(f"{fmt.OBS_GROUP}/{key}"):
                    raise ValueError(
                        f"{r.path}: within_group_sampling={setting!r} needs obs column {key!r}, "
                        "which this store was compiled without: add it to "
                        "datamodule.obs_keys and compile again"
                    )
        cats = _Categories(self.readers, cols)
        out = []
        for i, r in enumerate(self.readers):
            ids = np.full(len(r), base[i], np.int64)
            missing = np.zeros(len(r), bool)
            for key in cols:
                codes = cats.remap[key][i][r.column(f"{fmt.OBS_GROUP}/{key}")[:] + 1]
                missing |= codes < 0
                ids = ids * (len(cats.names[key]) + 1) + codes + 1
            out.append(np.where(missing, -1, ids))
        return out

    def var_tokens(self, store: int) -> torch.Tensor:
        """The store's gene universe, as the batches carry it: a tensor over the mapped
        array (read-only: nothing writes a batch's ``var_tokens``)."""
        var = self._var_cache.get(store)
        if var is None:
            with warnings.catch_warnings():  # torch warns that the mapping is read-only
                warnings.simplefilter("ignore", UserWarning)
                var = self._var_cache[store] = torch.from_numpy(self.readers[store].var_tokens)
        return var

    def _genes_of(self, species: str) -> torch.Tensor:
        """The union of the genes of the species' stores (the reference's outer join)."""
        if species not in self._species_var:
            stores = [i for i, s in enumerate(self.species) if s == species]
            self._species_var[species] = torch.from_numpy(
                np.unique(np.concatenate([self.readers[i].var_tokens for i in stores]))
            )
        return self._species_var[species]

    def read_batch(self, reads: Reads, epoch: int = 0, index: int = 0) -> PackedBatch:
        """Read one rank's share of a global batch into a packed batch."""
        return self._start_batch(reads, epoch, index)()

    def _start_batch(self, reads: Reads, epoch: int, index: int) -> Callable[[], PackedBatch]:
        """Start a batch's reads (all of them: on S3 they run concurrently); returns the
        call that waits for them and builds the batch."""
        runs = list(
            zip(reads.store.tolist(), reads.start.tolist(), reads.stop.tolist(), strict=True)
        )
        ips = [self.readers[s].column(fmt.INDPTR)[a : b + 1] for s, a, b in runs]
        n_cells = int((reads.stop - reads.start).sum())
        nnz = sum(int(ip[-1] - ip[0]) for ip in ips)
        first = self.readers[runs[0][0]]
        vdtype = first.dtype(fmt.VALUES)
        for s in set(reads.store.tolist()):  # mixed stores: widen values to a common dtype
            vdtype = np.promote_types(vdtype, self.readers[s].dtype(fmt.VALUES))
        tokens = np.empty(nnz, first.dtype(fmt.TOKENS))
        values = np.empty(nnz, vdtype)
        cu = np.empty(n_cells + 1, np.int32)
        cu[0] = 0
        total = np.empty(n_cells, np.float32)
        rows = np.empty(n_cells, np.int64) if self.rows else None
        store_index = np.repeat(reads.store, reads.stop - reads.start).astype(np.int32)
        obs = {k: np.empty(n_cells, np.int32) for k in self.obs_keys}
        embs = []
        pending, e, c = [], 0, 0
        for (s, a, b), ip in zip(runs, ips, strict=True):
            rd = self.readers[s]
            m, k = b - a, int(ip[-1] - ip[0])
            pending.append(rd.submit(fmt.TOKENS, int(ip[0]), int(ip[-1]), tokens[e : e + k]))
            pending.append(rd.submit(fmt.VALUES, int(ip[0]), int(ip[-1]), values[e : e + k]))
            cu[c + 1 : c + m + 1] = ip[1:] - ip[0] + e
            total[c : c + m] = rd.column(fmt.TOTAL_COUNTS)[a:b]
            if rows is not None:
                rows[c : c + m] = rd.column(fmt.ROW)[a:b]
            if self.embeddings is not None:
                embs.append(rd.obsm_rows(self.embeddings, a, b))
            for key in self.obs_keys:
                remap = self.categories.remap[key][s]
                if len(remap) > 1:
                    obs[key][c : c + m] = remap[rd.column(f"{fmt.OBS_GROUP}/{key}")[a:b] + 1]
                else:
                    obs[key][c : c + m] = -1
            e, c = e + k, c + m
        self._missed = any(wait is not fmt.done for wait in pending)

        def finish() -> PackedBatch:
            for wait in pending:
                wait()
            species = self.species[runs[0][0]]
            var = self.var_tokens(runs[0][0]) if self._per_store else self._genes_of(species)
            batch = PackedBatch(
                tokens=torch.from_numpy(tokens),
                values=torch.from_numpy(values),
                cu_seqlens=torch.from_numpy(cu),
                total_counts=torch.from_numpy(total),
                rows=None if rows is None else torch.from_numpy(rows),
                store_index=torch.from_numpy(store_index),
                obs={k: torch.from_numpy(v) for k, v in obs.items()},
                var_tokens=var,
                species=species,
                epoch=epoch,
                index=index,
                embeddings=torch.from_numpy(np.concatenate(embs)) if embs else None,
            )
            if self.plan_views is not None:
                batch.views = self.plan_views(batch)
            return batch

        return finish

    def _advise_cells(self, reads: Reads) -> None:
        """Hint the per-cell array pages of ``reads`` to the kernel (read while the batches
        before them are read and built; on first touch they would be read one page fault
        at a time, waiting)."""
        for s, a, b in zip(
            reads.store.tolist(), reads.start.tolist(), reads.stop.tolist(), strict=True
        ):
            rd = self.readers[s]
            for name in self._cell_columns:
                if rd.has(name):  # a store without an obs column reads none
                    rd.column(name).advise(a, b + 1 if name == fmt.INDPTR else b)

    def _produce(self, out: queue.Queue, stop: threading.Event, schedule) -> None:
        epoch, start, batches = schedule
        try:
            started: deque[Callable[[], PackedBatch]] = deque()  # reads in flight

            def hand_out() -> None:
                batch = started.popleft()()
                out.put(batch.pin_memory() if self.pin else batch)

            upcoming: deque[Reads] = deque()  # the next batches' reads, not started yet
            for index in range(start, len(batches)):
                if stop.is_set():
                    return
                while len(upcoming) < min(max(self.prefetch, 1), len(batches) - index):
                    reads = self.sampler.rank_slice(batches.batch(index + len(upcoming)))
                    if self._missed:  # a cold cache: the per-cell pages too, ahead
                        self._advise_cells(reads)
                    upcoming.append(reads)
                started.append(self._start_batch(upcoming.popleft(), epoch, index))
                if len(started) >= max(self.prefetch, 1):
                    hand_out()
            while started and not stop.is_set():
                hand_out()
            out.put(_DONE)
        except BaseException as e:  # hand the error to the consumer
            out.put(e)

    def __iter__(self) -> Iterator[PackedBatch]:
        schedule = self.sampler.remaining()
        if self.num_workers > 0:
            yield from self._iter_workers(schedule)
            return
        out: queue.Queue = queue.Queue(maxsize=max(self.prefetch, 1))
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop, schedule), daemon=True)
        thread.start()
        try:
            while (item := out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                # handed out = consumed (what Lightning's checkpoint expects); the batches
                # read ahead on the thread never count
                self.sampler.position = item.index + 1
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.01)

    def _iter_workers(self, schedule) -> Iterator[PackedBatch]:
        # workers hand over unpinned batches; the DataLoader pins them in this process
        loader = torch.utils.data.DataLoader(
            _WorkerBatches(self, schedule),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin,
            prefetch_factor=max(self.prefetch // self.num_workers, 1),
        )
        for batch in loader:
            self.sampler.position = batch.index + 1
            yield batch


class _WorkerBatches(torch.utils.data.IterableDataset):
    """Worker w of k reads global batches w, w+k, ... (the DataLoader interleaves in order)."""

    def __init__(self, loader: TokenLoader, schedule):
        self.loader, self.schedule = loader, schedule

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, k = (info.id, info.num_workers) if info else (0, 1)
        epoch, start, batches = self.schedule
        for index in range(start + wid, len(batches), k):
            reads = self.loader.sampler.rank_slice(batches.batch(index))
            yield self.loader.read_batch(reads, epoch, index)
