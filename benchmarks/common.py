"""What every benchmark shares: the machine it ran on, synthetic images, a table, a JSON file."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from store.files import write_durably

# torch and numpy are imported where used, so that importing this module (for
# add_run_args) does not count in flow_profile's import timings

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | None = None) -> dict:
    """The machine, so that a figure is never quoted without it."""
    import torch

    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def synthetic_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n learnable synthetic images (cnn.synthetic): uint8 (n, 3, 32, 32) and int64 labels (n,)."""
    import numpy as np
    import torch

    from cnn.synthetic import make_images

    x, y = make_images(n, np.random.default_rng(seed))
    return torch.from_numpy(x).view(n, 3, 32, 32), torch.tensor(y, dtype=torch.int64)


class Timer:
    """Wall-clock seconds of a block: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def table(rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table of `columns` of `rows`; floats to 3 significant places or more."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>.json, written then renamed."""
    return write_durably(RESULTS / f"{name}.json", json.dumps(
        {"benchmark": name, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}, indent=2).encode())


def add_run_args(ap) -> None:
    """The small synthetic flow run that orchestration and flow_profile both time."""
    ap.add_argument("--model", default="seed")
    ap.add_argument("--variants", default="none,flip")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--synthetic-train", type=int, default=2500)  # about a minute of training here
    ap.add_argument("--synthetic-test", type=int, default=1000)
