"""The contrastive cell encoder (the scConcept architecture), as plain modules.

Packed in, packed through: tokens of all 2B sequences (two views of B cells, CLS first)
form one ``(T, d)`` stream; attention is varlen (:mod:`concept.model.attention`), the
feed-forward layers see no padding at all, and the CLS outputs are read at
``cu_seqlens[:-1]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from concept.config import ModelConfig
from concept.model.attention import Packing, select_backend, varlen_attention
from concept.vocab import PAD_TOKEN


class MultiheadAttention(nn.Module):
    """Self-attention with flash-attn's parameter names (``Wqkv``, ``out_proj``), so a
    checkpoint loads whichever backend runs it."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.Wqkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        t, d = x.shape
        qkv = self.Wqkv(x).view(t, 3, self.heads, d // self.heads)  # (T, 3, H, Dh)
        q, k, v = qkv.unbind(1)
        p = self.dropout if self.training else 0.0
        out = varlen_attention(q, k, v, packing, p, self.backend)  # (T, H, Dh)
        return self.out_proj(out.reshape(t, d))


class EncoderLayer(nn.Module):
    """Transformer encoder layer, pre- or post-LayerNorm (reference ``norm_scheme``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim_model
        self.self_attn = MultiheadAttention(d, cfg.num_head, cfg.dropout)
        self.linear1 = nn.Linear(d, cfg.dim_hid)
        self.linear2 = nn.Linear(cfg.dim_hid, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)
        self.act = F.gelu if cfg.activation == "gelu" else F.relu
        self.pre_norm = cfg.norm_scheme == "pre"

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.act(self.linear1(x)))))

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout1(self.self_attn(self.norm1(x), packing))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, packing)))
        return self.norm2(x + self._ff(x))


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """Fixed positional table (base 10000; sin on even, cos on odd dimensions)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table


class GeneEncoder(nn.Module):
    """Per-species gene embeddings, optionally from pretrained vectors plus a learnable
    residual table; shared adapters and LayerNorm."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_sizes: dict[str, int],
        pretrained: dict[str, np.ndarray] | None = None,
    ):
        super().__init__()
        self.species = list(vocab_sizes)
        self.pretrained = None
        if pretrained:
            self.pretrained = nn.ModuleDict(
                {
                    s: nn.Embedding.from_pretrained(
                        torch.as_tensor(pretrained[s], dtype=torch.float32),
                        freeze=cfg.training.freeze_pretrained_vocabulary,
                        padding_idx=PAD_TOKEN,
                    )
                    for s in self.species
                }
            )
            self.adapter1 = nn.Linear(cfg.dim_pretrained_vocab, cfg.dim_gene_embs)
        self.learnable = nn.ModuleDict(
            {
                s: nn.Embedding(n, cfg.dim_gene_embs, padding_idx=PAD_TOKEN)
                for s, n in vocab_sizes.items()
            }
        )
        if pretrained:  # a residual on top of the pretrained vectors starts at zero
            for emb in self.learnable.values():
                nn.init.zeros_(emb.weight)
        self.adapter2 = nn.Linear(cfg.dim_gene_embs, cfg.dim_model)
        self.norm = nn.LayerNorm(cfg.dim_model)

    def forward(self, tokens: torch.Tensor, species: str, add_learnable: bool) -> torch.Tensor:
        if self.pretrained is None:
            x = self.learnable[species](tokens)
        else:
            x = self.adapter1(self.pretrained[species](tokens))
            if add_learnable:
                x = x + self.learnable[species](tokens)
        return self.norm(self.adapter2(x))

    def untouched(self, species: str, add_learnable: bool) -> list[torch.Tensor]:
        """Tables this step does not use (DDP needs every parameter in the graph)."""
        out = [e.weight for s, e in self.learnable.items() if s != species]
        if self.pretrained is not None:
            out += [
                e.weight
                for s, e in self.pretrained.items()
                if s != species and e.weight.requires_grad
            ]
            if not add_learnable:
                out.append(self.learnable[species].weight)
        return out


class ContrastiveEncoder(nn.Module):
    """Cell encoder: genes + expression rank (or value) -> transformer -> L2-normalized CLS."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_sizes: dict[str, int],
        pretrained: dict[str, np.ndarray] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.genes = GeneEncoder(cfg, vocab_sizes, pretrained)
        self.cls_embedding = nn.Parameter(torch.zeros(cfg.dim_model))
        if cfg.input_encoding == "rank_encoding":
            self.register_buffer(
                "pe", sinusoid_table(cfg.pe_max_len, cfg.dim_model), persistent=False
            )
        else:
            self.value_encoder = nn.Sequential(
                nn.Linear(1, cfg.dim_model),
                nn.ReLU(),
                nn.Linear(cfg.dim_model, cfg.dim_model),
                nn.LayerNorm(cfg.dim_model),
                nn.Dropout(0.0),
            )
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.nlayers))
        self.projection = (
            nn.Linear(cfg.dim_model, cfg.projection_dim, bias=False) if cfg.projection_dim else None
        )
        self.decoder = None
        if cfg.decoder_head:
            d = cfg.dim_model
            self.decoder = nn.Sequential(
                nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1)
            )
        self.backend = "sdpa"

    def set_backend(self, device: torch.device) -> str:
        """Pick the attention backend for ``device`` (``model.flash_attention`` = prefer flash)."""
        self.backend = select_backend(device, self.cfg.flash_attention)
        for layer in self.layers:
            layer.self_attn.backend = self.backend
        return self.backend

    def forward(
        self,
        tokens: torch.Tensor,
        values: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        species: str,
        add_learnable: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed packed sequences.

        Parameters
        ----------
        tokens, values
            ``(T,)`` packed tokens (CLS first in each sequence) and their values.
        cu_seqlens, max_seqlen
            Sequence boundaries (S+1,) and the longest sequence.

        Returns
        -------
        embeddings
            ``(S, dim)`` L2-normalized CLS embeddings.
        hidden
            ``(T, d)`` last-layer token states (for the optional decoder head).
        """
        packing = Packing.from_cu_seqlens(cu_seqlens, max_seqlen, len(tokens))
        is_cls = (packing.pos == 0)[:, None]
        x = self.genes(tokens, species, add_learnable)  # (T, d)
        x = torch.where(is_cls, self.cls_embedding.to(x.dtype), x)
        if self.cfg.input_encoding == "rank_encoding":
            x = x + self.pe[packing.pos]  # rank in the cell's expression order
        else:
            v = torch.where(is_cls[:, 0], self.cfg.cls_value, values)
            x = x + self.value_encoder(v[:, None])
        for layer in self.layers:
            x = layer(x, packing)
        # keep unused per-species tables in the graph with zero weight (DDP-safe)
        idle = self.genes.untouched(species, add_learnable)
        if idle:
            x = x + sum(w.view(-1)[0] for w in idle) * 0.0
        cls = x[cu_seqlens[:-1].long()]  # (S, d)
        if self.projection is not None:
            cls = self.projection(cls)
        return F.normalize(cls, dim=-1), x

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token expression prediction (MLM head)."""
        return self.decoder(hidden).squeeze(-1)
