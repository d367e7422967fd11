"""Published scConcept models: loaded, and their reference embeddings reproduced exactly.

The fixtures in ``../shared/reference-models/`` were made by the reference implementation
itself (its README and MANIFEST say how); they are read as given, never written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

from concept import Concept, estimate_mutual_information
from concept.config import ConfigError, validate_schema
from concept.vocab import InputError

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT.parent / "shared" / "reference-models"
MANIFEST = json.loads((REF / "expected" / "MANIFEST.json").read_text()) if REF.is_dir() else {}
pytestmark = pytest.mark.skipif(not REF.is_dir(), reason="../shared/reference-models missing")

MODELS: dict[str, Concept] = {}


def model(name: str) -> Concept:
    if name not in MODELS:
        MODELS[name] = Concept.from_pretrained(REF / "models" / name)
    return MODELS[name]


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    return ad.read_h5ad(REF / "inputs" / "pbmc.h5ad")


def close_enough(z: np.ndarray, expected: np.ndarray, mode: str) -> None:
    """The fixtures' tolerances: fp32 1e-5; bf16 autocast 1e-2 with per-cell cosine >= 0.999."""
    assert z.shape == expected.shape and z.dtype == np.float32
    diff = np.abs(z - expected).max()
    if mode == "fp32":
        assert diff <= 1e-5, diff
    else:
        cos = (z * expected).sum(1) / np.linalg.norm(z, axis=1) / np.linalg.norm(expected, axis=1)
        assert diff <= 1e-2 and cos.min() >= 0.999, (diff, cos.min())


def api_inputs(call: dict, pbmc: ad.AnnData) -> tuple[ad.AnnData, dict]:
    """The call's input (its ``input_transform``) and its extract_embeddings arguments."""
    kwargs = {k: v for k, v in call["extract_embeddings_kwargs"].items() if k != "num_workers"}
    transform = call["input_transform"] or ""
    if call["input"].endswith("pbmc_symbols.h5ad"):
        adata = ad.read_h5ad(REF / call["input"])
        m = model(call["model"])
        adata.var["gene_id"] = m.map_gene_names_to_ids("hsapiens", adata.var_names.tolist())
    elif transform.startswith("adata[:, :383]"):
        adata = pbmc[:, :383]
    elif transform.startswith("adata[:, 383:]"):
        adata = pbmc[:, 383:]
    else:
        assert not transform, transform
        adata = pbmc
    return adata, kwargs


def mode_of(call: dict) -> str:
    return "fp32" if call["output"].endswith("__fp32.npy") else "default"


CALLS = MANIFEST.get("calls", [])


@pytest.mark.parametrize("call", CALLS, ids=[Path(c["output"]).stem for c in CALLS])
def test_api_reproduces_the_reference(call, pbmc):
    adata, kwargs = api_inputs(call, pbmc)
    precision = "32" if mode_of(call) == "fp32" else "bf16-mixed"
    z = model(call["model"]).embed(adata, precision=precision, batch_size=256, **kwargs)
    if kwargs.get("return_type") == "torch":
        assert isinstance(z, torch.Tensor)
        z = z.numpy()
    close_enough(z, np.load(REF / call["output"]), mode_of(call))


def test_every_fixture_is_covered():
    """All four models, both modes, every variant of the README."""
    outputs = {Path(c["output"]).name for c in CALLS}
    assert len(CALLS) == 20 and {c["model"] for c in CALLS} == {
        "tiny-base",
        "tiny-value-post",
        "tiny-pretrained",
        "tiny-fabric",
    }
    assert {"pbmc__max_tokens64__default.npy", "pbmc_symbols__mapped__fp32.npy"} <= outputs


CLI_CELLS = 96  # the command line embeds these first cells of each input (a cell's embedding
# does not depend on its batch); the API tests above embed every cell


def cli_args(call: dict, tmp_path: Path) -> tuple[list[str], Path]:
    """``concept.embed`` overrides for a fixture call (input transforms as files)."""
    kwargs = dict(call["extract_embeddings_kwargs"])
    kwargs.pop("num_workers")
    kwargs.pop("return_type", None)
    kwargs.pop("gene_id_column", None)  # the mapped symbols: gene_symbols=true below
    transform = call["input_transform"] or ""
    extra = ["gene_symbols=true"] if call["input"].endswith("pbmc_symbols.h5ad") else []
    cut = slice(None)
    if transform.startswith("adata[:, "):
        cut = slice(None, 383) if ":383]" in transform else slice(383, None)
    source = tmp_path / f"{Path(call['output']).stem}.h5ad"
    ad.read_h5ad(REF / call["input"])[:CLI_CELLS, cut].copy().write_h5ad(source)
    out = tmp_path / f"{Path(call['output']).stem}.out.h5ad"
    args = [
        f"checkpoint={REF / 'models' / call['model']}",
        f"input={source}",
        f"output={out}",
        f"precision={'32' if mode_of(call) == 'fp32' else 'bf16-mixed'}",
        "progress=false",
        "device=cpu",
        *[f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in kwargs.items()],
        *extra,
    ]
    return args, out


def test_cli_reproduces_every_fixture(tmp_path):
    """``concept.embed``'s own config (conf/embed.yaml + overrides) and run, in-process."""
    from hydra import compose, initialize_config_dir

    from concept.config import CONF_DIR
    from concept.embed import EmbedConfig, run

    for call in CALLS:
        args, out = cli_args(call, tmp_path)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = validate_schema(compose(config_name="embed", overrides=args), EmbedConfig)
        assert run(cfg) == 0
        z = ad.read_h5ad(out).obsm["X_concept"]
        close_enough(z, np.load(REF / call["output"])[:CLI_CELLS], mode_of(call))


def test_cli_command_line(tmp_path):
    """The real command line on the pretrained model without the learnable residual."""
    (call,) = [
        c for c in CALLS if c["output"].endswith("tiny-pretrained/pbmc__no_learnable__fp32.npy")
    ]
    args, out = cli_args(call, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "concept.embed", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = np.load(REF / call["output"])[:CLI_CELLS]
    close_enough(ad.read_h5ad(out).obsm["X_concept"], expected, "fp32")


def test_output_equal_to_input_is_refused_before_any_work(tmp_path):
    from concept.embed import EmbedConfig, run

    source = tmp_path / "in.h5ad"
    shutil.copyfile(REF / "inputs" / "pbmc.h5ad", source)
    cfg = validate_schema(
        {
            "checkpoint": str(tmp_path / "no-such-model"),
            "input": str(source),
            "output": str(source),
        },
        EmbedConfig,
    )
    # the checkpoint does not exist: the output check comes first, before any loading
    with pytest.raises(InputError, match="is the input file: the input is never modified"):
        run(cfg)


# --- loading ----------------------------------------------------------------------------


def copy_model(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(REF / "models" / name, dst)
    return dst


def edit_config(folder: Path, drop: list[str]) -> None:
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    for key in drop:
        del cfg["model"][key]
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_missing_keys_take_the_reference_code_defaults(tmp_path, pbmc):
    """tiny-value-post is post-norm + relu: a config without those keys still gives its
    embeddings (post and relu are what the reference's model code falls back to)."""
    folder = copy_model("tiny-value-post", tmp_path)
    edit_config(folder, ["norm_scheme", "activation"])
    m = Concept.from_pretrained(folder)
    assert (m.model.module.cfg.norm_scheme, m.model.module.cfg.activation) == ("post", "relu")
    z = m.embed(pbmc, precision="32", batch_size=256)
    close_enough(z, np.load(REF / "expected" / "tiny-value-post" / "pbmc__fp32.npy"), "fp32")
    # dim_gene_embs defaults to dim_model (32): the 16-wide tables no longer fit, by name
    edit_config(folder, ["dim_gene_embs"])
    with pytest.raises(InputError, match=r"net.genes.learnable.hsapiens.weight \(802, 16\)"):
        Concept.from_pretrained(folder)


def test_decoder_head_defaults_to_true(tmp_path):
    """Without ``decoder_head`` the reference builds the head: tiny-base has none -> the
    head's weights are missing, and the error names them."""
    folder = copy_model("tiny-base", tmp_path)
    edit_config(folder, ["decoder_head"])
    with pytest.raises(InputError, match=r"missing: \['net.decoder.0.bias'"):
        Concept.from_pretrained(folder)


def save_state(folder: Path, edit) -> None:
    ck = torch.load(folder / "model.ckpt", weights_only=True)
    edit(ck["state_dict"])
    torch.save(ck, folder / "model.ckpt")


def test_every_mismatched_weight_is_an_error_that_names_it(tmp_path):
    folder = copy_model("tiny-base", tmp_path)
    save_state(folder, lambda s: s.pop("transformer_encoder.layers.1.linear2.bias"))
    with pytest.raises(InputError, match=r"missing: \['net.layers.1.linear2.bias'\]"):
        Concept.from_pretrained(folder)
    folder = copy_model("tiny-base", tmp_path / "b")
    save_state(folder, lambda s: s.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(InputError, match=r"unexpected weights .*\['extra.weight'\]"):
        Concept.from_pretrained(folder)
    folder = copy_model("tiny-base", tmp_path / "c")
    save_state(folder, lambda s: s["positional_encoder.pe"].mul_(2))
    with pytest.raises(InputError, match="positional_encoder.pe .* differs from the sinusoidal"):
        Concept.from_pretrained(folder)
    folder = copy_model("tiny-base", tmp_path / "d")
    mapping = folder / "gene_mappings" / "hsapiens.csv"
    lines = mapping.read_text().splitlines(keepends=True)
    mapping.write_text("".join(x for x in lines if not x.rstrip().endswith(",801")))
    with pytest.raises(
        InputError, match="801 tokens, the checkpoint's hsapiens vocabulary has 802"
    ):
        Concept.from_pretrained(folder)


def test_fabric_and_lightning_checkpoints_load_the_same_weights():
    a = model("tiny-base").model.module.state_dict()
    b = model("tiny-fabric").model.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_table_values_come_from_the_checkpoint():
    m = model("tiny-pretrained")
    state = torch.load(REF / "models" / "tiny-pretrained" / "model.ckpt", weights_only=True)
    expected = state["state_dict"]["gene_token_encoder.pretrained_embs.hsapiens.weight"]
    assert torch.equal(m.model.module.net.genes.pretrained["hsapiens"].weight, expected)
    assert m.model.module.cfg.dim_pretrained_vocab == 24


def offline_cache(monkeypatch, cache: Path) -> None:
    """``HF_HUB_OFFLINE=1`` with the cache at ``cache`` (huggingface_hub reads both at
    import, so its constants follow the environment here)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_unknown_names_and_paths_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no such checkpoint file or model folder"):
        Concept.from_pretrained(tmp_path / "nothing.ckpt")
    offline_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(InputError, match="model 'corpus40M-model30M' of theislab/scConcept"):
        Concept.from_pretrained("corpus40M-model30M")


def test_a_model_name_resolves_from_the_offline_cache(tmp_path, monkeypatch, pbmc):
    """The Hugging Face cache layout: models--<org>--<repo>/{refs/main, snapshots/<sha>/}."""
    repo = tmp_path / "hub" / "models--theislab--scConcept"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(REF / "models" / "tiny-base", repo / "snapshots" / sha / "tiny-base")
    offline_cache(monkeypatch, tmp_path / "hub")
    m = Concept.from_pretrained("tiny-base")
    assert m.model.files.folder == repo / "snapshots" / sha / "tiny-base"
    z = m.embed(pbmc[:64], precision="32")
    close_enough(z, np.load(REF / "expected" / "tiny-base" / "pbmc__fp32.npy")[:64], "fp32")


# --- inference details -------------------------------------------------------------------


def direct(m: Concept, tokens: list[int], values: list[float]) -> np.ndarray:
    """The embedding of one CLS-first sequence, straight through the network (fp32)."""
    net = m.model.module.net
    t = torch.tensor([0, *tokens])
    v = torch.tensor([0.0, *values])
    with torch.inference_mode():
        z, _ = net(t, v, torch.tensor([0, len(t)], dtype=torch.int32), len(t), "hsapiens", True)
    return z[0].numpy()


def cells(n_genes: int = 40) -> tuple[ad.AnnData, list[str]]:
    """Eight cells over the first genes of tiny-base's vocabulary; cells 2, 5, 6, 7 empty."""
    m = model("tiny-base")
    ids = m.model.mappings["hsapiens"].gene_ids[2 : 2 + n_genes]
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, (8, n_genes)).astype(np.float32)
    x[[2, 5, 6, 7]] = 0
    adata = ad.AnnData(sp.csr_matrix(x))
    adata.var_names = ids
    return adata, ids


def test_empty_cells_embed_as_the_cls_only_sequence():
    """Empty cells (a whole batch of them, too: cells are sorted by length) embed as CLS
    alone, as the reference gives them; the other cells are unchanged."""
    m = model("tiny-base")
    adata, _ = cells()
    z = m.embed(adata, precision="32", batch_size=4)
    cls_only = direct(m, [], [])
    for i in (2, 5, 6, 7):
        np.testing.assert_allclose(z[i], cls_only, atol=1e-6)
    alone = m.embed(adata[[0, 1, 3, 4]], precision="32")
    np.testing.assert_allclose(z[[0, 1, 3, 4]], alone, atol=1e-6)
    everything_empty = m.embed(adata[[2, 5]], precision="32")
    np.testing.assert_allclose(everything_empty, np.stack([cls_only] * 2), atol=1e-6)


def expected_sequence(x: np.ndarray, tokens: np.ndarray, strategy: str, limit: int):
    """The reference's inference collate for one cell: value descending (token ascending on
    ties); ``top`` keeps unexpressed genes too, after the expressed ones."""
    keep = np.ones(len(x), bool) if strategy == "top" else x > 0
    order = np.lexsort((tokens[keep], -x[keep]))[:limit]
    return tokens[keep][order].tolist(), x[keep][order].tolist()


@pytest.mark.parametrize("strategy", ["top-nonzero", "top"])
def test_gene_sampling_strategy_is_honoured(strategy):
    m = model("tiny-base")
    adata, ids = cells()
    tokens = m.model.mappings["hsapiens"].tokens_of(ids)
    z = m.embed(adata, precision="32", gene_sampling_strategy=strategy, max_tokens=30)
    x = adata.X.toarray()
    for i in (0, 1, 3):
        t, v = expected_sequence(x[i], tokens, strategy, 30)
        np.testing.assert_allclose(z[i], direct(m, t, v), atol=1e-6)


def test_random_nonzero_draws_a_subset_in_value_order():
    m = model("tiny-base")
    adata, _ = cells()
    top = m.embed(adata, precision="32")
    same = m.embed(adata, precision="32", gene_sampling_strategy="random-nonzero")
    np.testing.assert_allclose(same, top, atol=1e-6)  # every gene fits: the same sequences
    few = m.embed(adata, precision="32", gene_sampling_strategy="random-nonzero", max_tokens=5)
    assert np.abs(few[[0, 1, 3]] - top[[0, 1, 3]]).max() > 1e-3


def test_learnable_residual_follows_use_learnable_embs(pbmc):
    m = model("tiny-pretrained")
    with_table = m.embed(pbmc[:32], precision="32")
    without = m.embed(pbmc[:32], precision="32", use_learnable_embs=False)
    assert np.abs(with_table - without).max() > 1e-2


def test_mutual_information_equals_the_reference():
    expected = json.loads((REF / "expected" / "tiny-base" / "mutual_information.json").read_text())
    m = model("tiny-base")
    assert m.logit_scale == pytest.approx(expected["logit_scale_exp"], abs=1e-6)
    for mode in ("default", "fp32"):
        arr = {
            k: np.load(REF / "expected" / "tiny-base" / f"pbmc__{k}__{mode}.npy")
            for k in ("genes_first_half", "genes_second_half", "max_tokens64")
        }
        arr["pbmc"] = np.load(REF / "expected" / "tiny-base" / f"pbmc__{mode}.npy")
        got = {
            "estimate_mutual_information(first_half, second_half)": m.estimate_mutual_information(
                arr["genes_first_half"], arr["genes_second_half"]
            ),
            "estimate_mutual_information(second_half, first_half)": m.estimate_mutual_information(
                arr["genes_second_half"], arr["genes_first_half"]
            ),
            "estimate_mutual_information(pbmc, pbmc__max_tokens64)": estimate_mutual_information(
                torch.from_numpy(arr["pbmc"]), arr["max_tokens64"], m.logit_scale
            ),
        }
        for key, value in got.items():
            assert value == pytest.approx(expected[mode][key], abs=1e-5), key


def test_gene_names_and_ids_map_both_ways():
    m = model("tiny-base")
    mapping = m.model.mappings["hsapiens"]
    t = next(i for i, n in enumerate(mapping.gene_names) if n)
    name, gid = mapping.gene_names[t], mapping.gene_ids[t]
    assert m.map_gene_names_to_ids("hsapiens", [name.lower(), "NOT_A_GENE"]) == [gid, None]
    assert m.map_gene_ids_to_names("hsapiens", [gid, "ENSG_NONE"]) == [name, None]
    with pytest.raises(InputError, match="species='mmusculus': the model knows"):
        m.map_gene_names_to_ids("mmusculus", [name])


def test_save_writes_a_folder_from_pretrained_reads_back(tmp_path, pbmc):
    saved = model("tiny-fabric").save(tmp_path / "saved")
    assert {p.name for p in saved.iterdir()} >= {"model.ckpt", "config.yaml", "gene_mappings"}
    ck = torch.load(saved / "model.ckpt", weights_only=True)
    assert (
        "gene_token_encoder.learnable_embs.hsapiens.weight" in ck["state_dict"]
    )  # reference names
    again = Concept.from_pretrained(saved)
    z = again.embed(pbmc[:64], precision="32")
    close_enough(z, np.load(REF / "expected" / "tiny-fabric" / "pbmc__fp32.npy")[:64], "fp32")


def test_bad_options_are_config_errors(pbmc):
    with pytest.raises(ConfigError, match="precision='16'"):
        model("tiny-base").embed(pbmc, precision="16")
    with pytest.raises(ConfigError, match="gene_sampling_strategy='best'"):
        model("tiny-base").embed(pbmc, gene_sampling_strategy="best")


# --- continuing pre-training from a published model ----------------------------------------


def pbmc_project(tmp_path: Path, mapping: Path) -> tuple[Path, Path]:
    """A project whose files are the fixture's PBMC cells (train: a copy; val: the input
    itself) with ``mapping`` as its token mapping; and a config folder with its split."""
    project = tmp_path / "project"
    h5ads = project / "data" / "pbmc" / "h5ads"
    h5ads.mkdir(parents=True)
    shutil.copyfile(REF / "inputs" / "pbmc.h5ad", h5ads / "pbmc_train.h5ad")
    shutil.copyfile(REF / "inputs" / "pbmc.h5ad", h5ads / "pbmc.h5ad")
    vocab = project / "references" / "vocabulary" / "token_mappings_per_specie"
    vocab.mkdir(parents=True)
    shutil.copyfile(mapping, vocab / "hsapiens.csv")
    conf = tmp_path / "conf" / "datamodule" / "split_cellxgene_hsapiens"
    conf.mkdir(parents=True)
    (conf / "split_pbmc.yaml").write_text(
        "source_name: pbmc\nspecies: hsapiens\n"
        "source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads\n"
        "train: [pbmc_train.h5ad]\nval: [pbmc.h5ad]\n"
    )
    return project, tmp_path / "conf"


def continue_config(project: Path, conf: Path, source: Path, *extra: str):
    from concept.config import load_config

    return load_config(
        [
            f"PATH.PROJECT_PATH={project}",
            "datamodule/split_cellxgene_hsapiens=split_pbmc",
            "compile.register=false",
            "compile.workers=1",
            f"initialize.checkpoint={source}",
            "initialize.create_new_run=true",
            "wandb.run_name=continued",
            "model.training.accelerator=cpu",
            "model.training.max_steps=20",
            "model.training.warmup=2",
            "model.training.lr=1e-3",
            "model.training.log_every_n_steps=1",
            "model.training.val_check_interval=1000",
            "model.training.validate_before_training=false",
            "datamodule.dataset.train.max_tokens=256",
            "datamodule.dataloader.train.batch_size=16",
            "datamodule.loader.block_size=8",
            "datamodule.dataset.val={}",
            "datamodule.dataloader.val={}",
            *extra,
        ],
        config_dir=conf,
    )


def test_continue_pretraining_from_a_published_model(tmp_path, monkeypatch):
    """Strict load into the trainer's module: before any step it embeds the validation
    file as the reference does; 20 CPU steps with finite losses; the run loads back."""
    import copy
    import csv
    from dataclasses import replace

    from concept import pretrained
    from concept.inference import Embedder
    from concept.train import train
    from preprocess.compile import run as compile_run

    source = REF / "models" / "tiny-base"
    project, conf = pbmc_project(tmp_path, source / "gene_mappings" / "hsapiens.csv")
    val_file = project / "data" / "pbmc" / "h5ads" / "pbmc.h5ad"
    # the project's own defaults (pre-norm gelu 8 layers, d=512) are replaced by the model's
    cfg = continue_config(project, conf, source)
    assert compile_run(cfg) == 0
    seen = {}

    def spy(module, model):  # the trainer's module, right after loading, before any step
        load_weights(module, model)
        frozen = replace(model, module=copy.deepcopy(module))
        seen["z"] = Embedder(frozen, device="cpu", precision="32").embed_file(
            val_file, progress=False
        )[0]

    load_weights = pretrained.load_weights
    monkeypatch.setattr(pretrained, "load_weights", spy)
    train(cfg)
    expected = np.load(REF / "expected" / "tiny-base" / "pbmc__fp32.npy")
    close_enough(seen["z"], expected, "fp32")
    run_dir = project / "model_checkpoints" / "continued"
    with open(run_dir / "metrics.csv") as fh:
        losses = [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    assert len(losses) == 20 and np.isfinite(losses).all()
    again = Concept.from_pretrained(run_dir)
    assert again.model.module.cfg.nlayers == 2 and again.model.module.cfg.dim_model == 32
    z = again.embed(val_file, precision="32")
    assert z.shape == expected.shape and np.abs(z - expected).max() > 1e-3  # it trained


def test_a_project_vocabulary_other_than_the_model_s_is_an_error(tmp_path):
    from concept.train import train

    source = REF / "models" / "tiny-base"
    lines = (source / "gene_mappings" / "hsapiens.csv").read_text().splitlines()
    ids = [line.split(",", 1) for line in lines]
    ids[3][0], ids[4][0] = ids[4][0], ids[3][0]  # two genes swap tokens
    (tmp_path / "mine.csv").write_text("\n".join(",".join(x) for x in ids) + "\n")
    project, conf = pbmc_project(tmp_path, tmp_path / "mine.csv")
    with pytest.raises(
        InputError, match=r"differs from the model's .*set PATH.GENE_MAPPINGS_PATH="
    ):
        train(continue_config(project, conf, source))


# --- light adaptation -------------------------------------------------------------------------


def view_recall_on(m: Concept, adata: ad.AnnData, size: int = 150, batch: int = 50) -> float:
    """Mean view recall@1 (two disjoint random panels of ``size`` genes per batch of
    ``batch`` cells), as ``concept.evaluate`` measures it."""
    from concept.data.views import ViewSpec, plan_views
    from concept.eval_metrics import view_recall

    e = m.embedder(device="cpu", precision="32")
    file = e.open(adata)
    (_, blk), *_ = list(e.blocks(file))
    spec = ViewSpec(
        max_tokens=e.max_tokens,
        panel_selection="random",
        panel_size_min=size,
        panel_size_max=size,
        normalization=e.normalization,
        train=False,
    )
    out = []
    for i in range(adata.n_obs // batch):
        b = e.packed(blk, np.arange(i * batch, (i + 1) * batch), file.species, file.var_tokens, i)
        b.views = plan_views(b, spec, e.mappings[file.species].size)
        z = e.encode(b)
        out.append(view_recall(z[:batch], z[batch:]))
    return float(np.mean(out))


def programs(m: Concept, n: int, seed: int) -> ad.AnnData:
    """Cells of 16 gene programs over the model's vocabulary: 40 program genes at Poisson(8),
    the rest at Poisson(0.1). Two disjoint views of a cell share its program."""
    ids = np.array(m.model.mappings["hsapiens"].gene_ids[2:])
    genes = np.random.default_rng(0).permutation(len(ids))
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.1, (n, len(ids))).astype(np.float32)
    for i, p in enumerate(rng.integers(0, 16, n)):
        x[i, genes[p * 40 : (p + 1) * 40]] = rng.poisson(8, 40)
    adata = ad.AnnData(sp.csr_matrix(x))
    adata.var_names = ids
    return adata


@pytest.mark.slow
def test_adapt_improves_view_recall_on_held_out_cells(tmp_path):
    """Adapt tiny-base (trained on PBMC) to cells of gene programs, in memory, through the
    compiler and the trainer: on a held-out set view recall@1 rises well above chance."""
    m = model("tiny-base")
    held_out = programs(m, 100, seed=2)
    before = view_recall_on(m, held_out, size=200, batch=20)
    adapted = m.adapt(
        programs(m, 640, seed=1),
        max_steps=150,
        batch_size=32,
        lr=1e-2,
        warmup=3,
        max_tokens=64,
        overrides=[
            "datamodule.dataset.train.panel_selection=random",
            "datamodule.dataset.train.panel_size_min=200",
            "datamodule.dataset.train.panel_size_max=300",
        ],
    )
    after = view_recall_on(adapted, held_out, size=200, batch=20)
    assert after > before + 0.08, (before, after)
    assert model("tiny-base").logit_scale == m.logit_scale  # the original is unchanged
    saved = adapted.save(tmp_path / "adapted")
    z = Concept.from_pretrained(saved).embed(held_out, precision="32")
    np.testing.assert_allclose(z, adapted.embed(held_out, precision="32"), atol=1e-6)


@pytest.mark.slow
def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """README's "Python API" example, with the fixture model and input in place of the
    published name and the user's file."""
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S).group(1)
    code = block.replace('"corpus40M-model30M"', repr(str(REF / "models" / "tiny-base")))
    code = code.replace('"pbmc.h5ad"', repr(str(REF / "inputs" / "pbmc.h5ad")))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    expected = np.load(REF / "expected" / "tiny-base" / "pbmc__fp32.npy")
    close_enough(scope["exact"], expected, "fp32")
    close_enough(
        scope["emb"], np.load(REF / "expected" / "tiny-base" / "pbmc__default.npy"), "bf16"
    )
    assert np.isfinite(scope["mi"]) and (tmp_path / "my-model" / "model.ckpt").is_file()
    assert scope["again"].species == ["hsapiens"]


# --- in-memory AnnData: compiled without a file -----------------------------------------------


def rich_adata(layout: str) -> ad.AnnData:
    """Counts with empty cells and ties, obs columns of several kinds, an obsm table; the
    counts in X (``csr``, ``dense``) or in ``raw`` beside a normalized CSC X (``csc_raw``)."""
    rng = np.random.default_rng(3)
    lines = (REF / "models" / "tiny-base" / "gene_mappings" / "hsapiens.csv").read_text()
    ids = [row.split(",")[0] for row in lines.splitlines()[3:]][:60] + ["ENSG_NOT_IN_VOCAB"]
    x = rng.poisson(0.8, (90, len(ids))).astype(np.float32)
    x[[4, 50, 89]] = 0  # empty cells, one of them the last
    obs = {
        "cell_type": np.array(["b", "a", None, "c", "a"] * 18, dtype=object),
        "donor": rng.integers(0, 12, 90),  # numbers: categories as strings, sorted
        "batch": pd.Categorical(rng.choice(["z", "y"], 90), categories=["z", "y"]),
    }
    frame = pd.DataFrame(obs, index=[f"c{i}" for i in range(90)])
    adata = ad.AnnData(sp.csr_matrix(x) if layout == "csr" else x, obs=frame)
    adata.var_names = ids
    adata.obsm["X_emb"] = rng.normal(size=(90, 4)).astype(np.float32)
    if layout == "csc_raw":
        adata.raw = adata.copy()
        adata.X = sp.csc_matrix(np.log1p(x))
    return adata


def compile_project(root: Path, adata: ad.AnnData | None, file: ad.AnnData | None) -> Path:
    """Compile ``input_0`` of a one-file project (from memory, or written as ``.h5ad``);
    returns its store."""
    from concept.config import load_config
    from preprocess.compile import run as compile_run

    data = root / "data" / "mem" / "h5ads"
    data.mkdir(parents=True)
    vocab = root / "references" / "vocabulary" / "token_mappings_per_specie"
    vocab.mkdir(parents=True)
    shutil.copyfile(
        REF / "models" / "tiny-base" / "gene_mappings" / "hsapiens.csv", vocab / "hsapiens.csv"
    )
    name = "input_0.h5ad" if file is not None else "input_0"
    if file is not None:
        file.write_h5ad(data / name)
    conf = root / "conf" / "datamodule" / "split_cellxgene_hsapiens"
    conf.mkdir(parents=True)
    (conf / "split_mem.yaml").write_text(
        f"source_name: mem\nspecies: hsapiens\nsource_path: {data}\ntrain: [{name}]\nval: []\n"
    )
    cfg = load_config(
        [
            f"PATH.PROJECT_PATH={root}",
            "datamodule/split_cellxgene_hsapiens=split_mem",
            "compile.register=false",
            "compile.workers=1",
            "datamodule.obs_keys=[cell_type,donor,batch]",
            "datamodule.precomp_embs_key=X_emb",
            "datamodule.dataset.val={}",
            "datamodule.dataloader.val={}",
        ],
        config_dir=root / "conf",
    )
    assert compile_run(cfg, {data / name: adata} if adata is not None else None) == 0
    return root / "compiled" / "mem" / "input_0.zarr"


def store_arrays(path: Path) -> dict:
    """Every array of a store with its attributes, by path."""
    import zarr

    members = zarr.open_group(path, mode="r").members(max_depth=None)
    return {n: (a[...], dict(a.attrs)) for n, a in members if isinstance(a, zarr.Array)}


@pytest.mark.parametrize("layout", ["csr", "dense", "csc_raw"])
def test_in_memory_anndata_compiles_to_the_store_of_its_h5ad(tmp_path, layout):
    """The same data, in memory and written to .h5ad, give stores with identical arrays
    (tokens, values, per-cell arrays, obs codes and categories, obsm) and attributes, but
    for the source's fingerprint and stat; nothing is written beside the in-memory input."""
    from concept.store import read_attrs

    mem = compile_project(tmp_path / "mem", rich_adata(layout), None)
    disk = compile_project(tmp_path / "disk", None, rich_adata(layout))
    a, b = store_arrays(mem), store_arrays(disk)
    assert set(a) == set(b) and {"tokens", "obs/donor", "obsm/X_emb"} <= set(a)
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
        assert a[name][0].dtype == b[name][0].dtype and a[name][1] == b[name][1], name
    assert a["obs/cell_type"][1]["categories"] == ["a", "b", "c"]
    assert (a["obs/cell_type"][0] == -1).sum() == 18  # None: missing
    different = {"source_file", "source_fingerprint", "source_stat", "created_at"}
    ma, da = read_attrs(mem), read_attrs(disk)
    assert {k for k in ma if ma[k] != da.get(k)} <= different
    assert (ma["source_file"], da["source_file"]) == ("input_0", "input_0.h5ad")
    assert ma["source_fingerprint"].startswith("content:")
    assert ma["source_stat"]["mtime_ns"] == 0 and ma["source_stat"]["size"] > 0
    assert ma["x_source"] == ("raw" if layout == "csc_raw" else "X")
    assert [p for p in (tmp_path / "mem" / "data").rglob("*") if p.is_file()] == []


def test_in_memory_fingerprint_follows_the_content():
    """Equal data hash equal (another object, as in another process); a change of the
    matrix, var, obs, the categories' order (the codes follow it) or obsm changes it."""
    from concept.h5ad import AnnDataSource

    fp = AnnDataSource(rich_adata("csr")).fingerprint()
    assert AnnDataSource(rich_adata("csr")).fingerprint() == fp
    assert AnnDataSource(rich_adata("csr"), "X").fingerprint() == fp  # the same matrix
    for what in ("value", "var", "obs", "categories", "obsm"):
        a = rich_adata("csr")
        if what == "value":
            a.X.data[0] += 1
        elif what == "var":
            a.var_names = list(a.var_names[::-1])
        elif what == "obs":
            a.obs["donor"] = a.obs["donor"] + 1
        elif what == "categories":
            a.obs["batch"] = a.obs["batch"].cat.reorder_categories(["y", "z"])
        else:
            a.obsm["X_emb"][0, 0] = 9.0
        assert AnnDataSource(a).fingerprint() != fp, what


# --- train_vocab_only: adapting a model to another vocabulary -------------------------------


def other_vocabulary(tmp_path: Path, source: str = "tiny-base") -> tuple[Path, dict]:
    """``<tmp>/vocab/hsapiens.csv``: the model's vocabulary less 15 genes the PBMC cells
    express, plus the 38 PBMC genes it lacks, tokens in a new order."""
    theirs = model(source).model.mappings["hsapiens"]
    pbmc = ad.read_h5ad(REF / "inputs" / "pbmc.h5ad")
    in_vocab = theirs.tokens_of(pbmc.var_names) >= 0
    removed = list(pbmc.var_names[in_vocab][:15])
    added = list(pbmc.var_names[~in_vocab])
    names = dict(zip(pbmc.var_names, pbmc.var["feature_name"], strict=True))
    genes = [(g, n) for g, n in zip(theirs.gene_ids[2:], theirs.gene_names[2:], strict=True)]
    genes = [x for x in genes if x[0] not in removed] + [(g, names[g]) for g in added]
    order = np.random.default_rng(0).permutation(len(genes))
    rows = ["gene_id,gene_name,token", "<cls>,,0", "<pad>,,1"]
    rows += [f"{genes[i][0]},{genes[i][1]},{t + 2}" for t, i in enumerate(order)]
    folder = tmp_path / "vocab"
    folder.mkdir()
    (folder / "hsapiens.csv").write_text("\n".join(rows) + "\n")
    return folder, {"removed": removed, "added": added}


def shared_rows(mine, theirs) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the genes both vocabularies hold: in ``mine``, and in ``theirs``."""
    old = theirs.tokens_of(mine.gene_ids)
    new = np.flatnonzero(old >= 0)
    return new, old[new]


def test_with_vocabulary_keeps_shared_rows_and_starts_new_genes_fresh():
    """tiny-pretrained moved to another vocabulary: every non-table weight is the model's;
    both tables keep the rows of shared genes (matched by id, tokens reordered); new genes
    start as a fresh table does next to pretrained vectors (zero residual), their
    pretrained rows from the project's vectors (zeros without)."""
    import tempfile

    from concept.pretrained import with_vocabulary
    from concept.vocab import read_token_mapping

    m = model("tiny-pretrained").model
    with tempfile.TemporaryDirectory() as tmp:
        folder, genes = other_vocabulary(Path(tmp), "tiny-pretrained")
        mine = read_token_mapping(folder / "hsapiens.csv")
    rng = np.random.default_rng(1)
    vectors = {"hsapiens": rng.normal(size=(mine.size, 24)).astype(np.float32)}
    for given in (None, vectors):
        moved = with_vocabulary(m, {"hsapiens": mine}, given)
        assert moved.mappings["hsapiens"] is mine and moved.vocab_sizes["hsapiens"] == mine.size
        a, b = moved.module.state_dict(), m.module.state_dict()
        tables = {f"net.genes.{k}.hsapiens.weight" for k in ("learnable", "pretrained")}
        assert set(a) == set(b)
        for k in set(a) - tables:
            assert torch.equal(a[k], b[k]), k
        new, old = shared_rows(mine, m.mappings["hsapiens"])
        assert len(new) == mine.size - len(genes["added"])
        fresh = np.setdiff1d(np.arange(mine.size), new)
        for k in tables:
            assert torch.equal(a[k][new], b[k][old]), k
        assert not a["net.genes.learnable.hsapiens.weight"][fresh].any()
        rows = a["net.genes.pretrained.hsapiens.weight"][fresh].numpy()
        np.testing.assert_array_equal(rows, 0 if given is None else vectors["hsapiens"][fresh])


def test_a_vocabulary_sharing_no_gene_is_an_error(tmp_path):
    from concept.train import train

    source = REF / "models" / "tiny-base"
    rows = ["gene_id,gene_name,token", "<cls>,,0", "<pad>,,1"]
    rows += [f"ENSG9999999{i:04d},G{i},{i + 2}" for i in range(50)]
    (tmp_path / "none.csv").write_text("\n".join(rows) + "\n")
    project, conf = pbmc_project(tmp_path, tmp_path / "none.csv")
    cfg = continue_config(project, conf, source, "model.training.train_vocab_only=true")
    with pytest.raises(
        InputError, match=r"hsapiens.csv shares no gene with the model.s hsapiens vocabulary"
    ):
        train(cfg)


def test_train_vocab_only_trains_only_the_gene_table_of_a_new_vocabulary(tmp_path, monkeypatch):
    """``initialize.checkpoint=<model> model.training.train_vocab_only=true`` on a project
    whose vocabulary drops and adds genes: right after loading, shared genes' rows are the
    model's; after 20 CPU steps every other weight is unchanged, rows of genes the data
    holds changed, the rest did not."""
    import copy

    from concept import pretrained
    from concept.train import train
    from preprocess.compile import run as compile_run

    source = REF / "models" / "tiny-base"
    folder, genes = other_vocabulary(tmp_path)
    project, conf = pbmc_project(tmp_path, folder / "hsapiens.csv")
    cfg = continue_config(project, conf, source, "model.training.train_vocab_only=true")
    assert compile_run(cfg) == 0
    seen = {}

    def spy(module, model):
        load_weights(module, model)
        seen["state"] = copy.deepcopy(module.state_dict())

    load_weights = pretrained.load_weights
    monkeypatch.setattr(pretrained, "load_weights", spy)
    train(cfg)
    original = model("tiny-base").model
    key = "net.genes.learnable.hsapiens.weight"
    after = Concept.from_pretrained(project / "model_checkpoints" / "continued").model
    mine = after.mappings["hsapiens"]
    assert mine.size == original.mappings["hsapiens"].size - 15 + 38
    new, old = shared_rows(mine, original.mappings["hsapiens"])
    b, loaded, trained = original.module.state_dict(), seen["state"], after.module.state_dict()
    assert torch.equal(loaded[key][new], b[key][old])
    for k in set(b) - {key}:
        assert torch.equal(loaded[k], b[k]) and torch.equal(trained[k], b[k]), k
    pbmc = ad.read_h5ad(REF / "inputs" / "pbmc.h5ad")
    in_data = np.zeros(mine.size, bool)
    in_data[mine.tokens_of(pbmc.var_names)[mine.tokens_of(pbmc.var_names) >= 0]] = True
    changed = (trained[key] != loaded[key]).any(1).numpy()
    assert not changed[~in_data].any()  # genes absent from the data (and CLS, PAD) untouched
    # kept and added genes alike train (a gene in few cells may not be drawn in 20 steps)
    for rows in (mine.tokens_of(genes["added"]), new[in_data[new]]):
        assert changed[rows].mean() > 0.9, changed[rows].mean()


def test_adapt_reads_in_memory_data_without_a_file_and_skips_what_is_current(tmp_path):
    """In-memory AnnData is compiled from memory: nothing is written under the project's
    data/ (no .h5ad anywhere); adapting again on equal data into the same folder reuses
    the store, on changed data it rebuilds it."""
    m = model("tiny-base")
    folder = tmp_path / "project"

    def adapt_and_status(adata: ad.AnnData) -> list[str]:
        m.adapt(adata, max_steps=2, batch_size=16, max_tokens=64, folder=folder)
        report = json.loads((folder / "compiled" / "compile_report.json").read_text())
        return [f["status"] for f in report["files"]]

    assert adapt_and_status(programs(m, 64, seed=1)) == ["compiled"]
    assert [p for p in (folder / "data").rglob("*") if p.is_file()] == []
    assert list(folder.rglob("*.h5ad")) == []
    assert adapt_and_status(programs(m, 64, seed=1)) == ["skipped"]  # another, equal object
    changed = programs(m, 64, seed=1)
    changed.X.data[0] += 1
    assert adapt_and_status(changed) == ["compiled"]
    assert (folder / "model_checkpoints" / "adapted" / "latest" / "last.ckpt").exists()


def test_adapt_to_another_vocabulary_trains_only_its_gene_table(tmp_path, pbmc):
    """``adapt(train_vocab_only=True, gene_mappings=...)``: the adapted model has the new
    vocabulary, every weight but the gene table is the model's, and it saves and loads
    back; a new vocabulary without train_vocab_only is refused."""
    m = model("tiny-base")
    folder, _ = other_vocabulary(tmp_path)
    with pytest.raises(ConfigError, match="needs train_vocab_only=True"):
        m.adapt(pbmc, gene_mappings=folder)
    adapted = m.adapt(
        pbmc, max_steps=3, batch_size=16, max_tokens=64, train_vocab_only=True, gene_mappings=folder
    )
    mine = adapted.model.mappings["hsapiens"]
    assert mine.path == folder / "hsapiens.csv"
    a, b = adapted.model.module.state_dict(), m.model.module.state_dict()
    key = "net.genes.learnable.hsapiens.weight"
    assert a[key].shape[0] == mine.size != b[key].shape[0]
    assert all(torch.equal(a[k], b[k]) for k in set(b) - {key})
    again = Concept.from_pretrained(adapted.save(tmp_path / "saved"))
    z = adapted.embed(pbmc, precision="32")
    np.testing.assert_allclose(again.embed(pbmc, precision="32"), z, atol=1e-6)
