"""Checkpoints: a variant's whole training state in one safetensors file, nothing pickled.

A checkpoint comes back from a store that others may write, so reading one must never
run code (torch.load unpickles). Tensors: model/<name>, optimizer/<i>/<name>,
lookahead/<name>, best/<name>, best/val_predictions, rng. Metadata: "format" and
"document", JSON with config, loop (LoopState without tensors), optimizer (param_groups
and non-tensor state) and scheduler. Anything else, or a tensor that does not fit the
model, is refused with a ValueError naming the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from cnn.config import TrainConfig
from cnn.fast import Lookahead
from store.files import publishing

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "train-cifar-checkpoint-1"
BEST_PREDICTIONS = "val_predictions"  # under best/; no model's state_dict has a key without a dot
LOOP_STATES = ("running", "completed", "early_stopped", "diverged")


@dataclass
class LoopState:
    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0  # 0 until an epoch has a finite validation loss
    best_val_loss: float = math.inf
    bad_epochs: int = 0  # epochs since the best one
    best_state: dict[str, torch.Tensor] | None = None
    best_predictions: torch.Tensor | None = None  # (N_val,) uint8: comparisons pair on these images
    seconds: float = 0.0
    status: str = "running"
    error: str | None = None


_LOOP_FIELDS = {"epoch": int, "history": list, "best_epoch": int, "best_val_loss": (int, float),
                "bad_epochs": int, "seconds": (int, float), "status": str, "error": (str, type(None))}
_DOCUMENT_KEYS = {"config", "loop", "optimizer", "scheduler"}


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched, gen: torch.Generator,
                    lookahead: Lookahead | None, cfg: TrainConfig, state: LoopState) -> None:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    opt_scalars: dict[str, dict] = {}  # JSON keys are strings
    for i, entries in opt_state["state"].items():
        for k, v in entries.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer/{i}/{k}"] = v
            else:
                opt_scalars.setdefault(str(i), {})[k] = v
    if lookahead is not None and lookahead.average is not None:
        tensors.update({f"lookahead/{k}": v for k, v in lookahead.average.items()})
    if state.best_state is not None:
        tensors.update({f"best/{k}": v for k, v in state.best_state.items()})
    if state.best_predictions is not None:
        tensors[f"best/{BEST_PREDICTIONS}"] = state.best_predictions
    tensors["rng"] = gen.get_state()
    document = {
        "config": dataclasses.asdict(cfg),
        "loop": {k: getattr(state, k) for k in _LOOP_FIELDS},
        "optimizer": {"param_groups": opt_state["param_groups"], "state": opt_scalars},
        "scheduler": sched.state_dict(),
    }
    # json writes an infinite best_val_loss (no best epoch yet) as Infinity; Python reads it back
    metadata = {"format": FORMAT, "document": json.dumps(document)}
    with publishing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched, gen: torch.Generator,
                    lookahead: Lookahead | None, cfg: TrainConfig) -> LoopState:
    """Restore everything save_checkpoint wrote under the same config; returns the loop's state."""
    with _open(path) as f:
        document = _document(path, f.metadata())
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{path}: a tensor in the checkpoint does not parse: {e}") from e
    if document["config"] != dataclasses.asdict(cfg):
        raise ValueError(f"{path}: checkpoint was written with a different config; "
                         f"expected {dataclasses.asdict(cfg)}, found {document['config']}")
    groups, rng = _grouped(path, tensors)
    live = model.state_dict()
    _check_like(path, "model", groups["model"], live)
    state = LoopState(**document["loop"])
    state.best_predictions = _predictions(path, groups["best"].pop(BEST_PREDICTIONS, None), state.best_epoch)
    if state.best_epoch:
        _check_like(path, "best", groups["best"], live)
        state.best_state = groups["best"]
    else:
        _check_like(path, "best", groups["best"], {})
    if lookahead is not None and groups["lookahead"]:
        floats = {k: v for k, v in live.items() if v.is_floating_point()}  # what Lookahead averages
        _check_like(path, "lookahead", groups["lookahead"], floats)
        lookahead.average = {k: _layout_of(floats[k], v) for k, v in groups["lookahead"].items()}
    elif lookahead is None:
        _check_like(path, "lookahead", groups["lookahead"], {})

    opt_state = _optimizer_state(path, opt, document["optimizer"], groups["optimizer"])
    with _refusing(path, "the model, optimizer, scheduler or generator state"):
        model.load_state_dict(groups["model"])
        opt.load_state_dict(opt_state)
        sched.load_state_dict(document["scheduler"])
        gen.set_state(rng)
    return state


def _grouped(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}, "lookahead": {}, "best": {}}
    rng = tensors.pop("rng", None)
    for name, t in tensors.items():
        prefix, _, key = name.partition("/")
        if prefix not in groups or not key:
            raise ValueError(f"{path}: unexpected tensor {name!r}; a checkpoint holds model/, optimizer/, "
                             f"lookahead/ and best/ tensors and rng")
        groups[prefix][key] = t
    if rng is None or rng.dtype != torch.uint8 or rng.ndim != 1:
        found = "none" if rng is None else f"{rng.dtype} {tuple(rng.shape)}"
        raise ValueError(f"{path}: tensor 'rng': expected the generator state, (S,) uint8; found {found}")
    return groups, rng


def read_history(path: Path) -> list[dict]:
    with _open(path) as f:
        return _document(path, f.metadata())["loop"]["history"]


def read_progress(path: Path) -> tuple[dict, int]:
    with _open(path) as f:
        document = _document(path, f.metadata())
    return document["config"], document["loop"]["epoch"]


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: expected a safetensors checkpoint, found a file that does not parse as one "
                         f"({e}); an older pickled checkpoint.pt is not read, by design") from e


def _document(path: Path, metadata: dict[str, str] | None) -> dict:
    metadata = metadata or {}
    if metadata.get("format") != FORMAT or set(metadata) != {"format", "document"}:
        raise ValueError(f"{path}: expected safetensors metadata {{'format': {FORMAT!r}, 'document': ...}}, "
                         f"found keys {sorted(metadata)} with format {metadata.get('format')!r}")
    try:
        document = json.loads(metadata["document"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: checkpoint metadata 'document' is not JSON: {e}") from e
    if not isinstance(document, dict) or set(document) != _DOCUMENT_KEYS:
        found = sorted(document) if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"{path}: expected a checkpoint document with {sorted(_DOCUMENT_KEYS)}, found {found}")
    loop = document["loop"]
    if not isinstance(loop, dict) or set(loop) != set(_LOOP_FIELDS):
        found = sorted(loop) if isinstance(loop, dict) else type(loop).__name__
        raise ValueError(f"{path}: expected loop state {sorted(_LOOP_FIELDS)}, found {found}")
    for k, kind in _LOOP_FIELDS.items():
        if not isinstance(loop[k], kind) or isinstance(loop[k], bool):
            raise ValueError(f"{path}: loop state {k!r}: expected {kind}, found {loop[k]!r}")
    if loop["status"] not in LOOP_STATES or not all(isinstance(row, dict) for row in loop["history"]):
        raise ValueError(f"{path}: loop state: expected a status in {LOOP_STATES} and a list of history rows, "
                         f"found {loop['status']!r} and {loop['history']!r:.200}")
    return document


def _predictions(path: Path, saved: torch.Tensor | None, best_epoch: int) -> torch.Tensor | None:
    misshapen = saved is not None and (saved.dtype != torch.uint8 or saved.ndim != 1)
    if (saved is not None) != bool(best_epoch) or misshapen:
        found = "none" if saved is None else f"{saved.dtype} {tuple(saved.shape)}"
        raise ValueError(f"{path}: tensor 'best/{BEST_PREDICTIONS}': expected (N,) uint8 exactly when there is a "
                         f"best epoch, found {found} (best epoch {best_epoch})")
    return saved


def _check_like(path: Path, group: str, saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
    """`saved` must hold exactly `live`'s names, each with its shape and dtype."""
    if set(saved) != set(live):
        extra, missing = sorted(set(saved) - set(live)), sorted(set(live) - set(saved))
        raise ValueError(f"{path}: {group}/ tensors do not match the model: unexpected {extra}, missing {missing}")
    for k, v in saved.items():
        if v.shape != live[k].shape or v.dtype != live[k].dtype:
            raise ValueError(f"{path}: tensor '{group}/{k}': expected {live[k].dtype} {tuple(live[k].shape)}, "
                             f"found {v.dtype} {tuple(v.shape)}")


def _optimizer_state(path: Path, opt: torch.optim.Optimizer, scalars: dict, tensors: dict[str, torch.Tensor]) -> dict:
    params = [p for g in opt.param_groups for p in g["params"]]  # state_dict numbers them in this order
    if not isinstance(scalars, dict) or set(scalars) != {"param_groups", "state"}:
        raise ValueError(f"{path}: optimizer: expected param_groups and state, found {scalars!r:.200}")
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        i, _, key = name.partition("/")
        p = params[int(i)] if i.isdigit() and int(i) < len(params) else None
        if p is None or not key or (t.ndim and t.shape != p.shape):
            raise ValueError(f"{path}: unexpected tensor 'optimizer/{name}': expected optimizer/<i>/<name> for "
                             f"one of {len(params)} parameters, a scalar or of that parameter's shape")
        # its parameter's layout (channels_last), as the uninterrupted run's buffer had
        state.setdefault(int(i), {})[key] = _layout_of(p, t) if t.ndim else t
    for i, entries in scalars["state"].items():
        if not i.isdigit() or int(i) >= len(params) or not isinstance(entries, dict):
            raise ValueError(f"{path}: optimizer state {i!r}: expected a parameter index below {len(params)}")
        state.setdefault(int(i), {}).update(entries)
    return {"state": state, "param_groups": scalars["param_groups"]}


def _layout_of(like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` on `like`'s device with `like`'s strides: the file holds contiguous tensors."""
    return torch.empty_like(like).copy_(values)


@contextlib.contextmanager
def _refusing(path: Path, what: str):
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path}: {what} does not fit this model and config: {e}") from e
