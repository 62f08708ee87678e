"""Where a run's files are: every key and file name, for writers and readers alike.

    runs/<run-id>/
        manifest.json  report.md  curves.png  variants.png   the run's seal and its report
        rungs.png      with halving on: the rungs' scores and cutoffs
        skipped.json   instead, when its fingerprint matched (tasks/skip.py): nothing trained
        budget.json    device seconds used and reserved per unit, with budget_gpu_hours (run/budget.py)
        halving/rung-<k>.json                                successive halving's decision at rung k
        model/         the tested model (MODEL_FILES)
        variants/<variant>/[seed-<seed>/]                    one folder per unit (`Unit.folder`)
            lease.json                                       its writer, and which files are current:
            gen-<g>/a|b/<file>                               checkpoint, history, best weights,
                                                             validation predictions, result record,
                                                             or paused.json at a rung (halving)
        conditional-write-probe
    datasets/<name>/<md5>/                                   the prepared tensors (tasks/data.py)
    champions/<identity>.json                                the registry (registry/champions.py)
    nights/<deployment>/<YYYY-MM-DD>/<digest>.json           a scheduled night's claim on a fingerprint

This machine's cache keeps a run's files under the same names (run/cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from store import Store, join_key, name_part, safe_name
from store.lease import committed

MANIFEST = "manifest.json"
REPORT = "report.md"
SKIPPED = "skipped.json"  # a run that trained nothing: what it matched
CURVES = "curves.png"
VARIANTS_PLOT = "variants.png"
TREND_PLOT = "trend.png"  # the dataset identity's trend, night by night, as it was when the run published
RUNGS_PLOT = "rungs.png"  # with halving on: validation accuracy per unit per rung, the cutoffs drawn

MODEL = "model"
WEIGHTS = "weights.safetensors"  # state dict, safetensors: nothing unpickled to read it
PORTABLE = "model.pt2"  # torch.export program with normalisation and TTA (cnn/export.py)
CLASSES = "classes.json"
CONFIG = "config.json"
TEST_METRICS = "metrics.json"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
TEST_PREDICTIONS = "test_predictions.safetensors"  # tensor "predicted": (N_test,) uint8
MODEL_FILES = (WEIGHTS, PORTABLE, CLASSES, CONFIG, TEST_METRICS, CONFUSION_CSV, CONFUSION_PNG, TEST_PREDICTIONS)

LEASE = "lease.json"
HISTORY = "history.csv"
BEST_WEIGHTS = "best.safetensors"
VAL_PREDICTIONS = "val_predictions.safetensors"  # tensor "predicted": (N_val,) uint8, the best epoch's classes
UNIT_RESULT = "metrics.json"  # the unit's result record, written last: once current, the unit is done
PAUSED = "paused.json"  # instead, at a halving rung: the unit's result so far; it resumes from its checkpoint
BUDGET = "budget.json"


def rung_key(run_id: str, rung: int) -> str:
    return run_key(run_id, "halving", f"rung-{rung}.json")


def run_key(run_id: str, *parts: str) -> str:
    return join_key("runs", safe_name(run_id, "run id"), *parts)


def night_key(deployment: str, night: str, digest: str) -> str:
    """The claim of the fingerprint `digest` by one run of the deployment's scheduled night (YYYY-MM-DD)."""
    return join_key("nights", name_part(deployment), safe_name(night, "night"),
                    safe_name(digest, "fingerprint digest") + ".json")


def model_key(run_id: str, name: str = "") -> str:
    return run_key(run_id, MODEL, *([name] if name else []))


def dataset_key(name: str, md5: str) -> str:
    return join_key("datasets", name, md5)


def probe_key(run_id: str) -> str:
    """Created by the run's first conditional-write probe (store/probe.py); never read."""
    return run_key(run_id, "conditional-write-probe")


@dataclass(frozen=True)
class Unit:
    """One repeat (seed) of one variant: the unit of work. Only with repeats does it get
    its own seed-<seed>/ folder, so a run of one repeat keeps the older layout."""

    variant: str
    seed: int
    repeated: bool = False

    @property
    def folder(self) -> str:
        """Under variants/, also its artifacts' name prefix: `flip`, `flip/seed-1`."""
        name = safe_name(self.variant, "variant")
        return f"{name}/seed-{self.seed}" if self.repeated else name

    @property
    def label(self) -> str:
        """In logs, task runs and child flow runs: `flip`, `flip-s1`."""
        return f"{self.variant}-s{self.seed}" if self.repeated else self.variant

    def key(self, run_id: str, filename: str) -> str:
        return run_key(run_id, "variants", *self.folder.split("/"), filename)


def stored_key(store: Store, run_id: str, unit: Unit, name: str) -> str | None:
    """Store key of the unit's current `name`: the object its lease names; for a unit
    written before writes were fenced, the plain key under its folder."""
    current = committed(store, unit.key(run_id, LEASE))
    if current is not None:
        return current["files"].get(name, {}).get("key")
    plain = unit.key(run_id, name)
    return plain if store.exists(plain) else None


def units_of(variants: list[str], seed: int, repeats: int) -> list[Unit]:
    return [Unit(v, seed + r, repeats > 1) for v in variants for r in range(repeats)]
