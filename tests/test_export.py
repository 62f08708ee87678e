"""The portable model reproduces the project's own predictions, test-time augmentation included."""
from __future__ import annotations

import pytest
import torch

from cnn.evaluate import predict_logits
from cnn.export import export_portable
from cnn.models import build_model


@pytest.mark.parametrize("name,tta", [("seed", 0), ("seed", 1), ("fast", 2)])
def test_portable_model_matches_evaluation(name, tta, tmp_path):
    torch.manual_seed(0)
    model = build_model(name)
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.randn(256, 3, 32, 32))
    x = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8)
    expected = predict_logits(model, x, torch.device("cpu"), tta=tta)
    export_portable(model, tmp_path / "model.pt2", tta=tta)
    portable = torch.export.load(tmp_path / "model.pt2").module()  # torch alone, no project code
    for batch in (x, x[:1]):  # any batch size
        got = portable(batch.float() / 255)
        assert torch.allclose(got, expected[: len(batch)], atol=1e-4)
    assert not list(tmp_path.glob("*.tmp*"))
