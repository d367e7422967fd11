"""Variable-length (unpadded) self-attention: one function, three backends.

Tokens of all sequences are packed into one ``(T, ...)`` tensor; ``cu_seqlens`` (int32,
S+1) marks where each sequence starts and ``max_seqlen`` (a host int, known from the
loader) bounds their lengths. Backends, all fed the same packed q/k/v:

* ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (CUDA, if the package imports);
* ``torch_varlen``: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (CUDA, when
  flash-attn is absent; it has no attention-probability dropout, so that dropout is
  skipped there: residual and feed-forward dropout still apply);
* ``sdpa``: scaled-dot-product attention over a padded view with a key-padding mask
  (CPU, and the reference the others are tested against).

None of them syncs with the host: ``max_seqlen`` comes from the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional: source-only package that needs CUDA to build
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def select_backend(device: torch.device, prefer_flash: bool = True) -> str:
    """The fastest backend available on ``device`` (``model.flash_attention`` = prefer)."""
    if device.type == "cuda" and prefer_flash:
        if flash_attn_varlen_func is not None:
            return "flash_attn"
        if _torch_varlen() is not None:
            return "torch_varlen"
    return "sdpa"


@dataclass
class Packing:
    """Where each packed token sits: its sequence and position (computed once per batch)."""

    cu_seqlens: torch.Tensor  # (S+1,) int32
    max_seqlen: int
    seq: torch.Tensor  # (T,) int64: sequence of each token
    pos: torch.Tensor  # (T,) int64: position inside its sequence (0 = CLS)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> Packing:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(
            torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total
        )
        pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]
        return cls(cu_seqlens, max_seqlen, seq, pos)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packing: Packing,
    dropout_p: float = 0.0,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Attention within each packed sequence.

    Parameters
    ----------
    q, k, v
        ``(T, H, D)`` packed heads.
    packing
        Sequence boundaries of the packed tokens.
    dropout_p
        Attention-probability dropout (pass 0 in evaluation).
    backend
        One of :data:`BACKENDS`.

    Returns
    -------
    torch.Tensor
        ``(T, H, D)``.
    """
    cu, max_len = packing.cu_seqlens, packing.max_seqlen
    if backend == "flash_attn":
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p)
    if backend == "torch_varlen":
        return _torch_varlen()(q, k, v, cu, cu, max_len, max_len)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}")
    n_seq = len(cu) - 1
    t, h, d = q.shape

    def pad(x: torch.Tensor) -> torch.Tensor:  # (T, H, D) -> (S, H, L, D)
        out = x.new_zeros(n_seq, max_len, h, d)
        out[packing.seq, packing.pos] = x
        return out.transpose(1, 2)

    valid = torch.zeros(n_seq, max_len, dtype=torch.bool, device=q.device)
    valid[packing.seq, packing.pos] = True
    mask = valid[:, None, None, :]  # (S, 1, 1, L): keys that exist
    out = F.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=mask, dropout_p=dropout_p
    )
    return out.transpose(1, 2)[packing.seq, packing.pos]  # (T, H, D)
