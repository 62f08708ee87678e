"""flows.predict: the champion's (or a named run's) portable model on image files.

The models here are tiny exported programs that classify by dominant colour, so
the expected class of each image is known; the real trained model is exercised
end to end in test_s3_run.py.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from flows import predict
from store import open_store

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (25, 30, 220)}


class ByColour(nn.Module):
    """Logits = 10 x mean of each channel: red, green, blue images get classes 0, 1, 2."""

    def __init__(self, reverse: bool = False):
        super().__init__()
        self.reverse = reverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) in 0..1 -> (B, 3)
        m = x.mean(dim=(2, 3)) * 10
        return m.flip(1) if self.reverse else m


def _publish_model(store, run_id: str, tmp: Path, reverse: bool = False) -> None:
    prog = torch.export.export(ByColour(reverse), (torch.rand(2, 3, 32, 32),),
                               dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
    torch.export.save(prog, tmp / f"{run_id}.pt2")
    (tmp / "classes.json").write_text(json.dumps(["red", "green", "blue"]))
    store.put_file(f"runs/{run_id}/model/model.pt2", tmp / f"{run_id}.pt2")
    store.put_file(f"runs/{run_id}/model/classes.json", tmp / "classes.json")
    store.put_json(f"runs/{run_id}/manifest.json", {"run_id": run_id}, tmp)


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
    st.write_if("champion.json", json.dumps({"run_id": "r1", "model_uri": st.uri_for("runs/r1/model")}).encode(), None)

    files = [str(images[k]) for k in ["red", "green", "blue", "red-palette"]]
    proc = subprocess.run([sys.executable, "-m", "flows.predict", "--store", uri, *files], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stdout) == {"red.png": "red", "green.jpeg": "green", "blue.png": "blue",
                                   "grey-red.png": "red"}
    assert "run r1 (the champion)" in proc.stderr


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
    assert f"--store {uri}: no champion.json" in capsys.readouterr().err

    _publish_model(st, "r1", tmp_path)
    assert predict.main(["--store", uri, "--run", "r9", red]) == 1
    err = capsys.readouterr().err
    assert "--run r9: no such run" in err and "r1" in err

    assert predict.main(["--store", uri, "--run", "../r1", red]) == 1
    assert "--run '../r1' is not a valid name" in capsys.readouterr().err

    st.put_file("runs/r3/manifest.json", tmp_path / "classes.json")  # a run that never got a model
    assert predict.main(["--store", uri, "--run", "r3", red]) == 1
    assert f"{uri}/runs/r3/model: expected one portable model" in capsys.readouterr().err

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
