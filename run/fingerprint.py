"""The run's fingerprint: what decides the model, taken before any training. Four parts:

    dataset      the data's content (archive MD5, prepared tensors' SHA-256), split seed,
                 test size, the data checks' digest once they ran, and the purged
                 hold-out images' tag if purge_test_duplicates dropped any
    code         the product packages' source, parsed: comments and formatting do not count
    environment  Python, torch, torchvision, the locked dependencies' installed versions,
                 and the pod's image (TRAIN_CIFAR_IMAGE)
    params       the training parameters, recipe defaults resolved; every RunParams field
                 except those in NOT_IN_PARAMS, so a new field counts until someone says why not

Its digest is the SHA-256 of the parts' canonical JSON. A run whose digest equals the
champion's run's would train the same model again (tasks/skip.py).
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cnn.config import make_config
from run.params import RunParams

ROOT = Path(__file__).resolve().parents[1]
# the product; tests/ and benchmarks/ do not decide a model
PACKAGES = ("cnn", "run", "store", "tasks", "flows", "registry", "cli")
CONSTRAINTS = "constraints.txt"
IMAGE_ENV = "TRAIN_CIFAR_IMAGE"  # set in the pods by deployments/prefect.yaml: repository:commit
IMAGE_ID_ENV = "TRAIN_CIFAR_IMAGE_ID"  # and the image's ID, the SHA-256 of its content

# RunParams fields that do not decide the model, and why. Every other field is in the
# params part: a new field changes the fingerprint until it is listed here.
NOT_IN_PARAMS = {
    "dataset": "the dataset part names the data by its content",
    "data_dir": "where the archive is read from; the dataset part has its content",
    "data_source": "where the archive is read from; the dataset part has its content",
    "data_md5": "checked against the archive; the dataset part has the archive's MD5",
    "synthetic_train": "decides the generated archive, whose MD5 is in the dataset part",
    "synthetic_test": "decides the generated archive, whose MD5 is in the dataset part",
    "split_seed": "in the dataset part, with the test size",
    "store": "where results go, not what they are",
    "store_outage_minutes": "how long an unanswering store is waited for",
    "device": "placement; the image and the environment part hold what runs it",
    "variants_per_gpu": "placement: variants trained at once on one GPU",
    "variant_deployment": "placement: in this process or as flow runs of a deployment",
    "variant_attempts": "how many crashes are survived, not what is trained",
    "fanout_deadline_hours": "a deadline, not a training setting",
    "promote_margin": "decides the promotion of a model, not the model",
    "promote_confidence": "decides the promotion of a model, not the model",
    "regression_margin": "decides whether a worse model raises an alert, not the model",
    "link_expiry_hours": "how long the UI's links work",
    "late_runs": "what happens to a run that starts late, not what it trains",
    "force": "trains even when nothing changed: the fingerprint it would match is the same",
    "run_id": "names the run; the same training under another name is the same model",
    "class_balance_tolerance": "a data check's threshold: in the dataset part, beside the checks' result",
    "max_blank_images": "a data check's threshold: in the dataset part, beside the checks' result",
    "max_exact_duplicates": "a data check's threshold: in the dataset part, beside the checks' result",
    "max_near_duplicates": "a data check's threshold: in the dataset part, beside the checks' result",
}


@dataclass(frozen=True)
class Fingerprint:
    """The parts and their digest; once compared, what changed since the champion's run
    ({part: {"champion": value, "now": value}}, only the differing keys of a part)."""
    parts: dict
    digest: str
    champion_run_id: str | None = None
    changed_since_champion: dict | None = None

    def to_dict(self) -> dict:
        return {"digest": self.digest, "parts": self.parts}

    def compared(self, champion_run_id: str, champion_parts: dict | None) -> Fingerprint:
        changed = {}
        for name, now in self.parts.items():
            before = (champion_parts or {}).get(name)
            if before == now:
                continue
            if isinstance(now, dict) and isinstance(before, dict):
                keys = [k for k in {**before, **now} if before.get(k) != now.get(k)]
                before, now = {k: before.get(k) for k in keys}, {k: now.get(k) for k in keys}
            changed[name] = {"champion": before, "now": now}
        return dataclasses.replace(self, champion_run_id=champion_run_id, changed_since_champion=changed)


    def with_checks_of(self, champion_parts: dict | None) -> Fingerprint:
        """Taken before the data checks: with the champion run's check result when that run
        checked the same data with the same thresholds, code, environment and parameters
        (everything the result depends on), so that its digest is then the champion's;
        else unchanged (its data_checks None: it matches nothing)."""
        def but_checks(parts: dict) -> dict:
            return {**parts, "dataset": {k: v for k, v in (parts.get("dataset") or {}).items() if k != "data_checks"}}

        if not champion_parts or but_checks(champion_parts) != but_checks(self.parts):
            return self
        parts = {**self.parts, "dataset": {**self.parts["dataset"],
                                           "data_checks": champion_parts["dataset"].get("data_checks")}}
        return Fingerprint(parts, digest_of(parts))


def digest_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def take(ctx) -> Fingerprint:
    """The fingerprint of a run whose dataset is fetched (and checked)."""
    parts = {"dataset": dataset_part(ctx), "code": code_digest(), "environment": environment(),
             "params": params_part(ctx.params)}
    return Fingerprint(parts, digest_of(parts))


def dataset_part(ctx) -> dict:
    ds = ctx.dataset
    if ds is None:
        raise ValueError("the fingerprint needs the fetched dataset: call it after fetch-dataset")
    checks, p = ctx.data_checks, ctx.params
    part = {"name": ds.name, "md5": ds.md5, "sha256": ds.sha256, "split_seed": p.split_seed,
            "test_size": ds.split_sizes()[1],
            "check_thresholds": {"class_balance_tolerance": p.class_balance_tolerance,
                                 "max_blank_images": p.max_blank_images,
                                 "max_exact_duplicates": p.max_exact_duplicates,
                                 "max_near_duplicates": p.max_near_duplicates},
            "data_checks": None if checks is None else checks["digest"]}
    if ds.purged:  # only then: a run that purged nothing has the part it always had
        part["purged"] = ds.purged_tag
    return part


def params_part(p: RunParams) -> dict:
    d = p.model_dump(exclude=set(NOT_IN_PARAMS))
    # None means the model's recipe: the value it resolves to is what trains
    cfg = make_config(p.model, "none", epochs=p.epochs, patience=p.patience, seed=p.seed,
                      batch_size=p.batch_size, lr=p.lr)
    d.update(batch_size=cfg.batch_size, lr=cfg.lr)
    return d


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def normalised(source: str, name: str = "<source>") -> str:
    """The module's syntax tree without docstrings, comments, formatting or line numbers."""
    return ast.dump(_strip_docstrings(ast.parse(source, name)))


def code_digest(root: Path = ROOT) -> str:
    """SHA-256 over every product module's path and normalised source."""
    h = hashlib.sha256()
    for pkg in PACKAGES:
        folder = root / pkg
        if not folder.is_dir():
            raise FileNotFoundError(f"the fingerprint's code part: no package folder {folder}")
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            h.update(f"{rel}\n{normalised(path.read_text(), rel)}\n".encode())
    return h.hexdigest()


def _constraints() -> Path:
    """constraints.txt beside the packages (a checkout), else in the working folder (the image's /opt/train-cifar)."""
    for folder in (ROOT, Path.cwd()):
        if (folder / CONSTRAINTS).is_file():
            return folder / CONSTRAINTS
    raise FileNotFoundError(f"the fingerprint's environment part: no {CONSTRAINTS} in {ROOT} or {Path.cwd()}")


def locked_names(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==", line)
        if m:
            names.append(m.group(1).lower())
    return sorted(set(names))


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torchvision_version() -> str:
    """torchvision.__version__, build included (0.29.1+cu130, where the installed metadata says
    0.29.1), read from its version.py: importing torchvision for one string costs a run about
    1.2 s of CPU."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"].__version__
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("torchvision is not installed")
    version_py = Path(spec.origin).with_name("version.py")
    for node in ast.parse(version_py.read_text()).body if version_py.is_file() else []:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)):
            return node.value.value
    import torchvision  # no version.py of the shape torchvision writes: ask the package

    return torchvision.__version__


def environment() -> dict:
    """What runs the code: the installed versions (None: not installed), and the image."""
    import torch

    # flat, so that what changed since the champion names the package; torch's own versions
    # carry the build (2.14.1+cu130), which the installed metadata may not
    return {"python": platform.python_version(), "image": os.environ.get(IMAGE_ENV) or None,
            "image_id": os.environ.get(IMAGE_ID_ENV) or None,
            **{name: _installed(name) for name in locked_names(_constraints())},
            "torch": torch.__version__, "torchvision": torchvision_version()}
