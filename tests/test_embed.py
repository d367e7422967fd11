"""Inference: one embedding per cell, whatever the file's layout, read exactly as compiled."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import store_paths

from concept.config import ConfigError, load_config, validate_schema
from concept.embed import EmbedConfig, write_embedding
from concept.inference import Embedder, infer_species, length_batches
from concept.pretrained import load, resolve
from concept.store import open_store
from concept.vocab import InputError

TINY = [
    "datamodule=DataModuleSynthMultiSpecies",
    "model.dim_gene_embs=32",
    "model.dim_model=32",
    "model.num_head=2",
    "model.dim_hid=64",
    "model.nlayers=2",
    "model.dropout=0.0",
    "model.pe_max_len=65",
    "model.dim_pretrained_vocab=8",
    "model.training.accelerator=cpu",
    "model.training.warmup=2",
    "model.training.max_steps=4",
    "model.training.val_check_interval=1000",
    "model.training.log_every_n_steps=2",
    "model.training.validate_before_training=false",
    "datamodule.dataset.train.max_tokens=48",
    "datamodule.dataloader.train.batch_size=16",
    "datamodule.loader.block_size=8",
    "datamodule.dataset.val={}",
    "datamodule.dataloader.val={}",
]


def trained_run(base: Path, project: Path) -> Path:
    """A tiny two-species model trained a few steps on the compiled synthetic project, kept
    under ``base`` so that every test module of the session shares one run folder."""
    from concept.train import train

    run = base / "runs" / "tiny"
    if not (run / "latest" / "last.ckpt").exists():
        train(
            load_config(
                [
                    f"PATH.PROJECT_PATH={project}",
                    f"PATH.PRETRAINED_VOCABULARY={project}/references/embeddings/esm2_t30",
                    f"PATH.CHECKPOINT_ROOT={run.parent}",
                    "wandb.run_name=tiny",
                    *TINY,
                ]
            )
        )
    return run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, compiled) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), compiled)


def embedder_of(source, **options) -> Embedder:
    return Embedder(load(source), device="cpu", precision="32", **options)


def embed(data, embedder: Embedder | Path, **options) -> np.ndarray:
    """One file's (or AnnData's) embedding."""
    if not isinstance(embedder, Embedder):
        embedder = embedder_of(embedder)
    return embedder.embed_file(data, progress=False, **options)[0]


@pytest.fixture(scope="session")
def embedder(run_dir) -> Embedder:
    return embedder_of(run_dir)


def h5ads(project: Path) -> Path:
    return project / "data" / "synth_cxg" / "h5ads"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def reference(embedder, compiled) -> tuple[ad.AnnData, np.ndarray]:
    """hs_csr_a (CSR counts in X) in memory, and its embedding from the file."""
    path = h5ads(compiled) / "hs_csr_a.h5ad"
    return ad.read_h5ad(path), embed(path, embedder)


def test_checkpoint_resolution(run_dir, tmp_path):
    files = resolve(run_dir)
    ckpt = run_dir / "latest" / "last.ckpt"
    assert (files.checkpoint, files.config, files.folder) == (
        ckpt,
        run_dir / "config.yaml",
        run_dir,
    )
    assert not files.published
    assert resolve(ckpt) == files
    assert resolve("latest", str(run_dir.parent)) == files
    with pytest.raises(ConfigError, match="PATH.PROJECT_PATH"):
        resolve("latest")
    with pytest.raises(InputError, match="no such checkpoint"):
        resolve(tmp_path / "nope")


def test_settings_come_from_the_run(embedder):
    assert embedder.max_tokens == 48  # the run's datamodule.dataset.train.max_tokens
    assert sorted(embedder.mappings) == ["hsapiens", "mmusculus"]
    with pytest.raises(ConfigError, match="pe_max_len"):
        embedder_of(embedder.run_dir, max_tokens=65)


def test_same_embedding_whatever_the_layout(reference, embedder, tmp_path):
    """CSR, CSC, dense, and counts in raw/X beside a normalized X: one embedding."""
    adata, expected = reference
    counts = adata.X.tocsr()
    layouts = {
        "csc": ad.AnnData(counts.tocsc(), obs=adata.obs, var=adata.var),
        "dense": ad.AnnData(counts.toarray(), obs=adata.obs, var=adata.var),
    }
    raw = ad.AnnData(
        sp.csr_matrix(np.log1p(counts.astype(np.float32).toarray())), obs=adata.obs, var=adata.var
    )
    raw.raw = ad.AnnData(counts.astype(np.float32), obs=adata.obs, var=adata.var)
    layouts["raw"] = raw
    for name, layout in layouts.items():
        layout.write_h5ad(tmp_path / f"{name}.h5ad")
        got = embed(tmp_path / f"{name}.h5ad", embedder)
        assert np.array_equal(got, expected), name
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-5)
    # the in-memory path is the file path
    assert np.array_equal(embed(adata, embedder), expected)


def test_gene_symbols_equal_ensembl_ids(reference, embedder, compiled, tmp_path):
    adata, expected = reference
    by_symbol = adata.copy()
    by_symbol.var_names = adata.var["gene_symbols"].astype(str).to_numpy()
    by_symbol.write_h5ad(tmp_path / "symbols.h5ad")
    got = embed(tmp_path / "symbols.h5ad", embedder, gene_symbols=True)
    assert np.array_equal(got, expected)
    path = h5ads(compiled) / "hs_csr_a.h5ad"
    got = embed(path, embedder, gene_id_column="gene_symbols", gene_symbols=True)
    assert np.array_equal(got, expected)


def test_species_is_inferred_and_a_tie_is_an_error(embedder, compiled, tmp_path):
    _, species = embedder.embed_file(h5ads(compiled) / "hs_csr_e.h5ad", progress=False)
    assert species == "hsapiens"
    _, species = embedder.embed_file(h5ads(compiled) / "mm_csr_c.h5ad", progress=False)
    assert species == "mmusculus"
    hs, mm = (embedder.mappings[s].gene_ids[2:22] for s in ("hsapiens", "mmusculus"))
    assert infer_species(np.array(hs + mm[:5]), embedder.mappings) == "hsapiens"
    with pytest.raises(InputError, match="ambiguous"):
        infer_species(np.array(hs + mm), embedder.mappings)
    tie = ad.AnnData(sp.random(30, 40, density=0.5, format="csr", random_state=0) * 10)
    tie.var_names = hs + mm
    tie.write_h5ad(tmp_path / "tie.h5ad")
    with pytest.raises(InputError, match="ambiguous"):
        embed(tmp_path / "tie.h5ad", embedder)
    assert embed(tmp_path / "tie.h5ad", embedder, species="mmusculus").shape == (
        30,
        32,
    )


def test_tokens_match_the_compiled_store(embedder, compiled):
    """The embedder sees exactly the stored cells: same tokens, same order."""
    store = open_store(next(p for p in store_paths(compiled, "hs_csc_c")))
    file = embedder.open(h5ads(compiled) / "hs_csc_c.h5ad")
    with file.source:
        blk = next(b for _, b in embedder.blocks(file))
    tokens, _, indptr = store.cells(0, len(store))
    rows = store.rows
    assert np.array_equal(store.var_tokens, file.var_tokens)
    for i in range(0, len(store), 37):
        r = rows[i]
        mine = blk.tokens[blk.indptr[r] : blk.indptr[r + 1]]
        assert np.array_equal(tokens[indptr[i] : indptr[i + 1]], mine)


def test_batching_and_order(reference, embedder, compiled):
    """Small batches change only the grouping: the rows stay in the file's order."""
    _, expected = reference
    small = embedder_of(embedder.run_dir, batch_size=7, max_batch_tokens=200)
    got = embed(h5ads(compiled) / "hs_csr_a.h5ad", small)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    batches = list(length_batches(np.array([3, 3, 5, 9, 20]), max_cells=2, max_tokens=17))
    assert batches == [(0, 2), (2, 3), (3, 4), (4, 5)]


def test_deterministic(reference, run_dir, compiled):
    """A fresh load of the checkpoint gives the same bits."""
    again = embed(h5ads(compiled) / "hs_csr_a.h5ad", run_dir)
    assert np.array_equal(again, reference[1])


def test_options_are_strict():
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'"):
        validate_schema(
            {"checkpoint": "c", "input": "i", "output": "o", "batchsize": 3}, EmbedConfig
        )
    with pytest.raises(ConfigError, match="missing value for output"):
        validate_schema({"checkpoint": "c", "input": "i"}, EmbedConfig)
    with pytest.raises(ConfigError, match="x_source"):
        validate_schema(
            {"checkpoint": "c", "input": "i", "output": "o", "x_source": "Y"}, EmbedConfig
        )


def test_cli_writes_a_copy_and_leaves_the_input_alone(run_dir, reference, compiled, tmp_path):
    source = tmp_path / "in.h5ad"
    shutil.copyfile(h5ads(compiled) / "hs_csr_a.h5ad", source)
    before = sha256(source)
    out = tmp_path / "out" / "embedded.h5ad"
    cmd = [
        sys.executable,
        "-m",
        "concept.embed",
        "checkpoint=latest",
        f"PATH.CHECKPOINT_ROOT={run_dir.parent}",
        f"input={source}",
        f"output={out}",
        "progress=false",
        "precision=32",
    ]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sha256(source) == before
    adata = ad.read_h5ad(out)
    assert np.array_equal(adata.obsm["X_concept"], reference[1])
    assert adata.n_obs == reference[0].n_obs and not list(tmp_path.glob("outputs"))
    with pytest.raises(InputError, match="input is never modified"):
        write_embedding(source, source, reference[1])
    assert sha256(source) == before


def test_embed_cli_reads_and_writes_anndata_zarr(run_dir, compiled, tmp_path):
    """An AnnData .zarr input embeds like the same cells in an .h5ad, into a .zarr copy."""
    from concept.embed import EmbedConfig, run

    h5ad = h5ads(compiled) / "hs_csr_e.h5ad"
    src = ad.read_h5ad(h5ad)
    zin = tmp_path / "cells.zarr"
    src.write_zarr(zin)
    outs = {}
    for name, path in (("h5ad", h5ad), ("zarr", zin)):
        out = tmp_path / f"out_{name}{path.suffix}"
        cfg = EmbedConfig(
            checkpoint=str(run_dir),
            input=str(path),
            output=str(out),
            species="hsapiens",
            device="cpu",
            precision="32",
            progress=False,
        )
        assert run(cfg) == 0
        outs[name] = (ad.read_zarr(out) if name == "zarr" else ad.read_h5ad(out)).obsm["X_concept"]
    np.testing.assert_allclose(outs["zarr"], outs["h5ad"], atol=1e-6)
    assert ad.read_zarr(zin).obsm.keys() == src.obsm.keys()  # the input is untouched
