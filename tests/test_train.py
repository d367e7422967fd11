"""Training end to end on CPU: resume, DDP over gloo, and that the model learns."""

from __future__ import annotations

import csv
import os
import shutil
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import store_paths

from concept.config import load_config
from concept.train import train

TINY = [
    "model.dim_gene_embs=32",
    "model.dim_model=32",
    "model.num_head=2",
    "model.dim_hid=64",
    "model.nlayers=2",
    "model.dropout=0.0",
    "model.pe_max_len=257",
    "model.dim_pretrained_vocab=8",
    "model.training.accelerator=cpu",
    "model.training.warmup=10",
    "model.training.lr=3e-3",
    "model.training.validate_before_training=false",
    "datamodule.dataset.train.max_tokens=64",
    "datamodule.dataloader.train.batch_size=16",
    "datamodule.loader.block_size=8",
]
VAL_SMALL = [
    f"datamodule.dataloader.val.{n}.batch_size=32"
    for n in ("within_P200_B256", "within_P800_B256", "within_P6400_B256")
]


def _cfg(project: Path, *extra: str):
    return load_config(
        [
            f"PATH.PROJECT_PATH={project}",
            f"PATH.PRETRAINED_VOCABULARY={project}/references/embeddings/esm2_t30",
            *TINY,
            *VAL_SMALL,
            *extra,
        ]
    )


def _train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as fh:
        return {
            int(r["step"]): float(r["train/loss"])
            for r in csv.DictReader(fh)
            if r.get("train/loss")
        }


def test_missing_store_names_the_compile_command(synth_project, tmp_path):
    cfg = _cfg(synth_project, "model.training.max_steps=1")
    with pytest.raises(FileNotFoundError, match="python -m preprocess.compile PATH.PROJECT_PATH="):
        train(cfg)


def test_resume_equals_straight_run(compiled, tmp_path):
    """N steps straight == N/2 steps, then resume from latest/last.ckpt for N/2 (same losses)."""
    common = [
        "model.training.log_every_n_steps=1",
        "model.training.val_check_interval=1000",
        f"PATH.CHECKPOINT_ROOT={tmp_path}",
    ]
    train(_cfg(compiled, *common, "model.training.max_steps=8", "wandb.run_name=straight"))
    train(_cfg(compiled, *common, "model.training.max_steps=4", "wandb.run_name=half"))
    assert (tmp_path / "half" / "latest" / "last.ckpt").exists()
    resume = [
        "initialize.resume=true",
        "initialize.run_id=half",
        "initialize.checkpoint=latest/last.ckpt",
        "model.training.max_steps=8",
    ]
    train(_cfg(compiled, *common, *resume), overrides=resume)
    straight, resumed = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "half")
    assert sorted(straight) == list(range(8)) and sorted(resumed) == list(range(8))
    for step in range(8):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step


def test_model_learns_on_the_synthetic_project(compiled, tmp_path):
    """A tiny model trained 300 steps matches views far above chance (must fail if it cannot learn)."""
    metrics = train(
        _cfg(
            compiled,
            "model.training.max_steps=300",
            "model.training.val_check_interval=300",
            "model.training.log_every_n_steps=50",
            f"PATH.CHECKPOINT_ROOT={tmp_path}",
        )
    )
    chance = 1 / 32  # val batches of 32 cells
    recall = metrics["val/within_P800_B256/recall@1"]
    assert recall >= 5 * chance, metrics
    # 8 cell types: 0.125 by chance (300-step runs score 0.49-0.64, varying with batch make-up)
    assert metrics["val/within_P800_B256/knn_acc_cell_type"] > 3 / 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_setup(project: Path, rank: int = 0, world: int = 1):
    """The same tiny module (seeded) and loader for every rank and for the reference."""
    from concept.data.loader import TokenLoader
    from concept.data.views import ViewSpec, make_planner
    from concept.datamodule import read_mappings
    from concept.lit import ContrastiveModule

    cfg = _cfg(project)
    vocab = read_mappings(cfg)["hsapiens"].size
    torch.manual_seed(0)
    module = ContrastiveModule(ContrastiveModule.hparams_for(cfg.model, None), {"hsapiens": vocab})
    loader = TokenLoader(
        store_paths(project, "hs_"),
        batch_size=16,
        block_size=4,
        rank=rank,
        world_size=world,
        plan_views=make_planner(ViewSpec(max_tokens=32), vocab),
    )
    return module, loader


def _global_loss(net, batch):
    from concept import losses
    from concept.data.views import build_views
    from concept.lit import gather

    views = build_views(batch.to("cpu"))
    z, _ = net(views.tokens, views.values, views.cu_seqlens, views.max_seqlen, "hsapiens")
    z1, z2 = gather(z[: views.n_cells]), gather(z[views.n_cells :])
    return losses.clip_loss(z1, z2, torch.tensor(20.0))[0], len(z1)


def _ddp_worker(rank: int, world: int, port: int, project: str, out: str) -> None:
    """One rank: a few optimizer steps on its slice, recording what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    module, loader = _tiny_setup(Path(project), rank, world)
    ddp = torch.nn.parallel.DistributedDataParallel(module.net)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    record = []
    for i, batch in enumerate(loader):
        if i == 3:
            break
        loss, n = _global_loss(ddp, batch)
        opt.zero_grad()
        loss.backward()
        if i == 0:  # averaged over ranks, before the first optimizer step
            grads = {k: p.grad.clone() for k, p in ddp.module.named_parameters()}
            torch.save(grads, f"{out}/rank{rank}_grads.pt")
        opt.step()
        record.append(
            (batch.rows.tolist(), [g.tolist() for g in batch.views.gene_sets], n, float(loss))
        )
    weights = ddp.module.layers[0].linear1.weight.detach().numpy()
    np.save(f"{out}/rank{rank}_w.npy", weights)
    torch.save(record, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_ddp_over_gloo(compiled, tmp_path):
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, _free_port(), str(compiled), str(tmp_path)), nprocs=2
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(r0) == len(r1) == 3
    for (rows0, sets0, n0, loss0), (rows1, sets1, n1, loss1) in zip(r0, r1, strict=True):
        assert len(rows0) == len(rows1) == 8 and not set(rows0) & set(rows1)  # disjoint halves
        assert sets0 == sets1  # the same panels on both ranks
        assert n0 == n1 == 16  # negatives gathered from both ranks (8 cells each)
        assert loss0 == pytest.approx(loss1, rel=1e-5)  # one global loss
    w0, w1 = np.load(tmp_path / "rank0_w.npy"), np.load(tmp_path / "rank1_w.npy")
    assert np.array_equal(w0, w1)  # gradients averaged: replicas stay identical

    # one process, the same weights, the whole global batch: the same loss and gradients
    module, loader = _tiny_setup(compiled)
    batch = next(iter(loader))
    assert sorted(batch.rows.tolist()) == sorted(r0[0][0] + r1[0][0])
    loss, n = _global_loss(module.net, batch)
    loss.backward()
    assert n == 16 and loss.item() == pytest.approx(r0[0][3], rel=1e-5)
    ddp_grads = torch.load(tmp_path / "rank0_grads.pt")
    checked = 0
    for name, p in module.net.named_parameters():
        if p.grad is None:
            continue
        want = p.grad
        assert torch.allclose(ddp_grads[name], want, rtol=1e-4, atol=1e-6), name
        checked += want.abs().sum() > 0
    assert checked >= 10  # real, nonzero gradients were compared


def _ddp_train_worker(rank: int, world: int, port: int, project: str, root: str) -> None:
    """``train()`` on one of two ranks, each proposing its own run id."""
    import concept.train as train_module

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world),
    )
    train_module.new_run_id = lambda: f"proposed-by-rank{rank}"  # as if started seconds apart
    cfg = _cfg(
        Path(project),
        "model.training.devices=2",
        "model.training.max_steps=2",
        "model.training.log_every_n_steps=1",
        "model.training.val_check_interval=1000",
        f"PATH.CHECKPOINT_ROOT={root}",
    )
    train(cfg)


def test_ddp_training_writes_one_run_folder(compiled, tmp_path):
    """Two ranks through ``train()``: one run folder (rank 0's id), one metrics.csv."""
    root = tmp_path / "runs"
    torch.multiprocessing.spawn(
        _ddp_train_worker, args=(2, _free_port(), str(compiled), str(root)), nprocs=2
    )
    assert sorted(p.name for p in root.iterdir()) == ["proposed-by-rank0"]
    run = root / "proposed-by-rank0"
    assert sorted(p.name for p in run.rglob("metrics.csv")) == ["metrics.csv"]
    assert sorted(_train_losses(run)) == [0, 1]  # one row per step: one writer
    assert (run / "config.yaml").is_file() and (run / "latest" / "last.ckpt").exists()


def test_cli_trains_and_writes_the_run_folder(compiled, tmp_path):
    import subprocess
    import sys

    project = tmp_path / "p"
    shutil.copytree(compiled, project, ignore=shutil.ignore_patterns(".lamin"))
    cmd = [
        sys.executable,
        "-m",
        "concept.train",
        f"PATH.PROJECT_PATH={project}",
        f"PATH.PRETRAINED_VOCABULARY={project}/references/embeddings/esm2_t30",
        *TINY,
        *VAL_SMALL,
        "model.training.max_steps=3",
        "model.training.val_check_interval=3",
        "wandb.run_name=cli",
    ]
    done = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run = project / "model_checkpoints" / "cli"
    assert (run / "config.yaml").exists() and (run / "metrics.csv").exists()
    assert (run / "latest" / "last.ckpt").exists()
    assert "val/within_P800_B256/recall@1" in done.stdout
    # the saved config is a complete, valid config
    from omegaconf import OmegaConf

    from concept.config import validate

    saved = validate(OmegaConf.load(run / "config.yaml"))
    assert saved.model.nlayers == 2 and str(project) == saved.PATH.PROJECT_PATH


def test_create_new_run_loads_weights_only(compiled, tmp_path):
    """initialize.create_new_run: the old run's weights, a new run folder, step 0."""
    common = [
        "model.training.log_every_n_steps=1",
        "model.training.val_check_interval=1000",
        f"PATH.CHECKPOINT_ROOT={tmp_path}",
    ]
    train(_cfg(compiled, *common, "model.training.max_steps=3", "wandb.run_name=old"))
    new = [
        "initialize.resume=true",
        "initialize.run_id=old",
        "initialize.checkpoint=latest/last.ckpt",
        "initialize.create_new_run=true",
        "wandb.run_name=new",
        "model.training.max_steps=2",
        "model.training.lr=0.0",  # no update: the new run's first loss shows the loaded weights
    ]
    train(_cfg(compiled, *common, *new), overrides=new)
    old_state = torch.load(tmp_path / "old" / "latest" / "last.ckpt", weights_only=False)[
        "state_dict"
    ]
    new_state = torch.load(tmp_path / "new" / "latest" / "last.ckpt", weights_only=False)[
        "state_dict"
    ]
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)  # weights carried over
    assert sorted(_train_losses(tmp_path / "new")) == [0, 1]  # a fresh run: steps from 0


def test_mlm_loss_is_the_masked_mean_squared_error(compiled):
    """value_encoding + decoder head: loss = contrastive + weight * MSE on masked values."""
    from concept.data.loader import TokenLoader
    from concept.data.views import ViewSpec, build_views, make_planner
    from concept.datamodule import read_mappings
    from concept.lit import ContrastiveModule

    cfg = _cfg(
        compiled,
        "model.input_encoding=value_encoding",
        "model.decoder_head=true",
        "model.mlm_loss_weight=0.5",
        "model.training.masking_rate=0.3",
        "PATH.PRETRAINED_VOCABULARY=null",
    )
    vocab = read_mappings(cfg)["hsapiens"].size
    loader = TokenLoader(
        store_paths(compiled, "hs_"), 16, 8, plan_views=make_planner(ViewSpec(max_tokens=32), vocab)
    )
    batch = next(iter(loader)).to("cpu")
    module = ContrastiveModule(
        ContrastiveModule.hparams_for(cfg.model, None), {"hsapiens": vocab}
    ).train()
    torch.manual_seed(3)
    out, _ = module._step(batch, validating=False)
    torch.manual_seed(3)  # the same masking draw, recomputed by hand
    views = build_views(batch)
    _, _, hidden, masked = module.embed_views(views, "hsapiens", False)
    pred = module.net.decode(hidden)
    want = ((pred[masked] - views.values[masked]) ** 2).mean()
    assert masked.any() and not masked[views.tokens == 0].any()  # CLS is never masked
    assert out["loss_mlm"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(
        out["loss_cont"].item() + 0.5 * want.item(), rel=1e-5
    )


def test_training_needs_only_the_stores(synth_project, tmp_path):
    """Stores compiled with non-default settings train under the default config; a source
    that changed is refused with a command carrying those settings; without any source
    h5ad, training runs."""
    from conftest import config

    from concept.datamodule import StaleStoreError
    from preprocess.compile import run

    project = tmp_path / "p"
    shutil.copytree(synth_project, project)
    assert run(config(project, "compile.value_dtype=float32", "compile.workers=1")) == 0
    common = [
        "model.training.max_steps=1",
        "model.training.log_every_n_steps=1",
        f"PATH.CHECKPOINT_ROOT={tmp_path / 'runs'}",
    ]
    source = project / "data" / "synth_cxg" / "h5ads" / "hs_csr_a.h5ad"
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleStoreError) as err:
        train(_cfg(project, *common, "wandb.run_name=stale"))
    msg = str(err.value)
    assert f"the source {source} changed since it was compiled" in msg
    assert f"run: python -m preprocess.compile PATH.PROJECT_PATH={project} " in msg
    assert "compile.value_dtype=float32" in msg and "hs_raw_b" not in msg  # only that store
    shutil.rmtree(project / "data")  # only the compiled stores reach the GPU nodes
    train(_cfg(project, *common, "wandb.run_name=no_sources"))
    assert sorted(_train_losses(tmp_path / "runs" / "no_sources")) == [0]


def synthetic_batch(n_cells: int, vocab: int, max_genes: int, seed: int = 0):
    """A planned packed batch without any store (for machines without the compiler)."""
    from concept.data.batch import PackedBatch
    from concept.data.views import ViewSpec, plan_views

    rng = np.random.default_rng(seed)
    counts = rng.integers(max_genes // 2, max_genes, n_cells)
    tokens = np.concatenate(
        [np.sort(rng.choice(np.arange(2, vocab), c, replace=False)) for c in counts]
    )
    values = rng.integers(1, 50, len(tokens)).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    batch = PackedBatch(
        tokens=torch.from_numpy(tokens.astype(np.int32)),
        values=torch.from_numpy(values),
        cu_seqlens=torch.from_numpy(cu),
        total_counts=torch.from_numpy(np.add.reduceat(values, cu[:-1]).astype(np.float32)),
        rows=torch.arange(n_cells),
        store_index=torch.zeros(n_cells, dtype=torch.int32),
        obs={},
        var_tokens=torch.arange(2, vocab, dtype=torch.int32),
        species="hsapiens",
    )
    batch.views = plan_views(batch, ViewSpec(max_tokens=max_genes, panel_size_min=0.5), vocab)
    return batch


class Batches:
    """A fixed list of batches as a loader (Lightning takes a bare list for many loaders)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _SyncGuard(L.Callback):
    """Errors on any host-device sync during training step ``batch_idx == 1``: forward,
    loss, logging, backward, clipping, optimizer and scheduler steps, every callback."""

    ran = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            torch.cuda.set_sync_debug_mode("default")
            self.ran = True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_never_syncs_with_the_host(tmp_path):
    from concept.lit import ContrastiveModule
    from concept.train import build_trainer

    cfg = load_config(
        [
            f"PATH.PROJECT_PATH={tmp_path}",
            *[o for o in TINY if "accelerator" not in o],
            "model.training.accelerator=gpu",
            "model.training.devices=1",
            "model.training.max_steps=3",
            "model.training.log_every_n_steps=100",  # step 1 is not a logging step
        ]
    )
    vocab = 500
    module = ContrastiveModule(ContrastiveModule.hparams_for(cfg.model, None), {"hsapiens": vocab})
    trainer = build_trainer(cfg, "sync")
    guard = _SyncGuard()
    trainer.callbacks.append(guard)
    batches = [synthetic_batch(16, vocab, 48, seed=i) for i in range(3)]
    try:
        trainer.fit(module, train_dataloaders=Batches(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.ran and trainer.global_step == 3


def test_fresh_training_restores_weights_and_optimizer_but_not_the_step(compiled, tmp_path):
    common = [
        "model.training.log_every_n_steps=1",
        "model.training.val_check_interval=1000",
        "model.training.max_steps=3",
        f"PATH.CHECKPOINT_ROOT={tmp_path}",
    ]
    train(_cfg(compiled, *common, "wandb.run_name=run"))
    old = torch.load(tmp_path / "run" / "latest" / "last.ckpt", weights_only=False)
    again = [
        "initialize.resume=true",
        "initialize.run_id=run",
        "initialize.checkpoint=latest/last.ckpt",
        "initialize.fresh_training=true",
    ]
    train(_cfg(compiled, *common, *again), overrides=again)  # a plain resume: no step left
    new = torch.load(tmp_path / "run" / "latest" / "last.ckpt", weights_only=False)
    assert old["global_step"] == new["global_step"] == 3  # 3 steps again, from step 0
    steps = {int(s["step"]) for s in new["optimizer_states"][0]["state"].values()}
    assert steps == {6}  # Adam's state continued from the checkpoint: 3 + 3 updates
    assert new["lr_schedulers"][0]["last_epoch"] == 3  # the schedule restarted too
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 0, 1, 2]  # the same batches again ...
    first, again_first = float(rows[0]["train/loss"]), float(rows[3]["train/loss"])
    assert again_first < first  # ... seen by the trained weights, not a new seeded init
    with pytest.raises(ValueError, match="initialize.fresh_training=true restarts"):
        train(_cfg(compiled, *common, "initialize.fresh_training=true"))


def test_local_dir_copies_the_stores_and_trains_from_the_copies(compiled, tmp_path, monkeypatch):
    """PATH.LOCAL_DIR: stores copied (incrementally, never partially) and read from there."""
    import concept.datamodule as dm

    opened = []

    class Recording(dm.TokenLoader):
        def __init__(self, paths, *args, **kwargs):
            opened.extend(paths)
            super().__init__(paths, *args, **kwargs)

    monkeypatch.setattr(dm, "TokenLoader", Recording)
    project = tmp_path / "p"
    shutil.copytree(compiled, project, ignore=shutil.ignore_patterns(".lamin"))
    local = tmp_path / "local"
    common = [
        "model.training.max_steps=1",
        f"PATH.CHECKPOINT_ROOT={tmp_path / 'runs'}",
        f"PATH.LOCAL_DIR={local}",
    ]
    train(_cfg(project, *common))
    human = sorted(p.name for p in (project / "compiled" / "synth_cxg").glob("hs_*.zarr"))
    assert sorted(p.name for p in (local / "synth_cxg").iterdir()) == human  # no temp left
    assert opened and all(p.parent == local / "synth_cxg" for p in opened)
    assert all(
        sorted(f.relative_to(p) for f in p.rglob("*"))
        == sorted(f.relative_to(q) for f in q.rglob("*"))
        for p, q in (
            (local / "synth_cxg" / n, project / "compiled" / "synth_cxg" / n) for n in human
        )
    )
    marker = local / "synth_cxg" / human[0] / "kept"
    marker.write_text("a current copy is not copied again")
    stale = local / "synth_cxg" / human[1]
    (stale / "zarr.json").write_text("{}")  # a copy that no longer matches its store
    (stale / "extra").write_text("gone after the recopy")
    train(_cfg(project, *common))
    assert marker.is_file() and not (stale / "extra").exists()
    assert (stale / "zarr.json").read_bytes() == (
        project / "compiled" / "synth_cxg" / human[1] / "zarr.json"
    ).read_bytes()


def test_shuffle_and_drop_last_must_be_true(compiled):
    for key in ("train.shuffle", "val.within_P200_B256.drop_last"):
        with pytest.raises(ValueError, match=f"datamodule.dataloader.{key}=False: must be true"):
            train(_cfg(compiled, f"datamodule.dataloader.{key}=false"))


def test_precomputed_embeddings_replace_view_2(synth_project, tmp_path):
    """datamodule.precomp_embs_key: obsm[key] compiled per cell, delivered per cell, and the
    loss is InfoNCE on s / (‖z1ᵢ − eⱼ‖ + 1e-4), against a direct computation."""
    import anndata
    import h5py
    from anndata.io import write_elem
    from conftest import config

    from concept.data.loader import TokenLoader
    from concept.data.views import ViewSpec, build_views, make_planner
    from concept.datamodule import StaleStoreError, read_mappings
    from concept.lit import ContrastiveModule
    from preprocess.compile import run

    project = tmp_path / "p"
    shutil.copytree(synth_project, project)
    rng = np.random.default_rng(0)
    emb = {}
    for path in sorted((project / "data" / "synth_cxg" / "h5ads").glob("hs_*.h5ad")):
        with h5py.File(path, "a") as f:
            n = len(f["obs"][f["obs"].attrs["_index"]])
            emb[path.stem] = rng.normal(size=(n, 32)).astype(np.float32)
            write_elem(f["obsm"], "X_pre", emb[path.stem])
        assert anndata.read_h5ad(path).obsm["X_pre"].shape == (n, 32)
    key = ["datamodule.precomp_embs_key=X_pre"]
    assert run(config(project, *key, "compile.workers=1")) == 0
    cfg = _cfg(project, *key, "PATH.PRETRAINED_VOCABULARY=null")
    vocab = read_mappings(cfg)["hsapiens"].size
    stores = store_paths(project, "hs_")
    loader = TokenLoader(
        stores,
        16,
        8,
        plan_views=make_planner(ViewSpec(max_tokens=32), vocab),
        embeddings_key="X_pre",
    )
    batch = next(iter(loader))
    stem = stores[int(batch.store_index[0])].stem
    assert np.array_equal(batch.embeddings.numpy(), emb[stem][batch.rows.numpy()])
    module = ContrastiveModule(ContrastiveModule.hparams_for(cfg.model, None), {"hsapiens": vocab})
    module.eval()
    out, _ = module._step(batch.to("cpu"), validating=True)
    z1, _, _, _ = module.embed_views(build_views(batch), "hsapiens", False)
    z1, e = z1.detach().double().numpy(), batch.embeddings.double().numpy()
    s = float(module.logit_scale.exp())
    dist = np.array([[np.sqrt(((z1[i] - e[j]) ** 2).sum()) for j in range(16)] for i in range(16)])
    logits = s / (dist + 1e-4)

    def ce(m):  # mean cross-entropy, targets on the diagonal
        return float(np.mean(np.log(np.exp(m).sum(1)) - np.diag(m)))

    want = 0.5 * (ce(logits) + ce(logits.T))
    assert out["loss_cont"].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(StaleStoreError, match="has no obsm/X_other") as err:
        train(_cfg(project, "datamodule.precomp_embs_key=X_other"))
    assert "datamodule.precomp_embs_key=X_other" in str(err.value)
    common = ["model.training.max_steps=2", "model.training.log_every_n_steps=1"]
    train(_cfg(project, *key, *common, f"PATH.CHECKPOINT_ROOT={tmp_path / 'runs'}"))
