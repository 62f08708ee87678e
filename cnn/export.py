"""A portable model: a `torch.export` program with the input normalisation inside.

It loads with torch alone, no project code:

    m = torch.export.load("model.pt2").module()
    logits = m(images)  # images: float (B, 3, 32, 32), RGB in 0..1

but torch's loader falls back to a full unpickle (code) when the safe one fails, so an
archive from anywhere else goes through `load_portable`, which first refuses any archive
whose loading could unpickle more than tensors.
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from cnn.augment import MEAN, STD
from cnn.evaluate import tta_views
from store.files import publishing


class Portable(nn.Module):
    """0..1 RGB images in, logits out, with `cnn.evaluate`'s views, so it reproduces the metrics."""

    def __init__(self, model: nn.Module, tta: int):
        super().__init__()
        self.model = model.eval()
        self.tta = int(tta)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return sum(w * self.model(v) for w, v in tta_views(x, self.tta))


def export_portable(model: nn.Module, path: Path, tta: int = 0) -> Path:
    """Export `model` (CPU, fp32, eval) with normalisation to `path` (.pt2), and check it."""
    # contiguous weights: channels_last parameters do not serialise as whole tensors
    portable = Portable(model.float().cpu().to(memory_format=torch.contiguous_format), tta).eval()
    example = torch.rand(4, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(portable, (example,), dynamic_shapes={"x": {0: batch}})
    with publishing(path, suffix=".pt2") as tmp:  # torch.export wants the .pt2 suffix
        torch.export.save(program, tmp)
        try:
            reloaded = load_portable(tmp)  # what we write must pass the check that reading it will face
        except ValueError as e:
            raise RuntimeError(f"{path}: the exported archive fails the load check: {e}") from None
        with torch.no_grad():
            if not torch.allclose(reloaded(example), portable(example), atol=1e-4):
                raise RuntimeError(f"{path}: the exported model does not reproduce the original's outputs")
    return Path(path)


# What torch.export.save writes for one plain program named "model". Everything else torch's
# loader would act on is refused: legacy pickled state, opaque and custom-object constants
# (pickle.loads, TorchScript's unpickler), AOTInductor libraries, extras.
SAMPLE_INPUTS = "data/sample_inputs/model.pt"
PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": "data/weights/",
                   "data/constants/model_constants_config.json": "data/constants/"}
MEMBERS = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
           "models/model.json", SAMPLE_INPUTS, *PAYLOAD_CONFIGS}
TENSOR_MEMBER = re.compile(r"data/weights/weight_\d+|data/constants/tensor_\d+")
# every torch.load runs weights_only, whatever its caller asked for
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def load_portable(path: Path) -> nn.Module:
    """Loaded with torch.load pinned to weights_only, so the sample inputs' fallback to a full
    unpickle fails instead of running. ValueError (naming what, not the file) otherwise."""
    check_archive(path)
    saved = {k: os.environ.pop(k, None) for k in (FORCE_WEIGHTS_ONLY, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        return torch.export.load(str(path)).module()
    except Exception as e:  # torch's loader raises many kinds for an archive it cannot use
        raise ValueError(f"not a program torch can load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         ) from None
    finally:
        os.environ.pop(FORCE_WEIGHTS_ONLY)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def check_archive(path: Path) -> None:
    """Refuse, without executing anything, a .pt2 whose loading could unpickle more than
    tensors: only MEMBERS and tensor members, once each, stored (nothing to inflate), and
    every member torch would torch.load holding only what weights_only allows."""
    try:
        with zipfile.ZipFile(path) as z:
            members = _members(z)
            pickled = [SAMPLE_INPUTS] if SAMPLE_INPUTS in members else []
            for config, folder in PAYLOAD_CONFIGS.items():
                if config in members:
                    pickled += _pickled_payloads(config, z.read(members[config]), folder)
            for name in pickled:
                if name in members:  # torch fails on a missing one, unpickling nothing
                    _check_checkpoint(name, z.read(members[name]))
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a .pt2 (zip) archive: {e}") from None


def _members(z: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """{name below the top folder: its entry}, or a ValueError naming the first odd one."""
    tops = sorted({i.filename.split("/", 1)[0] for i in z.infolist()})
    if len(tops) != 1:
        raise ValueError(f"members under {len(tops)} top folders ({', '.join(tops[:5])}); one expected")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in z.infolist():
        name = info.filename.partition("/")[2]
        if name not in MEMBERS and not TENSOR_MEMBER.fullmatch(name):
            raise ValueError(f"member {name or info.filename}: not a member torch.export.save writes for a "
                             f"plain program")
        if name in members:
            raise ValueError(f"member {name}: present twice")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"member {name}: compressed; torch.export.save stores every member as is")
        members[name] = info
    return members


def _pickled_payloads(config: str, raw: bytes, folder: str) -> list[str]:
    """The members `config` asks torch to torch.load; only tensor members (a name decides how torch reads it)."""
    try:
        entries = list(json.loads(raw)["config"].values())
        paths = [(folder + e["path_name"], bool(e.get("use_pickle"))) for e in entries]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"member {config}: not a payload config ({type(e).__name__}: {e})") from None
    for member, _ in paths:
        if not TENSOR_MEMBER.fullmatch(member):
            raise ValueError(f"member {config}: names {member}, not a tensor member")
    return [member for member, pickled in paths if pickled]


def _check_checkpoint(name: str, data: bytes) -> None:
    """Its globals read statically (torch's own scan), nothing executed."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception as e:  # not a torch.save zip, a TorchScript archive, an opcode the scan refuses
        raise ValueError(f"member {name}: not a checkpoint torch can load without a full unpickle "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if unsafe:
        raise ValueError(f"member {name}: a pickle naming {', '.join(sorted(unsafe))}, beyond the tensors and "
                         f"storages torch's weights_only unpickler allows")
