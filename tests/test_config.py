"""Configs compose, validate strictly, and resolve splits to files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from concept.config import CONF_DIR, ConfigError, load_config, validate, validate_schema
from concept.splits import configured_files, resolve_split_list, train_files, val_files

P = "PATH.PROJECT_PATH=/data/project"


@pytest.mark.parametrize("datamodule", ["DataModuleBasic", "DataModuleSynthMultiSpecies"])
def test_every_datamodule_composes(datamodule):
    cfg = load_config([P, f"datamodule={datamodule}"])
    assert cfg.datamodule.dataset.train.max_tokens == 1000
    assert sorted(cfg.datamodule.dataset.val) == [
        "same_as_train",
        "within_P200_B256",
        "within_P6400_B256",
        "within_P800_B256",
    ]


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("config", [P]),
        ("demo", [P]),
        ("embed", ["checkpoint=c", "input=i.h5ad", "output=o.h5ad"]),
        ("evaluate", ["checkpoint=c"]),
    ],
)
def test_every_root_config_composes_and_validates(name, overrides):
    from concept.embed import EmbedConfig
    from concept.evaluate import EvaluateConfig

    schema = {"embed": EmbedConfig, "evaluate": EvaluateConfig}.get(name)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name=name, overrides=overrides)
    typed = validate(cfg) if schema is None else validate_schema(cfg, schema)
    assert typed is not None


def test_reference_defaults():
    cfg = load_config([P])
    m, t = cfg.model, cfg.model.training
    assert (m.nlayers, m.dim_model, m.num_head, m.dim_hid, m.pe_max_len) == (8, 512, 8, 1024, 5000)
    assert (m.logit_scale_init_value, m.loss_switch_step, m.input_encoding) == (
        3.0,
        10000,
        "rank_encoding",
    )
    assert (t.lr, t.warmup, t.gradient_clip_val, t.val_check_interval) == (1e-4, 10000, 1.0, 100000)
    d = cfg.datamodule
    assert (d.dataset.train.panel_selection, d.dataset.train.panel_size_min) == ("mixed", 0.02)
    assert (
        d.dataloader.train.batch_size == 128
        and d.dataloader.val["within_P200_B256"].batch_size == 256
    )
    assert d.dataset.val["within_P800_B256"].panel_size_min == 800
    assert (
        d.dataset.val["same_as_train"].panel_max_drop_rate is None
    )  # not copied, as the reference
    assert cfg.PATH.PRETRAINED_VOCABULARY is None  # no crash for a new user
    assert cfg.PATH.CHECKPOINT_ROOT == "/data/project/model_checkpoints"
    assert cfg.PATH.COMPILED_ROOT == "/data/project/compiled"


def test_dotted_overrides_reach_the_typed_config():
    cfg = load_config(
        [P, "model.training.max_steps=7", "datamodule.dataset.train.panel_overlap=0.3"]
    )
    assert cfg.model.training.max_steps == 7 and cfg.datamodule.dataset.train.panel_overlap == 0.3
    # val loaders copy the train panel settings by interpolation
    assert cfg.datamodule.dataset.val["same_as_train"].panel_overlap == 0.3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+model.nlayer=3"], "unknown config key 'model.nlayer' (did you mean nlayers"),
        (["model.nlayers=eight"], "bad value for 'model.nlayers'"),
        (["model.norm_scheme=middle"], "model.norm_scheme='middle': expected one of pre, post"),
        (["compile.x_source=layers"], "compile.x_source"),
        (["datamodule.normalization=binning/x"], "binning needs an integer"),
    ],
)
def test_bad_values_fail_clearly(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config([P, *overrides])
    assert message in str(err.value)


def test_missing_project_path_names_the_key():
    with pytest.raises(ConfigError, match="missing value for PATH.PROJECT_PATH"):
        load_config([])


def test_split_resolution(synth_project):
    cfg = load_config(
        [f"PATH.PROJECT_PATH={synth_project}", "datamodule=DataModuleSynthMultiSpecies"]
    )
    h5 = synth_project / "data/synth_cxg/h5ads"
    train = train_files(cfg)
    assert [f.path for f in train] == [
        h5 / n
        for n in ("hs_csr_a", "hs_raw_b", "hs_csc_c", "hs_dense_d", "mm_csr_a", "mm_raw_b")
        for n in [f"{n}.h5ad"]
    ]
    assert {f.species for f in train} == {"hsapiens", "mmusculus"}
    assert all(
        f.section == "train" and f.source_name == "synth_cxg" and f.path.exists() for f in train
    )
    vals = val_files(cfg)
    assert [f.path.name for f in vals["within_P800_B256"]] == ["hs_csr_e.h5ad"]
    everything = configured_files(cfg)  # both lists of every split in use, once each
    assert len(everything) == 8 and len({f.path for f in everything}) == 8
    # {source, key} wrappers choose the section
    split = cfg.splits["split_cellxgene_hsapiens"]
    picked = resolve_split_list([{"source": split, "key": "val"}], "train")
    assert [f.path.name for f in picked] == ["hs_csr_e.h5ad"] and picked[0].section == "val"
    with pytest.raises(ConfigError, match="split entry must be a split dict"):
        resolve_split_list(["a.h5ad"], "train")


def test_bring_your_own_split(tmp_path):
    """A user's split in their own config folder, selected from the command line."""
    folder = tmp_path / "myconf" / "datamodule" / "split_cellxgene_hsapiens"
    folder.mkdir(parents=True)
    (folder / "split_mine.yaml").write_text(
        "source_name: my_atlas\nspecies: hsapiens\n"
        "source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads\n"
        "train: [donor1.h5ad, donor2.h5ad]\nval: [donor3.h5ad]\n"
    )
    cfg = load_config(
        [f"PATH.PROJECT_PATH={tmp_path}", "datamodule/split_cellxgene_hsapiens=split_mine"],
        config_dir=tmp_path / "myconf",
    )
    assert [f.path for f in train_files(cfg)] == [
        Path(tmp_path) / "data/my_atlas/h5ads" / n for n in ("donor1.h5ad", "donor2.h5ad")
    ]
    assert [f.path.name for f in val_files(cfg)["within_P200_B256"]] == ["donor3.h5ad"]
