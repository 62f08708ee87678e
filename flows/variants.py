"""Training every unit of a run: in lanes in this process, or fanned out as flow runs
(flows/fanout.py); either way one `UnitResult` per unit, in the order of `units_of`."""
from __future__ import annotations

from prefect import allow_failure
from prefect.artifacts import create_table_artifact

from run.context import RunContext
from run.layout import Unit, units_of
from run.params import UNIT_PARAMS
from run.records import UnitResult
from run.report import variants_table


class Board:
    """The run's variant table in the UI, every unit listed from the start."""

    def __init__(self, run_id: str, names: list[str]):
        self.run_id = run_id
        self.rows = {n: {"name": n, "status": "pending", "attempts": 0} for n in names}
        self._shown = None
        self.show()

    def update(self, name: str, row: dict) -> None:
        self.rows[name] = {**self.rows[name], **row, "name": name}
        self.show()

    def show(self) -> None:
        table = variants_table(list(self.rows.values()), None)
        if table != self._shown:
            create_table_artifact(table, key="variant-comparison",
                                  description=f"Run {self.run_id}: augmentation variants so far")
            self._shown = table


def plan_lanes(variants: list[str], devices: list[str], per_device: int) -> list[tuple[str, list[str]]]:
    """Assign variants to lanes: each lane runs its variants one after another on one
    device, and a device has `per_device` lanes, so it never trains more at once."""
    lanes = [(d, []) for _ in range(per_device) for d in devices][: len(variants)]
    for i, v in enumerate(variants):
        lanes[i % len(lanes)][1].append(v)
    return lanes


def devices_for(device: str) -> list[str]:
    """The devices variants are spread over: every GPU for 'auto'/'cuda', else the one named."""
    import torch

    from cnn.device import pick_device

    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(dev)]


def train_units(ctx: RunContext) -> list[UnitResult]:
    p = ctx.params
    units = units_of(p.variants, p.seed, p.repeats)
    board = Board(ctx.run_id, [u.label for u in units])

    def dispatch(some: list[Unit], until: int | None = None, rung: int | None = None) -> list[UnitResult]:
        """`some` trained to epoch `until` (a halving rung), or to the end."""
        if p.variant_deployment:
            from flows.fanout import fan_out

            extra = {} if until is None else {"until_epoch": until}
            return fan_out(ctx, {u: {**child_parameters(ctx, u), **extra} for u in some}, on_change=board.update,
                           rung=rung)
        return _in_lanes(ctx, some, board, until)

    if p.halving == "on":
        from flows.halving import halve

        return halve(ctx, units, dispatch, on_change=board.update)
    return dispatch(units)


def child_parameters(ctx: RunContext, unit: Unit) -> dict:
    """The train-variant flow's parameters for one unit: JSON values only. `repeats`
    only when above 1, so a run of one repeat starts its children exactly as before;
    `dataset_purged` only when the run purged hold-out images."""
    out = ctx.params.model_dump(mode="json", include=set(UNIT_PARAMS))
    out.update(run_id=ctx.run_id, store=ctx.store_uri, variant=unit.variant, seed=unit.seed,
               dataset_key=ctx.dataset.key, dataset_md5=ctx.dataset.md5, dataset_sha256=ctx.dataset.sha256)
    if not unit.repeated:
        del out["repeats"]
    if ctx.dataset.purged:  # only then, as with repeats: a run without purge starts its children as before
        out["dataset_purged"] = list(ctx.dataset.purged)
    return out


def _in_lanes(ctx: RunContext, units: list[Unit], board: Board, until: int | None = None) -> list[UnitResult]:
    from tasks.training import refuse_other_parameters, train_in_lane, unit_facts

    p, run_id = ctx.params, ctx.run_id
    devices = devices_for(p.device)
    cfgs = {u.label: ctx.config(u, devices[0]) for u in units}
    # every unit checked before any trains (a fan-out child checks its own: precision depends on its device)
    for u in units:
        refuse_other_parameters(ctx, u, unit_facts(ctx, cfgs[u.label]))
    by_label = {u.label: u for u in units}
    lanes = plan_lanes(list(by_label), devices, _lanes_per_device(ctx, cfgs[units[0].label], devices[0]))
    to = "" if until is None else f" to epoch {until}"
    print(f"run {run_id}: {len(units)} unit(s) of {p.model}{to} in {len(lanes)} lane(s) on {', '.join(devices)}")
    # a single CPU lane trains in the flow's own thread: up to 10% faster than in a
    # task-runner thread (benchmarks/README.md, cpu_lanes)
    here = len(lanes) == 1 and not devices[0].startswith("cuda")
    results: dict[str, UnitResult] = {}
    futures = {}
    for dev, names in lanes:
        previous = None
        for v in names:
            args = (ctx, cfgs[v], dev, by_label[v].repeated, v, until)
            if here:
                board.update(v, {"status": "running", "attempts": 1})
                results[v] = _result(by_label[v], train_in_lane(*args, return_state=True))
                board.update(v, results[v].summary())
            else:
                wait = [allow_failure(previous)] if previous else None
                previous = futures[v] = train_in_lane.submit(*args, wait_for=wait)
    for v, future in futures.items():
        results[v] = _result(by_label[v], future.wait() or future.state)
        board.update(v, results[v].summary())
    return [results[u.label] for u in units]


def _lanes_per_device(ctx: RunContext, cfg, device: str) -> int:
    """The CPU gets one lane: each variant already uses every core, and several at once in
    threads measured 1-9% slower (benchmarks/README.md, cpu_lanes). A GPU as many as asked
    for and as fit in its free memory."""
    if not device.startswith("cuda"):
        return 1
    import torch

    from cnn.train import variants_that_fit

    p = ctx.params
    train_size = min(ctx.dataset.train, p.subset or ctx.dataset.train)
    per_device = variants_that_fit(cfg, torch.device(device), train_size, p.variants_per_gpu)
    if per_device < p.variants_per_gpu:
        print(f"variants_per_gpu {p.variants_per_gpu}: only {per_device} fit in {device}'s free memory")
    return per_device


def _result(unit: Unit, state) -> UnitResult:
    """A finished train-in-lane task's result, or a failed one saying why (the others go on)."""
    if state.is_completed():
        return state.result()
    if state.is_cancelled():
        print(f"{unit.label}: {state.message}")
        return UnitResult.failed(unit.variant, state.message, seed=unit.seed)
    try:
        state.result()
        err = f"ended {state.type.value}"
    except Exception as e:  # noqa: BLE001 - any failure of one unit is reported, not raised
        err = f"{type(e).__name__}: {e}"
    print(f"{unit.label}: failed: {err}")
    return UnitResult.failed(unit.variant, err, seed=unit.seed)
