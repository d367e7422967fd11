"""The MFU formula against a hand count, and the CSV log's single writer."""

from __future__ import annotations

import numpy as np
import pytest

from concept.callbacks import CSVLog, non_embedding_params, step_flops
from concept.config import ModelConfig, TrainingConfig
from concept.model.network import ContrastiveEncoder


def test_step_flops_match_a_hand_count():
    g, d, h, p, layers, vocab = 6, 8, 16, 4, 2, 10
    cfg = ModelConfig(
        dim_gene_embs=g,
        dim_model=d,
        num_head=2,
        dim_hid=h,
        nlayers=layers,
        dim_pretrained_vocab=p,
        pe_max_len=16,
        training=TrainingConfig(),
    )
    pretrained = {"hsapiens": np.ones((vocab, p), np.float32)}
    net = ContrastiveEncoder(cfg, {"hsapiens": vocab}, pretrained)
    per_layer = (
        (d * 3 * d + 3 * d)  # Wqkv
        + (d * d + d)  # out_proj
        + (d * h + h)  # linear1
        + (h * d + d)  # linear2
        + 2 * 2 * d  # norm1, norm2
    )
    genes = (p * g + g) + (g * d + d) + 2 * d  # adapter1, adapter2, norm
    n = layers * per_layer + genes  # tables (learnable, pretrained) and CLS not counted
    assert non_embedding_params(net) == n
    assert sum(q.numel() for q in net.parameters()) == n + vocab * g + vocab * p + d
    seqlens = np.array([3, 5, 1])
    want = 6 * n * 9 + 12 * layers * d * (9 + 25 + 1)  # Σs = 9, Σs² = 35
    assert step_flops(n, layers, d, seqlens) == pytest.approx(want, rel=1e-12)


def test_csv_log_writes_on_rank_zero_only(tmp_path, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    log = CSVLog(tmp_path / "metrics.csv")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    log.log_metrics({"a": 1.0}, step=0)
    assert not (tmp_path / "metrics.csv").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    log.log_metrics({"a": 2.0}, step=1)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,a", "1,2.0"]
