"""Helpers of `UncertaintyAwareModelForCausalLM.generate`: which tokens are real, how generate will decode,
prompt padding checks, and the target API the wrapper hands through."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.generation import GenerationMode

__all__ = ["generated_token_mask", "decodes_token_by_token", "full_attention_mask", "check_left_padded", "TARGET_API",
           "target_attribute"]


def check_left_padded(mask: torch.Tensor | None, name: str) -> None:
    """Refuse right-padded prompts: padding between a prompt and its answer gives wrong tokens' EU."""
    if mask is None or not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[1] < 2:
        return
    ends_early = (mask[:, :-1] != 0) & (mask[:, 1:] == 0)  # a real token followed by padding
    if ends_early.any():
        rows = ends_early.any(-1).nonzero().flatten().tolist()
        raise ValueError(f"`{name}` is right-padded in rows {rows[:8]}: padding would sit between the prompt and the "
                         "answer. Pad prompts on the left (`tokenizer.padding_side = 'left'`, as "
                         "`hf_eu.load_default()` returns it).")


# Attributes of the target's model API that the wrapper hands through (see `__getattr__`).
TARGET_API = frozenset({
    "get_input_embeddings", "get_output_embeddings", "set_input_embeddings", "tie_weights", "resize_token_embeddings",
    "gradient_checkpointing_enable", "gradient_checkpointing_disable", "is_gradient_checkpointing",
    "enable_input_require_grads", "get_memory_footprint", "num_parameters", "main_input_name", "name_or_path",
    "hf_device_map", "add_model_tags", "model_tags", "get_decoder", "base_model_prefix", "warnings_issued",
    "supports_gradient_checkpointing", "prepare_inputs_for_generation", "loss_function", "vocab_size",
    "base_model",  # the backbone: TRL's fused LM head (SFTTrainer) runs it, then `get_output_embeddings`
    "loss_type",  # Trainer counts `num_items_in_batch` over shifted labels only for a causal-LM loss
    # `PreTrainedModel` methods the wrapper inherits that must act on the target, not on the composite:
    "activation_checkpointing_enable", "activation_checkpointing_disable", "is_activation_checkpointing",
    "disable_input_require_grads", "get_position_embeddings", "resize_position_embeddings", "set_output_embeddings",
    "set_decoder", "get_encoder", "dequantize", "set_attn_implementation", "warn_if_padding_and_no_attention_mask",
    "add_adapter", "load_adapter", "set_adapter", "enable_adapters", "disable_adapters", "active_adapters",
    "delete_adapter", "get_adapter_state_dict",
})


def full_attention_mask(attention_mask, sequences: torch.Tensor, prompt_length: int, batch_size: int) -> torch.Tensor:
    """`(R, P + T)` mask of generated sequences: the prompt's (rows repeated for num_return_sequences), then ones."""
    rows = sequences.shape[0]
    prompt_mask = attention_mask if attention_mask is not None else torch.ones(batch_size, prompt_length)
    prompt_mask = prompt_mask.to(sequences.device).long().repeat_interleave(rows // batch_size, dim=0)  # (R, P)
    return torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_length:])], dim=1)  # (R, P + T)


def decodes_token_by_token(kwargs: dict, generation_config) -> bool:
    """Whether `generate` will call the target once per new token on every row (greedy or sampling, no
    assistant, no beams): then the recorded forward calls map one to one onto the new tokens."""
    if any(kwargs.get(name) is not None for name in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate")):
        return False
    config = copy.deepcopy(kwargs.get("generation_config") or generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k) and k != "generation_config"})
    try:
        mode = config.get_generation_mode()
    except (ValueError, TypeError):
        return False
    return mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE) and getattr(config, "dola_layers", None) is None


def generated_token_mask(new_tokens: torch.Tensor, eos_token_id: Any, pad_token_id: Any = None) -> torch.Tensor:
    """Bool mask `(batch, new_tokens)`: True up to and including the first EOS of each row.

    Tokens after the first EOS are the padding generate appends to finished rows. When the pad token
    is not an EOS token, a trailing run of pad tokens (rows stopped by other stopping criteria) is
    also masked out.
    """
    eos_ids = _as_id_tensor(eos_token_id, new_tokens.device)
    valid = torch.ones_like(new_tokens, dtype=torch.bool)
    if eos_ids.numel():
        is_eos = torch.isin(new_tokens, eos_ids).long()  # (B, T)
        valid = (is_eos.cumsum(-1) - is_eos) == 0
    pad_ids = _as_id_tensor(pad_token_id, new_tokens.device)
    if pad_ids.numel() and not torch.isin(pad_ids, eos_ids).all():
        is_pad = torch.isin(new_tokens, pad_ids)
        trailing_pad = is_pad.flip(-1).long().cumprod(-1).flip(-1).bool()  # (B, T): pad from here to the end
        valid &= ~trailing_pad
    return valid


def _as_id_tensor(token_id: Any, device: torch.device) -> torch.Tensor:
    if token_id is None:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.as_tensor(token_id, dtype=torch.long, device=device).flatten()


def target_attribute(name: str) -> property:
    """A property reading (and setting) `name` on the wrapped target."""

    def get(self):
        target = self.__dict__["_modules"].get("target")
        if target is None:
            raise AttributeError(name)
        return getattr(target, name)

    def set(self, value) -> None:
        target = self.__dict__["_modules"].get("target")
        if target is not None:  # `PreTrainedModel.__init__` sets `name_or_path` and `loss_type` before it exists
            setattr(target, name, value)

    return property(get, set, doc=f"The target's `{name}`.")
