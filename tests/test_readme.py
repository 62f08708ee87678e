"""The README documents what the code does: every parameter, and the CI command."""
from __future__ import annotations

from pathlib import Path

from run.params import RunParams

REPO = Path(__file__).resolve().parents[1]


def test_every_parameter_is_documented():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in RunParams.model_fields
               if f"`--{name.replace('_', '-')}` / `{name}`" not in readme]
    assert not missing, f"README.md's parameter table lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
