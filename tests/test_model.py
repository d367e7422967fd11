"""Attention backends, the encoder and the losses against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from concept import losses
from concept.config import ModelConfig, TrainingConfig
from concept.model.attention import Packing, select_backend, varlen_attention
from concept.model.network import ContrastiveEncoder

CUDA = torch.cuda.is_available()


def _packed(lengths, heads=2, dim=8, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, heads, dim, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device
    )
    return q, k, v, Packing.from_cu_seqlens(cu, max(lengths), t)


def _reference(q, k, v, cu):
    """Exact attention, one sequence at a time."""
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1).double() for x in (q, k, v))  # (H, L, D)
        att = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out.append((att @ vs).transpose(0, 1))
    return torch.cat(out).to(q.dtype)


def test_sdpa_backend_equals_per_sequence_attention():
    q, k, v, packing = _packed([5, 1, 9, 3])
    out = varlen_attention(q, k, v, packing, backend="sdpa")
    assert torch.allclose(out, _reference(q, k, v, packing.cu_seqlens), atol=1e-5)


def test_cpu_falls_back_to_sdpa_without_flash():
    assert select_backend(torch.device("cpu")) == "sdpa"
    assert select_backend(torch.device("cpu"), prefer_flash=True) == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_backends_equal_per_sequence_attention(backend):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    q, k, v, packing = _packed(
        [37, 1, 300, 64], heads=4, dim=64, device="cuda", dtype=torch.bfloat16
    )
    out = varlen_attention(q, k, v, packing, backend=backend).float()
    ref = _reference(q.float(), k.float(), v.float(), packing.cu_seqlens)
    assert torch.allclose(out, ref, atol=2e-2)


def _tiny(**kw) -> ModelConfig:
    base = dict(
        dim_gene_embs=16,
        dim_model=16,
        num_head=2,
        dim_hid=32,
        nlayers=2,
        dropout=0.0,
        pe_max_len=64,
    )
    return ModelConfig(**{**base, **kw}, training=TrainingConfig())


def test_parameter_names_do_not_depend_on_the_backend():
    a = ContrastiveEncoder(_tiny(), {"hsapiens": 50})
    b = ContrastiveEncoder(_tiny(flash_attention=False), {"hsapiens": 50})
    for layer in b.layers:
        layer.self_attn.backend = "flash_attn"
    assert list(a.state_dict()) == list(b.state_dict())
    assert "layers.0.self_attn.Wqkv.weight" in a.state_dict()  # flash-attn's MHA names


def test_packed_encoder_equals_one_sequence_at_a_time():
    """Packing many sequences gives each the embedding it gets alone (no cross-talk)."""
    torch.manual_seed(0)
    net = ContrastiveEncoder(_tiny(), {"hsapiens": 50}).eval()
    seqs = [torch.tensor([0, 5, 9, 2]), torch.tensor([0, 7]), torch.tensor([0, 3, 4, 5, 6, 7, 8])]
    tokens = torch.cat(seqs)
    cu = torch.tensor([0, 4, 6, 13], dtype=torch.int32)
    z, _ = net(tokens, torch.ones(len(tokens)), cu, 7, "hsapiens")
    for i, s in enumerate(seqs):
        alone, _ = net(
            s, torch.ones(len(s)), torch.tensor([0, len(s)], dtype=torch.int32), len(s), "hsapiens"
        )
        assert torch.allclose(z[i], alone[0], atol=1e-5)
    assert torch.allclose(z.norm(dim=1), torch.ones(3))


def test_value_encoding_and_projection():
    net = ContrastiveEncoder(
        _tiny(input_encoding="value_encoding", projection_dim=8), {"hsapiens": 50}
    ).eval()
    tokens = torch.tensor([0, 5, 9, 0, 5, 9])
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    z, _ = net(tokens, torch.tensor([0.0, 3.0, 1.0, 0.0, 1.0, 3.0]), cu, 3, "hsapiens")
    assert z.shape == (2, 8)
    assert not torch.allclose(z[0], z[1])  # same genes, other values: other embedding


def _embeddings(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(
        torch.randn(n, d, generator=g), dim=1
    )


def test_clip_loss_equals_a_direct_computation():
    z1, z2 = _embeddings()
    s = 20.0
    loss, _ = losses.clip_loss(z1, z2, torch.tensor(s))
    total = 0.0
    for i in range(6):
        row = [s * float(z1[i] @ z2[j]) for j in range(6)]
        col = [s * float(z1[j] @ z2[i]) for j in range(6)]
        total += 0.5 * (-row[i] + math.log(sum(map(math.exp, row))))
        total += 0.5 * (-col[i] + math.log(sum(map(math.exp, col))))
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)


def test_combined_loss_excludes_self_pairs():
    z1, z2 = _embeddings()
    s = 10.0
    loss, _ = losses.combined_loss(z1, z2, torch.tensor(s))
    rows, cols = torch.cat([z1, z2]), torch.cat([z2, z1])
    total = 0.0
    for i in range(12):
        self_col = (i + 6) % 12  # cols[self_col] is rows[i] itself
        logits = [s * float(rows[i] @ cols[j]) for j in range(12) if j != self_col]
        pos = s * float(rows[i] @ cols[i])
        total += -pos + math.log(sum(map(math.exp, logits)))
    assert loss.item() == pytest.approx(total / 12, rel=1e-5)


def test_masked_cells_are_neither_anchors_nor_negatives():
    z1, z2 = _embeddings(8)
    mask = torch.tensor([True] * 5 + [False] * 3)
    masked, _ = losses.clip_loss(z1, z2, torch.tensor(5.0), mask)
    kept, _ = losses.clip_loss(z1[:5], z2[:5], torch.tensor(5.0))
    assert masked.item() == pytest.approx(kept.item(), rel=1e-5)


def test_recall_knn_and_mixing_on_known_embeddings():
    eye = torch.eye(4)
    logits = eye * 10
    assert losses.recall_at_k(logits, 1).item() == 1.0
    shifted = torch.roll(eye, 1, dims=1) * 10
    assert losses.recall_at_k(shifted, 1).item() == 0.0
    assert losses.recall_at_k(shifted + eye * 5, 2).item() == 1.0  # the diagonal ranks 2nd
    # two tight clusters, labelled by cluster: kNN is perfect
    centers = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), dim=1)
    labels = torch.tensor([0] * 6 + [1] * 6)
    z = F.normalize(centers[labels] + 0.01 * torch.randn(12, 3), dim=1)
    assert losses.knn_accuracy(z, z.clone(), labels).item() == 1.0
    assert losses.views_mixing_score(z, z.clone(), 1).item() == 1.0  # nearest: its twin view
    assert losses.views_mixing_score(z, -z, 1).item() == 0.0  # views apart: no mixing
