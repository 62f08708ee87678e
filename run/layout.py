"""Where a run's files are: every key and file name, for writers and readers alike.

    runs/<run-id>/
        manifest.json  report.md  curves.png  variants.png   the run's seal and its report
        model/         the tested model (MODEL_FILES)
        variants/<variant>/[seed-<seed>/]                    one folder per unit (`Unit.folder`)
            lease.json                                       its writer, and which files are current:
            gen-<g>/a|b/<file>                               checkpoint, history, best weights,
                                                             validation predictions, result record
        conditional-write-probe
    datasets/<name>/<md5>/                                   the prepared tensors (tasks/data.py)
    champions/<identity>.json                                the registry (registry/champions.py)

This machine's cache keeps a run's files under the same names (run/cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from cnn.checkpoint import CHECKPOINT  # noqa: F401 - a unit's checkpoint is cnn's file, named here too
from store import Store, join_key, safe_name
from store.lease import committed

# the run's own files
MANIFEST = "manifest.json"
REPORT = "report.md"
CURVES = "curves.png"
VARIANTS_PLOT = "variants.png"

# the tested model, under model/
MODEL = "model"
WEIGHTS = "weights.safetensors"  # state dict, safetensors: nothing unpickled to read it
PORTABLE = "model.pt2"  # torch.export program with normalisation and TTA (cnn/export.py)
CLASSES = "classes.json"
CONFIG = "config.json"  # the TrainConfig it trained with
TEST_METRICS = "metrics.json"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
TEST_PREDICTIONS = "test_predictions.safetensors"  # tensor "predicted": (N_test,) uint8
MODEL_FILES = (WEIGHTS, PORTABLE, CLASSES, CONFIG, TEST_METRICS, CONFUSION_CSV, CONFUSION_PNG, TEST_PREDICTIONS)

# a unit's files, under variants/<variant>/[seed-<seed>/]
LEASE = "lease.json"  # a unit's writer, and the pointer to its current files (store/lease.py)
HISTORY = "history.csv"
BEST_WEIGHTS = "best.safetensors"
VAL_PREDICTIONS = "val_predictions.safetensors"  # tensor "predicted": (N_val,) uint8, the best epoch's classes
UNIT_RESULT = "metrics.json"  # the unit's result record, written last: once current, the unit is done


def run_key(run_id: str, *parts: str) -> str:
    """Store key under runs/<run-id>/; every part is a validated name or a fixed word."""
    return join_key("runs", safe_name(run_id, "run id"), *parts)


def model_key(run_id: str, name: str = "") -> str:
    """Store key of the run's model folder, or of the file `name` in it."""
    return run_key(run_id, MODEL, *([name] if name else []))


def dataset_key(name: str, md5: str) -> str:
    """Store key of the prepared copy of the archive `md5` of dataset `name`."""
    return join_key("datasets", name, md5)


def probe_key(run_id: str) -> str:
    """The object the run's conditional-write probe uses (store/probe.py): created by the run's
    first probe, refused ever after on a store that honours conditional writes; never read."""
    return run_key(run_id, "conditional-write-probe")


@dataclass(frozen=True)
class Unit:
    """One repeat (seed) of one variant: the unit of work. In a run of one repeat its
    files sit in variants/<variant>/, as they always have; with repeats, each in
    variants/<variant>/seed-<seed>/ (`repeated`)."""

    variant: str
    seed: int
    repeated: bool = False

    @property
    def folder(self) -> str:
        """Its folder under variants/, also the prefix of its artifacts' names: `flip`, `flip/seed-1`."""
        name = safe_name(self.variant, "variant")
        return f"{name}/seed-{self.seed}" if self.repeated else name

    @property
    def label(self) -> str:
        """How logs, task runs and child flow runs name it: `flip`, `flip-s1`."""
        return f"{self.variant}-s{self.seed}" if self.repeated else self.variant

    def key(self, run_id: str, filename: str) -> str:
        return run_key(run_id, "variants", *self.folder.split("/"), filename)


def stored_key(store: Store, run_id: str, unit: Unit, name: str) -> str | None:
    """Store key of the unit's current `name` (checkpoint, history, metrics.json, ...): the
    generation's object its lease names; for a unit written before writes were fenced, the
    plain key under its folder. None if the store has none."""
    current = committed(store, unit.key(run_id, LEASE))
    if current is not None:
        return current["files"].get(name, {}).get("key")
    plain = unit.key(run_id, name)
    return plain if store.exists(plain) else None


def units_of(variants: list[str], seed: int, repeats: int) -> list[Unit]:
    """Every variant's repeats, seeds seed, seed + 1, ...: the run's units of work, variant by variant."""
    return [Unit(v, seed + r, repeats > 1) for v in variants for r in range(repeats)]
