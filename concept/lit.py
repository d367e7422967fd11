"""The LightningModule: wires the encoder, the views, the loss and the optimizer.

No math lives here: the network is :mod:`concept.model.network`, the views
:mod:`concept.data.views`, the losses and metrics :mod:`concept.losses`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict

import lightning as L
import numpy as np
import torch

from concept import losses
from concept.callbacks import StepStats
from concept.config import ModelConfig, TrainingConfig
from concept.data.batch import PackedBatch
from concept.data.views import Views, build_views
from concept.model.network import ContrastiveEncoder

log = logging.getLogger(__name__)


def gather(z: torch.Tensor) -> torch.Tensor:
    """All ranks' embeddings, differentiably (each rank then computes the global loss; the
    gather's backward sums the gradients and DDP averages: the gradient of that loss)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return z
    if torch.distributed.get_world_size() == 1:
        return z
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z))


def lr_factor(step: int, t: TrainingConfig) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (reference schedules)."""
    warm = min(1.0, step / t.warmup) if t.warmup > 0 else 1.0
    if t.scheduler == "warmup":
        return warm
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, t.max_steps) / max(t.max_steps, 1)))
    return max(warm * cosine, t.min_lr / t.lr if t.lr else 0.0)


class ContrastiveModule(L.LightningModule):
    """Contrastive pre-training of :class:`ContrastiveEncoder` on packed two-view batches.

    Parameters
    ----------
    model
        ``model.*`` config (as a dict, so checkpoints carry it).
    vocab_sizes
        Species -> vocabulary size (embedding-table rows).
    normalization
        ``datamodule.normalization``, applied per cell on the device.
    val_loader_names
        Names of the validation loaders, in ``dataloader_idx`` order.
    obs_keys
        Obs columns for kNN accuracy in validation.
    pretrained
        Optional species -> (V, dim_pretrained_vocab) gene vectors.
    """

    def __init__(
        self,
        model: dict,
        vocab_sizes: dict[str, int],
        normalization: str = "raw",
        val_loader_names: list[str] | tuple[str, ...] = (),
        obs_keys: list[str] | tuple[str, ...] = (),
        pretrained: dict[str, np.ndarray] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["pretrained"])
        model = dict(model)
        shapes = model.pop("_pretrained_shapes", None)
        self.cfg = ModelConfig(**{**model, "training": TrainingConfig(**model["training"])})
        if pretrained is None and shapes:
            # rebuilt from a checkpoint: zero tables of the saved shape, filled by the state dict
            pretrained = {s: np.zeros(shape, np.float32) for s, shape in shapes.items()}
        self.net = ContrastiveEncoder(self.cfg, vocab_sizes, pretrained)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(self.cfg.logit_scale_init_value)))
        self.normalization = normalization
        self.val_loader_names = list(val_loader_names)
        self.obs_keys = list(obs_keys)
        self._host_stats: StepStats | None = None
        self.last_stats: StepStats | None = None  # the last training step's sizes
        self.fresh_training = False  # initialize.fresh_training (set by concept.train)
        if self.cfg.training.train_vocab_only:
            for name, p in self.named_parameters():
                p.requires_grad = ".learnable." in name

    @staticmethod
    def hparams_for(cfg: ModelConfig, pretrained: dict[str, np.ndarray] | None) -> dict:
        """``model.*`` as saved in checkpoints (plus the pretrained tables' shapes)."""
        d = asdict(cfg)
        if pretrained:
            d["_pretrained_shapes"] = {s: list(v.shape) for s, v in pretrained.items()}
        return d

    # --- plumbing ---------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        backend = self.net.set_backend(self.device)
        log.info("attention backend: %s", backend)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.fresh_training:
            # weights and optimizer state restored; step, epoch, loader position and the
            # learning-rate schedule start from zero (the reference's Fabric loop)
            checkpoint.pop("loops", None)
            checkpoint["lr_schedulers"] = []

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if not isinstance(batch, PackedBatch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        plan = batch.views
        if plan is not None and plan.cu_seqlens.device.type == "cpu":
            # sizes for the throughput callback, read while they are still on the host
            self._host_stats = StepStats(
                len(batch), np.diff(plan.cu_seqlens.numpy()), plan.max_seqlen
            )
        else:
            self._host_stats = None
        return batch.to(device)

    def _add_learnable(self, validating: bool) -> bool:
        t = self.cfg.training
        freq = 1.0 if t.train_vocab_only else t.use_learnable_embs_freq
        if freq is None:
            return False
        s = self.global_step
        if validating or (s + 1) % self.trainer.log_every_n_steps == 0:
            return True
        return math.floor((s + 1) * freq) > math.floor(s * freq)

    @property
    def inference_add_learnable(self) -> bool:
        """Whether inference adds the learnable residual tables (validation's rule)."""
        return self._add_learnable(validating=True)

    def embed_views(self, views: Views, species: str, add_learnable: bool):
        """Embeddings of both views, (B, d) each, plus token states."""
        values = views.values
        if self.training and self.cfg.values_only_sanity_check:
            values = values[torch.randperm(len(values), device=values.device)]
        masked = None
        if self.training and self.cfg.training.masking_rate > 0:
            masked = (torch.rand_like(values) < self.cfg.training.masking_rate) & (
                views.tokens != 0
            )
            values = torch.where(masked, float(self.cfg.mask_value), values)
        z, hidden = self.net(
            views.tokens, values, views.cu_seqlens, views.max_seqlen, species, add_learnable
        )
        return z[: views.n_cells], z[views.n_cells :], hidden, masked

    def _step(self, batch: PackedBatch, validating: bool):
        views = build_views(batch, self.normalization)
        z1, z2, hidden, masked = self.embed_views(
            views, batch.species, self._add_learnable(validating)
        )
        mask = gather(views.items_mask)
        z1, z2 = gather(z1), gather(z2)
        scale = self.logit_scale.exp()
        kind = self.cfg.contrastive_loss
        if batch.embeddings is not None:  # precomputed embeddings replace view 2
            emb = gather(batch.embeddings)
            if emb.shape[1] != z1.shape[1]:
                raise ValueError(
                    f"datamodule.precomp_embs_key: the stored embeddings have {emb.shape[1]} "
                    f"dimensions, the model's {z1.shape[1]} (model.projection_dim or dim_model)"
                )
            loss_cont, logits = losses.distance_loss(z1, emb, scale, mask)
        elif kind == "binary":
            loss_cont, logits = losses.binary_loss(z1, z2, scale, mask=mask)
        elif self.global_step < self.cfg.loss_switch_step or validating:
            loss_cont, logits = losses.clip_loss(z1, z2, scale, mask)
        else:
            loss_cont, _ = losses.combined_loss(z1, z2, scale, mask)
            logits = scale * z1 @ z2.T
        loss = self.cfg.cont_loss_weight * loss_cont
        out = {"loss_cont": loss_cont}
        if self.net.decoder is not None:
            if masked is not None and self.cfg.mlm_loss_weight > 0:
                # masked mean without indexing by the mask: no host sync
                err = (self.net.decode(hidden) - views.values) ** 2 * masked
                loss_mlm = err.sum() / masked.sum().clamp(min=1)
                loss = loss + self.cfg.mlm_loss_weight * loss_mlm
                out["loss_mlm"] = loss_mlm
            else:  # decoder idle this step: keep it in the graph for DDP
                loss = loss + sum(p.view(-1)[0] for p in self.net.decoder.parameters()) * 0.0
        out["loss"] = loss
        out["recall@1"] = losses.recall_at_k(logits.detach(), 1, mask)
        out["recall@5"] = losses.recall_at_k(logits.detach(), 5, mask)
        return out, (z1.detach(), z2.detach(), views)

    # --- steps --------------------------------------------------------------------------

    def training_step(self, batch: PackedBatch, batch_idx: int):
        if self.cfg.data_loading_speed_sanity_check:
            return None  # measure the loader alone: no forward, no optimizer step
        out, _ = self._step(batch, validating=False)
        n = len(batch)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=False, batch_size=n)
        self.log("train/logit_scale", self.logit_scale.exp().detach(), batch_size=n)
        # shown on the progress bar, which refreshes (reads it back) every log_every_n_steps
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=n)
        self.last_stats = self._host_stats
        return out["loss"]

    def validation_step(self, batch: PackedBatch, batch_idx: int, dataloader_idx: int = 0):
        out, (z1, z2, _) = self._step(batch, validating=True)
        name = self.val_loader_names[dataloader_idx] if self.val_loader_names else "val"
        n = len(batch)
        metrics = {f"val/{name}/{k}": v for k, v in out.items()}
        for key in self.obs_keys:
            labels = gather(batch.obs[key]) if key in batch.obs else None
            if labels is not None and (labels >= 0).any():
                metrics[f"val/{name}/knn_acc_{key}"] = losses.knn_accuracy(z1, z2, labels)
        metrics[f"val/{name}/views_mixing_score"] = losses.views_mixing_score(z1, z2, 1)
        metrics[f"val/{name}/views_mixing_score_top_5"] = losses.views_mixing_score(z1, z2, 5)
        self.log_dict(metrics, batch_size=n, add_dataloader_idx=False, sync_dist=False)

    # --- optimization -------------------------------------------------------------------

    def configure_optimizers(self):
        t = self.cfg.training
        tables, rest = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (
                tables if ".genes.learnable." in name or ".genes.pretrained." in name else rest
            ).append(p)
        groups = [
            {"params": rest, "weight_decay": t.weight_decay},
            {"params": tables, "weight_decay": 0.0},
        ]
        opt_cls = torch.optim.AdamW if t.optimizer_class == "AdamW" else torch.optim.Adam
        opt = opt_cls([g for g in groups if g["params"]], lr=t.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            from lightning.pytorch.utilities import grad_norm

            self.log_dict(grad_norm(self.net, norm_type=2))
