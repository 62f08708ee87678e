"""The run's device-time budget (`budget_gpu_hours`), kept in the store so that every unit,
in lanes or in pods of its own, draws on one account.

`runs/<id>/budget.json` holds, per unit, the device seconds it used and the seconds it
reserved for the epoch it is training. A unit starts an epoch only after reserving its
last epoch's time through a conditional write, so units starting at once cannot both take
the last of the budget; after the epoch it books what it used. The ceiling holds to
within how much an epoch ran over the one it was estimated from: a unit's first epoch is
estimated by the longest epoch another unit measured, and the run's very first epoch,
with nothing measured yet, always starts.
"""
from __future__ import annotations

import json

from store import PreconditionFailed, Store
from store.base import json_object
from run.layout import BUDGET, run_key


class Budget:
    def __init__(self, store: Store, run_id: str, limit_s: float):
        self.store, self.key, self.limit_s = store, run_key(run_id, BUDGET), float(limit_s)

    def read(self) -> dict:
        raw, _ = self.store.read_versioned(self.key)
        return self._parse(raw)

    def _parse(self, raw: bytes | None) -> dict:
        if raw is None:
            return {"limit_s": self.limit_s, "units": {}}
        doc = json_object(raw, self.store.uri_for(self.key), "the run's budget record")
        units = doc.get("units")
        bad = not isinstance(units, dict) or any(
            not isinstance(u, dict) or any(type(v) not in (int, float) or not v >= 0 for v in u.values())
            for u in units.values())
        if bad:
            raise ValueError(f"{self.store.uri_for(self.key)}: expected 'units' as {{unit: {{used_s, reserved_s, "
                             f"epoch_s: seconds >= 0}}}}, found {str(units)[:200]}")
        return doc

    def _change(self, change) -> bool:
        """Apply `change(doc) -> bool` (False: leave the record as it is) by conditional write."""
        for _ in range(50):
            raw, version = self.store.read_versioned(self.key)
            doc = self._parse(raw)
            doc["limit_s"] = self.limit_s
            if not change(doc):
                return False
            try:
                self.store.write_if(self.key, json.dumps(doc, indent=2).encode(), version)
                return True
            except PreconditionFailed:
                continue  # another unit booked in between: read again
        raise RuntimeError(f"{self.store.uri_for(self.key)}: 50 conflicting writes in a row")

    def may_start(self, label: str, used_s: float, estimate_s: float | None) -> bool:
        """Reserve `estimate_s` (None: this unit has measured no epoch yet) for `label`'s next
        epoch if the run's total allows it."""
        def reserve(doc: dict) -> bool:
            others = {k: u for k, u in doc["units"].items() if k != label}
            total = used_s + sum(float(u.get("used_s", 0)) + float(u.get("reserved_s", 0)) for u in others.values())
            estimate = estimate_s if estimate_s is not None else max(
                [float(u.get("epoch_s", 0)) for u in others.values()], default=0.0)
            if total >= self.limit_s or total + estimate > self.limit_s:
                return False
            mine = doc["units"].get(label, {})
            doc["units"][label] = {**mine, "used_s": round(used_s, 3), "reserved_s": round(estimate, 3)}
            return True
        return self._change(reserve)

    def book(self, label: str, used_s: float, epoch_s: float) -> None:
        """`label` has used `used_s` in all, its last epoch `epoch_s`, and reserves nothing."""
        def booked(doc: dict) -> bool:
            doc["units"][label] = {"used_s": round(used_s, 3), "reserved_s": 0.0, "epoch_s": round(epoch_s, 3)}
            return True
        self._change(booked)

    def summary(self) -> dict:
        doc = self.read()
        used = {k: float(u.get("used_s", 0)) for k, u in sorted(doc["units"].items())}
        return {"limit_s": self.limit_s, "used_s": round(sum(used.values()), 3), "units": used}
