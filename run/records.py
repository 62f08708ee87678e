"""A variant's result: the one record that training writes for each repeat (as the
repeat's `metrics.json` in the store), that scoring combines into the variant's
(tasks/scoring.py), and that the parent, selection and the report read."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from store import Store
from store.base import json_object
from run.layout import Unit, stored_key

METRICS = "metrics.json"


@dataclass(frozen=True, kw_only=True)
class DatasetRef:
    """fetch-dataset's result: where the run's prepared tensors are and what they must be.
    `sha256` is derived from the verified archive, never read from the store: a child flow
    run gets it as a parameter, and the store's copy is refused unless it matches. A child
    knows only key, md5 and sha256; the rest describe the set for the manifest and the lanes."""

    name: str | None = None  # cifar10 or synthetic
    source: str | None = None  # where the archive came from (URL, folder, s3:// mirror, generator)
    md5: str  # of the archive
    key: str  # store key of the prepared copy, datasets/<name>/<md5>
    sha256: str  # of the prepared tensors
    train: int | None = None  # images
    holdout: int | None = None  # images, split into validation and test by the run's split_seed
    classes: list[str] | None = None

    def to_dict(self) -> dict:
        """The manifest's `dataset`."""
        return dataclasses.asdict(self)


STATUSES = ("completed", "early_stopped", "diverged", "failed")
SELECTABLE = ("completed", "early_stopped")


@dataclass
class UnitResult:
    name: str
    status: str  # one of STATUSES
    epochs_run: int | None = None
    best_epoch: int | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    seconds: float | None = None  # training time, all attempts together
    device: str | None = None
    error: str | None = None
    weights_key: str | None = None  # store key of the best epoch's weights
    config: dict | None = None  # the TrainConfig it trained with
    artifacts: dict[str, dict] = field(default_factory=dict)  # name -> {uri, sha256, bytes}
    attempts: int = 1  # flow runs (or task runs) it took
    flow_run_id: str | None = None  # the flow run that trained it
    seed: int | None = None  # the repeat's seed (a variant's record: its best repeat's)
    predictions_key: str | None = None  # store key of the best epoch's val predictions, (N_val,) uint8
    # a variant's record only (tasks/scoring.py), None in a repeat's metrics.json:
    repeats: list[dict] | None = None  # each repeat: seed, status, best_epoch, val_loss, val_accuracy, seconds
    val_accuracy_mean: float | None = None  # over the selectable repeats
    val_loss_mean: float | None = None  # over the selectable repeats: breaks ties of the mean accuracy
    val_accuracy_ci: list[float] | None = None  # [low, high], 95%, over seeds and images

    @classmethod
    def failed(cls, name: str, error: str, **known) -> UnitResult:
        """A variant that produced no model, saying why."""
        return cls(name=name, status="failed", error=error, **known)

    @property
    def selectable(self) -> bool:
        return self.status in SELECTABLE and self.val_loss is not None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> UnitResult:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def read(cls, store: Store, run_id: str, unit: Unit) -> UnitResult | None:
        """The unit's record in the store (the one its lease names current), or None if it has not finished."""
        key = stored_key(store, run_id, unit, METRICS)
        raw = None if key is None else store.read_versioned(key)[0]  # deleted by hand: the unit resumes
        return None if raw is None else cls.from_dict(_checked(raw, store.uri_for(key)))

    def summary(self) -> dict:
        """The manifest's per-variant fields."""
        return {k: getattr(self, k) for k in ("name", "status", "epochs_run", "best_epoch", "val_loss",
                                               "val_accuracy", "seconds", "attempts", "error", "repeats",
                                               "val_accuracy_mean", "val_accuracy_ci", "val_loss_mean")}

    def repeat_summary(self) -> dict:
        """This repeat's entry in its variant's `repeats`."""
        return {k: getattr(self, k) for k in ("seed", "status", "best_epoch", "val_loss", "val_accuracy", "seconds")}


# a stored record's fields that the parent, scoring and selection compute with or read by
_NUMBERS = ("epochs_run", "best_epoch", "val_loss", "val_accuracy", "seconds")
_KEYS = ("weights_key", "predictions_key")


def _checked(raw: bytes, uri: str) -> dict:
    """The result record in `raw`, or a ValueError naming `uri`, what was expected and what
    was found: a record is read from the store, where anyone with write access can plant one."""
    expected = (f"expected a result record: a JSON object with a string name, a status among {', '.join(STATUSES)}, "
                f"numbers or null for {', '.join(_NUMBERS)} and strings or null for {', '.join(_KEYS)}")
    d = json_object(raw, uri, expected)
    bad = [k for k, ok in [("name", isinstance(d.get("name"), str)), ("status", d.get("status") in STATUSES),
                           *((k, d.get(k) is None or (isinstance(d[k], (int, float)) and not isinstance(d[k], bool)))
                             for k in _NUMBERS),
                           *((k, d.get(k) is None or isinstance(d[k], str)) for k in _KEYS)] if not ok]
    if bad:
        raise ValueError(f"{uri}: {expected}; found {bad[0]} = {d.get(bad[0])!r:.100}")
    return d
