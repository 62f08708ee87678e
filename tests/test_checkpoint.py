"""Checkpoints: nothing read back is unpickled, a file that is not exactly a checkpoint
is refused naming it, and what is saved comes back exactly (values, layouts, RNG).

Resuming through the loop (interrupted after epoch k, continued at k + 1 with the same
history and weights) is tested in test_train.py and test_fast.py."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cnn.checkpoint import CHECKPOINT, LoopState, load_checkpoint, read_history, save_checkpoint
from cnn.config import make_config
from cnn.data import Splits, load_splits
from cnn.fast import Lookahead
from cnn.train import init_model, make_optimizer, make_scheduler, train
from tests.conftest import register_tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(prepared_dir) -> Splits:
    s = load_splits(prepared_dir, split_seed=0)
    return Splits(s.train_x[:256], s.train_y[:256], s.val_x[:64], s.val_y[:64], s.test_x, s.test_y, s.classes)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A real checkpoint: `tiny` trained for one of two epochs."""
    workdir = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        register_tiny(mp)

        def stop(row, ckpt):
            raise KeyboardInterrupt("stopped after epoch 1")

        with pytest.raises(KeyboardInterrupt):
            train(_config("tiny"), data, CPU, workdir, on_epoch=stop)
    return workdir / CHECKPOINT


def _config(model: str):
    return make_config(model, "flip", epochs=2, patience=2, seed=0, batch_size=64)


def _parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


class _Plant:
    """Unpickling this creates the file `marker`: what a planted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pickled_checkpoint_is_refused_and_never_unpickled(tiny, data, tmp_path):
    marker = tmp_path / "pwned"
    planted = {"model": {}, "config": {}, "state": {"history": [], "status": "running", "x": _Plant(marker)}}
    # the payload is live: torch.load without weights_only runs it
    torch.save(planted, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    workdir = tmp_path / "variant"
    workdir.mkdir()
    torch.save(planted, workdir / CHECKPOINT)
    path = re.escape(str(workdir / CHECKPOINT))
    with pytest.raises(ValueError, match=f"{path}: expected a safetensors checkpoint"):
        train(_config(tiny), data, CPU, workdir)
    with pytest.raises(ValueError, match=f"{path}: expected a safetensors checkpoint"):
        read_history(workdir / CHECKPOINT)
    assert not marker.exists()


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _edit_document(edit):
    return lambda tensors, meta: (tensors, {**meta, "document": json.dumps(edit(json.loads(meta["document"])))})


# (what is changed, how, what the refusal says)
TAMPERED = {
    "no metadata": (lambda t, m: (t, None), "expected safetensors metadata"),
    "another format": (lambda t, m: (t, {**m, "format": "pickle-please"}), "expected safetensors metadata"),
    "an extra metadata entry": (lambda t, m: (t, {**m, "hook": "x"}), "expected safetensors metadata"),
    "a document that is not JSON": (lambda t, m: (t, {**m, "document": "{'epoch': 1"}), "is not JSON"),
    "an extra document entry": (_edit_document(lambda d: {**d, "pickle": "gASV"}), "expected a checkpoint document"),
    "the history missing": (_edit_document(lambda d: {**d, "loop": _drop(d["loop"], "history")}),
                            "expected loop state"),
    "an epoch that is text": (_edit_document(lambda d: {**d, "loop": {**d["loop"], "epoch": "1"}}),
                              "loop state 'epoch'"),
    "an unknown status": (_edit_document(lambda d: {**d, "loop": {**d["loop"], "status": "pwned"}}),
                          "expected a status"),
    "an extra tensor": (lambda t, m: ({**t, "payload": torch.zeros(3)}, m), "unexpected tensor 'payload'"),
    "an extra model tensor": (lambda t, m: ({**t, "model/extra": torch.zeros(3)}, m), "unexpected \\['extra'\\]"),
    "a model tensor missing": (lambda t, m: (_drop(t, "model/classifier.3.weight"), m), "missing \\['classifier.3.weight'\\]"),
    "a model tensor of another shape": (lambda t, m: ({**t, "model/classifier.3.weight": torch.zeros(2, 2)}, m),
                                        "tensor 'model/classifier.3.weight': expected"),
    "an optimizer tensor for no parameter": (lambda t, m: ({**t, "optimizer/999/momentum_buffer": torch.zeros(1)}, m),
                                             "unexpected tensor 'optimizer/999/momentum_buffer'"),
    "the rng state missing": (lambda t, m: (_drop(t, "rng"), m), "tensor 'rng'"),
    "the best epoch's predictions missing": (lambda t, m: (_drop(t, "best/val_predictions"), m),
                                             "tensor 'best/val_predictions'"),
    "an rng state of the wrong size": (lambda t, m: ({**t, "rng": torch.zeros(7, dtype=torch.uint8)}, m),
                                       "does not fit"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_checkpoint_is_refused_naming_the_file(case, tiny, data, trained, tmp_path):
    tamper, says = TAMPERED[case]
    tensors, meta = tamper(*_parts(trained))
    path = tmp_path / CHECKPOINT
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{says}"):
        train(_config(tiny), data, CPU, tmp_path)


def test_a_truncated_checkpoint_is_refused(tiny, data, trained, tmp_path):
    path = tmp_path / CHECKPOINT
    path.write_bytes(trained.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        train(_config(tiny), data, CPU, tmp_path)


def test_the_untampered_checkpoint_resumes(tiny, data, trained, tmp_path):
    """The control for the cases above: a copy of the same file resumes at epoch 2."""
    shutil.copy(trained, tmp_path / CHECKPOINT)
    seen = []
    result = train(_config(tiny), data, CPU, tmp_path, on_epoch=lambda row, ckpt: seen.append(row["epoch"]))
    assert seen == [2] and result["status"] == "completed"


def test_read_history_reads_the_json_alone(tiny, data, trained):
    history = read_history(trained)
    assert [row["epoch"] for row in history] == [1]
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"}


def _objects(cfg, steps_per_epoch=4):
    model = init_model(cfg, 10, CPU)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    return model, opt, sched, torch.Generator().manual_seed(cfg.seed), Lookahead(model, 8)


def _step(model, opt, sched, gen, lookahead, step):
    x = torch.rand((8, 3, 32, 32), generator=gen).contiguous(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    model(x).logsumexp(1).mean().backward()
    opt.step()
    sched.step()
    lookahead.step(step)


def test_a_checkpoint_restores_every_state_exactly(tiny, tmp_path):
    cfg = _config(tiny)
    model, opt, sched, gen, lookahead = _objects(cfg)
    for step in range(1, 6):  # past the lookahead's start: its average exists
        _step(model, opt, sched, gen, lookahead, step)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    predictions = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    state = LoopState(epoch=1, history=[{"epoch": 1, "val_loss": 2.25}], best_epoch=1, best_val_loss=2.25,
                      best_state=best, best_predictions=predictions, seconds=1.5)
    save_checkpoint(tmp_path / CHECKPOINT, model, opt, sched, gen, lookahead, cfg, state)

    model2, opt2, sched2, gen2, lookahead2 = _objects(dataclasses.replace(cfg, seed=9))  # other weights, other rng
    with pytest.raises(ValueError, match="different config"):
        load_checkpoint(tmp_path / CHECKPOINT, model2, opt2, sched2, gen2, lookahead2, dataclasses.replace(cfg, seed=9))
    loaded = load_checkpoint(tmp_path / CHECKPOINT, model2, opt2, sched2, gen2, lookahead2, cfg)
    assert loaded.history == state.history and loaded.best_epoch == 1 and loaded.best_val_loss == 2.25
    for k, v in best.items():
        assert torch.equal(loaded.best_state[k], v), k
    assert torch.equal(loaded.best_predictions, predictions)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert torch.equal(gen2.get_state(), gen.get_state())
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for p, p2 in zip(model.parameters(), model2.parameters()):
        buf, buf2 = opt.state[p]["momentum_buffer"], opt2.state[p2]["momentum_buffer"]
        # same values and the same strides (channels_last for convolutions) as before saving
        assert torch.equal(buf2, buf) and buf2.stride() == buf.stride()
    for k, v in lookahead.average.items():
        assert torch.equal(lookahead2.average[k], v) and lookahead2.average[k].stride() == v.stride(), k
    # and they continue identically
    _step(model, opt, sched, gen, lookahead, 6)
    _step(model2, opt2, sched2, gen2, lookahead2, 6)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_concurrent_writers_never_share_a_temporary_file(tiny, tmp_path):
    cfg = _config(tiny)
    model, opt, sched, gen, lookahead = _objects(cfg)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def write(n: int):
        barrier.wait()
        try:
            for _ in range(5):
                save_checkpoint(tmp_path / CHECKPOINT, model, opt, sched, gen, None, cfg, LoopState(epoch=n))
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind
    state = load_checkpoint(tmp_path / CHECKPOINT, *_objects(cfg)[:4], None, cfg)
    assert state.epoch in range(4)
