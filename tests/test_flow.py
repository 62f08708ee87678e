"""The train-cifar flow under Prefect's test harness, on a small synthetic set."""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch

import cnn.augment
import cnn.config
import cnn.train
import tasks.testing
from store import LocalStore, sha256_of
from registry import champions
from run.layout import Unit, stored_key

pytestmark = pytest.mark.slow

MANIFEST_FIELDS = {"run_id", "created_at", "git_sha", "params", "dataset", "variants", "selected", "test",
                   "promoted", "promotion_reason", "artifacts", "versions", "device"}
VARIANT_FIELDS = {"name", "status", "epochs_run", "best_epoch", "val_loss", "val_accuracy", "seconds"}


def _poison(x, g):  # a variant whose loss is NaN from the first step
    return x * float("nan")


def _broken(x, g):  # a variant whose task fails outright
    raise RuntimeError("broken augmentation step")


def _artifacts(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


@pytest.fixture
def run_env(tmp_path, monkeypatch, prefect_harness):
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(cnn.augment.VARIANTS, "poison", [_poison])
    monkeypatch.setitem(cnn.augment.VARIANTS, "broken", [_broken])
    return tmp_path


def test_flow_end_to_end(run_env, synthetic_archive, monkeypatch, tiny):
    from flows.train_cifar import train_cifar

    path, md5 = synthetic_archive
    calls = {"test": [], "val": []}
    real_train_eval, real_test_eval = cnn.train.evaluate, tasks.testing.evaluate
    lock = threading.Lock()

    def train_eval(model, x, *a, **k):
        with lock:
            calls["val"].append(len(x))
        return real_train_eval(model, x, *a, **k)

    def test_eval(model, x, *a, **k):
        with lock:
            calls["test"].append(len(x))
        return real_test_eval(model, x, *a, **k)

    monkeypatch.setattr(cnn.train, "evaluate", train_eval)
    monkeypatch.setattr(tasks.testing, "evaluate", test_eval)

    store = run_env / "store"
    out = train_cifar(data_dir=str(path.parent), data_md5=md5, variants=["none", "poison", "flip", "broken"],
                      model=tiny, epochs=3, patience=2, subset=800, store=str(store), device="cpu")
    manifest = json.loads(Path(out["manifest"]).read_text())

    assert MANIFEST_FIELDS <= set(manifest)
    assert set(manifest["dataset"]) >= {"source", "md5", "sizes", "split_seed"}
    assert manifest["dataset"]["md5"] == md5
    assert manifest["dataset"]["sizes"] == {"train": 800, "val": 260, "test": 140}
    assert set(manifest["versions"]) == {"python", "torch", "torchvision", "prefect"}
    status = {v["name"]: v["status"] for v in manifest["variants"]}
    assert status["poison"] == "diverged" and status["broken"] == "failed"
    assert status["none"] in ("completed", "early_stopped") and status["flip"] in ("completed", "early_stopped")
    assert all(VARIANT_FIELDS <= set(v) for v in manifest["variants"])
    assert manifest["selected"] in ("none", "flip")
    best = max((v for v in manifest["variants"] if v["name"] in ("none", "flip")),
               key=lambda v: (v["val_accuracy"], -v["val_loss"]))
    assert manifest["selected"] == best["name"]
    assert set(manifest["test"]) == {"loss", "accuracy", "per_class"} and len(manifest["test"]["per_class"]) == 10
    ident = manifest["dataset"]["identity"]
    assert manifest["promoted"] is True and manifest["promotion_reason"] == f"no champion yet for dataset {ident}"

    # the test split was evaluated exactly once; training only ever saw validation
    assert calls["test"] == [140]
    assert set(calls["val"]) == {260}

    # every file in the manifest exists with the recorded hash and size
    for name, a in manifest["artifacts"].items():
        p = Path(a["uri"])
        assert p.is_file(), name
        assert sha256_of(p) == a["sha256"] and p.stat().st_size == a["bytes"], name
    run = store / "runs" / manifest["run_id"]
    for rel in ["report.md", "model/weights.safetensors", "model/model.pt2", "model/metrics.json",
                "model/confusion_matrix.csv"]:
        assert (run / rel).is_file(), rel
    for name in ["history.csv", "metrics.json", "checkpoint.safetensors"]:  # where the unit's lease names them
        assert (store / stored_key(LocalStore(store), manifest["run_id"], Unit("none", 0), name)).is_file(), name
    assert champions.read(LocalStore(store), ident)["run_id"] == manifest["run_id"]

    # the portable model loads with plain torch and agrees with the reported accuracy
    from cnn.data import load_splits

    m = torch.export.load(run / "model" / "model.pt2").module()
    splits = load_splits(store / "datasets" / "cifar10" / md5, 0)
    acc = (m(splits.test_x.float() / 255).argmax(1) == splits.test_y).float().mean().item()
    assert acc == pytest.approx(manifest["test"]["accuracy"], abs=0.01)
    assert acc > 0.2  # well above chance (0.1) even after 3 short epochs

    # the UI artifacts, read back through the Prefect API
    arts = _artifacts(manifest["flow_run_id"])
    for key in ["progress-none", "progress-flip", "progress-poison", "variant-comparison", "report", "manifest", "model"]:
        assert key in arts, key
    assert arts["progress-none"].data == 100.0
    table = json.loads(arts["variant-comparison"].data) if isinstance(arts["variant-comparison"].data, str) else arts["variant-comparison"].data
    assert {row["variant"] for row in table} == {"none", "poison", "flip", "broken"}
    assert f"Selected variant **{manifest['selected']}**" in arts["report"].data


def test_the_test_runs_at_the_precision_of_its_own_device(run_env, synthetic_archive, monkeypatch):
    """Variants trained in bf16 (as 'auto' resolves on a GPU, where fan-out's children
    run) are tested here on the CPU, where 'auto' is fp32: no bf16 autocast on the CPU."""
    from flows.train_cifar import train_cifar

    path, md5 = synthetic_archive
    from run.context import RunContext

    trains_with = RunContext.config  # the trainer's view: bf16, as on a GPU
    monkeypatch.setattr(RunContext, "config", lambda self, unit, device: dataclasses.replace(
        trains_with(self, unit, device), precision="bf16"))
    amps = []
    real_test_eval = tasks.testing.evaluate

    def test_eval(model, x, *a, **k):
        amps.append(k["amp"])
        return real_test_eval(model, x, *a, **k)

    monkeypatch.setattr(tasks.testing, "evaluate", test_eval)
    out = train_cifar(data_dir=str(path.parent), data_md5=md5, variants=["none"], epochs=1, subset=300,
                      store=str(run_env / "store"), device="cpu", precision="auto")
    manifest = json.loads(Path(out["manifest"]).read_text())
    assert manifest["configs"]["none"]["precision"] == "bf16"
    assert amps == [False]


def test_flow_fails_clearly_when_no_variant_succeeds(run_env, synthetic_archive):
    from flows.train_cifar import train_cifar

    path, md5 = synthetic_archive
    store = run_env / "store"
    with pytest.raises(RuntimeError, match="no variant finished training.*poison: diverged"):
        train_cifar(data_dir=str(path.parent), data_md5=md5, variants=["poison"], epochs=2, subset=300,
                    store=str(store), device="cpu")
    assert not (store / "champions").exists()
    assert not list(store.glob("runs/*/manifest.json"))


def test_invalid_parameter_fails_the_flow_before_data(run_env):
    from flows.train_cifar import train_cifar

    with pytest.raises(ValueError, match="epochs: Input should be greater than or equal to 1, found 0"):
        train_cifar(dataset="synthetic", epochs=0, store=str(run_env / "store"))
    assert not (run_env / "store").exists() and not (run_env / "cache").exists()


def test_rerun_with_same_run_id_resumes_and_promotion_needs_a_better_model(run_env, synthetic_archive):
    from flows.train_cifar import train_cifar

    path, md5 = synthetic_archive
    store = run_env / "store"
    kw = dict(data_dir=str(path.parent), data_md5=md5, variants=["none"], epochs=2, subset=300,
              store=str(store), device="cpu")
    first = train_cifar(run_id="run-a", **kw)
    def history() -> str:
        return (store / stored_key(LocalStore(store), "run-a", Unit("none", 0), "history.csv")).read_text()

    before = history()
    # the same run id again: the finished variant is resumed from its checkpoint, not retrained
    again = train_cifar(run_id="run-a", **kw)
    assert history() == before
    # the same run id with another learning rate: refused before anything trains
    with pytest.raises(ValueError, match=r"^run run-a: unit none in the store .* lr 0\.05 \(stored\) "
                                         r"vs 0\.2 \(asked\)"):
        train_cifar(run_id="run-a", **{**kw, "lr": 0.2})
    assert history() == before
    assert again["test_accuracy"] == first["test_accuracy"]
    # it is still the champion: the rerun records the promotion it made, not a comparison with itself
    assert again["promoted"] is True
    m = json.loads((store / "runs/run-a/manifest.json").read_text())
    assert m["promotion_reason"].startswith("no champion yet for dataset")
    # another run training an identical model on the same split does not beat the champion
    # (forced: with the champion's fingerprint it would be skipped, trained nothing)
    other = train_cifar(run_id="run-b", force=True, **kw)
    assert other["promoted"] is False and other["compared_with"] == "run-a"
    m = json.loads((store / "runs/run-b/manifest.json").read_text())
    # the champion's model was tested on the same images: (nearly) the same predictions
    faced = m["test"]["champion_comparison"]
    assert faced["champion_run_id"] == "run-a" and abs(faced["difference"]) < 0.05 and faced["ci"][0] <= 0
    assert "champion run-a" in m["promotion_reason"] and "not enough to promote" in m["promotion_reason"]


@pytest.mark.parametrize("variants,devices,per_device", [
    (list("abcdef"), ["cuda:0", "cuda:1"], 2), (list("abc"), ["cpu"], 1), (["a"], ["cuda:0", "cuda:1"], 3),
    (list("abcdefg"), ["cuda:0", "cuda:1", "cuda:2"], 1)])
def test_lanes_never_put_more_than_per_device_variants_on_a_device(variants, devices, per_device):
    from collections import Counter

    from flows.variants import plan_lanes

    lanes = plan_lanes(variants, devices, per_device)
    assert sorted(v for _, names in lanes for v in names) == sorted(variants)  # each variant once
    assert max(Counter(d for d, _ in lanes).values()) <= per_device  # lanes run at once: per device
    assert len(lanes) == min(len(variants), len(devices) * per_device)  # and every slot is used


def test_manifest_never_claims_a_promotion_that_did_not_happen(run_env, synthetic_archive, monkeypatch):
    """If writing champion.json fails, the run fails, the champion is untouched and the
    sealed manifest says the promotion is pending, not done."""
    from flows.train_cifar import train_cifar
    from store import StoreError

    def refuse(*a, **k):
        raise StoreError("champion.json: access denied (test)")

    monkeypatch.setattr(champions, "promote", refuse)
    path, md5 = synthetic_archive
    store = run_env / "store"
    with pytest.raises(StoreError, match="access denied"):
        train_cifar(data_dir=str(path.parent), data_md5=md5, variants=["none"], epochs=1, subset=300,
                    store=str(store), device="cpu", run_id="run-p")
    m = json.loads((store / "runs/run-p/manifest.json").read_text())
    assert m["promoted"] is False and m["promotion_reason"].startswith("pending: no champion yet for dataset")
    assert not (store / "champions").exists()
