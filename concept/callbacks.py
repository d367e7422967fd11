"""Training callbacks: throughput (cells/s, tokens/s, padding saved, MFU on GPU), the run
folder every rank agrees on, and the CSV log (written by rank 0 only)."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# dense bf16 peak FLOP/s by device name fragment (NVIDIA datasheets)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def non_embedding_params(net: torch.nn.Module) -> int:
    """Parameters that multiply every token: all but the embedding tables (gene tables and
    the CLS vector are looked up, not multiplied)."""
    tables = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Embedding)}
    cls = getattr(net, "cls_embedding", None)
    if cls is not None:
        tables.add(id(cls))
    return sum(p.numel() for p in net.parameters() if id(p) not in tables)


def step_flops(n_params: int, n_layers: int, dim: int, seqlens: np.ndarray) -> float:
    """Training FLOPs of one step (forward + backward) over packed sequences of ``seqlens``.

    ``6 N T + 12 L d Σ sᵢ²``: ``N`` non-embedding parameters applied to each of the
    ``T = Σ sᵢ`` tokens (2 FLOPs per multiply-add, x3 for forward and backward), plus
    attention's ``QKᵀ`` and ``AV`` products, ``2·2·sᵢ²·d`` per layer and sequence forward,
    x3 with backward. Padding costs nothing in the varlen path, so only real lengths count.
    """
    s = np.asarray(seqlens, dtype=np.float64)
    return 6.0 * n_params * s.sum() + 12.0 * n_layers * dim * float((s * s).sum())


@dataclass
class StepStats:
    """Host-known sizes of one rank's training step (recorded before the batch moves)."""

    cells: int
    seqlens: np.ndarray  # (2B,) packed sequence lengths, CLS included
    max_seqlen: int

    @property
    def tokens(self) -> int:
        return int(self.seqlens.sum())

    @property
    def padded(self) -> int:
        return len(self.seqlens) * self.max_seqlen


class Throughput(L.Callback):
    """Logs ``perf/cells_per_s``, ``perf/tokens_per_s``, ``perf/padding_free`` (real tokens
    over what a padded batch would hold) and, on GPU, ``perf/mfu`` (:func:`step_flops`),
    averaged over each logging interval. Only host numbers are used, and the metrics are
    logged on logging steps only: nothing here makes the host wait for the device."""

    def __init__(self):
        self.t0: float | None = None
        self.n_params = 0
        self._reset()

    def _reset(self) -> None:
        self.cells = self.tokens = self.padded = 0
        self.flops = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.n_params = non_embedding_params(pl_module.net)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = getattr(pl_module, "last_stats", None)
        if stats is None:
            return
        world, cfg = trainer.world_size, pl_module.cfg
        self.cells += stats.cells * world
        self.tokens += stats.tokens * world
        self.padded += stats.padded * world
        self.flops += world * step_flops(self.n_params, cfg.nlayers, cfg.dim_model, stats.seqlens)
        if not trainer._logger_connector.should_update_logs:
            return
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        if dt <= 0:
            return
        metrics = {
            "perf/cells_per_s": self.cells / dt,
            "perf/tokens_per_s": self.tokens / dt,
            "perf/padding_free": self.tokens / max(self.padded, 1),
        }
        peak = peak_flops(pl_module.device)
        if peak:
            metrics["perf/mfu"] = self.flops / dt / (peak * world)
        self._reset()
        pl_module.log_dict(metrics, prog_bar=False, batch_size=stats.cells)
        pl_module.log("cells/s", metrics["perf/cells_per_s"], prog_bar=True, logger=False)


class RunFolder(L.Callback):
    """Agrees on one run folder across ranks and writes ``config.yaml`` there.

    Every rank proposes a run id (a timestamp for a new run); once the process group
    exists (``setup``), rank 0's id is broadcast, and the checkpoint folders, the CSV log
    and the profiler are pointed at ``root/<run id>``. Only rank 0 writes.

    Parameters
    ----------
    root
        ``PATH.CHECKPOINT_ROOT``.
    run_id
        This rank's proposal.
    config
        The config to save as ``config.yaml`` (a plain dict).
    """

    def __init__(self, root: str | Path, run_id: str, config: dict):
        self.root, self.run_id, self.config = Path(root), run_id, config
        self.run_dir: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.run_dir is not None:
            return
        self.run_id = trainer.strategy.broadcast(self.run_id, src=0)
        self.run_dir = self.root / self.run_id
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
                cb.dirpath = str(self.run_dir / Path(cb.dirpath).name)
        for logger in trainer.loggers:
            if isinstance(logger, CSVLog):
                logger.set_path(self.run_dir / "metrics.csv")
        if getattr(trainer.profiler, "dirpath", None) is not None:
            trainer.profiler.dirpath = self.run_dir / "profiler"
        if trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create(self.config), self.run_dir / "config.yaml")
            log.info("run %s -> %s", self.run_id, self.run_dir)


class CSVLog(Logger):
    """``metrics.csv`` in the run folder that a resumed run appends to (Lightning's own
    CSVLogger deletes an existing file). One row per logging call; new columns rewrite
    the header. Only global rank 0 writes; the path is set by :class:`RunFolder` once the
    ranks agree on the run."""

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.path: Path | None = None
        self.rows: list[dict] = []
        self.keys: list[str] = []
        if path is not None:
            self.set_path(path)

    def set_path(self, path: str | Path) -> None:
        """Log to ``path``, continuing the rows already there."""
        self.path = Path(path)
        self.rows, self.keys = [], []
        if self.path.is_file():
            with self.path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.keys = list(reader.fieldnames or [])
                self.rows = list(reader)

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    def log_hyperparams(self, params, *args, **kwargs) -> None:  # the run folder has config.yaml
        return None

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.path is None:
            raise RuntimeError("CSVLog: no path set (RunFolder sets it in setup)")
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        new = [k for k in row if k not in self.keys]
        if new or not self.path.is_file():
            self.keys = sorted(set(self.keys) | set(new), key=lambda k: (k != "step", k))
            self._write(self.rows, "w")
        else:
            self._write([row], "a")

    def _write(self, rows: list[dict], mode: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open(mode, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.keys)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)
