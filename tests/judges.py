"""Judges for tests of the champion registry that fabricate records, not predictions:
the registry asks a judge whether a candidate beats the champion (the product's is the
paired comparison on the test images, tasks/publish.py ChampionJudge)."""
from __future__ import annotations

from registry.champions import Judge


def promote_by_accuracy(margin: float) -> Judge:
    """Promote when the candidate's test accuracy beats the champion's by at least `margin`."""
    def judge(current: dict, candidate: dict) -> tuple[bool, str]:
        old, new = current["test"]["accuracy"], candidate["test"]["accuracy"]
        if new > old and new - old >= margin:
            return True, f"test accuracy {new:.4f} beats champion {current['run_id']} ({old:.4f}) by >= {margin}"
        return False, (f"test accuracy {new:.4f} does not beat champion {current['run_id']} ({old:.4f}) "
                       f"by more than {margin}")

    return judge
