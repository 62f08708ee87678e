"""Where a run's files are in the store: its keys, its units' folders, the current file of a leased unit."""
from __future__ import annotations

from dataclasses import dataclass

from store import Store, join_key, safe_name
from store.lease import committed


LEASE = "lease.json"  # a unit's writer, and the pointer to its current files (store/lease.py)


def run_key(run_id: str, *parts: str) -> str:
    """Store key under runs/<run-id>/; every part is a validated name or a fixed word."""
    return join_key("runs", safe_name(run_id, "run id"), *parts)


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
