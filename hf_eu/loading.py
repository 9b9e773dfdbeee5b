"""Resolve the models of a composite from hub ids, local folders or loaded models, and check them.

A target, draft or proxy may be given as a hub id, a local folder or an already loaded
`PreTrainedModel` (or a peft `PeftModel`). Loading goes through `AutoModelForCausalLM` with
`use_safetensors=True` and without remote code. The checks here refuse what would give silently wrong
uncertainty: a different output vocabulary or a different tokenizer than the target's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import cached_file

__all__ = [
    "load_causal_lm",
    "output_vocab_size",
    "check_same_vocabulary",
    "load_local_tokenizer",
    "check_same_tokenizer",
    "is_composite",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _is_loaded_model(obj: Any) -> bool:
    return isinstance(obj, PreTrainedModel) or (isinstance(obj, nn.Module) and hasattr(obj, "generate"))


def load_causal_lm(reference: Any, *, role: str, **kwargs) -> nn.Module:
    """Return `reference` if it is a loaded model, else load it with `AutoModelForCausalLM`.

    Args:
        reference: a hub id, a local folder (str or PathLike) or a loaded model.
        role: what the model is for ("target", "draft 0", "proxy"), used in error messages.
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, revision, …).
    """
    if _is_loaded_model(reference):
        return reference
    if not isinstance(reference, (str, os.PathLike)):
        raise TypeError(
            f"The {role} must be a hub id, a local folder or a loaded PreTrainedModel, got {type(reference).__name__}."
        )
    kwargs.setdefault("use_safetensors", True)
    kwargs.setdefault("trust_remote_code", False)
    try:
        return AutoModelForCausalLM.from_pretrained(reference, **kwargs)
    except OSError as error:
        raise ValueError(
            f"Could not load the {role} from {str(reference)!r}: {error}. Pass an existing local folder holding "
            "config.json and model.safetensors, a hub id you can reach, or a loaded model."
        ) from error


def output_vocab_size(model: nn.Module) -> int:
    """Number of logits the model produces per position (its output embedding rows)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_same_vocabulary(target: nn.Module, others: Mapping[str, nn.Module]) -> int:
    """Raise ValueError if any model's output vocabulary size differs from the target's; return it."""
    target_size = output_vocab_size(target)
    for role, model in others.items():
        size = output_vocab_size(model)
        if size != target_size:
            raise ValueError(
                f"The {role} has an output vocabulary of {size} tokens but the target has {target_size}. Drafts and "
                "proxy must share the target's tokenizer and vocabulary (as in speculative decoding); train or pick "
                "a model with the target's tokenizer, or resize its embeddings with `resize_token_embeddings("
                f"{target_size})`."
            )
    return target_size


def _local_folder(reference: Any) -> str | None:
    if isinstance(reference, (str, os.PathLike)) and os.path.isdir(reference):
        return os.fspath(reference)
    name = getattr(getattr(reference, "config", None), "_name_or_path", None)
    return name if name and os.path.isdir(name) else None


def load_local_tokenizer(reference: Any):
    """The tokenizer stored beside a model in a local folder, or None when there is none to compare."""
    folder = _local_folder(reference)
    if folder is None or not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(folder)


def check_same_tokenizer(target_tokenizer, others: Mapping[str, Any]) -> None:
    """Raise ValueError if a draft's or the proxy's tokenizer maps any token to another id than the target's."""
    if target_tokenizer is None:
        return
    target_vocab = target_tokenizer.get_vocab()
    for role, tokenizer in others.items():
        if tokenizer is None:
            continue
        vocab = tokenizer.get_vocab()
        if vocab != target_vocab:
            differing = sorted(set(vocab.items()) ^ set(target_vocab.items()), key=str)[:3]
            raise ValueError(
                f"The {role}'s tokenizer differs from the target's ({len(vocab)} vs {len(target_vocab)} tokens; "
                f"first differences: {differing}). Drafts and proxy must use the target's tokenizer; train them "
                "with it or pick models of the same family."
            )


def is_composite(reference: Any, revision: str | None = None) -> bool:
    """True if `reference` (folder or hub id) holds a saved hf_eu composite (config.json with model_type 'hf_eu')."""
    if not isinstance(reference, (str, os.PathLike)):
        return False
    try:
        path = cached_file(os.fspath(reference), "config.json", revision=revision,
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return False
    if path is None:
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle).get("model_type") == "hf_eu"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        # A corrupt config.json in a folder that has other composite files is still a composite:
        # `load_composite_config` reports the corruption with the fix.
        return os.path.isdir(os.path.join(os.fspath(reference), "drafts"))
