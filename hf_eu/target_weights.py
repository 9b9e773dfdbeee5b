"""The fine-tuned target's weights inside a composite folder.

A composite normally records only its target's id and revision. Once the wrapped target has been
trained (`Trainer(model=wrapper)`, TRL, or any loop that put the wrapper in training mode with trainable
target parameters), `save_pretrained` also writes the target's weights, the way transformers writes a
model's: `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json`, keyed as in the wrapper's `state_dict` (`target.` + the target's names).
So `from_pretrained(folder)` loads the recorded target, then these weights over it; and `Trainer`'s
`resume_from_checkpoint` and `load_best_model_at_end`, which load that file into the wrapper with
`load_state_dict`, restore the fine-tuned target too. The config key `has_target_weights` says they are there.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from torch import nn

from .loading import check_safetensors_only

__all__ = ["TARGET_PREFIX", "is_target_weight_file", "target_state_dict", "save_target_weights", "load_target_weights"]

TARGET_PREFIX = "target."
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def is_target_weight_file(name: str) -> bool:
    """Whether `name` (a file name in a composite folder) is one of the target-weight files this module writes."""
    return name in (_SINGLE, _INDEX) or _SHARD.match(name) is not None


def target_state_dict(target: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The target's tensors keyed `target.<name>`: from `state_dict` (the wrapper's, as `Trainer` passes it under
    FSDP or DeepSpeed) when given, else from the target itself.

    Raises:
        ValueError: `state_dict` holds no `target.` keys, or the target is quantized (its packed weights do not
            load back into a freshly loaded target).
    """
    if getattr(target, "is_quantized", False) or getattr(target, "hf_quantizer", None) is not None:
        raise ValueError("The wrapped target is quantized, and its packed weights cannot be stored in the composite. "
                         "Train a PEFT adapter on it and save that with the adapter's own `save_pretrained`, or pass "
                         "`save_target=False`.")
    if state_dict is None:
        return {TARGET_PREFIX + name: tensor for name, tensor in target.state_dict().items()}
    found = {name: tensor for name, tensor in state_dict.items() if name.startswith(TARGET_PREFIX)}
    if not found:
        raise ValueError(f"`state_dict` has no '{TARGET_PREFIX}' keys (got {sorted(state_dict)[:4]}…): pass the "
                         "wrapper's own `state_dict()`, whose target tensors are keyed 'target.<name>'.")
    return found


def _tied_aliases(target: nn.Module) -> dict[str, str]:
    """Every tensor name of the target that shares its storage with another one → the name that is kept."""
    first: dict[tuple[int, torch.device], str] = {}
    aliases = {}
    for name, tensor in target.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta":
            continue
        key = (tensor.data_ptr(), tensor.device)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def save_target_weights(folder: str, target: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                        max_shard_size: int | str = "5GB") -> None:
    """Write the target's weights into `folder` (a composite being staged), shared tensors once."""
    tensors = target_state_dict(target, state_dict)
    discard = [TARGET_PREFIX + name for name in _tied_aliases(target) if TARGET_PREFIX + name in tensors]
    save_torch_state_dict({name: tensor.detach() for name, tensor in tensors.items()}, folder,
                          max_shard_size=max_shard_size, metadata={"format": "pt"},
                          shared_tensors_to_discard=discard or None)


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, _INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            weight_map: dict[str, Any] = json.load(handle).get("weight_map", {})
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(folder, _SINGLE)
    if not os.path.isfile(single):
        raise ValueError(f"The composite in {folder!r} says it stores its target's weights (`has_target_weights`), but "
                         f"neither {_SINGLE} nor {_INDEX} is there. Copy the whole folder again, or re-save it.")
    return [single]


def load_target_weights(folder: str | os.PathLike, target: nn.Module) -> None:
    """Load the stored fine-tuned weights into `target` (in place, in its own dtype and device).

    Raises:
        ValueError: the files are missing or not safetensors, name tensors the target lacks, lack tensors it has
            (other than tied aliases of stored ones), or have other shapes (a target of another architecture).
    """
    folder = os.fspath(folder)
    check_safetensors_only(folder, "composite's target weights")
    stored: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        for name, tensor in load_file(path, device="cpu").items():
            if not name.startswith(TARGET_PREFIX):
                raise ValueError(f"{path} holds {name!r}, not a '{TARGET_PREFIX}' tensor: it is not the target-weight "
                                 "file of an hf_eu composite. Re-save the composite.")
            stored[name[len(TARGET_PREFIX):]] = tensor
    try:
        result = target.load_state_dict(stored, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"The target's weights stored in {folder!r} do not fit the loaded target ({error}). Load the "
                         "composite with the target it was trained from (its config records the id).") from error
    aliases = _tied_aliases(target)
    missing = [name for name in result.missing_keys if aliases.get(name) not in stored]
    if missing or result.unexpected_keys:
        raise ValueError(f"The target's weights stored in {folder!r} do not match the loaded target: missing "
                         f"{missing[:4]}, unexpected {result.unexpected_keys[:4]}. Load the composite with the target "
                         "it was trained from (its config records the id).")
