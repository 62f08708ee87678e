"""Shared fixtures: one Prefect test harness per session, a synthetic archive, a prepared dataset,
and `tiny`, the seed network at small widths. Also how `make test` spreads the suite over
pytest-xdist workers (README.md, Tests)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Several workers share two cores: a command-line run's temporary server, started while
# other tests train, may take longer than Prefect's default to answer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread each: torch's default (a thread per core) in every worker at once only
    # adds switching
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # no two workers share a Prefect home (its SQLite database, its profiles)
    _home = tempfile.mkdtemp(prefix=f"prefect-home-{os.environ['PYTEST_XDIST_WORKER']}-")
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
    os.environ["PREFECT_HOME"] = _home

pytest_plugins = ["tests.s3_fixtures", "tests.prefect_fixtures"]

# The modules that take longest, longest first (measured with --durations). They are
# handed out first so that their waiting on servers and workers overlaps everything else.
LONGEST = ["test_fanout.py", "test_deployments.py", "test_retry.py", "test_s3_run.py", "test_flow.py",
           "test_pictures.py", "test_cli.py", "test_portable_trust.py", "test_resume.py"]
# Grouped modules whose tests are dealt, in turn, into this many groups. Each group runs on a
# worker of its own with its own module fixtures (the fan-out's server, workers and moto), so
# that the minutes its tests spend waiting for heartbeats, crashes and retries overlap.
SPLIT = {"test_fanout.py": 3}


def _shares_state(item: pytest.Item) -> bool:
    """Whether the test uses a fixture kept for its module or class (a server, a cluster, a
    trained model): such tests must run in one worker, in their order."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(defs and defs[-1].scope in ("module", "class", "package")
                                    for defs in info.name2fixturedefs.values())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first, slow tests before quick ones; and with `--dist loadgroup`, a
    module whose tests share a module-scoped fixture is one group (one worker, file order),
    while every other test is handed out on its own."""
    grouped = {item.path.name for item in items if _shares_state(item)}
    rank = {name: i for i, name in enumerate(LONGEST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)),
                                 item.get_closest_marker("slow") is None, order[id(item)]))
    dealt: dict[str, int] = {}
    for item in items:
        if item.path.name in grouped:
            n, i = SPLIT.get(item.path.name, 1), dealt.setdefault(item.path.name, 0)
            dealt[item.path.name] += 1
            item.add_marker(pytest.mark.xdist_group(item.path.stem if n == 1 else f"{item.path.stem}-{i % n}"))


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
