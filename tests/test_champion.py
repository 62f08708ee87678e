"""Champions per dataset identity, their history and rollback, and a retried publish.

Champion records and run inputs are fabricated (nothing is trained); the store is
a real local folder, and S3 through moto where marked.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import threading

import pytest

from cli import champion as cli
from store import LocalStore, PreconditionFailed, open_store
from registry import champions
from tests import prefect_services
from tests.judges import promote_by_accuracy

CIFAR = dict(name="cifar10", md5="c58f30108f718f92721af3b95e74349a", test_size=3500)
SYNTH = dict(name="synthetic", md5="5" * 32, test_size=350)


def _record(run_id: str, acc: float, name="cifar10", md5=CIFAR["md5"], split_seed=0, test_size=3500) -> dict:
    return {"run_id": run_id, "model_uri": f"runs/{run_id}/model", "test": {"accuracy": acc, "loss": 1 - acc},
            "dataset_name": name, "dataset_md5": md5, "split_seed": split_seed, "test_size": test_size}


NIGHTLY = champions.identity(_record("x", 0))


@pytest.fixture
def events(monkeypatch, prefect_harness):
    """The Prefect events this test emits, caught by Prefect's own asserting client."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    EventsWorker.set_client_override(AssertingEventsClient)
    AssertingEventsClient.reset()

    def emitted() -> list:
        abandoned = prefect_services.drain(timeout=60, client_type=AssertingEventsClient)
        assert not abandoned, f"Prefect's events worker did not deliver this test's events within 60 s: {abandoned}"
        return [e for c in AssertingEventsClient.all for e in c.events]

    try:
        yield emitted
    finally:
        prefect_services.drain(timeout=60)  # never unbounded (tests/prefect_services.py)
        EventsWorker.set_client_override(None)
        AssertingEventsClient.reset()


def _publish(store_uri: str, run_id: str, acc: float, dataset: dict, split_seed: int = 0) -> dict:
    """publish_run's logic on fabricated results: one trained variant, a test result."""
    from run.context import RunContext
    from run.params import RunParams
    from run.records import ChampionComparison, DatasetRef, TestResult, VariantScore
    from tasks.publish import publish_run

    classes = [f"c{i}" for i in range(10)]
    ds = DatasetRef(name=dataset["name"], source="fabricated", md5=dataset["md5"], key="datasets/fabricated",
                    sha256="0" * 64, train=50000, holdout=dataset["test_size"] * 100 // 35, classes=classes)
    v = VariantScore(name="none", status="completed", repeats=[], epochs_run=1, best_epoch=1, val_loss=1.0,
                     val_accuracy=acc, seconds=1.0, device="cpu", config={"model": "seed", "variant": "none"})
    test = TestResult(variant="none", model="seed", n=dataset["test_size"], loss=1 - acc, accuracy=acc,
                      per_class=dict.fromkeys(classes, acc))
    ident = champions.identity({"dataset_name": dataset["name"], "dataset_md5": dataset["md5"],
                               "split_seed": split_seed, "test_size": dataset["test_size"]})
    current = champions.read(open_store(store_uri), ident)
    if current is not None and current["run_id"] != run_id:  # what test-model's paired comparison would say
        diff = acc - current["test"]["accuracy"]
        test = dataclasses.replace(test, champion_comparison=ChampionComparison(
            champion_run_id=current["run_id"], difference=diff, ci=[diff, diff], method="fabricated",
            promoted=diff > 0, reason=f"new model {'beats' if diff > 0 else 'does not beat'} champion "
                                      f"{current['run_id']} by {diff:+.4f}"))
    params = RunParams(model="seed", select_metric="val_accuracy", split_seed=split_seed, promote_margin=0.0,
                       promote_confidence=0.95, subset=None, variant_deployment=None, seed=0, repeats=1,
                       store=store_uri)
    ctx = RunContext(params, run_id, None, "2026-01-01T00:00:00+00:00", ds)
    return publish_run.fn(ctx, [v], v, test)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))


def test_a_synthetic_run_neither_blocks_nor_replaces_the_nightly_champion(tmp_path, cache, events):
    uri = str(tmp_path / "store")
    st = open_store(uri)
    champions.promote(st, _record("nightly-1", 0.90), promote_by_accuracy(0.0))

    out = _publish(uri, "synthetic-1", 0.99, SYNTH)
    assert out["promoted"] is True and out["compared_with"] is None  # its own identity's first champion
    assert champions.read(st, NIGHTLY)["run_id"] == "nightly-1"
    report = (tmp_path / "store/runs/synthetic-1/report.md").read_text()
    assert f"**Not compared** with any champion: dataset `{out['dataset_identity']}` had none." in report
    [ev] = [e for e in events() if e.event == "train-cifar.champion.not-compared"]
    assert ev.resource.id == "train-cifar.run.synthetic-1"
    assert ev.payload["dataset_identity"] == out["dataset_identity"] and ev.payload["other_identities"] == [NIGHTLY]

    # later CIFAR-10 runs are compared with the nightly champion, and promote when better
    worse = _publish(uri, "nightly-2", 0.85, CIFAR)
    assert worse["promoted"] is False and worse["compared_with"] == "nightly-1"
    better = _publish(uri, "nightly-3", 0.91, CIFAR)
    assert better["promoted"] is True and better["compared_with"] == "nightly-1"
    assert champions.read(st, NIGHTLY)["run_id"] == "nightly-3"
    assert "Not compared" not in (tmp_path / "store/runs/nightly-3/report.md").read_text()
    assert len([e for e in events() if e.event == "train-cifar.champion.not-compared"]) == 1  # the synthetic one


def test_a_publish_retried_after_its_promotion_records_it(tmp_path, cache, events, monkeypatch):
    """The champion write landed, then sealing the manifest failed (an I/O error, which
    Prefect retries): the retry must record the promotion, not compare the run with itself."""
    uri = str(tmp_path / "store")
    st = open_store(uri)
    champions.promote(st, _record("old", 0.50), promote_by_accuracy(0.0))
    real_put = LocalStore.put_file
    manifests = []

    def fail_second_manifest(self, key, path):
        if key.endswith("manifest.json"):
            manifests.append(key)
            if len(manifests) == 2:  # the seal after the promotion
                raise ConnectionResetError("the store went away (test)")
        return real_put(self, key, path)

    monkeypatch.setattr(LocalStore, "put_file", fail_second_manifest)
    with pytest.raises(ConnectionResetError):
        _publish(uri, "new", 0.60, CIFAR)
    assert champions.read(st, NIGHTLY)["run_id"] == "new"
    sealed = json.loads((tmp_path / "store/runs/new/manifest.json").read_text())
    assert sealed["promoted"] is False and sealed["promotion_reason"].startswith("pending: ")

    out = _publish(uri, "new", 0.60, CIFAR)  # Prefect's retry
    m = json.loads((tmp_path / "store/runs/new/manifest.json").read_text())
    assert out["promoted"] is True and m["promoted"] is True
    assert m["promotion_reason"] == "new model beats champion old by +0.1000"  # the decision it made, kept
    assert m["compared_with"] == "old"
    assert len(champions.documents(st)[NIGHTLY]["history"]) == 2  # the retry added no entry


def test_two_promotions_and_a_rollback_through_the_cli(tmp_path, capsys):
    uri = str(tmp_path / "store")
    st = open_store(uri)
    assert champions.promote(st, _record("r1", 0.80), promote_by_accuracy(0.0), flow_run_id="flow-1").promoted
    assert champions.promote(st, _record("r2", 0.85), promote_by_accuracy(0.0), flow_run_id="flow-2").promoted

    assert cli.main(["--store", uri, "rollback", "--to", "r1", "--reason", "r2 misclassifies trucks"]) == 0
    assert capsys.readouterr().out == f"{NIGHTLY}: champion r2 -> r1 (r2 misclassifies trucks)\n"
    assert champions.read(st, NIGHTLY)["run_id"] == "r1"

    assert cli.main(["--store", uri, "history"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert [line.split("\t")[2] for line in lines] == ["promote", "promote", "rollback"]
    assert "- (-) -> r1 (0.8000)" in lines[0] and "flow-1" in lines[0]
    assert "r1 (0.8000) -> r2 (0.8500)" in lines[1] and "beats champion r1" in lines[1]
    assert "r2 (0.8500) -> r1 (0.8000)" in lines[2] and "r2 misclassifies trucks" in lines[2]

    assert cli.main(["--store", uri]) == 0
    assert capsys.readouterr().out.startswith(f"{NIGHTLY}\tr1\t0.8000\t")
    # a run that never was this identity's champion, or the champion itself, is refused
    assert cli.main(["--store", uri, "rollback", "--to", "r9"]) == 1
    assert "--to r9: never a champion of dataset" in capsys.readouterr().err
    assert cli.main(["--store", uri, "rollback", "--to", "r1"]) == 1
    assert "--to r1: already the champion" in capsys.readouterr().err
    assert len(champions.documents(st)[NIGHTLY]["history"]) == 3


def test_rollback_needs_the_dataset_when_there_are_several(tmp_path, capsys):
    uri = str(tmp_path / "store")
    st = open_store(uri)
    champions.promote(st, _record("c1", 0.8), promote_by_accuracy(0.0))
    champions.promote(st, _record("s1", 0.9, name="synthetic", md5=SYNTH["md5"], test_size=350), promote_by_accuracy(0.0))
    assert cli.main(["--store", uri, "rollback", "--to", "c1"]) == 1
    assert "--dataset: give the dataset identity, one of: " in capsys.readouterr().err


def _race(store_factory, rounds: int = 3) -> None:
    """A rollback and a promotion at once: both land in the history, and the champion is
    the one the last entry names, whatever the interleaving."""
    for i in range(rounds):
        st = store_factory(i)
        champions.promote(st, _record("a", 0.80), promote_by_accuracy(0.0))
        champions.promote(st, _record("b", 0.85), promote_by_accuracy(0.0))
        go = threading.Barrier(2)
        out = {}

        def roll():
            go.wait()
            out["rollback"] = champions.rollback(store_factory(i), NIGHTLY, "a", "b was bad")

        def promote():
            go.wait()
            out["promote"] = champions.promote(store_factory(i), _record("c", 0.95), promote_by_accuracy(0.0))

        threads = [threading.Thread(target=roll), threading.Thread(target=promote)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out["promote"].promoted  # 0.95 beats both a and b
        doc = champions.documents(st)[NIGHTLY]
        actions = [(e["action"], e["champion"]["run_id"]) for e in doc["history"]]
        assert sorted(actions[2:]) == [("promote", "c"), ("rollback", "a")]
        assert doc["champion"] == doc["history"][-1]["champion"]
        # each entry's previous champion is the one the entry before made
        assert all(e["previous"]["run_id"] == p["champion"]["run_id"]
                   for p, e in zip(doc["history"], doc["history"][1:]))


def test_a_rollback_racing_a_promotion_keeps_both_entries(tmp_path):
    _race(lambda i: LocalStore(tmp_path / f"store-{i}"))


def test_a_rollback_racing_a_promotion_on_s3(s3_bucket):
    _race(lambda i: open_store(f"s3://{s3_bucket}/race-{i}"))


def test_history_and_rollback_on_s3_with_a_lost_answer(s3_bucket, monkeypatch):
    """The conditional PUT landed but its answer was lost (botocore's retry got 412): the
    rollback counts once."""
    uri = f"s3://{s3_bucket}/nightly"
    st = open_store(uri)
    champions.promote(st, _record("r1", 0.8), promote_by_accuracy(0.0))
    champions.promote(st, _record("r2", 0.9), promote_by_accuracy(0.0))
    real = type(st).write_if

    def applied_then_lost(self, key, data, version):
        real(self, key, data, version)
        raise PreconditionFailed("the retry of a PUT that had already succeeded")

    monkeypatch.setattr(type(st), "write_if", applied_then_lost)
    entry = champions.rollback(st, NIGHTLY, "r1", "test")
    assert entry["champion"]["run_id"] == "r1" and entry["previous"]["run_id"] == "r2"
    doc = champions.documents(open_store(uri))[NIGHTLY]
    assert [e["action"] for e in doc["history"]] == ["promote", "promote", "rollback"]
    assert doc["champion"]["run_id"] == "r1"


def test_a_legacy_champion_json_stays_the_champion_of_its_identity(tmp_path):
    """A store from before this layout: its champion.json (no dataset name; the run's
    manifest has it) is compared with, then replaced by the per-identity object."""
    st = LocalStore(tmp_path)
    legacy = {k: v for k, v in _record("old", 0.70).items() if k != "dataset_name"}
    st.write_if("champion.json", json.dumps(legacy).encode(), None)
    st.write_if("runs/old/manifest.json", json.dumps({"dataset": {"name": "cifar10"}}).encode(), None)
    assert champions.read(st, NIGHTLY)["run_id"] == "old"

    ok, why, against = champions.promote(st, _record("worse", 0.60), promote_by_accuracy(0.0))
    assert not ok and against == "old"
    assert champions.promote(st, _record("better", 0.75), promote_by_accuracy(0.0)).promoted
    doc = champions.documents(st)[NIGHTLY]
    assert doc["champion"]["run_id"] == "better" and doc["history"][0]["previous"]["run_id"] == "old"
    champions.rollback(st, NIGHTLY, "old", "back to the legacy champion")
    assert champions.read(st, NIGHTLY)["run_id"] == "old"


@pytest.mark.parametrize("body, found", [(b"{not json", "unreadable content"),
                                         (b'{"champion": {"run_id": "a"}}', "found ['champion']"),
                                         (b"[]", "found list")])
def test_a_damaged_champion_document_is_refused_naming_it(tmp_path, body, found):
    """Nothing is promoted over a champion document that cannot be read, and it is left as it is."""
    st = LocalStore(tmp_path)
    key = champions.key_for(NIGHTLY)
    st.write_if(key, body, None)
    where = st.uri_for(key)
    for call in (lambda: champions.read(st, NIGHTLY), lambda: champions.documents(st),
                 lambda: champions.promote(st, _record("new", 0.9), promote_by_accuracy(0.0))):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value).startswith(f"{where}: expected a champion document") and found in str(err.value)
    assert (tmp_path / key).read_bytes() == body


# --- what a store writer plants in a champion document is refused naming it (issue 16) ---

def _plant(st, ident: str, doc_bytes: bytes) -> str:
    path = Path(st.uri_for(champions.key_for(ident)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(doc_bytes)
    return str(path)


def test_an_oversized_champion_document_is_refused_naming_it_and_the_limit(tmp_path):
    """A valid champion document padded past 16 MiB is refused unread, not held in memory."""
    from store import MAX_DOCUMENT_BYTES

    st = LocalStore(tmp_path / "store")
    doc = {"identity": NIGHTLY, "champion": _record("old", 0.5), "history": [], "pad": "x" * MAX_DOCUMENT_BYTES}
    where = _plant(st, NIGHTLY, json.dumps(doc).encode())
    with pytest.raises(ValueError) as err:
        champions.promote(st, _record("new", 0.9), promote_by_accuracy(0.0))
    assert str(err.value) == (f"{where}: {len(json.dumps(doc)):,} bytes, larger than a store document can be "
                              f"(limit {MAX_DOCUMENT_BYTES:,} bytes); refused")


@pytest.mark.parametrize("planted, expected", [
    ({"test": {"accuracy": 0.5}}, "the champion record: expected 'run_id', a run id, found None"),
    ({"run_id": "old", "test": {"accuracy": "high"}},
     "the champion record: expected 'test' with 'accuracy', a number, found {'accuracy': 'high'}"),
    ({"run_id": "../../etc", "test": {"accuracy": 0.5}},
     "the champion record: expected 'run_id', a run id, found '../../etc'"),
])
def test_a_champion_record_missing_a_field_is_refused_naming_the_document(planted, expected, tmp_path):
    st = LocalStore(tmp_path / "store")
    where = _plant(st, NIGHTLY, json.dumps({"identity": NIGHTLY, "champion": planted, "history": []}).encode())
    with pytest.raises(ValueError) as err:
        champions.promote(st, _record("new", 0.9), promote_by_accuracy(0.0))
    assert str(err.value) == f"{where}: {expected}; restore an earlier version of it"
    legacy = tmp_path / "legacy"
    (legacy).mkdir()
    (legacy / champions.LEGACY_KEY).write_text(json.dumps(planted))
    with pytest.raises(ValueError, match=f"^{legacy / champions.LEGACY_KEY}: the champion record: expected"):
        champions.documents(LocalStore(legacy))


def test_a_planted_huge_history_is_refused_naming_it(tmp_path, cache, events):
    """publish-run draws every unit's history.csv from the store: a planted huge one (sparse
    here) is refused naming it and the limit, before it is downloaded, and nothing is sealed."""
    from store import MAX_DOCUMENT_BYTES, TooLarge

    uri = str(tmp_path / "store")
    planted = tmp_path / "store" / "runs" / "r1" / "variants" / "none" / "history.csv"
    planted.parent.mkdir(parents=True)
    with open(planted, "wb") as f:
        f.truncate(4 * MAX_DOCUMENT_BYTES)
    with pytest.raises(TooLarge, match=f"^{planted}: {4 * MAX_DOCUMENT_BYTES:,} bytes, .*limit {MAX_DOCUMENT_BYTES:,}"):
        _publish(uri, "r1", 0.9, CIFAR)
    assert not (tmp_path / "cache" / "runs" / "r1" / "variants" / "none" / "history.csv").exists()
    assert not (tmp_path / "store" / "runs" / "r1" / "manifest.json").exists()
