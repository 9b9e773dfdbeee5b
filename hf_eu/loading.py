"""Resolve the models of a composite from hub ids, local folders or loaded models, and check them.

A target, draft or proxy may be given as a hub id, a local folder or an already loaded
`PreTrainedModel` (or a peft `PeftModel`). Loading goes through `AutoModelForCausalLM` with
`use_safetensors=True` and without remote code, after `check_safetensors_only` made sure no pickle
would be read (transformers unpickles a `.bin` shard that a `model.safetensors.index.json` names, even
with `use_safetensors=True`). The other checks here refuse what would give silently wrong
uncertainty: a different output vocabulary or a different tokenizer than the target's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import cached_file

from ._atomic import recover_folder

__all__ = [
    "load_causal_lm",
    "check_safetensors_only",
    "output_vocab_size",
    "check_same_vocabulary",
    "load_local_tokenizer",
    "check_same_tokenizer",
    "is_composite",
    "drop_loader_bookkeeping",
    "check_part_tokenizers",
    "composite_folder",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_SAFETENSORS_INDEX = "model.safetensors.index.json"


def _unsafe_fix(role: str, path: str) -> str:
    return (f"hf_eu reads safetensors only and never unpickles weights. Convert the {role}'s weights to "
            f"safetensors (load it once yourself and `model.save_pretrained(folder, safe_serialization=True)`, "
            f"or the safetensors convert tool), then pass that folder; {path} was not opened.")


def _check_index(index_path: str, role: str) -> None:
    try:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map") or {}
        shards = sorted(set(map(str, weight_map.values())))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"The {role}'s weight index {index_path} is unreadable ({error}); re-save the model "
                         "with `save_pretrained(folder, safe_serialization=True)`.") from error
    unsafe = [shard for shard in shards if not shard.endswith(".safetensors")]
    if unsafe:
        raise ValueError(f"The {role}'s weight index {index_path} names the non-safetensors shard {unsafe[0]!r}"
                         f"{f' (and {len(unsafe) - 1} more)' if len(unsafe) > 1 else ''}, which transformers would "
                         f"unpickle. " + _unsafe_fix(role, unsafe[0]))


def check_safetensors_only(reference: Any, role: str, *, revision: str | None = None, subfolder: str = "") -> None:
    """Raise ValueError (naming the file and the fix) if loading `reference` would unpickle weights.

    A local folder is refused when its `model.safetensors.index.json` names any shard that is not a
    `.safetensors` file, when it has pickled weights (`.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`) but no
    safetensors file, or when it is a peft adapter whose only weights are `adapter_model.bin`. For a hub
    id the index is checked when the hub (or the local cache) provides one; nothing else is downloaded.
    Loaded models and other references pass unchecked.
    """
    if not isinstance(reference, (str, os.PathLike)):
        return
    folder = os.path.join(os.fspath(reference), subfolder) if subfolder else os.fspath(reference)
    if os.path.isdir(folder):
        index = os.path.join(folder, _SAFETENSORS_INDEX)
        if os.path.isfile(index):
            _check_index(index, role)
        names = sorted(os.listdir(folder))
        pickled = [n for n in names if n.endswith(_PICKLE_SUFFIXES) and os.path.isfile(os.path.join(folder, n))]
        has_safetensors = any(n.endswith(".safetensors") for n in names)
        adapter_pickle = (os.path.isfile(os.path.join(folder, "adapter_config.json"))
                          and "adapter_model.bin" in names and "adapter_model.safetensors" not in names)
        if (pickled and not has_safetensors) or adapter_pickle:
            name = "adapter_model.bin" if adapter_pickle else pickled[0]
            path = os.path.join(folder, name)
            raise ValueError(f"The {role} in {folder} has its weights only in the pickle file {path}. "
                             + _unsafe_fix(role, path))
        return
    if os.path.exists(folder):
        return  # a file: transformers reports it
    try:
        index = cached_file(os.fspath(reference), _SAFETENSORS_INDEX, revision=revision, subfolder=subfolder,
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return  # not reachable: loading reports it
    if index is not None:
        _check_index(index, role)


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
    if kwargs.get("use_safetensors") is False:
        raise ValueError(f"`use_safetensors=False` was passed for the {role}, but hf_eu reads safetensors only; "
                         "drop the argument (and convert pickled weights to safetensors).")
    kwargs["use_safetensors"] = True
    kwargs.setdefault("trust_remote_code", False)
    if not kwargs.get("gguf_file"):  # a GGUF file is read by its own parser, never unpickled
        check_safetensors_only(reference, role, revision=kwargs.get("revision"), subfolder=kwargs.get("subfolder") or "")
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
    """True if `reference` (folder or hub id) holds a saved hf_eu composite (config.json with model_type 'hf_eu').

    A local composite whose replacement was killed halfway (nothing at the path, the previous folder
    still set aside beside it) is restored first (`hf_eu._atomic.recover_folder`).
    """
    if not isinstance(reference, (str, os.PathLike)):
        return False
    local = os.path.abspath(os.fspath(reference))
    if not os.path.lexists(local) and os.path.isdir(os.path.dirname(local)):
        recover_folder(local)
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


def drop_loader_bookkeeping(kwargs: dict) -> None:
    """Remove what `AutoModelForCausalLM` and `pipeline` add for themselves; refuse remote code."""
    for key in ("_from_auto", "_from_pipeline", "adapter_kwargs"):
        kwargs.pop(key, None)
    if kwargs.pop("trust_remote_code", None):
        raise ValueError("`trust_remote_code=True` was passed, but hf_eu loads composites and their parts without "
                         "remote code; drop the argument (a target that needs remote code: load it yourself and pass "
                         "it as `target=`).")


def check_part_tokenizers(target: Any, drafts: Sequence[Any], proxy: Any) -> None:
    """Compare tokenizers stored beside the models in local folders (skipped where none is available)."""
    target_tokenizer = load_local_tokenizer(target)
    if target_tokenizer is None:
        return
    others = {f"draft {k}": load_local_tokenizer(d) for k, d in enumerate(drafts)}
    if proxy is not None:
        others["proxy"] = load_local_tokenizer(proxy)
    check_same_tokenizer(target_tokenizer, others)


def composite_folder(reference: Any, revision: str | None) -> str:
    if os.path.isdir(reference):
        return os.fspath(reference)
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=str(reference), revision=revision)
