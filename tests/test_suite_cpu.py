"""benchmarks.suite_cpu refuses a results name it would write outside benchmarks/results/."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["../outside", "fanout.json", "results/fanout", ""])
def test_a_result_name_with_a_folder_or_suffix_is_refused_before_the_suite_runs(name):
    # were it not refused, the benchmark would run only a collection of one small file
    r = subprocess.run([sys.executable, "-m", "benchmarks.suite_cpu", "--workers", "0", "--result", name, "--",
                        "--collect-only", "tests/test_readme.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--result: expected a file name without folder or .json" in r.stderr and repr(name) in r.stderr
    assert "test session starts" not in r.stdout  # pytest never started
    assert not (REPO / "benchmarks" / "outside.json").exists()
