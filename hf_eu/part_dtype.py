"""The dtype a composite's proxy runs in, apart from the target's.

The proxy's teacher-forced pass is the cost of the estimators that read it (`eu_head_proxy`, `proxy_entropy`,
`hf_eu`). In bfloat16 it costs about half of a float32 pass on CPUs with AVX512-BF16 (measured on the shipped
composite: 0.55x) and on GPUs, while its entropy moves by about 0.03 nats: `eu_head_proxy`'s Spearman on the
evaluation's answers went from 0.9042 / 0.9043 (arith / gsm, float32 proxy) to 0.9042 / 0.9036. The target keeps
its own dtype, so `generate` returns its tokens unchanged.

A proxy built on the target's own layers shares the target's embedding and output modules
(`truncated_copy(..., share_embeddings=True)`); casting those in place would cast the target's too. `cast_part`
gives the part its own cast copy of every module and parameter it shares with the target instead (tied parameters
stay tied), and casts only parameters: float buffers such as the rotary `inv_freq` keep their precision.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["PART_DTYPES", "check_part_dtype", "cast_part"]

PART_DTYPES = ("float32", "bfloat16", "float16")


def check_part_dtype(value, name: str = "proxy_dtype") -> str | None:
    """`value` (None, a `torch.dtype` or its name, with or without "torch.") as the name a config stores."""
    if value is None:
        return None
    text = str(value).removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else None
    if text not in PART_DTYPES:
        raise ValueError(f"`{name}` must be None or one of {PART_DTYPES} (or the torch dtype), got {value!r}; "
                         f"e.g. {name}='bfloat16' runs the proxy's pass in bfloat16.")
    return text


def cast_part(part: nn.Module, dtype, target: nn.Module | None = None) -> nn.Module:
    """Cast `part`'s floating parameters to `dtype` in place, never touching `target`'s; returns `part`.

    Modules and parameters `part` shares with `target` are first replaced by copies (with one memo, so parameters
    tied among them stay tied); buffers keep their dtype.
    """
    dtype = getattr(torch, check_part_dtype(dtype, "dtype"))
    if target is not None:
        _own_copies(part, target)
    for parameter in part.parameters():  # each tensor once, tied ones included
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return part


def _own_copies(part: nn.Module, target: nn.Module) -> None:
    """Replace, inside `part`, every submodule and parameter that belongs to `target` by a copy."""
    target_modules = {id(module) for module in target.modules()}
    target_parameters = {id(parameter) for parameter in target.parameters()}
    memo: dict = {}  # deepcopy's memo: a tensor reached twice is copied once

    def walk(module: nn.Module) -> None:
        for name, child in list(module._modules.items()):
            if child is not None and id(child) in target_modules:
                module._modules[name] = copy.deepcopy(child, memo)
            elif child is not None:
                walk(child)
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) in target_parameters:
                module._parameters[name] = copy.deepcopy(parameter, memo)

    walk(part)
