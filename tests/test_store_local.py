"""The local store and the champion rule (the S3 store has its own tests)."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from store import LocalStore, PreconditionFailed, join_key, open_store, safe_name
from registry import champions
from tests.judges import promote_by_accuracy


def _cand(run_id, acc, md5="m" * 32, split_seed=0, test_size=3500, name="cifar10"):
    return {"run_id": run_id, "model_uri": f"runs/{run_id}/model", "test": {"accuracy": acc, "loss": 1 - acc},
            "dataset_name": name, "dataset_md5": md5, "split_seed": split_seed, "test_size": test_size}


IDENT = champions.identity(_cand("any", 0.0))


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "", ".hidden", "a\\b", "x" * 200, "a..b"])
def test_names_cannot_escape_their_prefix(bad):
    with pytest.raises(ValueError, match="variant"):
        safe_name(bad, "variant")


def test_join_key_refuses_traversal():
    with pytest.raises(ValueError):
        join_key("runs", "..", "champion.json")
    assert join_key("runs", "r1", "model/weights.safetensors") == "runs/r1/model/weights.safetensors"


def test_put_get_list_and_hash(tmp_path):
    s = open_store(str(tmp_path / "store"))
    src = tmp_path / "f.bin"
    src.write_bytes(b"abc")
    info = s.put_file("runs/r1/f.bin", src)
    assert info["bytes"] == 3 and info["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert s.exists("runs/r1/f.bin") and s.list("runs") == ["runs/r1/f.bin"]
    assert s.get_file("runs/r1/f.bin", tmp_path / "back.bin").read_bytes() == b"abc"
    with pytest.raises(FileNotFoundError):
        s.get_file("runs/r1/nope", tmp_path / "x")
    assert not list((tmp_path / "store").rglob("*.tmp"))  # no temporary file left behind


def test_open_store_refuses_unknown_scheme():
    with pytest.raises(ValueError, match="expected a local folder or s3://bucket/prefix, found 'gs://b/x'"):
        open_store("gs://b/x")


def test_store_uris_are_normalised_in_one_place(tmp_path, monkeypatch):
    from store import is_shared, normalize_uri

    monkeypatch.chdir(tmp_path)
    assert normalize_uri("./artifacts") == str(tmp_path / "artifacts")
    assert normalize_uri("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert normalize_uri("s3://bucket") == "s3://bucket"
    assert open_store("s3://bucket/a/").uri == "s3://bucket/a"
    for bad in ("s3://bucket/a/../b", "s3://bucket/a//b", "s3://B/x", ""):
        with pytest.raises(ValueError):
            normalize_uri(bad)
    # what a worker on another machine can reach as written
    assert is_shared("s3://bucket/x") and is_shared("/srv/store")
    assert not is_shared("./artifacts") and not is_shared("artifacts") and not is_shared("~/artifacts")


def test_write_if_is_compare_and_swap(tmp_path):
    s = LocalStore(tmp_path)
    s.write_if("k.json", b"1", None)
    with pytest.raises(PreconditionFailed):
        s.write_if("k.json", b"2", None)  # exists now
    _, v = s.read_versioned("k.json")
    s.write_if("k.json", b"2", v)
    with pytest.raises(PreconditionFailed):
        s.write_if("k.json", b"3", v)  # stale version
    assert s.read_versioned("k.json")[0] == b"2"


def test_champion_rule(tmp_path):
    s = LocalStore(tmp_path)
    d = champions.promote(s, _cand("a", 0.80), promote_by_accuracy(0.0))
    assert d.promoted and d.reason == f"no champion yet for dataset {IDENT}" and d.compared_with is None
    ok, why, against = champions.promote(s, _cand("b", 0.79), promote_by_accuracy(0.0))
    assert not ok and "does not beat champion a" in why and against == "a"
    ok, why, _ = champions.promote(s, _cand("c", 0.80), promote_by_accuracy(0.0))
    assert not ok  # a tie is not a win
    # another dataset or split is another identity: its own first champion, not compared with a
    ok, why, against = champions.promote(s, _cand("d", 0.95, md5="x" * 32), promote_by_accuracy(0.0))
    assert ok and against is None and why.startswith("no champion yet for dataset cifar10-xxxx")
    ok, why, against = champions.promote(s, _cand("e", 0.95, split_seed=1), promote_by_accuracy(0.0))
    assert ok and against is None and "split1" in why
    ok, _, _ = champions.promote(s, _cand("f", 0.805), promote_by_accuracy(0.01))
    assert not ok  # better, but not by the margin
    assert champions.promote(s, _cand("g", 0.85), promote_by_accuracy(0.01)).promoted
    assert champions.read(s, IDENT)["run_id"] == "g"
    assert champions.read(s, champions.identity(_cand("d", 0, md5="x" * 32)))["run_id"] == "d"


def test_racing_runs_have_one_consistent_winner(tmp_path):
    s = LocalStore(tmp_path)
    champions.promote(s, _cand("base", 0.50), promote_by_accuracy(0.0))
    cands = [_cand(f"r{i}", 0.60 + i / 100) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: champions.promote(s, c, promote_by_accuracy(0.0)), cands))
    # whatever the interleaving, the best candidate ends as champion and no better one was lost
    assert champions.read(s, IDENT)["run_id"] == "r7"
    assert results[7].promoted is True
    # every promotion that happened is in the history, in the order the writes landed
    doc = champions.documents(s)[IDENT]
    chain = [e["champion"]["run_id"] for e in doc["history"]]
    assert chain[0] == "base" and chain[-1] == "r7" and len(chain) == 1 + sum(r.promoted for r in results)
    assert all(e["previous"]["run_id"] == p for e, p in zip(doc["history"][1:], chain))


@pytest.mark.parametrize("end", ["\n", "\r", "\t", " "])
def test_a_name_with_a_trailing_newline_or_space_is_refused(end):
    """Names match whole strings: a `$` anchor with `match` let 'r1\\n' through."""
    with pytest.raises(ValueError, match=re.escape(f"run id {'r1' + end!r} is not a valid name")):
        safe_name("r1" + end, "run id")
    for uri in [f"s3://bucket{end}", f"s3://bucket{end}/prefix"]:
        with pytest.raises(ValueError, match=re.escape(f"{'bucket' + end!r} is not a valid S3 bucket name")):
            open_store(uri)
    if end != " ":  # a space is a valid S3 key character; control characters are in no key
        with pytest.raises(ValueError, match="invalid store key part"):
            join_key("runs", "r1" + end, "report.md")
        with pytest.raises(ValueError, match="invalid store key part"):
            open_store(f"s3://bucket/prefix{end}")
