"""Checks a checkpoint before `Trainer.train(resume_from_checkpoint=...)` reads it: a truncated or missing file is named.

Without this, a checkpoint cut short by a kill fails deep inside safetensors or torch (or, for a missing optimizer or
RNG state, resumes silently into a run that differs from an uninterrupted one). `CheckedResumeMixin` runs
`check_checkpoint` first; every hf_eu trainer uses it.
"""

from __future__ import annotations

import json
import os
import struct
import warnings

from transformers.trainer_utils import get_last_checkpoint

__all__ = ["CheckedResumeMixin", "check_checkpoint"]

_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")
_FIX = "resume from an earlier checkpoint-N folder, or start the run over"


def _check_safetensors(path: str) -> None:
    """Raise if `path` is shorter than its own header says (a write cut short) or its header is unreadable."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length)) if 8 + length <= size else None
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"Checkpoint file {path} is unreadable ({error}); {_FIX}.") from error
    if header is None:
        raise ValueError(f"Checkpoint file {path} is truncated ({size} bytes, shorter than its header); {_FIX}.")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < 8 + length + end:
        raise ValueError(f"Checkpoint file {path} is truncated ({size} bytes, its header needs {8 + length + end}); "
                         f"{_FIX}.")


def check_checkpoint(folder: str, world_size: int = 1) -> None:
    """Raise `ValueError` naming the missing or truncated file of checkpoint `folder`; warn when the optimizer,
    scheduler or RNG state is missing (the resumed run then differs from an uninterrupted one)."""
    if not os.path.isdir(folder):
        raise ValueError(f"`resume_from_checkpoint` {folder!r} is not a folder; pass a checkpoint-N folder the "
                         "Trainer wrote, or True for the last one in `output_dir`.")
    state = os.path.join(folder, "trainer_state.json")
    try:
        json.load(open(state))
    except FileNotFoundError:
        raise ValueError(f"Checkpoint {folder} lacks trainer_state.json (the save was interrupted); {_FIX}.") from None
    except ValueError as error:
        raise ValueError(f"Checkpoint file {state} is corrupt ({error}); {_FIX}.") from error
    weights = [os.path.join(folder, name) for name in _WEIGHTS if os.path.isfile(os.path.join(folder, name))]
    if not weights:
        raise ValueError(f"Checkpoint {folder} holds no weights ({' or '.join(_WEIGHTS)}); {_FIX}.")
    for path in weights:
        _check_safetensors(path)
    rng = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{i}.pth" for i in range(world_size)]
    missing = [name for name in ("optimizer.pt", "scheduler.pt", *rng) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        warnings.warn(f"Checkpoint {folder} lacks {missing}: training resumes, but the run will differ from an "
                      "uninterrupted one (fresh optimizer/scheduler state or random streams).", UserWarning, stacklevel=3)


class CheckedResumeMixin:
    """Put before `transformers.Trainer` in the bases: `train(resume_from_checkpoint=...)` checks the checkpoint first."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            folder = (get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True
                      else str(resume_from_checkpoint))
            if folder is not None:
                check_checkpoint(folder, self.args.world_size)
        return super().train(resume_from_checkpoint, *args, **kwargs)
