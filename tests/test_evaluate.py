"""Evaluation: metrics with known answers, the baseline, and a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from test_embed import h5ads, trained_run

from concept.baseline import PcaBaseline, highly_variable
from concept.config import ConfigError, validate_schema
from concept.eval_metrics import classification_scores, knn_predict, view_recall
from concept.evaluate import EvaluateConfig, evaluate, table
from concept.inference import Embedder
from concept.pretrained import load


def clusters(rng, n_per: int, n_types: int, dim: int, spread: float):
    """Points around ``n_types`` orthogonal centres, labelled by centre."""
    labels = np.repeat([f"type{t}" for t in range(n_types)], n_per)
    centres = np.eye(n_types, dim)[np.repeat(np.arange(n_types), n_per)]
    return centres + spread * rng.normal(size=centres.shape), labels


def test_separated_clusters_transfer_perfectly():
    rng = np.random.default_rng(0)
    ref, ref_y = clusters(rng, 60, 5, 16, 0.05)
    query, query_y = clusters(rng, 30, 5, 16, 0.05)
    pred = knn_predict(ref, ref_y, query, k=15)
    assert classification_scores(query_y, pred) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_random_embeddings_are_near_chance():
    rng = np.random.default_rng(1)
    n_types = 5
    ref_y = rng.choice([f"t{i}" for i in range(n_types)], 2000)
    query_y = rng.choice([f"t{i}" for i in range(n_types)], 1000)
    pred = knn_predict(rng.normal(size=(2000, 16)), ref_y, rng.normal(size=(1000, 16)), k=15)
    scores = classification_scores(query_y, pred)
    assert 0.12 < scores["accuracy"] < 0.28
    assert 0.10 < scores["macro_f1"] < 0.28


def test_view_recall_known_answers():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(128, 16))
    assert view_recall(z, z + 1e-3 * rng.normal(size=z.shape)) == 1.0
    assert view_recall(z, rng.normal(size=z.shape)) < 0.1  # chance 1/128


def test_highly_variable_finds_the_variable_genes():
    rng = np.random.default_rng(3)
    counts = rng.poisson(5.0, size=(300, 40)).astype(np.float64)
    counts[:, [7, 21]] = rng.poisson(5.0, size=(300, 2)) * rng.choice([0, 10], size=(300, 2))
    x = sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4))
    assert list(highly_variable(x, 2, n_bins=1)) == [7, 21]


def test_a_view_of_every_gene_is_the_full_projection():
    rng = np.random.default_rng(4)
    x = sp.random(80, 30, density=0.4, format="csr", random_state=4)
    base = PcaBaseline(x, np.arange(30), n_pcs=5, seed=0)
    np.testing.assert_allclose(base.project_view(x, np.arange(30)), base.transform(x), atol=1e-10)
    # a view of some genes ignores the rest (held at the mean)
    y = x.toarray()
    y[:, 10:] = rng.normal(size=(80, 20))
    np.testing.assert_allclose(
        base.project_view(sp.csr_matrix(y), np.arange(10)),
        base.project_view(x, np.arange(10)),
        atol=1e-10,
    )


def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown config key 'panel_size'"):
        validate_schema({"checkpoint": "c", "panel_size": [200]}, EvaluateConfig)
    with pytest.raises(ConfigError, match="excludes"):
        validate_schema({"checkpoint": "c", "inputs": ["a", "b"], "query": ["a"]}, EvaluateConfig)
    with pytest.raises(ConfigError, match="plot"):
        validate_schema({"checkpoint": "c", "plot": "umap"}, EvaluateConfig)


@pytest.fixture(scope="session")
def embedder(tmp_path_factory, compiled) -> Embedder:
    run = trained_run(tmp_path_factory.getbasetemp(), compiled)
    return Embedder(load(run), device="cpu", precision="32")


def test_evaluate_end_to_end(embedder, tmp_path, capsys):
    """Default files (the run's val split against its train split), both species."""
    cfg = EvaluateConfig(
        checkpoint=str(embedder.run_dir), output_dir=str(tmp_path), plot="pca", progress=False
    )
    report = evaluate(cfg, embedder)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["metrics"] == report["metrics"]
    assert (tmp_path / "evaluation.png").stat().st_size > 10_000
    md = (tmp_path / "evaluation.md").read_text()
    assert "| knn_accuracy_cell_type |" in md
    roles = {f["path"].rsplit("/", 1)[-1]: f["role"] for f in report["files"]}
    assert roles["hs_csr_e.h5ad"] == roles["mm_csr_c.h5ad"] == "query"
    assert roles["hs_csr_a.h5ad"] == "reference"
    m = report["metrics"]
    for col in ("model", "baseline"):
        assert 0.3 < m["knn_accuracy_cell_type"][col] <= 1.0  # 8 types: chance ~0.125
        assert 0.0 <= m["view_recall@1_P200"][col] <= 1.0
    assert m["view_recall@1_P6400"] == {"model": None, "baseline": None}  # 3,000 genes
    assert "view_recall@1_P800" in table(report)
    # determinism: a second run reports the same numbers
    assert evaluate(cfg, embedder)["metrics"] == report["metrics"]


def test_leave_one_dataset_out(embedder, compiled, tmp_path):
    files = [str(h5ads(compiled) / f"hs_{n}.h5ad") for n in ("csr_a", "raw_b", "csr_e")]
    cfg = EvaluateConfig(
        checkpoint=str(embedder.run_dir),
        inputs=files,
        panel_sizes=[200],
        output_dir=str(tmp_path),
        plot="pca",
        progress=False,
    )
    report = evaluate(cfg, embedder)
    assert {f["role"] for f in report["files"]} == {"query+reference"}
    assert report["metrics"]["knn_accuracy_cell_type"]["model"] > 0.3


def test_split_overrides_and_config_dir_choose_the_files(embedder, compiled, tmp_path):
    """``--config-dir`` + ``datamodule/split_<group>=<name>``, as for compile and train: the
    split's train files are the reference, its val files the query."""
    from hydra import compose, initialize_config_dir

    from concept.config import CONF_DIR
    from concept.evaluate import plan_folds

    group = tmp_path / "datamodule" / "split_cellxgene_hsapiens"
    group.mkdir(parents=True)
    (group / "split_mine.yaml").write_text(
        "source_name: synth_cxg\nspecies: hsapiens\n"
        "source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads\n"
        "train: [hs_csr_a.h5ad, hs_raw_b.h5ad]\nval: [hs_dense_d.h5ad]\n"
    )
    overrides = [
        f"checkpoint={embedder.run_dir}",
        f"PATH.PROJECT_PATH={compiled}",
        "datamodule/split_cellxgene_hsapiens=split_mine",
        f"hydra.searchpath=[file://{tmp_path}]",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = validate_schema(compose(config_name="evaluate", overrides=overrides), EvaluateConfig)
    ((reference, query),) = plan_folds(cfg, embedder)
    assert [Path(f.path).name for f in reference] == ["hs_csr_a.h5ad", "hs_raw_b.h5ad"]
    assert [Path(f.path).name for f in query] == ["hs_dense_d.h5ad"]
    assert {f.species for f in reference + query} == {"hsapiens"}
