"""Tell two models apart before resuming a run with one of them: a hash of weights and config.

`model_fingerprint(model)` hashes every state-dict entry's name, shape and dtype, a fixed sample of
its values (evenly spaced elements, exact in float64: the same on every device) and the model's
config (without the keys that only say where or by which version it was loaded). The same model
loaded again, on another device or in another process, gives the same hash; another checkpoint,
another dtype or an edited config gives another. Resumable writers (`hf-eu score`,
`trainers.data.generate_responses`) record it and refuse to continue a run made with another model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

__all__ = ["model_fingerprint", "config_for_fingerprint"]

SAMPLES_PER_TENSOR = 64
# Keys that change with where, how or by which version a model was loaded, not with what it computes
# (the estimator and the chunk size are recorded as settings of their own where they matter).
_VOLATILE_KEYS = frozenset({"_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "hf_eu_version",
                            "dtype", "torch_dtype", "target_name_or_path", "target_revision", "estimator",
                            "chunk_size", "_attn_implementation_autoset", "architectures"})


def config_for_fingerprint(config: Any) -> dict:
    """The config as a dict without the volatile keys (recursively), for hashing."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return _without_volatile(data)


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _without_volatile(v) for k, v in value.items() if k not in _VOLATILE_KEYS}
    if isinstance(value, (list, tuple)):
        return [_without_volatile(v) for v in value]
    return value


def _sample(tensor: torch.Tensor) -> bytes:
    """Evenly spaced elements (first and last included) as exact float64 / int64 bytes."""
    flat = tensor.detach().reshape(-1)
    count = min(SAMPLES_PER_TENSOR, flat.numel())
    index = torch.linspace(0, flat.numel() - 1, steps=count, dtype=torch.float64).round().long()
    values = flat[index.to(flat.device)]
    if values.is_complex():
        values = torch.view_as_real(values)
    kind = torch.float64 if (values.is_floating_point() or values.is_complex()) else torch.int64
    return values.to("cpu").to(kind).numpy().tobytes()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of `model`'s state-dict names, shapes, dtypes, sampled values and config.

    Cheap: at most 64 elements are read per tensor. Tensors on the meta device (offloaded) count by
    name, shape and dtype only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fingerprint needs a torch.nn.Module, got {type(model).__name__}.")
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(config_for_fingerprint(config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, torch.Tensor):
                continue
            digest.update(f"\n{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if tensor.numel() and not tensor.is_meta:
                digest.update(_sample(tensor))
    return digest.hexdigest()
