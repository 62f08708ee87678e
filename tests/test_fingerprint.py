"""The run fingerprint's parts (run/fingerprint.py) and the night's claim (tasks/skip.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from run import fingerprint as fp
from run.params import RunParams
from store import open_store

# what the params part holds today; a new RunParams field fails this test until it is
# added here (it decides the model) or to NOT_IN_PARAMS with the reason why not
IN_PARAMS = {"model", "variants", "epochs", "patience", "batch_size", "lr", "subset", "seed", "repeats",
             "select_metric", "compile", "precision", "purge_test_duplicates",
             # they decide which epochs are trained, so which model comes out
             "budget_gpu_hours", "halving", "halving_min_epochs", "halving_factor"}


@pytest.fixture
def tree(tmp_path):
    """A copy of the product packages."""
    for pkg in fp.PACKAGES:
        shutil.copytree(fp.ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_comment_docstring_or_reformat_keeps_the_code_digest(tree):
    before = fp.code_digest(tree)
    assert before == fp.code_digest(fp.ROOT)  # the copy is the product
    path = tree / "run" / "report.py"
    src = path.read_text()
    src = src.replace('"""The run\'s report:', '"""Reworded: the run\'s report:', 1)  # the module docstring
    src = src.replace("DPI = 80\n", "DPI = (\n    80  # dots per inch\n)\n\n\n# a comment\n", 1)
    assert src != path.read_text()
    path.write_text(src)
    assert fp.code_digest(tree) == before


def test_a_real_edit_of_any_product_module_changes_the_code_digest(tree):
    before = fp.code_digest(tree)
    path = tree / "store" / "base.py"
    path.write_text(path.read_text().replace("MAX_DOCUMENT_BYTES = 16 << 20", "MAX_DOCUMENT_BYTES = 17 << 20", 1))
    assert fp.code_digest(tree) != before
    (tree / "cli" / "extra.py").write_text("X = 1\n")  # a new module counts too
    assert fp.code_digest(tree) != before


def test_every_run_parameter_is_in_the_params_part_or_excluded_with_a_reason():
    fields = set(RunParams.model_fields)
    part = fp.params_part(RunParams(dataset="synthetic"))
    assert set(part) == IN_PARAMS == fields - set(fp.NOT_IN_PARAMS)
    assert set(fp.NOT_IN_PARAMS) - fields <= {"late_runs"}  # added by another change
    assert all(reason.strip() for reason in fp.NOT_IN_PARAMS.values())
    for out in ("store", "run_id", "force", "link_expiry_hours", "fanout_deadline_hours", "store_outage_minutes",
                "device", "variants_per_gpu", "late_runs"):
        assert out in fp.NOT_IN_PARAMS


def test_a_new_parameter_counts_by_default():
    class Wider(RunParams):
        width: int = 2

    assert fp.params_part(Wider(dataset="synthetic"))["width"] == 2


def test_recipe_defaults_are_resolved():
    """lr=None and lr=<the recipe's> train the same model: one fingerprint."""
    default = fp.params_part(RunParams(dataset="synthetic"))
    assert default["lr"] is not None and default["batch_size"] is not None
    same = fp.params_part(RunParams(dataset="synthetic", lr=default["lr"], batch_size=default["batch_size"]))
    assert same == default
    assert fp.params_part(RunParams(dataset="synthetic", lr=default["lr"] / 2)) != default


def test_the_environment_part_reads_the_image_and_locked_versions(monkeypatch):
    import torch

    monkeypatch.delenv(fp.IMAGE_ENV, raising=False)
    monkeypatch.delenv(fp.IMAGE_ID_ENV, raising=False)
    env = fp.environment()
    assert env["image"] is None and env["image_id"] is None
    assert env["torch"] == torch.__version__ and env["torchvision"]
    assert env["boto3"] and env["prefect"]  # from constraints.txt
    monkeypatch.setenv(fp.IMAGE_ENV, "ghcr.io/your-org/train-cifar:0123abc")
    monkeypatch.setenv(fp.IMAGE_ID_ENV, "sha256:" + "a" * 64)
    env = fp.environment()
    assert env["image"] == "ghcr.io/your-org/train-cifar:0123abc" and env["image_id"] == "sha256:" + "a" * 64


def test_torchvision_is_named_with_its_build_without_being_imported():
    """The fingerprint and the manifest name torchvision's own version (build included), read
    from its version.py: a fresh process that computes both has not imported torchvision."""
    script = ("import sys; from run.fingerprint import environment; from tasks.publish import versions; "
              "seen = (environment()['torchvision'], versions()['torchvision'], 'torchvision' in sys.modules); "
              "import torchvision; print(json.dumps([*seen, torchvision.__version__]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + script], cwd=fp.ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    fingerprinted, in_manifest, imported, real = json.loads(out.stdout.splitlines()[-1])
    assert not imported
    assert fingerprinted == in_manifest == real  # the build included (0.29.1+cu130 here)


def test_changed_parts_name_only_what_differs():
    now = {"code": "b", "params": {"epochs": 2, "seed": 0}, "environment": {"torch": "2", "image": None}}
    before = {"code": "a", "params": {"epochs": 1, "seed": 0}, "environment": {"torch": "2", "image": None}}
    got = fp.Fingerprint(now, fp.digest_of(now)).compared("r1", before)
    assert got.champion_run_id == "r1"
    assert got.changed_since_champion == {"code": {"champion": "a", "now": "b"},
                                          "params": {"champion": {"epochs": 1}, "now": {"epochs": 2}}}
    unknown = fp.Fingerprint(now, fp.digest_of(now)).compared("r0", None)  # a champion from before fingerprints
    assert set(unknown.changed_since_champion) == set(now)


def test_the_night_is_claimed_once(tmp_path):
    from tasks.skip import claim_night

    store = open_store(str(tmp_path))
    assert claim_night(store, "nightly", "2026-12-06", "d" * 64, "run-a") is None
    assert claim_night(store, "nightly", "2026-12-06", "d" * 64, "run-a") is None  # a retry of run-a goes on
    held = claim_night(store, "nightly", "2026-12-06", "d" * 64, "run-b")
    assert held is not None and held.run_id == "run-a" and held.why == "night"
    assert claim_night(store, "nightly", "2026-12-07", "d" * 64, "run-b") is None  # another night
    assert claim_night(store, "nightly", "2026-12-06", "e" * 64, "run-b") is None  # another fingerprint


def test_a_champion_manifest_whose_parts_do_not_hash_to_the_record_is_not_believed(tmp_path):
    from run.layout import MANIFEST, run_key
    from tasks.skip import _champion_parts

    store = open_store(str(tmp_path))
    parts = {"code": "a"}
    digest = fp.digest_of(parts)
    store.put_bytes(run_key("r1", MANIFEST), json.dumps({"fingerprint": {"digest": digest, "parts": parts}}).encode(),
                    tmp_path / "tmp")
    assert _champion_parts(store, "r1", digest) == parts
    store.put_bytes(run_key("r1", MANIFEST), json.dumps({"fingerprint": {"digest": digest, "parts": {"code": "x"}}}
                                                        ).encode(), tmp_path / "tmp")
    assert _champion_parts(store, "r1", digest) is None


@pytest.mark.slow
def test_the_command_line_says_what_a_skipped_run_matched(tmp_path, monkeypatch, prefect_harness, capsys):
    """In-process, under the test harness: the second identical run's state and the CLI's last word."""
    from flows.train_cifar import _last_word, train_cifar

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    params = RunParams(dataset="synthetic", synthetic_train=300, synthetic_test=100, variants=["none"], epochs=1,
                       subset=100, store=str(tmp_path / "store"), device="cpu").model_dump()
    first = train_cifar(**params, return_state=True)
    assert first.name == "Completed"
    again = train_cifar(**params, return_state=True)
    assert again.is_completed() and again.name == "Skipped"
    capsys.readouterr()
    assert _last_word(again, None, None, False) == 0
    out, err = capsys.readouterr()
    skipped = Path(out.strip().splitlines()[-1])
    assert skipped.name == "skipped.json" and skipped.is_file()
    assert first.result()["run_id"] in err and "force" in err


def test_only_a_scheduled_run_of_a_deployment_has_a_night(monkeypatch):
    """The night is the scheduled start's date in UTC; a run started by hand has none."""
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    import prefect.context
    from prefect.runtime import deployment, flow_run

    from tasks.skip import scheduled_night

    start = datetime(2026, 12, 7, 1, 30, tzinfo=timezone(timedelta(hours=2)))  # 23:30 UTC the day before
    monkeypatch.setattr(deployment, "name", "nightly", raising=False)
    monkeypatch.setattr(flow_run, "scheduled_start_time", start, raising=False)
    for auto, expected in ((True, ("nightly", "2026-12-06")), (False, None)):
        run = SimpleNamespace(flow_run=SimpleNamespace(auto_scheduled=auto))
        monkeypatch.setattr(prefect.context.FlowRunContext, "get", classmethod(lambda cls, run=run: run))
        assert scheduled_night() == expected


def test_before_the_checks_only_a_champion_that_checked_the_same_inputs_lends_its_result():
    def parts(**dataset):
        base = {"name": "synthetic", "md5": "m", "sha256": "s", "split_seed": 0, "test_size": 350,
                "check_thresholds": {"max_blank_images": 0}, "data_checks": "c" * 64}
        return {"dataset": {**base, **dataset}, "code": "k", "environment": {"torch": "2.14.1"},
                "params": {"epochs": 1}}

    champion = parts()
    unchecked = fp.Fingerprint(parts(data_checks=None), fp.digest_of(parts(data_checks=None)))
    lent = unchecked.with_checks_of(champion)
    assert lent.digest == fp.digest_of(champion) and lent.parts["dataset"]["data_checks"] == "c" * 64
    # anything the check's result depends on differs: nothing lent, so it matches nothing
    for other in (parts(sha256="t"), parts(check_thresholds={"max_blank_images": 5}),
                  {**parts(), "code": "k2"}, {**parts(), "params": {"epochs": 2}}):
        mine = {**other, "dataset": {**other["dataset"], "data_checks": None}}
        assert fp.Fingerprint(mine, fp.digest_of(mine)).with_checks_of(champion).digest != fp.digest_of(champion)
    assert unchecked.with_checks_of(None) is unchecked
