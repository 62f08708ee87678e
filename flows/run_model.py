"""A run's model, read back from the store without unpickling anything by default.

By default the model is rebuilt from `runs/<id>/model/weights.safetensors` (tensors
only) and `config.json` (JSON naming the registry model and its test-time
augmentation), wrapped with the same normalisation and TTA as the portable file
(cnn.export.Portable), so both give the same predictions. The portable `model.pt2`
is a torch.export archive, whose loader unpickles parts of it: it is loaded only on
request, once its SHA-256 matches the one the run's manifest recorded (which catches
corruption; whoever can write the store can rewrite both) and once
cnn.export.check_archive finds nothing in it that could unpickle more than tensors
(which is what stops a planted archive).
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cnn.config import TrainConfig
from cnn.export import Portable, load_portable
from cnn.models import build_model
from store import Store, join_key, sha256_of

WEIGHTS, CONFIG, CLASSES, PORTABLE = "weights.safetensors", "config.json", "classes.json", "model.pt2"


def runs_hint(store: Store) -> str:
    runs = sorted({k.split("/")[1] for k in store.list("runs") if k.endswith("/manifest.json")})
    return f"runs in the store: {', '.join(runs[-5:])}" if runs else "the store holds no runs"


def load_model(store: Store, run_id: str, workdir: Path, portable: bool = False) -> tuple[nn.Module, list[str]]:
    """(model: 0..1 RGB (B, 3, 32, 32) in, logits out; class names) of a finished run."""
    folder = join_key("runs", run_id, "model")
    files = {Path(k).name for k in store.list(folder)}
    wanted = {CLASSES, PORTABLE} if portable else {CLASSES, WEIGHTS, CONFIG}
    if not wanted <= files:
        if not store.list(join_key("runs", run_id)):
            raise LookupError(f"--run {run_id}: no such run in {store.uri} ({runs_hint(store)})")
        raise LookupError(f"{store.uri_for(folder)}: expected {', '.join(sorted(wanted))}, found "
                          f"{', '.join(sorted(files)) or 'nothing'}; did the run finish?")
    classes = json.loads(store.get_file(join_key(folder, CLASSES), workdir / CLASSES).read_text())
    model = verified_portable(store, run_id, workdir) if portable else from_weights(store, folder, workdir, len(classes))
    return model, classes


def from_weights(store: Store, folder: str, workdir: Path, num_classes: int) -> nn.Module:
    """The registry's model named by config.json, with the safetensors weights, in eval mode."""
    cfg_file = store.get_file(join_key(folder, CONFIG), workdir / CONFIG)
    try:
        cfg = TrainConfig(**json.loads(cfg_file.read_text()))
        model = build_model(cfg.model, num_classes=num_classes)
    except (TypeError, ValueError) as e:  # unknown or missing fields, unknown model, not JSON
        raise ValueError(f"{store.uri_for(join_key(folder, CONFIG))}: expected a training config naming a "
                         f"known model: {e}") from None
    weights = store.get_file(join_key(folder, WEIGHTS), workdir / WEIGHTS)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError) as e:  # damaged file, or weights of another shape
        raise ValueError(f"{store.uri_for(join_key(folder, WEIGHTS))}: not the weights of a {cfg.model} model "
                         f"with {num_classes} classes: {e}") from None
    return Portable(model.float(), cfg.tta).eval()  # the exported program's normalisation and TTA


def verified_portable(store: Store, run_id: str, workdir: Path) -> nn.Module:
    """The run's model.pt2, loaded only if its SHA-256 is the one its manifest recorded
    (corruption) and cnn.export.check_archive accepts it (tampering)."""
    name = f"model/{PORTABLE}"
    manifest_key = join_key("runs", run_id, "manifest.json")
    key = join_key("runs", run_id, name)
    manifest = store.read_json(manifest_key) or {}
    expected = manifest.get("artifacts", {}).get(name, {}).get("sha256")
    if expected is None:
        raise ValueError(f"{store.uri_for(key)}: refusing to load it: {store.uri_for(manifest_key)} records "
                         f"no SHA-256 for {name}")
    path = store.get_file(key, workdir / PORTABLE)
    found = sha256_of(path)
    if found != expected:
        path.unlink()  # what is not verified is not kept
        raise ValueError(f"{store.uri_for(key)}: refusing to load it: its SHA-256 is {found}, but "
                         f"{store.uri_for(manifest_key)} records {expected}")
    try:
        return load_portable(path)
    except ValueError as e:
        path.unlink()
        raise ValueError(f"{store.uri_for(key)}: refusing to load it: {e}") from None
