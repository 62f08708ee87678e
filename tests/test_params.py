"""The flows' parameter schemas, which the Prefect UI renders as the run form and the
server checks a deployment run against: every parameter described, with RunParams'
bounds and choices."""
from __future__ import annotations

import re

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import ValidationError, validate

from cnn.augment import VARIANTS
from cnn.models import MODELS
from run.params import RunParams
from flows.train_cifar import train_cifar
from flows.train_variant import train_variant

CIFAR = parameter_schema(train_cifar).model_dump()
VARIANT = parameter_schema(train_variant).model_dump()


@pytest.mark.parametrize("schema", [CIFAR, VARIANT], ids=["train-cifar", "train-variant"])
def test_every_parameter_has_a_description(schema):
    undescribed = [name for name, prop in schema["properties"].items() if not prop.get("description")]
    assert not undescribed


def test_train_cifar_has_every_run_parameter_with_its_description_and_default():
    props = CIFAR["properties"]
    assert list(props) == list(RunParams.model_fields)
    for name, field in RunParams.model_fields.items():
        assert props[name]["description"] == field.description
        assert props[name]["default"] == field.get_default(call_default_factory=True)
    assert CIFAR["required"] == []


@pytest.mark.parametrize("schema", [CIFAR, VARIANT], ids=["train-cifar", "train-variant"])
def test_bounds_and_choices(schema):
    props = schema["properties"]
    assert props["epochs"]["minimum"] == 1 and props["patience"]["minimum"] == 1
    assert props["precision"]["enum"] == ["auto", "fp32", "bf16"]
    assert props["model"]["enum"] == sorted(MODELS)
    assert {"minimum": 1, "type": "integer"} in props["batch_size"]["anyOf"]
    assert {"exclusiveMinimum": 0, "type": "number"} in props["lr"]["anyOf"]


def test_train_cifar_choices_and_ranges():
    props = CIFAR["properties"]
    assert props["select_metric"]["enum"] == ["val_accuracy", "val_loss"]
    assert props["dataset"]["enum"] == ["cifar10", "synthetic"]
    assert props["variants"]["items"]["enum"] == list(VARIANTS) and props["variants"]["uniqueItems"]
    assert (props["variant_attempts"]["minimum"], props["variant_attempts"]["maximum"]) == (1, 20)


def test_train_variant_shares_the_run_parameters_schema():
    """The parameters the child shares with the parent read the same in both forms."""
    strip = lambda prop: {k: v for k, v in prop.items() if k not in ("position", "default")}  # noqa: E731
    own = {"run_id", "variant", "dataset_key", "dataset_md5", "dataset_sha256",  # run_id: required here, so described here
           "dataset_purged", "until_epoch"}
    shared = set(VARIANT["properties"]) - own
    assert shared <= set(RunParams.model_fields)
    for name in shared:
        assert strip(VARIANT["properties"][name]) == strip(CIFAR["properties"][name]), name
    assert VARIANT["properties"]["variant"]["enum"] == list(VARIANTS)
    assert set(VARIANT["required"]) == {"run_id", "variant", "dataset_key", "dataset_md5", "dataset_sha256", "store"}


@pytest.mark.parametrize("params,field", [
    ({"epochs": 0}, "epochs"),
    ({"patience": 0}, "patience"),
    ({"select_metric": "test_accuracy"}, "select_metric"),
    ({"variants": ["none", "mixup"]}, "variants[1]"),
    ({"model": "resnet9000"}, "model"),
])
def test_the_server_check_refuses_out_of_range_values_naming_them(params, field):
    """The check the server runs on `prefect deployment run` with enforce_parameter_schema."""
    with pytest.raises(ValidationError, match=re.escape(f"Validation failed for field '{field}'")):
        validate(params, CIFAR, raise_on_error=True, ignore_required=True)
    # device's form is the flow's check, not the schema's
    validate({"epochs": 1, "variants": ["none"], "device": "tpu"}, CIFAR, raise_on_error=True)


def test_a_direct_call_is_still_checked_by_run_params_naming_what_was_found():
    """The schema is for the form and the server; in Python, RunParams gives the message."""
    assert train_cifar.validate_parameters({"epochs": 0})["epochs"] == 0  # Prefect checks types only
    with pytest.raises(ValueError, match="epochs: Input should be greater than or equal to 1, found 0"):
        train_cifar.fn(epochs=0)


@pytest.mark.parametrize("override, message", [
    ({"epochs": 0}, "epochs: Input should be greater than or equal to 1, found 0"),
    ({"variant": "mixup"}, "variants: unknown variant(s) 'mixup'"),
    ({"dataset_key": "datasets/../x"}, "dataset_key: "),
    ({"dataset_md5": "not-an-md5"}, "dataset_md5: expected 32 lowercase hex digits, found 'not-an-md5'"),
    ({"run_id": "r1\n"}, "run_id: run_id 'r1\\n' is not a valid name"),
    ({"store": "s3://bucket\n/runs"}, "store: 's3://bucket\\n/runs': 'bucket\\n' is not a valid S3 bucket name"),
    ({"dataset_key": "datasets/abc\n"}, "dataset_key: invalid store key part 'abc\\n'"),
    ({"dataset_sha256": "a" * 32}, f"dataset_sha256: expected 64 lowercase hex digits, found '{'a' * 32}'"),
])
def test_train_variant_refuses_bad_parameters_before_any_work(override, message, tmp_path):
    """A child started by hand (or by a parent of another version) with a bad value stops
    at once, naming it; nothing is written to the store."""
    params = dict(run_id="r1", variant="flip", dataset_key="datasets/abc", dataset_md5="a" * 32,
                  dataset_sha256="b" * 64,
                  store=str(tmp_path / "store"), epochs=2)
    with pytest.raises(ValueError) as err:
        train_variant.fn(**{**params, **override})
    assert message in str(err.value), err.value
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("flag, value, most", [("--synthetic-train", "100000000", 50_000),
                                               ("--synthetic-test", "20000", 10_000)])
def test_a_synthetic_set_that_cannot_fit_is_refused_before_any_work(flag, value, most, tmp_path, capsys,
                                                                    monkeypatch):
    """--synthetic-train 100000000 asked for 153 GiB after validation; now validation names
    the flag, the range and the value, and nothing is generated."""
    from flows.train_cifar import main

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    assert main(["--dataset", "synthetic", flag, value, "--store", str(tmp_path / "store")]) == 2
    assert f"{flag}: Input should be less than or equal to {most}, found '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "synthetic").exists()


def test_a_new_run_parameter_reaches_a_child_flow_run_with_no_edit_outside_run_params(tmp_path, monkeypatch):
    """Every RunParams field but those only the parent uses (RUN_ONLY) is sent to each child,
    is a parameter of the train-variant flow (its signature, so its schema, comes from
    RunParams) and arrives in the child's own RunParams: a field added to RunParams alone
    reaches every unit wherever it trains."""
    import tasks.training
    from flows.variants import child_parameters
    from run.context import RunContext
    from run.layout import Unit
    from run.params import RUN_ONLY
    from run.records import DatasetRef, UnitResult

    unit_fields = set(RunParams.model_fields) - RUN_ONLY
    assert RUN_ONLY < set(RunParams.model_fields)
    own = {"variant", "dataset_key", "dataset_md5", "dataset_sha256"}
    # dataset_purged: sent only when a run purged; until_epoch: only at a halving rung
    assert set(VARIANT["properties"]) == unit_fields | own | {"dataset_purged", "until_epoch"}
    p = RunParams(store=str(tmp_path / "store"), variants=["flip"], model="fast", epochs=3, patience=2, batch_size=16,
                  lr=0.01, subset=50, seed=4, repeats=2, split_seed=3, store_outage_minutes=1.5, device="cpu",
                  precision="fp32")
    ctx = RunContext(p, "run", dataset=DatasetRef(key="datasets/cifar10/" + "a" * 32, md5="a" * 32, sha256="b" * 64))
    sent = child_parameters(ctx, Unit("flip", 5, repeated=True))
    assert set(sent) == unit_fields | own, (unit_fields | own) ^ set(sent)

    got = {}

    def train_unit(ctx, cfg, device, repeated=False, until=None):
        got.update(ctx=ctx, repeated=repeated, until=until)
        return UnitResult(name=cfg.variant, status="completed")

    monkeypatch.setattr(tasks.training, "train_unit", train_unit)
    train_variant.fn(**train_variant.validate_parameters(sent))
    child = got["ctx"]
    expected = {**p.model_dump(), "seed": 5, "run_id": "run", "store": ctx.store_uri}
    assert {n: getattr(child.params, n) for n in unit_fields} == {n: expected[n] for n in unit_fields}
    assert child.run_id == "run" and child.dataset == ctx.dataset and got["repeated"] and got["until"] is None
    train_variant.fn(**train_variant.validate_parameters({**sent, "until_epoch": 2}))  # a halving rung
    assert got["until"] == 2
    with pytest.raises(ValueError, match=r"^until_epoch: expected an epoch \(an integer >= 1\) or none, found 0"):
        train_variant.fn(**train_variant.validate_parameters({**sent, "until_epoch": 0}))

    # a run that purged hold-out images (purge_test_duplicates) sends them: the child's
    # validation split is the parent's
    purged = ctx.with_dataset(DatasetRef(key=ctx.dataset.key, md5=ctx.dataset.md5, sha256=ctx.dataset.sha256,
                                         purged=(3, 40)))
    sent = child_parameters(purged, Unit("flip", 5, repeated=True))
    assert sent["dataset_purged"] == [3, 40]
    train_variant.fn(**train_variant.validate_parameters(sent))
    assert got["ctx"].dataset == purged.dataset and got["ctx"].dataset.purged == (3, 40)
    with pytest.raises(ValueError, match=r"^dataset_purged: expected a list of hold-out indices"):
        train_variant.fn(**train_variant.validate_parameters({**sent, "dataset_purged": [-1]}))


def test_halving_settings_that_cannot_work_are_refused_naming_them():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match=r"halving_min_epochs: the first rung must come before the last epoch "
                                              r"\(epochs 4\), found 4"):
        RunParams(halving="on", halving_min_epochs=4, epochs=4)
    RunParams(halving="off", halving_min_epochs=4, epochs=4)  # not used: not checked
    with pytest.raises(pydantic.ValidationError, match="halving_factor"):
        RunParams(halving="on", halving_factor=1)
    with pytest.raises(pydantic.ValidationError, match="budget_gpu_hours"):
        RunParams(budget_gpu_hours=0)


def test_a_regression_margin_outside_0_to_1_is_refused_naming_it():
    import pydantic

    for bad in (-0.01, 1.5):
        with pytest.raises(pydantic.ValidationError, match=r"regression_margin\n.*greater than or equal to 0|"
                                                           r"regression_margin\n.*less than or equal to 1"):
            RunParams(regression_margin=bad)
    assert RunParams(regression_margin=0.02).regression_margin == 0.02
