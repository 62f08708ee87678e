"""predict --portable with a model.pt2 planted by someone who can write the store.

The planter rewrites the manifest's SHA-256 too (it sits in the same prefix and is
written by the same role), so the hash check passes: what must stop the archive is
its content. Each case is a real exported model.pt2 with one pickle planted where
torch's .pt2 loader would unpickle it; on a loader without the check each of them
creates the marker file.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli import predict
from store import open_store
from tests.test_predict import COLOURS, _lines, _publish_model


class Plant:
    """A pickle that creates `path` when unpickled: harmless, and visible."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _checkpoint(obj) -> bytes:
    """What torch.save writes (a zip holding data.pkl): the format torch.load reads."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rewrite(genuine: Path, out: Path, change) -> Path:
    """`genuine` with its members (names without the archive's top folder) changed by
    `change(members: dict[str, bytes])`, written as torch.export.save writes (stored)."""
    with zipfile.ZipFile(genuine) as src:
        top = src.namelist()[0].split("/")[0]
        members = {n.split("/", 1)[1]: src.read(n) for n in src.namelist()}
    change(members)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, data in members.items():
            dst.writestr(f"{top}/{name}", data)
    return out


def _with_config_entry(members: dict, config: str, fqn: str, entry: dict) -> None:
    doc = json.loads(members[config])
    doc["config"][fqn] = entry
    members[config] = json.dumps(doc).encode()


def _pickled_weight(members: dict, marker: Path) -> None:
    """The first weight marked `use_pickle`: torch.load(weights_only=False) of its member."""
    config = "data/weights/model_weights_config.json"
    doc = json.loads(members[config])
    first = next(iter(doc["config"].values()))
    first["use_pickle"] = True
    members[config] = json.dumps(doc).encode()
    members[f"data/weights/{first['path_name']}"] = _checkpoint(Plant(marker))


def _pickled_constant(members: dict, marker: Path) -> None:
    """A tensor constant marked `use_pickle`: torch.load(weights_only=False) of its member."""
    _with_config_entry(members, "data/constants/model_constants_config.json", "c",
                       {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None})
    members["data/constants/tensor_0"] = _checkpoint(Plant(marker))


def _opaque_constant(members: dict, marker: Path) -> None:
    """An opaque object constant: plain pickle.loads of its member."""
    _with_config_entry(members, "data/constants/model_constants_config.json", "c",
                       {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None})
    members["data/constants/opaque_obj_0"] = pickle.dumps(Plant(marker), protocol=2)


# (case, plant(members, marker), the member the refusal names, what it names in it)
PLANTS = [
    ("sample-inputs", lambda m, mk: m.__setitem__("data/sample_inputs/model.pt", _checkpoint(Plant(mk))),
     "data/sample_inputs/model.pt", "io.open"),
    ("pickled-weight", _pickled_weight, "data/weights/weight_0", "io.open"),
    ("pickled-constant", _pickled_constant, "data/constants/tensor_0", "io.open"),
    ("opaque-constant", _opaque_constant, "data/constants/opaque_obj_0", "not a member"),
    # an extra member: the legacy weights file, which torch reads in place of the weights config
    ("legacy-weights-member", lambda m, mk: m.__setitem__("data/weights/model.pt", _checkpoint(Plant(mk))),
     "data/weights/model.pt", "not a member"),
]


def _exit_code(argv: list[str]) -> int | Exception:
    """predict's exit code, or what escaped it (so that the marker is checked first)."""
    try:
        return predict.main(argv)
    except Exception as e:
        return e


@pytest.fixture
def red(tmp_path) -> str:
    p = tmp_path / "red.png"
    Image.new("RGB", (20, 20), COLOURS["red"]).save(p)
    return str(p)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case,plant,member,named", PLANTS, ids=[p[0] for p in PLANTS])
def test_a_planted_pickle_never_runs_even_with_a_matching_manifest(where, case, plant, member, named,
                                                                   tmp_path, red, request, capsys):
    uri = str(tmp_path / "store") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/p"
    st = open_store(uri)
    _publish_model(st, "r1", tmp_path)
    marker = tmp_path / f"PWNED-{case}"
    evil = _rewrite(tmp_path / "r1" / "model.pt2", tmp_path / "evil.pt2", lambda m: plant(m, marker))
    # the planter, as one with write access to the store would: the file and its manifest record
    manifest = st.read_json("runs/r1/manifest.json")
    manifest["artifacts"]["model/model.pt2"] = st.put_file("runs/r1/model/model.pt2", evil)
    st.put_json("runs/r1/manifest.json", manifest, tmp_path)

    code = _exit_code(["--store", uri, "--run", "r1", "--portable", red])
    assert not marker.exists(), "the planted pickle ran"
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: {uri}/runs/r1/model/model.pt2: refusing to load it: " in err
    assert member in err and named in err
    assert "Traceback" not in err


def test_the_planted_archives_are_real_threats(tmp_path):
    """Plain torch.export.load runs every planted payload: what the check above stops."""
    st = open_store(str(tmp_path / "store"))
    _publish_model(st, "r1", tmp_path)
    for case, plant, _, _ in PLANTS:
        marker = tmp_path / f"PWNED-{case}"
        evil = _rewrite(tmp_path / "r1" / "model.pt2", tmp_path / f"{case}.pt2", lambda m: plant(m, marker))
        try:
            torch.export.load(str(evil))
        except Exception:  # the payload has run by the time torch finds the archive unusable
            pass
        assert marker.exists(), case


def test_a_genuine_archive_passes_the_check_and_predicts(tmp_path, red, capsys):
    """The check refuses nothing torch.export.save writes: the same classes as the default path."""
    uri = str(tmp_path / "store")
    _publish_model(open_store(uri), "r1", tmp_path)
    rewritten = _rewrite(tmp_path / "r1" / "model.pt2", tmp_path / "same.pt2", lambda m: None)
    assert torch.export.load(str(rewritten)).module()(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    assert predict.main(["--store", uri, "--run", "r1", "--portable", red]) == 0
    assert _lines(capsys.readouterr().out) == {"red.png": "red"}


def test_torch_load_stays_weights_only_even_past_the_check(tmp_path, red, capsys, monkeypatch):
    """The second line: with the archive check switched off, every plant that torch would
    torch.load still fails to run, since load_portable pins torch.load to weights_only."""
    import cnn.export

    monkeypatch.setattr(cnn.export, "check_archive", lambda path: None)
    uri = str(tmp_path / "store")
    st = open_store(uri)
    _publish_model(st, "r1", tmp_path)
    for case, plant, _, _ in [p for p in PLANTS if p[0] != "opaque-constant"]:  # pickle.loads: the check's alone
        marker = tmp_path / f"PWNED-{case}"
        evil = _rewrite(tmp_path / "r1" / "model.pt2", tmp_path / f"{case}.pt2", lambda m: plant(m, marker))
        manifest = st.read_json("runs/r1/manifest.json")
        manifest["artifacts"]["model/model.pt2"] = st.put_file("runs/r1/model/model.pt2", evil)
        st.put_json("runs/r1/manifest.json", manifest, tmp_path)
        code = _exit_code(["--store", uri, "--run", "r1", "--portable", red])
        assert not marker.exists(), case
        assert code == 1 and "refusing to load it: not a program torch can load" in capsys.readouterr().err
