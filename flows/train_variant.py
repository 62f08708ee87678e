"""The train-variant flow: one repeat (seed) of one variant of one run, on whatever machine runs it.

The train-cifar flow starts one flow run of this per unit when it is given a
`variant_deployment` (e.g. train-variant/gpu: one pod and one GPU each). All it needs
is in its parameters (JSON values only) and the store; what it leaves is in the
store: checkpoint and history after every epoch, the best weights, and the result
record `metrics.json`, which the parent reads. Run again (a reschedule after
SIGTERM, a resubmission after a crash) it resumes from the checkpoint, and a
variant already trained is not trained again.
"""
from __future__ import annotations

import re

from prefect import flow
from pydantic import ValidationError

from cnn.augment import VARIANTS
from run.params import RunParams, describe_errors, described, form
from store import join_key, normalize_uri, open_store, require_conditional_writes

D = RunParams()  # the defaults, from the one place they are written


# form(name): RunParams' type, description, bounds and choices, for the UI's form (run/params.py)
# the parent names each run <run-id>-<variant>-a<attempt> (with repeats <run-id>-<variant>-s<seed>-a<attempt>)
@flow(name="train-variant", log_prints=True)
def train_variant(
    run_id: described(str, "the run this variant belongs to (the parent's run id)"),
    variant: described(str, "the augmentation variant to train", enum=list(VARIANTS)),
    dataset_key: described(str, "store key of the prepared dataset (the parent's fetch-dataset result)"),
    dataset_md5: described(str, "MD5 of the dataset's archive"),
    dataset_sha256: described(str, "SHA-256 of the prepared tensors, derived by the parent from the verified "
                              "archive; the prepared copy in the store must match it"),
    store: form("store"),
    model: form("model") = D.model,
    epochs: form("epochs") = D.epochs,
    patience: form("patience") = D.patience,
    batch_size: form("batch_size") = D.batch_size,
    lr: form("lr") = D.lr,
    seed: form("seed") = D.seed,
    repeats: form("repeats") = D.repeats,
    compile: form("compile") = D.compile,
    precision: form("precision") = D.precision,
    split_seed: form("split_seed") = D.split_seed,
    subset: form("subset") = D.subset,
    device: form("device") = D.device,
    store_outage_minutes: form("store_outage_minutes") = D.store_outage_minutes,
) -> dict:
    """Train one variant of one run with `seed` (with repeats above 1, into variants/<variant>/seed-<seed>/);
    its checkpoint, history, weights, validation predictions and result go to the store."""
    from cnn.config import make_config, resolve_precision
    from cnn.device import pick_device
    from run.layout import probe_key
    from tasks.training import train_unit

    # the same checks as the run's own parameters (names, ranges, the store), before any work
    try:
        p = RunParams(**{k: v for k, v in locals().items() if k in RunParams.model_fields}, variants=[variant])
    except ValidationError as e:
        raise ValueError(f"invalid parameter(s):\n{describe_errors(e)}") from None
    try:
        join_key(dataset_key)
    except ValueError as e:
        raise ValueError(f"dataset_key: {e}") from None
    if not re.fullmatch(r"[0-9a-f]{32}", dataset_md5):
        raise ValueError(f"dataset_md5: expected 32 lowercase hex digits, found {dataset_md5!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", dataset_sha256):
        raise ValueError(f"dataset_sha256: expected 64 lowercase hex digits, found {dataset_sha256!r}")
    dev = pick_device(p.device)
    cfg = make_config(p.model, variant, epochs=p.epochs, patience=p.patience, seed=p.seed, batch_size=p.batch_size,
                      lr=p.lr, compile=p.compile, precision=resolve_precision(p.precision, dev))
    store_uri = normalize_uri(p.store)
    dataset = {"key": dataset_key, "md5": dataset_md5, "sha256": dataset_sha256}
    # this machine's store settings are its own: reachable, and honouring conditional writes (the lease's)?
    require_conditional_writes(open_store(store_uri, outage_minutes=p.store_outage_minutes), probe_key(run_id))
    result = train_unit(cfg, dataset, p.split_seed, p.subset, run_id, store_uri, str(dev),
                        p.store_outage_minutes, repeated=p.repeats > 1)
    print(f"{variant}: {result.status} after {result.epochs_run} epochs, best epoch {result.best_epoch} "
          f"(val_acc {result.val_accuracy})")
    return result.summary()
