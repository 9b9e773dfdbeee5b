"""Draft models cut from the target itself: its embedding, first layers, final norm and output head.

`truncated_copy(model, num_layers)` builds a new model of the target's class with only its first
`num_layers` decoder layers, copying those weights. Such copies share the target's tokenizer and
vocabulary by construction, so they are valid drafts before any training, and they are the starting
point that training (DDD, OSD) fine-tunes. The copy's config records `hf_eu_target_layers`, so a
saved composite can store only a LoRA adapter trained on it and rebuild the base from the target. Works for decoder models whose base model keeps its blocks
in `.layers` (Llama, Mistral, Qwen, Gemma, …) or `.h` (GPT-2 style).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM

__all__ = ["truncated_copy"]


def _num_layers_key(config) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise ValueError(f"Cannot tell how many layers a {type(config).__name__} has; truncate it by hand.")


def truncated_copy(model: nn.Module, num_layers: int, dtype: torch.dtype | None = None,
                   share_embeddings: bool = False) -> nn.Module:
    """A copy of `model` keeping only its first `num_layers` decoder layers (plus embedding, norm, head).

    Args:
        model: a loaded causal LM (`PreTrainedModel`).
        num_layers: layers to keep, in [1, number of layers of `model`].
        dtype: dtype of the copy (default: the model's).
        share_embeddings: use `model`'s own input embedding and output head modules instead of copies
            (saves their memory; only for inference, or training that keeps them frozen).
    """
    config = copy.deepcopy(model.config)
    key = _num_layers_key(config)
    total = getattr(config, key)
    if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"`num_layers` must be an integer in [1, {total}] for this model, got {num_layers!r}.")
    setattr(config, key, num_layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=dtype or model.dtype)
    kept = {name: tensor for name, tensor in model.state_dict().items() if _layer_index(name) < num_layers}
    missing, unexpected = draft.load_state_dict(kept, strict=False)
    missing = [name for name in missing if name not in _tied_names(draft)]
    if missing or unexpected:
        raise ValueError(f"Truncating {type(model).__name__} left weights unmatched (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); this architecture is not supported by truncated_copy.")
    if share_embeddings and (dtype is None or dtype == model.dtype):
        draft.set_input_embeddings(model.get_input_embeddings())
        draft.set_output_embeddings(model.get_output_embeddings())
    draft.generation_config = copy.deepcopy(model.generation_config)
    # Marks the copy so a composite can store an adapter on it without its weights (see serialization).
    draft.config.hf_eu_target_layers = num_layers
    return draft.eval()


def _layer_index(name: str) -> int:
    """The decoder layer a parameter belongs to (-1 for embedding, norm, head)."""
    parts = name.split(".")
    for marker in ("layers", "h"):
        if marker in parts:
            position = parts.index(marker) + 1
            if position < len(parts) and parts[position].isdigit():
                return int(parts[position])
    return -1


def _tied_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if not isinstance(tied, dict) else tied.keys())
