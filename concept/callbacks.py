"""Training callbacks: throughput (cells/s, tokens/s, padding saved, MFU on GPU), CSV log."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

# dense bf16 peak FLOP/s by device name fragment (NVIDIA datasheets)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def flops_per_token(n_params: int, n_layers: int, dim: int, attended: float) -> float:
    """Training FLOPs per token: 6 N (weights, forward + backward) + 12 L d T (attention)."""
    return 6 * n_params + 12 * n_layers * dim * attended


class Throughput(L.Callback):
    """Logs ``perf/cells_per_s``, ``perf/tokens_per_s``, ``perf/padding_free`` (real tokens
    over what a padded batch would hold) and, on GPU, ``perf/mfu``."""

    def __init__(self):
        self.t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        if not hasattr(pl_module, "last_cells") or dt <= 0:
            return
        world = trainer.world_size
        cells, tokens = pl_module.last_cells * world, pl_module.last_tokens * world
        metrics = {
            "perf/cells_per_s": cells / dt,
            "perf/tokens_per_s": tokens / dt,
            "perf/padding_free": pl_module.last_tokens / max(pl_module.last_padded, 1),
        }
        peak = peak_flops(pl_module.device)
        if peak:
            cfg = pl_module.cfg
            n = sum(p.numel() for n_, p in pl_module.net.named_parameters() if ".genes." not in n_)
            attended = pl_module.last_tokens / max(2 * pl_module.last_cells, 1)
            fpt = flops_per_token(n, cfg.nlayers, cfg.dim_model, attended)
            metrics["perf/mfu"] = tokens * fpt / dt / (peak * world)
        pl_module.log_dict(metrics, prog_bar=False, batch_size=pl_module.last_cells)
        pl_module.log("cells/s", metrics["perf/cells_per_s"], prog_bar=True, logger=False)


class CSVLog(Logger):
    """``metrics.csv`` in the run folder that a resumed run appends to (Lightning's own
    CSVLogger deletes an existing file). One row per logging call; new columns rewrite
    the header."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict] = []
        self.keys: list[str] = []
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

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
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
