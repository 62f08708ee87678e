"""Shared fixtures: one Prefect test harness per session, a synthetic archive, a prepared dataset,
and the test-only models `tiny` and `paced`. Also how `make test` spreads the suite over
pytest-xdist workers (README.md, Tests)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import prefect_services

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Several workers share two cores: a command-line run's temporary server, started while
# other tests train, may take longer than Prefect's default to answer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread each: torch's default (a thread per core) in every worker at once only
    # adds switching
    os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.s3_fixtures", "tests.prefect_fixtures"]

# The modules that take longest, longest first. They are handed out first so that their
# waiting on servers and workers overlaps everything else.
LONGEST = ["test_fanout.py", "test_deployments.py", "test_retry.py", "test_s3_run.py", "test_flow.py", "test_skip.py",
           "test_pictures.py", "test_cli.py", "test_portable_trust.py", "test_resume.py", "test_late_runs.py"]
# The modules whose tests share a module-scoped fixture (a server and its workers, the
# fan-out's cluster, a trained model): each is one group, run on one worker in file order.
# Every other test goes on its own to whichever worker is free.
GROUPED = {"test_fanout.py", "test_deployments.py", "test_retry.py", "test_skip.py", "test_pictures.py", "test_fast.py",
           "test_train.py", "test_checkpoint.py", "test_late_runs.py"}
# Grouped modules whose tests are dealt, in turn, into this many groups. Each group runs on a
# worker of its own with its own module fixtures (the fan-out's server, workers and moto), so
# that the minutes its tests spend waiting for heartbeats, crashes and retries overlap.
SPLIT = {"test_fanout.py": 3}


def pytest_configure(config: pytest.Config) -> None:
    """Once a session (in xdist's controller, or a run without workers): the migrated
    database every server starts from (tests/prefect_fixtures.py)."""
    from tests import prefect_fixtures  # here: a plugin (below) is imported by pytest first, to be rewritten

    if not hasattr(config, "workerinput") and not config.option.collectonly:
        config._migrating = prefect_fixtures.start_migrating()


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests import prefect_fixtures

    if hasattr(config, "_migrating"):
        prefect_fixtures.stop_migrating(config._migrating)


def _shares_state(item: pytest.Item) -> bool:
    """Whether the test uses a fixture kept for its module or class."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(defs and defs[-1].scope in ("module", "class", "package")
                                    for defs in info.name2fixturedefs.values())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first, slow tests before quick ones; a module whose tests share state
    and is not grouped is refused (its fixture would be set up on several workers at once)."""
    rank = {name: i for i, name in enumerate(LONGEST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)),
                                 item.get_closest_marker("slow") is None, order[id(item)]))
    loose = sorted({item.path.name for item in items if _shares_state(item) and item.path.name not in GROUPED})
    if loose:
        raise pytest.UsageError(f"{', '.join(loose)}: tests sharing a module-scoped fixture; add to GROUPED in "
                                "tests/conftest.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """For `--dist loadgroup` (make test): the groups above. (xdist's own reads them from node
    ids it rewrites, which pytest 9 no longer takes.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            self.dealt: dict[str, str] = {}
            self.counts: dict[str, int] = {}

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            name = path.rsplit("/", 1)[-1]
            if name not in GROUPED:
                return nodeid
            n = SPLIT.get(name, 1)
            if n == 1:
                return path
            if nodeid not in self.dealt:  # first seen in collection order: dealt in turn
                i = self.counts[name] = self.counts.get(name, -1) + 1
                self.dealt[nodeid] = f"{path}#{i % n}"
            return self.dealt[nodeid]

    return ByModule(config, log)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing import utilities

    from tests import prefect_fixtures

    # the harness's server starts on a copy of the session's migrated database: the harness
    # makes its folder with `mkdtemp` and its database there, as prefect-test.db
    folder = Path(utilities.mkdtemp())
    prefect_fixtures.copy_migrated(folder / "prefect-test.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utilities, "mkdtemp", lambda: str(folder))
        with utilities.prefect_test_harness(server_startup_timeout=120):
            mp.undo()  # read once, as the harness starts
            yield
            # the harness drains Prefect's event and log workers with no bound before it stops;
            # drained here first, one that hangs costs a minute, not the suite (tests/prefect_services.py)
            prefect_services.drain(timeout=60)


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


def register_test_model(mp: pytest.MonkeyPatch, name: str) -> str:
    """Registers `tiny` (the seed network at small widths: the same training loop, a fraction
    of the compute) or `paced` (tiny, its training steps as long as the seed network's), with
    the seed recipe, as the fan-out's processes get them (tests/extras/); returns the name."""
    from cnn.models import MODELS, RECIPES
    from tests.extras import sitecustomize

    mp.setitem(MODELS, name, sitecustomize.TEST_MODELS[name])
    mp.setitem(RECIPES, name, RECIPES["seed"])
    return name


def register_tiny(mp: pytest.MonkeyPatch) -> str:
    return register_test_model(mp, "tiny")


@pytest.fixture
def tiny(monkeypatch) -> str:
    return register_tiny(monkeypatch)


@pytest.fixture
def paced(monkeypatch) -> str:
    return register_test_model(monkeypatch, "paced")
