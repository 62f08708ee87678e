"""Each variant's validation curve so far, in the Prefect UI while it trains.

One markdown artifact per flow run (in lanes, its variants share it). It is created once
and then updated in place: creating it again with the same key would keep every version,
tens of KB each, in Prefect's database for good. It is redrawn at most once every
MIN_INTERVAL_S and at each variant's end, so it costs training a fraction of a second a minute.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from uuid import UUID

import pandas as pd

from run.report import data_uri, draw_curves, save_png

KEY = "live-curves"
MIN_INTERVAL_S = 30.0


@dataclass
class _Board:
    histories: dict[str, list[dict]] = field(default_factory=dict)  # variant -> history.csv's rows
    states: dict[str, str] = field(default_factory=dict)  # variant -> "epoch 3 of at most 30", "early_stopped"
    artifact_id: UUID | None = None
    drawn_at: float = float("-inf")  # time.monotonic()
    lock: threading.Lock = field(default_factory=threading.Lock)  # lanes are threads of one process


_boards: dict[str, _Board] = {}  # by flow run id
_boards_lock = threading.Lock()


def show_curves(variant: str, history: list[dict], epochs: int, status: str | None = None) -> None:
    """Record `variant`'s `history` so far and redraw if due or `status` says it ended.
    Best-effort: a UI that cannot be reached never stops training."""
    from prefect.runtime import flow_run

    fid = flow_run.get_id()
    if fid is None:  # no page to show it on
        return
    with _boards_lock:
        board = _boards.setdefault(str(fid), _Board())
    with board.lock:
        board.histories[variant] = list(history)
        board.states[variant] = status or f"epoch {history[-1]['epoch'] if history else 0} of at most {epochs}"
        now = time.monotonic()
        if status is None and now - board.drawn_at < MIN_INTERVAL_S:
            return
        board.drawn_at = now
        try:
            _publish(board, str(fid), render(board.histories, board.states))
        except Exception as e:  # noqa: BLE001 - a picture for people; training goes on without it
            print(f"{variant}: the UI's {KEY} artifact was not updated ({type(e).__name__}: {e})")


def render(histories: dict[str, list[dict]], states: dict[str, str]) -> str:
    frames = {v: pd.DataFrame(h) for v, h in histories.items() if h}
    lines = [f"Validation so far, drawn {datetime.now(timezone.utc):%H:%M:%S} UTC "
             f"(every {MIN_INTERVAL_S:.0f} s at most, and at each variant's end).", ""]
    for v, state in states.items():
        h = histories.get(v) or []
        best = max((r["val_accuracy"] for r in h), default=None)
        lines.append(f"- **{v}**: {state}" + ("" if best is None else
                                                 f", val_acc {h[-1]['val_accuracy']:.3f} (best {best:.3f})"))
    if frames:
        lines += ["", f"![validation curves]({data_uri(save_png(draw_curves(frames, figsize=(8, 3))))})"]
    return "\n".join(lines) + "\n"


def _publish(board: _Board, flow_run_id: str, markdown: str) -> None:
    """Create the flow run's artifact (not a task run's: in lanes variants share it) once,
    then update it in place."""
    from prefect import get_client
    from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

    with get_client(sync_client=True) as client:
        if board.artifact_id is None:
            board.artifact_id = client.create_artifact(ArtifactCreate(
                key=KEY, type="markdown", data=markdown, flow_run_id=UUID(flow_run_id),
                description="Each variant's validation curve so far")).id
        else:
            client.update_artifact(board.artifact_id, ArtifactUpdate(data=markdown))
