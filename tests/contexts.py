"""A run's context for a test that calls a task or the training code directly."""
from __future__ import annotations

from run.context import RunContext
from run.params import RunParams
from run.records import DatasetRef


def run_context(store, run_id: str = "r", ref: DatasetRef | None = None, **params) -> RunContext:
    """Run `run_id` with RunParams from `params` (checked as a run's are) and `ref` as its
    fetched dataset. Store outages are not waited out unless `store_outage_minutes` says so."""
    ctx = RunContext(RunParams(**{"store_outage_minutes": 0, **params, "store": str(store)}), run_id)
    return ctx if ref is None else ctx.with_dataset(ref)
