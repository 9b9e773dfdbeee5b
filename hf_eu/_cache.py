"""The name of a model's cache argument and output field, across transformers versions.

transformers 5.24 renamed `past_key_values` to `cache` in model forward arguments and outputs; the old
name still works there but warns, and releases before 5.24 know only the old one. These helpers read the
model's own forward signature and output, so the code passes the name the installed release expects.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

__all__ = ["cache_argument", "forward_parameter", "output_cache", "continues_in_chunks"]


@lru_cache(maxsize=256)
def _parameters(forward) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None


def forward_parameter(model: Any, name: str) -> inspect.Parameter | None:
    """The parameter `name` of the forward `model` runs, or None when it has none (or no readable signature).

    A peft model forwards its keyword arguments to the model it wraps, so that model's signature decides."""
    base = getattr(model, "get_base_model", None)
    model = base() if callable(base) else model
    forward = getattr(type(model), "forward", None)
    parameters = _parameters(forward) if forward is not None else None
    return parameters.get(name) if parameters else None


def cache_argument(model: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` with the forward argument name `model` expects (`cache` from transformers 5.24 on)."""
    return {"cache" if forward_parameter(model, "cache") is not None else "past_key_values": cache}


def output_cache(output: Any) -> Any:
    """The cache a model output carries (`cache` from transformers 5.24 on, `past_key_values` before), or None."""
    if hasattr(output, "keys"):  # a ModelOutput: its keys are the fields that are set
        keys = output.keys()
        return next((output[name] for name in ("cache", "past_key_values") if name in keys), None)
    return getattr(output, "cache", None)


def continues_in_chunks(cache: Any) -> bool:
    """Whether a model's cache can be fed a multi-token chunk after what it holds and give the logits a full forward
    gives: only for plain attention key/value layers. Recurrent and hybrid models (Mamba, Mamba2, Jamba,
    RecurrentGemma, ...) keep states that are meant to advance one decoding token at a time; a scorer must run
    those cache-free (a full forward per chunk) instead."""
    try:
        from transformers.cache_utils import DynamicLayer, StaticLayer
    except ImportError:  # a transformers without layered caches: plain tuples of keys and values
        return cache is not None
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, (DynamicLayer, StaticLayer)) for layer in layers)
