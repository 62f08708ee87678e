"""The run's context, built once from RunParams and handed to every task and child flow
instead of loose arguments: a new training setting then touches RunParams, TrainConfig
and the place that uses it, nothing in between.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from cnn.config import TrainConfig, make_config, resolve_precision
from run.fingerprint import Fingerprint
from run.layout import Unit
from run.params import RunParams
from run.records import DatasetRef
from store import Store, normalize_uri, open_store


@dataclass(frozen=True)
class RunContext:
    params: RunParams
    run_id: str
    flow_run_id: str | None = None  # the parent's, or a child's own
    created_at: str | None = None
    dataset: DatasetRef | None = None  # None before fetch-dataset
    data_checks: dict | None = None  # None before check-data
    fingerprint: Fingerprint | None = None  # None before fingerprint-run

    @property
    def store_uri(self) -> str:
        return normalize_uri(self.params.store)

    @cached_property
    def store(self) -> Store:
        return open_store(self.store_uri, outage_minutes=self.params.store_outage_minutes)

    def with_dataset(self, dataset: DatasetRef) -> RunContext:
        out = dataclasses.replace(self, dataset=dataset)
        if "store" in self.__dict__:  # not opened again
            out.__dict__["store"] = self.__dict__["store"]
        return out

    def with_data_checks(self, record: dict) -> RunContext:
        out = dataclasses.replace(self, data_checks=record)
        if "store" in self.__dict__:  # not opened again
            out.__dict__["store"] = self.__dict__["store"]
        return out

    def __getstate__(self) -> dict:
        # the open store (clients, an outage clock) stays in its process; a copy opens its own
        return {k: v for k, v in self.__dict__.items() if k != "store"}

    def with_fingerprint(self, fingerprint: Fingerprint) -> RunContext:
        out = dataclasses.replace(self, fingerprint=fingerprint)
        if "store" in self.__dict__:
            out.__dict__["store"] = self.__dict__["store"]
        return out

    def precision(self, device: str) -> str:
        """fp32 or bf16."""
        return resolve_precision(self.params.precision, device)

    def config(self, unit: Unit, device: str) -> TrainConfig:
        p = self.params
        return make_config(p.model, unit.variant, epochs=p.epochs, patience=p.patience, seed=unit.seed,
                           batch_size=p.batch_size, lr=p.lr, compile=p.compile, precision=self.precision(device))
