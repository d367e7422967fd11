"""Contrastive losses and retrieval metrics over two views of N cells.

``z1[i]`` and ``z2[i]`` are the L2-normalized embeddings of cell i's two views (gathered
over all ranks); ``scale = exp(logit_scale)``. ``mask`` (bool, N) drops cells that the
quality filters removed: they are neither anchors nor negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1e4  # large negative logit for excluded pairs (finite: safe in bf16 and fp32)


def _masked_logits(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return logits
    return logits.masked_fill(~mask[None, :], NEG)


def _mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def symmetric_ce(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the row-wise and column-wise cross-entropy, positives on the diagonal."""
    target = torch.arange(len(logits), device=logits.device)
    a = F.cross_entropy(_masked_logits(logits, mask), target, reduction="none")
    b = F.cross_entropy(_masked_logits(logits.T, mask), target, reduction="none")
    return 0.5 * (_mean(a, mask) + _mean(b, mask))


def clip_loss(z1, z2, scale, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE on ``scale * z1 z2ᵀ`` (N x N, positives on the diagonal)."""
    logits = scale * z1 @ z2.T
    return symmetric_ce(logits, mask), logits


def distance_loss(z1, emb, scale, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``datamodule.precomp_embs_key``: view 1 against precomputed embeddings ``emb`` with
    the reference's distance logits ``scale / (‖z1ᵢ − embⱼ‖₂ + 1e-4)``, symmetric InfoNCE."""
    logits = scale / (torch.cdist(z1.float(), emb.float()) + 1e-4)
    return symmetric_ce(logits, mask), logits


def combined_loss(z1, z2, scale, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """2N-way loss: each embedding against the other view of every cell and the same view of
    the others. Rows are ``[z1; z2]``, columns ``[z2; z1]``; the positive is on the
    diagonal. Each embedding paired with itself (column ``(i + N) mod 2N``) is excluded
    (logit -inf in effect), where the reference set it to 0."""
    n = len(z1)
    rows, cols = torch.cat([z1, z2]), torch.cat([z2, z1])
    logits = scale * rows @ cols.T  # (2N, 2N)
    self_pair = torch.roll(torch.eye(2 * n, dtype=torch.bool, device=z1.device), n, dims=1)
    logits = logits.masked_fill(self_pair, NEG)
    mask2 = None if mask is None else torch.cat([mask, mask])
    target = torch.arange(2 * n, device=z1.device)
    loss = F.cross_entropy(_masked_logits(logits, mask2), target, reduction="none")
    return _mean(loss, mask2), logits


def binary_loss(z1, z2, scale, generator=None, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid loss: the N positive pairs against N negative pairs sampled from i != j."""
    n = len(z1)
    logits = scale * z1 @ z2.T
    i = torch.randint(0, n, (n,), device=z1.device, generator=generator)
    j = (i + torch.randint(1, max(n, 2), (n,), device=z1.device, generator=generator)) % n
    pos, neg = logits.diagonal(), logits[i, j]
    keep = torch.ones(n, dtype=torch.bool, device=z1.device) if mask is None else mask
    keep_neg = keep[i] & keep[j]
    lp = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="none")
    ln = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")
    loss = ((lp * keep).sum() + (ln * keep_neg).sum()) / (keep.sum() + keep_neg.sum()).clamp(min=1)
    return loss, logits


def recall_at_k(logits: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of rows whose diagonal entry is among the row's top k (both directions
    for a square view-1 x view-2 matrix)."""

    def one(m: torch.Tensor) -> torch.Tensor:
        m = _masked_logits(m, mask)
        top = m.topk(min(k, m.shape[1]), dim=1).indices
        hit = (top == torch.arange(len(m), device=m.device)[:, None]).any(1).float()
        return _mean(hit, mask)

    return 0.5 * (one(logits) + one(logits.T))


def knn_accuracy(z1, z2, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """5-NN label vote across views (view 1 queries view 2 and back), the positive pair
    itself removed; cells with a missing label (-1) are left out."""
    known = labels >= 0
    accs = []
    for a, b in ((z1, z2), (z2, z1)):
        sim = a @ b.T
        sim.fill_diagonal_(-float("inf"))
        sim[:, ~known] = -float("inf")
        nn_idx = sim.topk(min(k, max(int(len(a)) - 1, 1)), dim=1).indices
        votes = labels[nn_idx]  # (N, k)
        pred = torch.mode(votes, dim=1).values
        accs.append(((pred == labels) & known).sum() / known.sum().clamp(min=1))
    return torch.stack(accs).mean()


def views_mixing_score(z1, z2, k: int = 1) -> torch.Tensor:
    """Among each embedding's k nearest neighbours in the 2N set (itself excluded), the
    fraction from the other view; ~0.5 when views are well mixed."""
    z = torch.cat([z1, z2])
    n = len(z1)
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))
    idx = sim.topk(k, dim=1).indices
    view = torch.arange(2 * n, device=z.device) >= n
    return (view[idx] != view[:, None]).float().mean()
