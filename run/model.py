"""A run's model, read back from the store without unpickling anything by default.

By default the model is rebuilt from weights.safetensors and config.json, wrapped with
the portable file's normalisation and TTA (cnn.export.Portable), so both predict alike.
The portable model.pt2's loader unpickles parts of it: it is loaded only on request,
once its SHA-256 matches the manifest's (which catches corruption; whoever can write
the store can rewrite both) and cnn.export.check_archive finds nothing in it that could
unpickle more than tensors (which is what stops a planted archive).
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
from run.layout import CLASSES, CONFIG, MANIFEST, MODEL, PORTABLE, WEIGHTS, model_key, run_key
from store import MAX_MODEL_BYTES, Store, TooLarge, join_key, sha256_of

# classes.json and config.json are a few kB; a larger one is not the run's, and is not read
MAX_DOCUMENT_BYTES = 4 * 2**20


def runs_hint(store: Store) -> str:
    runs = sorted({k.split("/")[1] for k in store.list("runs") if k.endswith("/manifest.json")})
    return f"runs in the store: {', '.join(runs[-5:])}" if runs else "the store holds no runs"


def load_model(store: Store, run_id: str, workdir: Path, portable: bool = False) -> tuple[nn.Module, list[str]]:
    """(model: 0..1 RGB (B, 3, 32, 32) in, logits out; class names) of a finished run."""
    folder = model_key(run_id)
    files = {Path(k).name for k in store.list(folder)}
    wanted = {CLASSES, PORTABLE} if portable else {CLASSES, WEIGHTS, CONFIG}
    if not wanted <= files:
        if not store.list(run_key(run_id)):
            raise LookupError(f"--run {run_id}: no such run in {store.uri} ({runs_hint(store)})")
        raise LookupError(f"{store.uri_for(folder)}: expected {', '.join(sorted(wanted))}, found "
                          f"{', '.join(sorted(files)) or 'nothing'}; did the run finish?")
    classes = read_classes(store, folder, workdir)
    model = verified_portable(store, run_id, workdir) if portable else from_weights(store, folder, workdir, len(classes))
    return model, classes


def read_document(store: Store, key: str, workdir: Path, expected: str):
    try:
        path = store.get_file(key, workdir / Path(key).name, limit=MAX_DOCUMENT_BYTES)
    except TooLarge as e:
        found = "more" if e.size is None else f"{e.size:,} bytes"
        raise ValueError(f"{store.uri_for(key)}: expected {expected}, found {found}; at most "
                         f"{MAX_DOCUMENT_BYTES:,} are read") from None
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{store.uri_for(key)}: expected {expected}, found text that is not JSON ({e})") from None


def read_classes(store: Store, folder: str, workdir: Path) -> list[str]:
    key, expected = join_key(folder, CLASSES), "a JSON list of class-name strings, one per output of the model"
    classes = read_document(store, key, workdir, expected)
    if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
        return classes
    if not isinstance(classes, list):
        found = f"{_json_kind(classes)} ({json.dumps(classes)[:80]})"
    elif not classes:
        found = "an empty list"
    else:
        odd = next(c for c in classes if not isinstance(c, str))
        found = f"a list holding {_json_kind(odd)} ({json.dumps(odd)[:80]})"
    raise ValueError(f"{store.uri_for(key)}: expected {expected}, found {found}")


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"
            }.get(type(value), "a number")


def from_weights(store: Store, folder: str, workdir: Path, num_classes: int) -> nn.Module:
    model, cfg = rebuild(store, read_config(store, folder, workdir), store.uri_for(join_key(folder, CONFIG)),
                         join_key(folder, WEIGHTS), workdir, num_classes)
    return Portable(model.float(), cfg.tta).eval()


def read_config(store: Store, folder: str, workdir: Path) -> dict:
    """The model folder's config.json, a JSON object (rebuild checks its fields)."""
    key = join_key(folder, CONFIG)
    raw = read_document(store, key, workdir, CONFIG_EXPECTED)
    if not isinstance(raw, dict):
        raise ValueError(f"{store.uri_for(key)}: expected {CONFIG_EXPECTED}, found {_json_kind(raw)}")
    return raw


CONFIG_EXPECTED = "a training config naming a known model"


def rebuild(store: Store, config: dict, source: str, weights_key: str, workdir: Path,
            num_classes: int) -> tuple[nn.Module, TrainConfig]:
    """(the model `config` names with the weights at `weights_key`, in eval mode; its
    TrainConfig). `source` names where `config` came from in errors."""
    try:
        cfg = TrainConfig(**config)
        model = build_model(cfg.model, num_classes=num_classes)
    except (TypeError, ValueError) as e:  # unknown or missing fields, unknown model
        raise ValueError(f"{source}: expected {CONFIG_EXPECTED}: {e}") from None
    weights = store.get_file(weights_key, workdir / WEIGHTS, limit=MAX_MODEL_BYTES)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError) as e:  # damaged file, or weights of another shape
        raise ValueError(f"{store.uri_for(weights_key)}: not the weights of a {cfg.model} model "
                         f"with {num_classes} classes: {e}") from None
    return model.eval(), cfg


def verified_portable(store: Store, run_id: str, workdir: Path) -> nn.Module:
    name = f"{MODEL}/{PORTABLE}"
    manifest_key = run_key(run_id, MANIFEST)
    key = model_key(run_id, PORTABLE)
    manifest = store.read_json(manifest_key) or {}
    expected = manifest.get("artifacts", {}).get(name, {}).get("sha256")
    if expected is None:
        raise ValueError(f"{store.uri_for(key)}: refusing to load it: {store.uri_for(manifest_key)} records "
                         f"no SHA-256 for {name}")
    path = store.get_file(key, workdir / PORTABLE, limit=MAX_MODEL_BYTES)
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
