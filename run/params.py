"""The run's parameters: one pydantic model, the single source of defaults for the
flows, the CLI flags and the Prefect UI form; every check runs before data is touched.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal

from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema, field_validator,
                      model_validator)

from cnn.augment import VARIANTS, check_variants
from cnn.models import MODELS, check_model
from store import is_shared, normalize_uri, parse_uri, safe_name

DEFAULT_VARIANTS = ["none", "flip", "crop", "flip-crop", "flip-crop-cutout", "flip-crop-jitter"]


class RunParams(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    dataset: Literal["cifar10", "synthetic"] = Field(
        "cifar10", description="cifar10: the official archive (downloaded, or from --data-dir / --data-source); "
        "synthetic: a generated CIFAR-format set with ten learnable classes")
    data_dir: str | None = Field(None, description="local folder holding cifar-10-python.tar.gz or cifar-10-batches-py/")
    data_source: str | None = Field(None, description="s3://bucket/key of a mirrored cifar-10-python.tar.gz")
    data_md5: str | None = Field(None, description="MD5 of a non-official archive in CIFAR format (required for one)")
    # at most CIFAR-10's own sizes: the memory a run needs, and each batch file within the
    # size a CIFAR file may have (cnn/data.py, MAX_FILE_BYTES)
    synthetic_train: int = Field(5000, ge=10, le=50_000, description="training images generated for --dataset "
                                 "synthetic (at most 50,000, as CIFAR-10)")
    synthetic_test: int = Field(1000, ge=10, le=10_000, description="hold-out images generated for --dataset "
                                "synthetic (at most 10,000, as CIFAR-10)")
    # the enum makes the UI's form a select; the validators give the message that lists the choices
    model: str = Field("seed", description="model name from the registry",
                       json_schema_extra={"enum": sorted(MODELS)})
    variants: list[str] = Field(default_factory=lambda: list(DEFAULT_VARIANTS),
                                description="augmentation variants to train and compare",
                                json_schema_extra={"items": {"type": "string", "enum": list(VARIANTS)},
                                                   "uniqueItems": True})
    epochs: int = Field(30, ge=1, description="maximum epochs per variant")
    patience: int = Field(5, ge=1, description="stop a variant after this many epochs without a better validation loss")
    batch_size: int | None = Field(None, ge=1, description="training batch size (default: the model's recipe)")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: the model's recipe)")
    subset: int | None = Field(None, ge=1, description="cap on training images, for quick runs")
    seed: int = Field(0, description="seed for initialisation, shuffling and augmentation")
    repeats: int = Field(1, ge=1, le=20, description="times each variant is trained, with seeds seed, seed+1, ...; "
                         "variants are chosen by their mean, each shown with its 95% interval")
    split_seed: int = Field(0, description="seed of the validation/test split of the hold-out")
    select_metric: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy", description="how the variant is chosen (ties go to the lower validation loss)")
    store: str = Field("./artifacts", description="a local folder or s3://bucket/prefix")
    store_outage_minutes: float = Field(
        10.0, ge=0, description="how long a store that stopped answering is waited for (training goes on, its "
        "uploads retried in the background) before the variant or run fails")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    compile: bool = Field(False, description="torch.compile the model (compiled and warmed once per process, model and input shape)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on the CPU; bf16: bf16 autocast on either "
        "(on a CPU, fast only with native bf16: AVX512-BF16 or AMX); fp32: no autocast")
    variants_per_gpu: int = Field(1, ge=1, description="variants trained at once on one GPU")
    promote_margin: float = Field(0.0, ge=0, description="test accuracy by which a new model must beat the champion")
    promote_confidence: float = Field(0.95, ge=0, lt=1, description="confidence of the paired interval of (new minus "
                                      "champion) test accuracy whose lower bound must exceed promote_margin; 0: any "
                                      "improvement of the point estimate")
    regression_margin: float = Field(0.0, ge=0, le=1, description="test accuracy by which a new model may trail the "
                                     "champion (the paired interval's upper bound) before the run emits "
                                     "train-cifar.regression")
    link_expiry_hours: int = Field(168, ge=1, le=168, description="hours the Prefect UI's links to an S3 "
                                   "store's files work (presigned at publish; 168, a week, is S3's maximum)")
    variant_deployment: str | None = Field(
        None, description="train each variant as its own flow run of this deployment, e.g. train-variant/gpu "
        "(one pod and GPU each); default: in this process")
    variant_attempts: int = Field(3, ge=1, le=20, description="with variant_deployment: flow runs per variant, "
                                  "counting resubmissions after a crash (each resumes from the checkpoint)")
    fanout_deadline_hours: float = Field(24.0, gt=0, description="with variant_deployment: variants unfinished "
                                         "after this long are cancelled and reported as failed")
    budget_gpu_hours: float | None = Field(
        None, gt=0, description="ceiling on the device time of all the run's units together (GPU hours; CPU hours "
        "on a CPU): no unit starts an epoch that would pass it, and selection uses what was trained. Default: none")
    halving: Literal["off", "on"] = Field(
        "off", description="successive halving: at rungs of halving_min_epochs x halving_factor^k epochs, the "
        "variants behind (mean validation accuracy over repeats) stop and the top 1/halving_factor go on")
    halving_min_epochs: int = Field(1, ge=1, description="with halving on: the first rung, in epochs")
    halving_factor: int = Field(3, ge=2, description="with halving on: 1/halving_factor of the variants go on at "
                                "each rung, and rungs are this factor apart")
    late_runs: Literal["latest", "all"] = Field(
        "latest", description="a scheduled run that starts after a newer scheduled night of its deployment is due "
        "(the server or workers were down): latest: it ends Cancelled (Superseded) without training, so only the "
        "newest missed night trains; all: every missed night trains. Runs started by hand always train")
    force: bool = Field(False, description="train even when the run's fingerprint equals the champion's run's, "
                        "or another run of the same scheduled night claimed it")
    class_balance_tolerance: float = Field(
        5.0, gt=0, description="check-data: binomial standard deviations a class's count in a split may stray "
        "from an equal share before the run stops (a class missing from train always stops it)")
    max_blank_images: int = Field(0, ge=0, description="check-data: blank images (pixel std below 1) allowed "
                                  "across the splits before the run stops")
    max_exact_duplicates: int = Field(100, ge=0, description="check-data: images identical to another, within or "
                                      "across splits, allowed before the run stops")
    max_near_duplicates: float = Field(0.05, ge=0, le=1, description="check-data: fraction of validation and test "
                                       "images with a near-duplicate in train (shifted, re-lit or re-encoded) "
                                       "allowed before the run stops; CIFAR-10's test set has about 3.3%")
    purge_test_duplicates: bool = Field(
        False, description="drop the validation and test images that have a near-duplicate in train (the same "
        "check as max_near_duplicates, against the whole hold-out and every train image) before the hold-out is "
        "split; this changes the dataset identity, so a purged run has a champion of its own, and the "
        "near-duplicates found no longer stop the run")
    run_id: str | None = Field(None, description="reuse a run id to resume its variants from their checkpoints "
                               "(default: derived from the flow run, so a retried flow run continues its own run)")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        check_model(v)
        return v

    @field_validator("variants", mode="before")
    @classmethod
    def _split_variants(cls, v):
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, v: list[str]) -> list[str]:
        check_variants(v)
        if len(set(v)) != len(v):
            raise ValueError(f"variants must not repeat, found {v}")
        return v

    @field_validator("data_dir")
    @classmethod
    def _data_dir_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().exists():
            raise ValueError(f"no such folder or file: {v}")
        return v

    @field_validator("data_md5")
    @classmethod
    def _md5_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", v):
            raise ValueError(f"expected 32 hex digits, found {v!r}")
        return v.lower() if v else v

    @field_validator("data_source")
    @classmethod
    def _source_form(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("s3://") or not v.removeprefix("s3://").partition("/")[2].strip("/"):
            raise ValueError(f"expected s3://bucket/key/cifar-10-python.tar.gz, found {v!r}")
        try:  # the store's rules: the key becomes a path in the download cache and must stay there
            parse_uri(v)
        except ValueError:
            raise ValueError(f"expected s3://bucket/key with no '.', '..' or empty parts in the key, "
                             f"found {v!r}") from None
        return v

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, found {v!r}")
        return v

    @field_validator("store")
    @classmethod
    def _store_form(cls, v: str) -> str:
        normalize_uri(v)
        return v

    @field_validator("variant_deployment")
    @classmethod
    def _deployment_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", v):
            raise ValueError(f"expected <flow name>/<deployment name>, e.g. train-variant/gpu, found {v!r}")
        return v

    @field_validator("run_id")
    @classmethod
    def _run_id_form(cls, v: str | None) -> str | None:
        return v if v is None else safe_name(v, "run_id")

    @model_validator(mode="after")
    def _one_source(self):
        if self.dataset == "synthetic" and (self.data_dir or self.data_source):
            raise ValueError("dataset: synthetic is generated; do not combine it with data_dir or data_source")
        if self.data_dir and self.data_source:
            raise ValueError("data_dir and data_source: give one source, not both")
        if self.halving == "on" and self.halving_min_epochs >= self.epochs:
            raise ValueError(f"halving_min_epochs: the first rung must come before the last epoch (epochs "
                             f"{self.epochs}), found {self.halving_min_epochs}")
        if self.variant_deployment and not is_shared(self.store):
            raise ValueError(f"store {self.store!r} with variant_deployment {self.variant_deployment!r}: every "
                             "worker must reach the store, so give an s3:// store or an absolute path")
        return self


# What only the parent run uses (a child gets the prepared data's reference instead of
# its source); every other field reaches each child flow run as a parameter (UNIT_PARAMS).
RUN_ONLY = frozenset({
    "dataset", "data_dir", "data_source", "data_md5", "synthetic_train", "synthetic_test", "variants",
    "select_metric", "variants_per_gpu", "promote_margin", "promote_confidence", "regression_margin",
    "link_expiry_hours",
    "variant_deployment", "variant_attempts", "fanout_deadline_hours", "late_runs", "force",
    "class_balance_tolerance", "max_blank_images", "max_exact_duplicates", "max_near_duplicates",
    "purge_test_duplicates", "halving", "halving_min_epochs", "halving_factor"})
assert RUN_ONLY <= set(RunParams.model_fields), RUN_ONLY - set(RunParams.model_fields)
UNIT_PARAMS = tuple(n for n in RunParams.model_fields if n not in RUN_ONLY)


# The flows' parameters carry RunParams' JSON schema, so the UI's form and the server's
# check of a deployment run (enforce_parameter_schema) have its descriptions, bounds and
# choices. Only the schema: RunParams, inside the flow, checks the values with messages
# that name what was found.
_SCHEMAS = RunParams.model_json_schema()["properties"]


def form(name: str) -> Any:
    """RunParams' type and schema for flow parameter `name` (Prefect sets title and default)."""
    schema = {k: v for k, v in _SCHEMAS[name].items() if k not in ("title", "default")}
    return Annotated[RunParams.model_fields[name].annotation, WithJsonSchema(schema)]


def signed(names: Iterable[str], *, first: dict[str, Any] | None = None,
           required: Iterable[str] = (), last: dict[str, tuple[Any, Any]] | None = None
           ) -> Callable[[Callable], Callable]:
    """Give the decorated `def f(**params)` the keyword-only parameters `first` (name ->
    annotation), then RunParams' fields `names` (with RunParams' default unless
    `required`), so a new RunParams field reaches every flow signed with it, then `last`
    (name -> (annotation, default))."""
    first = dict(first or {})
    required = set(required)
    names = [n for n in names if n not in first]
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(n, kw, annotation=a) for n, a in first.items()]
    # Python's order: what has no default first
    params += [inspect.Parameter(n, kw, annotation=form(n)) for n in names if n in required]
    params += [inspect.Parameter(n, kw, annotation=form(n),
                                 default=RunParams.model_fields[n].get_default(call_default_factory=True))
               for n in names if n not in required]
    params += [inspect.Parameter(n, kw, annotation=a, default=d) for n, (a, d) in (last or {}).items()]

    def sign(fn: Callable) -> Callable:
        fn.__signature__ = inspect.Signature(params, return_annotation=inspect.signature(fn).return_annotation)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return sign


def described(annotation: Any, description: str, **schema: Any) -> Any:
    """A flow parameter RunParams does not have, described the same way. Not
    `Field(description=...)`: Prefect would replace it with the docstring's (None)."""
    return Annotated[annotation, WithJsonSchema({**TypeAdapter(annotation).json_schema(), "description": description,
                                                 **schema})]


def describe_errors(err: ValidationError, flag_style: bool = False) -> str:
    """One line per invalid parameter: its name, what was expected, what was found."""
    lines = []
    for e in err.errors():
        name = ".".join(str(p) for p in e["loc"]) or "parameters"
        if flag_style and e["loc"]:
            name = "--" + str(e["loc"][0]).replace("_", "-")
        msg = e["msg"].removeprefix("Value error, ")
        found = "" if e["type"] in ("value_error", "missing") else f", found {e.get('input')!r}"
        lines.append(f"{name}: {msg}{found}")
    return "\n".join(lines)
