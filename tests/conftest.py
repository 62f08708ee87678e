"""Shared fixtures: one Prefect test harness per session, a synthetic archive, a prepared dataset,
and `tiny`, the seed network at small widths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

pytest_plugins = ["tests.s3_fixtures", "tests.prefect_fixtures"]


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def synthetic_archive(tmp_path_factory) -> tuple[Path, str]:
    """A small synthetic CIFAR-format archive: (path, md5)."""
    from cnn.synthetic import write_archive

    return write_archive(tmp_path_factory.mktemp("synthetic"), n_train=2000, n_test=400, seed=0)


@pytest.fixture(scope="session")
def prepared_dir(synthetic_archive, tmp_path_factory) -> Path:
    from cnn.data import prepare

    path, md5 = synthetic_archive
    return prepare(path, md5, tmp_path_factory.mktemp("prepared"))


def register_tiny(mp: pytest.MonkeyPatch) -> str:
    """Registers `tiny`: the seed network at small widths with the seed recipe (the same
    training loop, a fraction of the compute); returns its name."""
    from cnn.models import MODELS, RECIPES, SeedNet

    mp.setitem(MODELS, "tiny", lambda num_classes=10: SeedNet((8, 8, 16, 16, 16, 16), 32, num_classes))
    mp.setitem(RECIPES, "tiny", RECIPES["seed"])
    return "tiny"


@pytest.fixture
def tiny(monkeypatch) -> str:
    return register_tiny(monkeypatch)
