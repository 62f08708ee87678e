"""check-data: the checks on synthetic images with planted faults, and a real run that
each fault stops before training."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnn import data as cd
from cnn import datachecks as dc
from cnn.synthetic import make_images

CPU = torch.device("cpu")
LOOSE = dc.Thresholds(class_balance_tolerance=5.0, max_blank_images=0, max_exact_duplicates=0,
                      max_near_duplicates=1.0)


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_images(n, np.random.default_rng(seed))
    return x.reshape(n, 3, 32, 32), np.asarray(y)


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translated by (dy, dx) px, the edge replicated into the gap."""
    t = torch.nn.functional.pad(torch.from_numpy(img)[None].float(), (2, 2, 2, 2), mode="replicate")[0]
    return t[:, 2 - dy:34 - dy, 2 - dx:34 - dx].byte().numpy()


def _relit(img: np.ndarray, gain: float, offset: float) -> np.ndarray:
    return np.clip(img.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).transpose(2, 0, 1).copy()


def _plant(train_x: np.ndarray, query_x: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n train images copied into the queries, each altered: (train indices, query indices, kinds)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(train_x), n, replace=False)
    dst = rng.choice(len(query_x), n, replace=False)
    kinds = ["shift", "relit", "jpeg", "shift+relit+jpeg"]
    for i, (s, d) in enumerate(zip(src, dst)):
        img, kind = train_x[s], kinds[i % len(kinds)]
        if "shift" in kind:
            img = _shift(img, int(rng.choice([-2, -1, 1, 2])), int(rng.choice([-2, -1, 1, 2])))
        if "relit" in kind:
            img = _relit(img, rng.uniform(0.85, 1.15), rng.uniform(-25, 25))
        if "jpeg" in kind:
            img = _jpeg(img, int(rng.integers(70, 95)))
        query_x[d] = img
    return src, dst, [kinds[i % len(kinds)] for i in range(n)]


def _splits(train: tuple, val: tuple, test: tuple, classes=cd.CLASSES) -> cd.Splits:
    t = lambda a, dtype: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
    return cd.Splits(t(train[0], torch.uint8), t(train[1], torch.int64), t(val[0], torch.uint8),
                     t(val[1], torch.int64), t(test[0], torch.uint8), t(test[1], torch.int64), list(classes))


def test_planted_near_duplicates_are_found_and_clean_images_are_not():
    train_x, _ = _images(5000, 1)
    query_x, _ = _images(1000, 2)
    src, dst, kinds = _plant(train_x, query_x, 200, seed=3)
    found = {q: t for q, t, _ in dc.near_duplicates(torch.from_numpy(train_x), torch.from_numpy(query_x), CPU)}
    hits = [found.get(d) == s for s, d in zip(src, dst)]
    by_kind = {k: np.mean([h for h, kk in zip(hits, kinds) if kk == k]) for k in set(kinds)}
    assert np.mean(hits) >= 0.95, by_kind
    clean = set(range(len(query_x))) - set(dst.tolist())
    flagged = [q for q in found if q in clean]
    assert len(flagged) <= 0.001 * len(clean), flagged  # 800 clean images: none may be flagged


def test_exact_duplicates_within_and_across_splits_are_counted():
    x, y = _images(600, 4)
    train, val, test = (x[:400].copy(), y[:400]), (x[400:500].copy(), y[400:500]), (x[500:].copy(), y[500:])
    train[0][10] = train[0][3]  # within train
    val[0][5] = train[0][7]  # across
    test[0][0] = val[0][1]  # across, val and test
    record, _ = dc.run_checks(_splits(train, val, test), LOOSE)
    check = next(c for c in record["checks"] if c["name"] == "exact_duplicates")
    assert check["count"] == 3 and not check["passed"]
    assert {(e["split"], e["index"], e["same_as_split"], e["same_as_index"]) for e in check["examples"]} == {
        ("train", 10, "train", 3), ("val", 5, "train", 7), ("test", 0, "val", 1)}
    assert not record["passed"]
    assert "exact_duplicates: 3 " in str(dc.failure(record)) and "max_exact_duplicates 0" in str(dc.failure(record))


def test_blank_images_and_a_class_missing_from_train_fail_their_checks():
    x, y = _images(1200, 5)
    x[[1, 2, 3]] = 128  # constant
    x[4] = 7 + (np.arange(3072).reshape(3, 32, 32) % 2).astype(np.uint8)  # nearly: std 0.5
    keep = y[:800] != 6  # no frog in train
    record, _ = dc.run_checks(_splits((x[:800][keep], y[:800][keep]), (x[800:1000], y[800:1000]),
                                     (x[1000:], y[1000:])), LOOSE)
    checks = {c["name"]: c for c in record["checks"]}
    assert checks["blank_images"]["count"] == 4 and not checks["blank_images"]["passed"]
    balance = checks["class_balance"]
    assert not balance["passed"] and {"split": "train", "class": "frog"} == {
        k: v for k, v in balance["examples"][0].items() if k in ("split", "class")}
    assert balance["examples"][0]["missing"] is True and balance["per_class"]["train"][6] == 0
    assert checks["exact_duplicates"]["count"] == 2  # the three constant images are one picture
    message = str(dc.failure(record))
    assert "class_balance: 1 " in message and "blank_images: 4 " in message


def test_clean_balanced_data_passes_and_the_digest_is_of_the_checks():
    x, y = _images(3000, 6)
    record, pairs = dc.run_checks(_splits((x[:2000], y[:2000]), (x[2000:2650], y[2000:2650]), (x[2650:], y[2650:])),
                                  LOOSE)
    assert record["passed"] and pairs == [] and dc.failure(record) is None
    assert [c["name"] for c in record["checks"]] == ["labels_outside_classes", "class_balance", "blank_images",
                                                      "exact_duplicates", "near_duplicates"]
    assert record["digest"] == dc.digest(json.loads(json.dumps(record["checks"])))
    assert all(set(c) >= {"name", "count", "threshold", "passed", "examples"} for c in record["checks"])


def test_class_balance_tolerates_binomial_noise_but_not_a_skew():
    rng = np.random.default_rng(7)
    x, _ = _images(200, 7)
    x = np.repeat(x, 30, axis=0)[:6000]  # pixels do not matter here
    y = rng.integers(0, 10, 6000)
    ok = dc.class_balance(_splits((x[:5000], y[:5000]), (x[5000:5650], y[5000:5650]), (x[5650:], y[5650:])), 5.0)
    assert ok["passed"], ok["examples"]
    y[:5000][y[:5000] == 2] = 3  # half of bird relabelled cat: cat twice its share
    skew = dc.class_balance(_splits((x[:5000], y[:5000]), (x[5000:5650], y[5000:5650]), (x[5650:], y[5650:])), 5.0)
    assert {e["class"] for e in skew["examples"]} >= {"cat", "bird"} and not skew["passed"]


def test_labels_outside_the_class_list_are_counted():
    """The decoder refuses labels outside 0..9 (cnn/data.py); a label within 0..9 that names
    no class of a batches.meta with fewer names reaches the splits, and this check."""
    x, y = _images(300, 8)
    y = y.copy()
    y[5] = 9
    check = dc.labels_outside_classes(_splits((x[:200], y[:200]), (x[200:250], y[200:250]), (x[250:], y[250:]),
                                              classes=cd.CLASSES[:9]))
    assert check["count"] >= 1 and not check["passed"] and {"split": "train", "index": 5, "label": 9} in check["examples"]


def test_the_markdown_has_the_table_and_thumbnails():
    from tasks.data_checks import render_markdown

    train_x, train_y = _images(1000, 9)
    q_x, q_y = _images(400, 10)
    q_x[3] = _shift(train_x[8], 1, 1)
    q_x[200] = 0
    splits = _splits((train_x, train_y), (q_x[:200], q_y[:200]), (q_x[200:], q_y[200:]))
    record, pairs = dc.run_checks(splits, LOOSE)
    assert [(p.split, p.index, p.train_index) for p in pairs] == [("val", 3, 8)]
    md = render_markdown(record, splits)
    assert "| check | count | threshold | result |" in md
    assert "| near_duplicates | 1 (0.25% of validation + test) | 100.00% | passed |" in md
    assert "| blank_images | 1 | 0 | **failed** |" in md
    assert md.count("data:image/png;base64,") == 3  # the pair and the blank image


def test_a_memoised_result_is_used_only_while_it_is_consistent(tmp_path):
    from tasks.data_checks import _memoised

    x, y = _images(600, 12)
    record, _ = dc.run_checks(_splits((x[:400], y[:400]), (x[400:500], y[400:500]), (x[500:], y[500:])), LOOSE)
    memo = tmp_path / "memo.json"
    memo.write_text(json.dumps(record))
    assert _memoised(memo) == record
    record["checks"][2]["count"] += 5  # edited by hand: the digest no longer agrees
    memo.write_text(json.dumps(record))
    assert _memoised(memo) is None
    memo.write_text("{")  # cut short
    assert _memoised(memo) is None and _memoised(tmp_path / "none.json") is None


# -- a real run, in-process, on synthetic data ------------------------------------------------

def _write_archive(out: Path, train: tuple, hold: tuple, classes: list[str]) -> tuple[Path, str]:
    """A CIFAR-format archive of these arrays: (path, md5)."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        batches = [(n, idx) for n, idx in zip(cd.TRAIN_FILES, np.array_split(np.arange(len(train[1])), 5))]
        batches.append((cd.HOLDOUT_FILE, None))
        for name, idx in batches:
            x, y = (train[0][idx], train[1][idx]) if idx is not None else hold
            payload = pickle.dumps({"data": np.ascontiguousarray(x).reshape(len(x), 3072),
                                    "labels": [int(v) for v in y]}, protocol=2)
            info = tarfile.TarInfo(f"{cd.BATCH_DIR}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        meta = pickle.dumps({"label_names": classes}, protocol=2)
        info = tarfile.TarInfo(f"{cd.BATCH_DIR}/{cd.META_FILE}")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    path = out / cd.ARCHIVE_NAME
    path.write_bytes(buf.getvalue())
    return path, cd.md5_of(path)


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


@pytest.fixture
def run_env(tmp_path, monkeypatch, prefect_harness):
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _faulty(tmp_path: Path, fault: str) -> tuple[Path, str]:
    x, y = _images(1500, 11)
    train, hold, classes = (x[:1000].copy(), y[:1000].copy()), (x[1000:].copy(), y[1000:].copy()), list(cd.CLASSES)
    if fault == "missing class":
        keep = train[1] != 4
        train = (train[0][keep], train[1][keep])
    elif fault == "blank images":
        train[0][:20] = 90
    elif fault == "label outside the classes":  # batches.meta names 9 classes; label 9 passes the decoder
        classes = classes[:9]
        train[1][train[1] == 9] = 8
        hold[1][hold[1] == 9] = 8
        train[1][0] = 9
    return _write_archive(tmp_path / fault.replace(" ", "-"), train, hold, classes)


@pytest.mark.slow
@pytest.mark.parametrize("fault,check", [("missing class", "class_balance"), ("blank images", "blank_images"),
                                         ("label outside the classes", "labels_outside_classes")])
def test_a_fault_in_the_data_stops_the_run_before_training(run_env, fault, check):
    from flows.train_cifar import train_cifar
    from run.errors import is_user_error

    path, md5 = _faulty(run_env, fault)
    store = run_env / "store"
    state = train_cifar(data_dir=str(path.parent), data_md5=md5, variants=["none"], epochs=1, store=str(store),
                        device="cpu", return_state=True)
    assert state.is_failed()
    with pytest.raises(dc.DataCheckFailed, match=rf"data check\(s\) failed before training: .*{check}: \d+ ") as e:
        state.result()
    assert isinstance(e.value, cd.DataError) and is_user_error(e.value)
    assert not list(store.glob("runs/*/variants/*")) and not list(store.glob("runs/*/manifest.json"))
    # the UI shows why: the table, with the failed check
    md = _artifacts(state.state_details.flow_run_id)["data-checks"].data
    assert f"| {check} |" in md and "**failed**" in md
    # and the night is in the dataset's trend, failed, with the reason
    [trend] = list((store / "trends").glob("cifar10-*.jsonl"))
    [entry] = [json.loads(line) for line in trend.read_text().splitlines()]
    assert entry["status"] == "failed" and entry["flow_run_id"] == str(state.state_details.flow_run_id)
    assert entry["message"].startswith("DataCheckFailed: data check(s) failed") and check in entry["message"]
    assert entry["test"] is None and not entry["promoted"]


@pytest.mark.slow
def test_a_run_records_its_checks_in_the_manifest_and_the_ui(run_env, synthetic_archive):
    from flows.train_cifar import train_cifar

    path, md5 = synthetic_archive
    out = train_cifar(data_dir=str(path.parent), data_md5=md5, variants=["none"], epochs=1, subset=300,
                      store=str(run_env / "store"), device="cpu")
    manifest = json.loads(Path(out["manifest"]).read_text())
    record = manifest["data_checks"]
    assert record["passed"] and record["digest"] == dc.digest(record["checks"])
    assert {c["name"] for c in record["checks"]} == {"labels_outside_classes", "class_balance", "blank_images",
                                                     "exact_duplicates", "near_duplicates"}
    md = _artifacts(manifest["flow_run_id"])["data-checks"].data
    assert "| check | count | threshold | result |" in md and "| near_duplicates |" in md
    # memoised on this machine: the same data and thresholds are not checked again
    memo = list((run_env / "cache" / "data-checks").glob("*.json"))
    assert len(memo) == 1 and json.loads(memo[0].read_text()) == record
