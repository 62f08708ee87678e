"""The run's records, each with one JSON form and built in one place; the manifest
(tasks/publish.py) is made of their JSON forms. A VariantScore is built only by
tasks/scoring.py `combine`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from store import Store
from store.base import json_object
from run.layout import UNIT_RESULT, Unit, stored_key

@dataclass(frozen=True, kw_only=True)
class DatasetRef:
    """fetch-dataset's result. `sha256` is derived from the verified archive, never read
    from the store: a child flow run gets it as a parameter, and the store's copy is
    refused unless it matches. A child knows only key, md5 and sha256."""

    name: str | None = None
    source: str | None = None  # where the archive came from (URL, folder, s3:// mirror, generator)
    md5: str  # of the archive
    key: str
    sha256: str  # of the prepared tensors
    train: int | None = None
    holdout: int | None = None  # split into validation and test by the run's split_seed
    classes: list[str] | None = None
    # hold-out indices (before the split) dropped for a near-duplicate in train
    # (purge_test_duplicates), sorted; every split of the run is made without them
    purged: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "purged", tuple(sorted({int(i) for i in self.purged})))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def split_sizes(self) -> tuple[int, int]:
        """(validation, test) sizes of the hold-out less the purged images."""
        from cnn.data import split_sizes

        return split_sizes(self.holdout - len(self.purged))

    @property
    def purged_tag(self) -> str | None:
        """`<count>-<first 8 hex digits of the indices' SHA-256>`, None if nothing was purged:
        part of the dataset identity, as a purged hold-out is other test images."""
        return purged_tag(self.purged)


def purged_tag(purged) -> str | None:
    if not purged:
        return None
    digest = hashlib.sha256(json.dumps(sorted(int(i) for i in purged)).encode()).hexdigest()
    return f"{len(purged)}-{digest[:8]}"


# paused: at a halving rung, its checkpoint to resume (paused.json, never metrics.json);
# pruned: stopped there by successive halving; stopped_by_budget: the run's budget_gpu_hours ran out
UNIT_STATUSES = ("completed", "early_stopped", "diverged", "failed", "paused", "pruned", "stopped_by_budget")
SELECTABLE = ("completed", "early_stopped", "pruned", "stopped_by_budget")


@dataclass
class UnitResult:
    """One repeat (seed) of one variant, as training wrote it."""
    name: str
    status: str  # one of UNIT_STATUSES
    epochs_run: int | None = None
    best_epoch: int | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    seconds: float | None = None  # training time, all attempts together
    device: str | None = None
    error: str | None = None
    weights_key: str | None = None  # the best epoch's
    config: dict | None = None
    artifacts: dict[str, dict] = field(default_factory=dict)  # name -> {uri, sha256, bytes}
    attempts: int = 1  # flow runs (or task runs)
    flow_run_id: str | None = None
    seed: int | None = None
    predictions_key: str | None = None  # store key of the best epoch's val predictions, (N_val,) uint8
    pruned: dict | None = None  # halving's reason (cnn/halving.py Stop) when status is pruned

    @classmethod
    def failed(cls, name: str, error: str, **known) -> UnitResult:
        return cls(name=name, status="failed", error=error, **known)

    @property
    def selectable(self) -> bool:
        return self.status in SELECTABLE and self.val_loss is not None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> UnitResult:
        # a metrics.json written before the aggregate moved to VariantScore holds its
        # (always null) aggregate keys too: they are not a unit's, and are dropped
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def read(cls, store: Store, run_id: str, unit: Unit, name: str = UNIT_RESULT) -> UnitResult | None:
        """The unit's current record (`name`: PAUSED for its record at a rung), or None if it has not finished."""
        key = stored_key(store, run_id, unit, name)
        raw = None if key is None else store.read_versioned(key)[0]  # deleted by hand: the unit resumes
        return None if raw is None else cls.from_dict(_checked(raw, store.uri_for(key)))

    def summary(self) -> dict:
        out = {k: getattr(self, k) for k in ("name", "status", "epochs_run", "best_epoch", "val_loss",
                                              "val_accuracy", "seconds", "attempts", "error")}
        return {**out, "pruned": self.pruned} if self.pruned else out

    def repeat_summary(self) -> dict:
        return {k: getattr(self, k) for k in ("seed", "status", "best_epoch", "val_loss", "val_accuracy", "seconds")}


@dataclass(frozen=True)
class VariantScore:
    """A variant over its repeats: the mean and interval decide, the best repeat's model
    is the one tested. With no selectable repeat it has no mean and carries the first
    repeat's failure."""
    name: str
    status: str
    repeats: list[dict]  # UnitResult.repeat_summary(), in seed order
    epochs_run: int | None = None
    best_epoch: int | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    seconds: float | None = None
    attempts: int = 1
    error: str | None = None
    val_accuracy_mean: float | None = None  # over the selectable repeats
    val_loss_mean: float | None = None  # breaks ties of the mean accuracy
    val_accuracy_ci: list[float] | None = None  # [low, high], 95%, over seeds and images
    seed: int | None = None
    device: str | None = None
    config: dict | None = None
    weights_key: str | None = None
    artifacts: dict[str, dict] = field(default_factory=dict)  # every repeat's
    pruned: dict | None = None  # halving's reason, when the variant was pruned (cnn/halving.py Stop)

    @property
    def selectable(self) -> bool:
        return self.val_accuracy_mean is not None

    def summary(self) -> dict:
        out = {k: getattr(self, k) for k in ("name", "status", "epochs_run", "best_epoch", "val_loss",
                                              "val_accuracy", "seconds", "attempts", "error", "repeats",
                                              "val_accuracy_mean", "val_accuracy_ci", "val_loss_mean")}
        return {**out, "pruned": self.pruned} if self.pruned else out


@dataclass(frozen=True)
class VariantComparison:
    """The selected variant minus the runner-up on the same validation images."""
    selected: str
    runner_up: str
    difference: float
    ci: list[float]
    distinguishable: bool
    method: str
    level: float
    n_images: int
    sentence: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ChampionComparison:
    """The new model minus the champion on the same test images, and whether that promotes
    it. No numbers when the champion's model could not be faced."""
    champion_run_id: str
    promoted: bool
    reason: str
    difference: float | None = None
    ci: list[float] | None = None
    method: str | None = None

    def to_dict(self) -> dict:
        # the manifest names the decision `promote`, as it always has
        return {"champion_run_id": self.champion_run_id, "difference": self.difference, "ci": self.ci,
                "method": self.method, "promote": self.promoted, "reason": self.reason}


@dataclass(frozen=True)
class TestResult:
    """The selected model on the test split, and the champion it faced if any."""

    __test__ = False  # not a pytest test class, whatever its name

    variant: str
    model: str
    n: int
    loss: float
    accuracy: float
    per_class: dict[str, float]
    champion_comparison: ChampionComparison | None = None
    artifacts: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"variant": self.variant, "model": self.model, "n": self.n, "loss": self.loss, "accuracy": self.accuracy,
             "per_class": self.per_class}
        if self.champion_comparison is not None:
            d["champion_comparison"] = self.champion_comparison.to_dict()
        return d

    def summary(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in ("variant", "model", "n")}


@dataclass(frozen=True)
class ChampionRecord:
    """What the champion registry keeps of a run."""
    run_id: str
    model_uri: str
    manifest_uri: str
    variant: str
    model: str
    test: dict
    dataset_name: str
    dataset_md5: str
    split_seed: int
    test_size: int
    created_at: str | None
    # the run's fingerprint digest (run/fingerprint.py); None in records written before it
    fingerprint: str | None = None
    # DatasetRef.purged_tag: only in the record of a run that purged hold-out images
    dataset_purged: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["dataset_purged"] is None:
            del d["dataset_purged"]
        return d


# a stored record's fields that scoring and selection compute with
_NUMBERS = ("epochs_run", "best_epoch", "val_loss", "val_accuracy", "seconds")
_KEYS = ("weights_key", "predictions_key")


def _checked(raw: bytes, uri: str) -> dict:
    """The result record in `raw`, checked: anyone with write access to the store can plant one."""
    expected = (f"expected a result record: a JSON object with a string name, a status among "
                f"{', '.join(UNIT_STATUSES)}, "
                f"numbers or null for {', '.join(_NUMBERS)} and strings or null for {', '.join(_KEYS)}")
    d = json_object(raw, uri, expected)
    bad = [k for k, ok in [("name", isinstance(d.get("name"), str)), ("status", d.get("status") in UNIT_STATUSES),
                           *((k, d.get(k) is None or (isinstance(d[k], (int, float)) and not isinstance(d[k], bool)))
                             for k in _NUMBERS),
                           *((k, d.get(k) is None or isinstance(d[k], str)) for k in _KEYS)] if not ok]
    if bad:
        raise ValueError(f"{uri}: {expected}; found {bad[0]} = {d.get(bad[0])!r:.100}")
    return d
