"""cli.predict: a champion's (or a named run's) model on image files.

The models here are the registry's `seed` network with weights set by hand so that
it classifies by dominant colour: the expected class of each image is known. The
real trained model is exercised end to end in test_s3_run.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cnn.config import make_config
from cnn.export import export_portable
from cnn.models import build_model
from cli import predict
from store import open_store
from registry import champions
from tests.judges import promote_by_accuracy

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (25, 30, 220)}


def colour_model(reverse: bool = False) -> torch.nn.Module:
    """`seed` with 3 classes whose logits are 10 x each normalised channel's mean: red,
    green and blue images get classes 0, 1, 2 (2, 1, 0 reversed). Every conv passes
    channels 0..2 through its centre tap; BatchNorm's bias keeps them above ReLU's zero."""
    m = build_model("seed", num_classes=3).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for layer in m.features:
            if isinstance(layer, torch.nn.Conv2d):
                for c in range(3):
                    layer.weight[c, c, 1, 1] = 1.0
            elif isinstance(layer, torch.nn.BatchNorm2d):
                layer.weight.fill_(1.0)
                layer.bias[:3] = 10.0  # (B, C, H, W): channels 0..2 stay positive
        fc1, fc2 = m.classifier[1], m.classifier[3]
        for c in range(3):
            fc1.weight[c, c * 64:(c + 1) * 64] = 1 / 64  # the mean of channel c over the 8x8 map
        fc1.bias[:3] = -50.0  # the six BatchNorm biases added 60; keep the value positive
        order = [2, 1, 0] if reverse else [0, 1, 2]
        for c in range(3):
            fc2.weight[c, order[c]] = 10.0
    return m


def _publish_model(store, run_id: str, tmp: Path, reverse: bool = False, model=None, tta: int = 0,
                   classes: tuple[str, ...] = ("red", "green", "blue")) -> None:
    """What test-model and publish-run store of a run: weights, config, classes, the
    portable model and a manifest recording its SHA-256."""
    model = colour_model(reverse) if model is None else model
    out = tmp / run_id
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out / "weights.safetensors")
    cfg = dataclasses.replace(make_config("seed", "none", epochs=1, patience=1, seed=0), tta=tta)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (out / "classes.json").write_text(json.dumps(list(classes)))
    export_portable(model, out / "model.pt2", tta=tta)
    artifacts = {f"model/{name}": store.put_file(f"runs/{run_id}/model/{name}", out / name)
                 for name in ["weights.safetensors", "config.json", "classes.json", "model.pt2"]}
    store.put_json(f"runs/{run_id}/manifest.json", {"run_id": run_id, "artifacts": artifacts}, tmp)


def _crown(store, run_id: str, md5: str = "c58f30108f718f92721af3b95e74349a", name: str = "cifar10") -> str:
    """Make `run_id` the champion of a dataset identity; returns the identity."""
    rec = {"run_id": run_id, "model_uri": store.uri_for(f"runs/{run_id}/model"), "test": {"accuracy": 0.5},
           "dataset_name": name, "dataset_md5": md5, "split_seed": 0, "test_size": 3500}
    assert champions.promote(store, rec, promote_by_accuracy(0.0)).promoted
    return champions.identity(rec)


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """One image per colour, in PNG and JPEG, of sizes other than 32x32 (and not square)."""
    out = {}
    for (name, rgb), size, fmt in zip(COLOURS.items(), [(640, 480), (7, 9), (32, 32)], ["PNG", "JPEG", "PNG"]):
        p = tmp_path / f"{name}.{fmt.lower()}"
        Image.new("RGB", size, rgb).save(p, fmt)
        out[name] = p
    grey = tmp_path / "grey-red.png"  # a palette image with a different mode
    Image.new("RGB", (50, 50), COLOURS["red"]).convert("P").save(grey)
    out["red-palette"] = grey
    return out


def _lines(out: str) -> dict[str, str]:
    return {Path(p).name: cls for p, cls, _ in (line.split("\t") for line in out.strip().splitlines())}


@pytest.mark.slow
def test_predict_champion_on_s3_from_a_fresh_process(s3_bucket, tmp_path, images):
    uri = f"s3://{s3_bucket}/team"
    st = open_store(uri)
    _publish_model(st, "r1", tmp_path)
    _publish_model(st, "r2", tmp_path, reverse=True)
    ident = _crown(st, "r1")

    files = [str(images[k]) for k in ["red", "green", "blue", "red-palette"]]
    proc = subprocess.run([sys.executable, "-m", "cli.predict", "--store", uri, *files], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stdout) == {"red.png": "red", "green.jpeg": "green", "blue.png": "blue",
                                   "grey-red.png": "red"}
    assert f"run r1 (the champion of {ident})" in proc.stderr and "(weights.safetensors)" in proc.stderr


def test_predict_a_named_run_and_a_local_store(tmp_path, images, capsys):
    st = open_store(str(tmp_path / "store"))
    _publish_model(st, "r1", tmp_path)
    _publish_model(st, "r2", tmp_path, reverse=True)
    assert predict.main(["--store", str(tmp_path / "store"), "--run", "r2", str(images["red"])]) == 0
    assert _lines(capsys.readouterr().out) == {"red.png": "blue"}  # r2 reverses the classes


def test_clear_errors(s3_bucket, tmp_path, images, capsys):
    uri = f"s3://{s3_bucket}/p"
    st = open_store(uri)
    red = str(images["red"])

    assert predict.main(["--store", uri, red]) == 1
    assert f"--store {uri}: no champion yet" in capsys.readouterr().err

    _publish_model(st, "r1", tmp_path)
    assert predict.main(["--store", uri, "--run", "r9", red]) == 1
    err = capsys.readouterr().err
    assert "--run r9: no such run" in err and "r1" in err

    assert predict.main(["--store", uri, "--run", "../r1", red]) == 1
    assert "--run '../r1' is not a valid name" in capsys.readouterr().err

    st.put_file("runs/r3/manifest.json", tmp_path / "r1" / "classes.json")  # a run that never got a model
    assert predict.main(["--store", uri, "--run", "r3", red]) == 1
    assert f"{uri}/runs/r3/model: expected classes.json, config.json, weights.safetensors, found nothing" \
        in capsys.readouterr().err

    assert predict.main(["--store", "s3://no-such-bucket-here/p", red]) == 1
    err = capsys.readouterr().err
    assert "no-such-bucket-here" in err and "NoSuchBucket" in err

    assert predict.main(["--store", str(tmp_path / "nowhere"), red]) == 1
    assert "no such folder" in capsys.readouterr().err

    (tmp_path / "notes.png").write_text("not an image")
    assert predict.main(["--store", uri, "--run", "r1", str(tmp_path / "notes.png")]) == 1
    assert f"IMAGE {tmp_path / 'notes.png'}: not an image" in capsys.readouterr().err
    assert predict.main(["--store", uri, "--run", "r1", str(tmp_path / "missing.jpg")]) == 1
    assert "missing.jpg: no such file" in capsys.readouterr().err


def _bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG: a few kilobytes on disk whatever its size (a decompression bomb
    when large: 20000x20000 decodes to 1.2 GB of RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the row's bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_refuses_huge_images_and_non_images_naming_them(tmp_path, capsys):
    """Bad input fails before the store is opened, with one line naming the file."""
    store = str(tmp_path / "store")
    (tmp_path / "store").mkdir()

    bomb = _bilevel_png(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(Image.DecompressionBombError):  # what plain Pillow does: a traceback
        Image.open(bomb)
    assert predict.main(["--store", store, str(bomb)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: IMAGE {bomb}: too large: over ") and "at most 16,777,216 (4096x4096)" in err

    big = _bilevel_png(tmp_path / "big.png", 5000, 5000)  # under Pillow's limit, over ours
    assert Image.open(big).size == (5000, 5000)
    assert predict.main(["--store", store, str(big)]) == 1
    assert f"IMAGE {big}: too large: 5000x5000 pixels; at most 16,777,216 (4096x4096)" in capsys.readouterr().err

    text = tmp_path / "notes.txt"
    text.write_text("a shopping list, not a picture")
    assert predict.main(["--store", store, str(text)]) == 1
    assert f"error: IMAGE {text}: not an image (PNG or JPEG expected)\n" == capsys.readouterr().err

    gif = tmp_path / "red.png"  # the format Pillow detects decides, not the extension
    Image.new("RGB", (8, 8), COLOURS["red"]).save(gif, "GIF")
    assert predict.main(["--store", store, str(gif)]) == 1
    assert f"IMAGE {gif}: not an image (PNG or JPEG expected)" in capsys.readouterr().err


def test_format_comes_from_the_content_not_the_extension(tmp_path):
    jpeg_named_png = tmp_path / "green.png"
    Image.new("RGB", (40, 30), COLOURS["green"]).save(jpeg_named_png, "JPEG")
    edge = _bilevel_png(tmp_path / "edge.png", 4096, 4096)  # exactly at the limit: accepted
    x = predict.load_images([jpeg_named_png, edge])
    assert x.shape == (2, 3, 32, 32) and x[0, 1].mean() > 0.7 and x[1].max() == 0


def test_without_run_the_official_cifar10_champion_else_the_only_one_else_ask(tmp_path, images, capsys):
    uri = str(tmp_path / "store")
    st = open_store(uri)
    for run in ["synth", "official", "split1"]:
        _publish_model(st, run, tmp_path, reverse=run != "official")
    red = str(images["red"])
    synth = _crown(st, "synth", md5="5" * 32, name="synthetic")
    assert predict.main(["--store", uri, red]) == 0  # the only champion
    assert f"run synth (the champion of {synth})" in capsys.readouterr().err

    official = _crown(st, "official")
    assert predict.main(["--store", uri, red]) == 0  # the official CIFAR-10 archive's, over others
    out = capsys.readouterr()
    assert f"run official (the champion of {official})" in out.err and _lines(out.out) == {"red.png": "red"}
    assert predict.main(["--store", uri, "--dataset", synth, red]) == 0
    assert _lines(capsys.readouterr().out) == {"red.png": "blue"}

    # two champions of the official archive (other split seeds): predict asks which
    rec = {"run_id": "split1", "model_uri": "", "test": {"accuracy": 0.5}, "dataset_name": "cifar10",
           "dataset_md5": "c58f30108f718f92721af3b95e74349a", "split_seed": 1, "test_size": 3500}
    champions.promote(st, rec, promote_by_accuracy(0.0))
    assert predict.main(["--store", uri, red]) == 1
    err = capsys.readouterr().err
    assert "champions of 3 datasets; choose one with --dataset IDENTITY or a run with --run RUN_ID" in err
    assert synth in err and official in err
    assert predict.main(["--store", uri, "--dataset", "nope", red]) == 1
    assert "--dataset nope: no champion of that dataset identity" in capsys.readouterr().err


def test_predictions_from_safetensors_equal_the_portable_models(tmp_path):
    """The default path (registry model + safetensors + config's TTA) and the exported
    program give the same probabilities on the same images."""
    from run.model import load_model

    torch.manual_seed(0)
    model = build_model("seed", num_classes=10).eval()
    with torch.no_grad():  # BatchNorm statistics other than 0/1, so normalisation matters
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    st = open_store(str(tmp_path / "store"))
    _publish_model(st, "r1", tmp_path, model=model, tta=2, classes=tuple(f"c{i}" for i in range(10)))
    images = torch.rand(37, 3, 32, 32)
    safe, classes = load_model(st, "r1", tmp_path / "a")
    portable, _ = load_model(st, "r1", tmp_path / "b", portable=True)
    assert len(classes) == 10
    p_safe, p_portable = predict.predict(safe, images), predict.predict(portable, images)
    assert torch.allclose(p_safe, p_portable, atol=1e-5)
    assert (p_safe.argmax(1) == p_portable.argmax(1)).all()


def _pickling_archive(genuine: Path, out: Path, marker: Path) -> Path:
    """`genuine` (a torch.export archive) with its first weight replaced by a pickle that
    creates `marker` when unpickled, and the archive's config asking torch to unpickle it."""
    class Plant:
        def __reduce__(self):
            return open, (str(marker), "w")  # harmless, and visible

    with zipfile.ZipFile(genuine) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        config_name = next(n for n in src.namelist() if n.endswith("data/weights/model_weights_config.json"))
        config = json.loads(src.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        planted = config_name.replace("model_weights_config.json", first["path_name"])
        for info in src.infolist():
            data = {config_name: json.dumps(config).encode(),
                    planted: pickle.dumps(Plant(), protocol=2)}.get(info.filename, src.read(info))
            dst.writestr(info, data)
    return out


def test_a_pickling_portable_model_is_never_loaded(tmp_path, images, capsys):
    """model.pt2 replaced in the store by one whose archive asks for pickled weights: the
    default path never opens it, and --portable refuses it on its SHA-256."""
    uri = str(tmp_path / "store")
    st = open_store(uri)
    _publish_model(st, "r1", tmp_path)
    marker = tmp_path / "PWNED"
    evil = _pickling_archive(tmp_path / "r1" / "model.pt2", tmp_path / "evil.pt2", marker)
    st.put_file("runs/r1/model/model.pt2", evil)  # someone with write access to the store
    genuine_sha = json.loads((tmp_path / "store/runs/r1/manifest.json").read_text()
                             )["artifacts"]["model/model.pt2"]["sha256"]

    assert predict.main(["--store", uri, "--run", "r1", str(images["red"])]) == 0
    assert _lines(capsys.readouterr().out) == {"red.png": "red"}
    assert not marker.exists()

    assert predict.main(["--store", uri, "--run", "r1", "--portable", str(images["red"])]) == 1
    err = capsys.readouterr().err
    from store import sha256_of
    assert f"{uri}/runs/r1/model/model.pt2: refusing to load it: its SHA-256 is {sha256_of(evil)}" in err
    assert f"but {uri}/runs/r1/manifest.json records {genuine_sha}" in err
    assert not marker.exists()

    # the planted archive is a real threat: plain torch.export.load runs its payload
    with pytest.raises(Exception):
        torch.export.load(str(evil))
    assert marker.exists()


def test_portable_needs_the_manifests_record(tmp_path, images, capsys):
    uri = str(tmp_path / "store")
    st = open_store(uri)
    _publish_model(st, "r1", tmp_path)
    st.put_json("runs/r1/manifest.json", {"run_id": "r1"}, tmp_path)  # no artifacts recorded
    assert predict.main(["--store", uri, "--run", "r1", "--portable", str(images["red"])]) == 1
    assert "records no SHA-256 for model/model.pt2" in capsys.readouterr().err
    _publish_model(st, "r1", tmp_path)
    assert predict.main(["--store", uri, "--run", "r1", "--portable", str(images["red"])]) == 0
    assert _lines(capsys.readouterr().out) == {"red.png": "red"}


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_damaged_classes_and_config_are_refused_naming_them(where, tmp_path, images, request, capsys):
    """classes.json and config.json come from the store: anything but what the run wrote
    is refused naming the file, what was expected and what was found; nothing huge is read."""
    from run.model import MAX_DOCUMENT_BYTES

    uri = str(tmp_path / "store") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/p"
    st = open_store(uri)
    _publish_model(st, "r1", tmp_path)
    red = str(images["red"])
    expected = "expected a JSON list of class-name strings, one per output of the model, found"
    for content, found in [(b"3", "a number (3)"), (b'{"red": 0}', 'an object ({"red": 0})'),
                           (b"red, green, blue", "text that is not JSON"), (b"[]", "an empty list"),
                           (b'["red", 1, "blue"]', "a list holding a number (1)"),
                           (b"\xff\xfe", "text that is not JSON")]:
        st.put_bytes("runs/r1/model/classes.json", content, tmp_path)
        for portable in ([], ["--portable"]):
            assert predict.main(["--store", uri, "--run", "r1", *portable, red]) == 1
            assert f"error: {uri}/runs/r1/model/classes.json: {expected} {found}" in capsys.readouterr().err

    st.put_bytes("runs/r1/model/classes.json", b'["' + b"x" * MAX_DOCUMENT_BYTES + b'"]', tmp_path)
    assert predict.main(["--store", uri, "--run", "r1", red]) == 1
    assert (f"error: {uri}/runs/r1/model/classes.json: {expected} 4,194,308 bytes; at most 4,194,304 are read"
            in capsys.readouterr().err)

    st.put_bytes("runs/r1/model/classes.json", b'["red", "green", "blue"]', tmp_path)
    for content, found in [(b"[1, 2]", "found a list"), (b"{not json", "found text that is not JSON"),
                           (b" " * (MAX_DOCUMENT_BYTES + 1), "found 4,194,305 bytes; at most 4,194,304 are read")]:
        st.put_bytes("runs/r1/model/config.json", content, tmp_path)
        assert predict.main(["--store", uri, "--run", "r1", red]) == 1
        err = capsys.readouterr().err
        assert f"error: {uri}/runs/r1/model/config.json: expected a training config naming a known model" in err
        assert found in err and "Traceback" not in err


def _png_with_text(path: Path, before_pixels: bool) -> Path:
    """An 8x8 PNG with an iTXt/zTXt chunk of 2 kB that inflates to 2 MiB, past Pillow's
    MAX_TEXT_CHUNK (1 MiB): before the pixels Pillow meets it opening the file, after them
    decoding it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    text = zlib.compress(b"A" * 2 * 2**20, 9)
    bomb = chunk(b"zTXt", b"comment\x00\x00" + text) if before_pixels else \
        chunk(b"iTXt", b"comment\x00\x01\x00\x00\x00" + text)
    pixels = chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + b"\x00" * 24 for _ in range(8))))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))  # 8-bit RGB
    body = bomb + pixels if before_pixels else pixels + bomb
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + body + chunk(b"IEND", b""))
    return path


def test_a_png_text_chunk_bomb_is_refused_naming_the_image(tmp_path, capsys):
    store = str(tmp_path / "store")
    (tmp_path / "store").mkdir()
    for before_pixels in (True, False):
        png = _png_with_text(tmp_path / f"text-{before_pixels}.png", before_pixels)
        assert png.stat().st_size < 10_000
        with pytest.raises(ValueError, match="Decompressed data too large"):  # plain Pillow: names nothing
            Image.open(png).convert("RGB")
        assert predict.main(["--store", store, str(png)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: IMAGE {png}: ") and "Decompressed data too large" in err


@pytest.mark.parametrize("name", ["classes.json", "config.json"])
def test_an_oversized_document_is_refused_before_it_is_downloaded(tmp_path, name):
    """A planted huge classes.json or config.json (sparse here) never reaches the predicting
    machine's disk: its size is checked in the store, then it is refused naming it."""
    from run.model import MAX_DOCUMENT_BYTES as LIMIT, read_document

    store = open_store(str(tmp_path / "store"))
    planted = tmp_path / "store" / "runs" / "r1" / "model" / name
    planted.parent.mkdir(parents=True)
    with open(planted, "wb") as f:
        f.truncate(16 * LIMIT)
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=f"^{planted}: expected a document, found {16 * LIMIT:,} bytes; "
                                         f"at most {LIMIT:,} are read$"):
        read_document(store, f"runs/r1/model/{name}", work, "a document")
    assert not (work / name).exists()


def test_an_oversized_champion_config_is_refused_naming_it(tmp_path):
    """The champion's config.json is read when a new model is compared with it: bounded too."""
    from store import MAX_DOCUMENT_BYTES, TooLarge
    from tasks.testing import champion_model

    planted = tmp_path / "store" / "runs" / "old" / "model" / "config.json"
    planted.parent.mkdir(parents=True)
    with open(planted, "wb") as f:
        f.truncate(4 * MAX_DOCUMENT_BYTES)
    with pytest.raises(TooLarge, match=f"^{planted}: {4 * MAX_DOCUMENT_BYTES:,} bytes, .*limit {MAX_DOCUMENT_BYTES:,}"):
        champion_model(open_store(str(tmp_path / "store")), {"run_id": "old"}, 10, "cpu", tmp_path / "work")
    assert not (tmp_path / "work" / "config.json").exists()


@pytest.mark.parametrize("name, flags", [("weights.safetensors", []), ("model.pt2", ["--portable"])])
def test_an_oversized_model_file_is_refused_before_it_is_downloaded(name, flags, tmp_path, images, capsys):
    """A planted model file larger than any model can be (sparse here) is refused naming it
    and the limit, before a byte of it reaches the predicting machine's disk."""
    from store import MAX_MODEL_BYTES

    uri = str(tmp_path / "store")
    _publish_model(open_store(uri), "r1", tmp_path)
    planted = tmp_path / "store" / "runs" / "r1" / "model" / name
    with open(planted, "wb") as f:
        f.truncate(2 * MAX_MODEL_BYTES)
    assert predict.main(["--store", uri, "--run", "r1", *flags, str(images["red"])]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {planted}: {2 * MAX_MODEL_BYTES:,} bytes, larger than this download can be "
                          f"(limit {MAX_MODEL_BYTES:,} bytes)"), err


def test_a_planted_training_config_is_refused_naming_where_it_came_from(tmp_path):
    """A result record in the store names the config the selected model is rebuilt from;
    a planted one with a field TrainConfig does not have, or a model nobody registered, is
    refused naming the record, before any weights are downloaded."""
    from run.model import rebuild
    from store import LocalStore

    good = dataclasses.asdict(make_config("seed", "none", epochs=1, patience=1, seed=0, precision="fp32"))
    st = LocalStore(tmp_path / "store")
    for config, found in [({**good, "evil": 1}, "evil"), ({**good, "model": "no-such-model"}, "no-such-model")]:
        with pytest.raises(ValueError) as err:
            rebuild(st, config, "runs/r/variants/none/metrics.json", "runs/r/none.safetensors", tmp_path, 10)
        msg = str(err.value)
        assert msg.startswith("runs/r/variants/none/metrics.json: expected a training config naming a known model")
        assert found in msg, msg
    assert not (tmp_path / "weights.safetensors").exists()
