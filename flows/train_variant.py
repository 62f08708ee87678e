"""The train-variant flow: one unit of a run on its own machine (fan-out's child).

All it needs is in its parameters (JSON values only) and the store, and all it leaves
is in the store, so running it again resumes from the checkpoint.
"""
from __future__ import annotations

import re

from prefect import flow
from pydantic import ValidationError

from cnn.augment import VARIANTS
from run.params import UNIT_PARAMS, RunParams, describe_errors, described, signed
from store import join_key


@flow(name="train-variant", log_prints=True)
@signed(UNIT_PARAMS, required={"store"}, first={
    "run_id": described(str, "the run this variant belongs to (the parent's run id)"),
    "variant": described(str, "the augmentation variant to train", enum=list(VARIANTS)),
    "dataset_key": described(str, "store key of the prepared dataset (the parent's fetch-dataset result)"),
    "dataset_md5": described(str, "MD5 of the dataset's archive"),
    "dataset_sha256": described(str, "SHA-256 of the prepared tensors, derived by the parent from the verified "
                                "archive; the prepared copy in the store must match it"),
}, last={
    "dataset_purged": (described(list[int], "hold-out indices the parent run dropped before the split into "
                                 "validation and test (purge_test_duplicates); the validation split is made "
                                 "without them, as the parent's is"), []),
    "until_epoch": (described(int | None, "a successive-halving rung: pause after this epoch (the parent "
                              "decides whether the unit goes on, from its checkpoint); default: train to the end"),
                    None),
})
def train_variant(**params) -> dict:
    from cnn.device import pick_device
    from run.context import RunContext
    from run.layout import Unit, probe_key
    from run.records import DatasetRef
    from store import require_conditional_writes
    from tasks.training import train_unit

    variant = params.pop("variant")
    purged = params.pop("dataset_purged", None) or []
    until = params.pop("until_epoch", None)
    if until is not None and (type(until) is not int or until < 1):
        raise ValueError(f"until_epoch: expected an epoch (an integer >= 1) or none, found {until!r}")
    if not isinstance(purged, list) or not all(type(i) is int and i >= 0 for i in purged):
        raise ValueError(f"dataset_purged: expected a list of hold-out indices (integers >= 0), found {purged!r}")
    dataset = DatasetRef(key=params.pop("dataset_key"), md5=params.pop("dataset_md5"),
                         sha256=params.pop("dataset_sha256"), purged=tuple(purged))
    try:
        p = RunParams(**params, variants=[variant])
    except ValidationError as e:
        raise ValueError(f"invalid parameter(s):\n{describe_errors(e)}") from None
    try:
        join_key(dataset.key)
    except ValueError as e:
        raise ValueError(f"dataset_key: {e}") from None
    if not re.fullmatch(r"[0-9a-f]{32}", dataset.md5):
        raise ValueError(f"dataset_md5: expected 32 lowercase hex digits, found {dataset.md5!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", dataset.sha256):
        raise ValueError(f"dataset_sha256: expected 64 lowercase hex digits, found {dataset.sha256!r}")
    ctx = RunContext(p, p.run_id).with_dataset(dataset)
    dev = str(pick_device(p.device))
    cfg = ctx.config(Unit(variant, p.seed), dev)
    # this machine's store settings are its own: check them here too
    require_conditional_writes(ctx.store, probe_key(ctx.run_id))
    result = train_unit(ctx, cfg, dev, repeated=p.repeats > 1, until=until)
    print(f"{variant}: {result.status} after {result.epochs_run} epochs, best epoch {result.best_epoch} "
          f"(val_acc {result.val_accuracy})")
    return result.summary()
