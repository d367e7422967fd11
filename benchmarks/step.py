"""Training-step throughput: packed (varlen) attention against padding, same batches.

Both paths run the same weights on the same two-view batches, forward + backward +
AdamW step, and report cells/s, real tokens/s and (on a GPU) model FLOPs utilization:

* ``varlen``: this project's path, every token packed, attention by ``cu_seqlens``
  (flash-attn varlen, PyTorch varlen, or SDPA on CPU);
* ``padded``: the reference's layout, every sequence padded to the batch's longest,
  feed-forward on all padded positions and SDPA with a key-padding mask.

Then the loader's share of a step (steps fed by the real loader and views against steps
on batches already on the device) and the embedding rate (inference, no grad).

MFU counts the model's FLOPs (``concept.callbacks.step_flops``: 6 x non-embedding
parameters x real tokens + 12 L d Σ sᵢ²) for both paths.

Batches come from compiled stores (``--stores``, e.g. ``projects/demo/compiled``) through
the real loader and views, with the reference's training view settings; the default
model is the reference's 30M configuration (8 layers, d=512, 8 heads, views of <= 1,000
genes) on a GPU and a small one on CPU (``--small`` forces it).

    python benchmarks/step.py --stores projects/demo/compiled --json benchmarks/out/step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from concept.callbacks import non_embedding_params, peak_flops, step_flops
from concept.config import ModelConfig, TrainingConfig
from concept.data.loader import TokenLoader
from concept.data.views import Views, ViewSpec, build_views, make_planner
from concept.model.network import ContrastiveEncoder
from concept.vocab import PAD_TOKEN


def padded_forward(net: ContrastiveEncoder, views: Views) -> torch.Tensor:
    """The same encoder on padded (S, L) sequences with a key-padding mask."""
    cu = views.cu_seqlens.long()
    n_seq, length = len(cu) - 1, views.max_seqlen
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(length, device=cu.device)
    valid = pos[None, :] < lengths[:, None]  # (S, L)
    index = (cu[:-1, None] + pos[None, :]).clamp(max=len(views.tokens) - 1)
    tokens = torch.where(valid, views.tokens[index], PAD_TOKEN)
    x = net.genes(tokens, "hsapiens", False)  # (S, L, d)
    x = torch.where((pos == 0)[None, :, None], net.cls_embedding.to(x.dtype), x)
    x = x + net.pe[:length]
    mask = valid[:, None, None, :]
    for layer in net.layers:
        att = layer.self_attn
        h = layer.norm1(x)
        qkv = att.Wqkv(h).view(n_seq, length, 3, att.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        x = x + att.out_proj(out.transpose(1, 2).reshape(n_seq, length, -1))
        x = x + layer._ff(layer.norm2(x))
    return F.normalize(x[:, 0], dim=-1)


def view_loss(z: torch.Tensor, n: int) -> torch.Tensor:
    """Symmetric CLIP loss between the two views' embeddings (z: 2n x d, view 1 first)."""
    logits = 20.0 * z[:n].float() @ z[n:].float().T
    target = torch.arange(n, device=z.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def model_config(small: bool) -> ModelConfig:
    if small:
        return ModelConfig(
            dim_gene_embs=128,
            dim_model=128,
            num_head=4,
            dim_hid=256,
            nlayers=2,
            dropout=0.0,
            training=TrainingConfig(),
        )
    return ModelConfig(dropout=0.0, training=TrainingConfig())


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    cfg = model_config(small)
    stores = sorted(Path(args.stores).rglob("*.zarr"))
    stores = [s for s in stores if "hs_" in s.name] or stores
    spec = ViewSpec(max_tokens=args.max_tokens, panel_selection="random", seed=0)
    probe = TokenLoader(stores, batch_size=args.batch_size)
    vocab = 1 + max(int(probe.readers[i].var_tokens.max()) for i in range(len(stores)))
    loader = TokenLoader(
        stores, batch_size=args.batch_size, block_size=32, plan_views=make_planner(spec, vocab)
    )
    batches = []
    for epoch in range(100):
        loader.set_epoch(epoch)
        for b in loader:
            batches.append(b)
            if len(batches) == args.steps + args.warmup:
                break
        if len(batches) == args.steps + args.warmup:
            break
    net = ContrastiveEncoder(cfg, {"hsapiens": vocab}).to(device)
    backend = net.set_backend(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    n_params = non_embedding_params(net)
    peak = peak_flops(device)
    results = []
    for name in ("varlen", "padded"):
        cells = tokens = padded_tokens = 0
        flops = 0.0
        elapsed = 0.0
        for i, b in enumerate(batches):
            b = b.to(device)
            views = build_views(b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with _autocast(device):
                if name == "varlen":
                    z, _ = net(
                        views.tokens, views.values, views.cu_seqlens, views.max_seqlen, "hsapiens"
                    )
                else:
                    z = padded_forward(net, views)
                loss = view_loss(z, views.n_cells)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i < args.warmup:
                continue
            elapsed += time.perf_counter() - t0
            real = len(views.tokens)
            lengths = (views.cu_seqlens[1:] - views.cu_seqlens[:-1]).cpu().numpy()
            cells += views.n_cells
            tokens += real
            padded_tokens += 2 * views.n_cells * views.max_seqlen
            # the model's FLOPs (real tokens only), for both paths: MFU counts useful work
            flops += step_flops(n_params, cfg.nlayers, cfg.dim_model, lengths)
        row = {
            "name": name,
            "cells_per_s": cells / elapsed,
            "tokens_per_s": tokens / elapsed,
            "padding_free_fraction": tokens / max(padded_tokens, 1),
            "seconds": elapsed,
            "mfu": flops / elapsed / peak if peak else None,
        }
        results.append(row)
    extra = {
        "loader": loader_share(args, device, cfg, stores, vocab),
        "embedding": embed_rate(args, device, cfg, batches, vocab),
    }
    return {
        **extra,
        "machine": {
            "device": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "attention_backend": backend,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "model": "reference 30M (8x512, 8 heads)" if not small else "small (2x128, 4 heads)",
            "batch_size": args.batch_size,
            "max_tokens": args.max_tokens,
            "steps": args.steps,
        },
        "results": results,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_share(args, device: torch.device, cfg: ModelConfig, stores, vocab: int) -> dict:
    """Training steps fed by the real loader (read, plan views, pin, copy, gather views)
    against the same number of steps on batches already on the device."""
    spec = ViewSpec(max_tokens=args.max_tokens, panel_selection="random", seed=1)
    loader = TokenLoader(
        stores, batch_size=args.batch_size, block_size=32, plan_views=make_planner(spec, vocab)
    )
    net = ContrastiveEncoder(cfg, {"hsapiens": vocab}).to(device)
    net.set_backend(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    n_steps = args.steps

    def step(b) -> None:
        views = build_views(b)
        with _autocast(device):
            z, _ = net(views.tokens, views.values, views.cu_seqlens, views.max_seqlen, "hsapiens")
            loss = view_loss(z, views.n_cells)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()
    resident = [next(it).to(device) for _ in range(min(n_steps, 8))]
    for b in resident[: args.warmup]:
        step(b)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n_steps):
        step(resident[i % len(resident)])
    _sync(device)
    on_device = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step(next(it).to(device))
    _sync(device)
    real = time.perf_counter() - t0
    cells = n_steps * args.batch_size
    return {
        "steps": n_steps,
        "real_loader_cells_per_s": cells / real,
        "on_device_cells_per_s": cells / on_device,
        "loader_share": max(0.0, 1 - on_device / real),
    }


def embed_rate(args, device: torch.device, cfg: ModelConfig, batches, vocab: int) -> dict:
    """Inference (no grad, bf16 on GPU): CLS embeddings of the planned sequences per second."""
    net = ContrastiveEncoder(cfg, {"hsapiens": vocab}).to(device).eval()
    net.set_backend(device)
    views = [build_views(b.to(device)) for b in batches]
    seqs = 0
    with torch.no_grad(), _autocast(device):
        for v in views[: args.warmup]:
            net(v.tokens, v.values, v.cu_seqlens, v.max_seqlen, "hsapiens")
        _sync(device)
        t0 = time.perf_counter()
        for v in views[args.warmup :]:
            net(v.tokens, v.values, v.cu_seqlens, v.max_seqlen, "hsapiens")
            seqs += 2 * v.n_cells
        _sync(device)
    return {"sequences_per_s": seqs / (time.perf_counter() - t0), "sequences": seqs}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stores", default="projects/demo/compiled", help="folder with compiled stores")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--small", action="store_true", help="small model even on a GPU")
    p.add_argument("--json", default="benchmarks/out/step.json")
    args = p.parse_args()
    out = run(args)
    m = out["machine"]
    print(
        f"{m['device']} | {m['model']} | attention: {m['attention_backend']} | batch {m['batch_size']}"
    )
    print(f"{'path':<8} {'cells/s':>10} {'tokens/s':>12} {'real/padded':>12} {'MFU':>7}")
    for r in out["results"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{r['name']:<8} {r['cells_per_s']:>10.1f} {r['tokens_per_s']:>12.0f} {r['padding_free_fraction']:>12.2f} {mfu:>7}"
        )
    v, p_ = out["results"]
    print(f"varlen / padded: {v['cells_per_s'] / p_['cells_per_s']:.2f}x")
    ld = out["loader"]
    print(
        f"real loader {ld['real_loader_cells_per_s']:.1f} cells/s, batch on device "
        f"{ld['on_device_cells_per_s']:.1f} cells/s: loader share {ld['loader_share']:.1%}"
    )
    print(f"embedding (inference): {out['embedding']['sequences_per_s']:.1f} sequences/s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
