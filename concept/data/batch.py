"""The packed batch: flat tokens and values of B cells, no padding."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class PackedBatch:
    """B cells, packed: cell i owns ``tokens[cu_seqlens[i]:cu_seqlens[i+1]]``.

    On the host ``tokens`` and ``values`` keep the store's compact dtypes (uint16/uint32
    tokens; uint8/16/32, float16 or float32 values), which halves the bytes moved; call
    :meth:`to` to move the batch to a device, where tokens become int64 and values
    float32. Within a cell, genes are ordered by value descending, then token ascending.
    """

    tokens: torch.Tensor  # (nnz,)
    values: torch.Tensor  # (nnz,)
    cu_seqlens: torch.Tensor  # (B+1,) int32
    total_counts: torch.Tensor  # (B,) float32: counts over all genes, before masking
    store_index: torch.Tensor  # (B,) int32: which store (index into the loader's list)
    obs: dict[str, torch.Tensor]  # key -> (B,) int32 codes into the loader's categories
    var_tokens: torch.Tensor  # the gene universe the views draw from (ascending)
    species: str
    epoch: int = 0
    index: int = 0  # global batch index within the epoch (the same on every rank)
    rows: torch.Tensor | None = None  # (B,) int64: source row in the file (not in training)
    views: object | None = field(default=None, repr=False)  # a ViewPlan, when planned
    embeddings: torch.Tensor | None = None  # (B, k) float32: datamodule.precomp_embs_key

    def __len__(self) -> int:
        return len(self.cu_seqlens) - 1

    def pin_memory(self) -> PackedBatch:
        out = self._map(lambda t: t.pin_memory())
        if self.views is not None:
            out.views = self.views.pin_memory()
        return out

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        """Move to ``device``; cast tokens to int64 and values to float32 there."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        out = self._map(move)
        out.tokens = out.tokens.long()
        out.values = out.values.float()
        if self.views is not None:
            out.views = self.views.to(device, non_blocking)
        return out

    def _map(self, fn) -> PackedBatch:
        return replace(
            self,
            tokens=fn(self.tokens),
            values=fn(self.values),
            cu_seqlens=fn(self.cu_seqlens),
            total_counts=fn(self.total_counts),
            rows=None if self.rows is None else fn(self.rows),
            store_index=fn(self.store_index),
            obs={k: fn(v) for k, v in self.obs.items()},
            var_tokens=fn(self.var_tokens),
            embeddings=None if self.embeddings is None else fn(self.embeddings),
        )
