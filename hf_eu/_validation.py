"""Checks of what users pass to hf_eu's public entry points, run once per call before any model runs.

`generate`, `estimate_uncertainty`, `score_tokens` / `score_tokens_many`, the wrapper's constructor and the
streaming scorer share these functions, so one input gets one rule and one message everywhere. Every error
is a `TypeError` (wrong kind of value) or a `ValueError` (right kind, wrong value) that names the argument,
what was received and the fix. The checks read only shapes, dtypes and one min/max of the token ids: no
per-token cost. `check_finite_scores` is the one check made after models ran: it names the part whose
outputs made the uncertainty non-finite.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

__all__ = ["check_chunk_size", "check_draft_index", "check_causal_lm", "check_token_inputs", "check_prompt_length",
           "warn_beyond_context", "context_length", "check_finite_scores"]

logger = logging.get_logger("hf_eu")

_CONTEXT_WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models already warned about, once each


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_chunk_size(chunk_size: Any) -> None:
    """`chunk_size` must be None (automatic) or an integer ≥ 1: the constructor's, the config's and scoring's rule."""
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be None (derived from the memory budget) or an integer ≥ 1, got "
                         f"{chunk_size!r} ({type(chunk_size).__name__}); pass a positive number of positions per "
                         "chunk or leave it out.")


def check_draft_index(assistant_draft: Any, num_drafts: int) -> None:
    """`assistant_draft` must be an int index of a draft; a bool (an int subclass in Python) is refused."""
    if not _is_int(assistant_draft):
        raise TypeError(f"`assistant_draft` must be the int index of a draft in [0, {num_drafts - 1}], got "
                        f"{assistant_draft!r} ({type(assistant_draft).__name__}); pass e.g. `assistant_draft=0` "
                        "for the first draft, or leave it None to decode without one.")
    if not 0 <= assistant_draft < num_drafts:
        raise ValueError(f"`assistant_draft` must be a draft index in [0, {num_drafts - 1}], got {assistant_draft!r}.")


def check_causal_lm(model: nn.Module, role: str) -> None:
    """Refuse a model that is not a causal LM (a bare `LlamaModel`, a masked LM such as `BertForMaskedLM`)."""
    generates = callable(getattr(model, "generate", None))
    can_generate = getattr(model, "can_generate", None)
    if generates and callable(can_generate):
        generates = bool(can_generate())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else True
    if not generates or head is None:
        name = type(model).__name__
        raise TypeError(f"The {role} is a {name}, which is not a causal language model (it cannot `generate` or has "
                        "no language-model head), so hf_eu cannot score tokens with it. Load the causal-LM class of "
                        f"the same checkpoint instead, e.g. `AutoModelForCausalLM.from_pretrained(...)` "
                        f"({name.replace('Model', 'ForCausalLM') if name.endswith('Model') else 'a *ForCausalLM'} "
                        "rather than a base model or a masked LM).")


def check_prompt_length(prompt_length: Any, seq_len: int | None = None) -> None:
    """`prompt_length` must be an int in [1, seq_len - 1]: the leading columns not scored, at least one scored
    (the range is checked only when `seq_len` is given)."""
    if not _is_int(prompt_length):
        raise TypeError(f"`prompt_length` must be an int (the number of leading columns not scored), got "
                        f"{prompt_length!r} ({type(prompt_length).__name__}); pass e.g. `int(prompt_length)`.")
    if seq_len is not None and not 1 <= prompt_length < seq_len:
        raise ValueError(
            f"`prompt_length` must be in [1, seq_len - 1] = [1, {seq_len - 1}] so at least one token is scored, "
            f"got {prompt_length}. Pass sequences that contain new tokens after the prompt."
        )


def _check_ids_tensor(input_ids: Any, name: str) -> None:
    if not torch.is_tensor(input_ids):
        raise TypeError(f"`{name}` must be a torch.Tensor of token ids of shape (batch_size, seq_len), got "
                        f"{type(input_ids).__name__}; use `tokenizer(texts, return_tensors='pt')` or "
                        "`torch.tensor([ids])`.")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer token ids, got dtype {input_ids.dtype}; pass `{name}.long()` "
                        "(token ids, not embeddings: those go in `inputs_embeds`).")
    if input_ids.dim() != 2:
        raise ValueError(f"`{name}` must have shape (batch_size, seq_len), got {tuple(input_ids.shape)}; add the "
                         f"batch dimension with `{name}[None]` for one sequence.")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"`{name}` is empty, shape {tuple(input_ids.shape)}: pass at least one sequence of at least "
                         "one token (a tokenized prompt).")


def _check_vocabulary(input_ids: torch.Tensor, vocab_size: int, name: str) -> None:
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low >= 0 and high < vocab_size:
        return
    row, column = ((input_ids < 0) | (input_ids >= vocab_size)).nonzero()[0].tolist()
    raise ValueError(f"`{name}` holds the id {int(input_ids[row, column])} (row {row}, column {column}), outside the "
                     f"models' vocabulary [0, {vocab_size}); tokenize with the target's own tokenizer.")


def _check_mask(mask: Any, input_ids: torch.Tensor, name: str, shape: tuple[int, int]) -> None:
    if mask is None:
        return
    if not torch.is_tensor(mask):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {shape}, got {type(mask).__name__}; pass the "
                        "tokenizer's `attention_mask` (`return_tensors='pt'`) or `torch.tensor(mask)`.")
    if tuple(mask.shape) != shape:
        what = "batch size" if mask.dim() == 2 and mask.shape[0] != shape[0] else "shape"
        raise ValueError(f"`{name}` has {what} {tuple(mask.shape)} but must have shape {shape} to match `input_ids` "
                         f"{tuple(input_ids.shape)}; pass the mask built with these ids.")


def check_token_inputs(input_ids: Any, attention_mask: Any = None, *, vocab_size: int | None,
                       prompt_length: Any = None, uncertainty_mask: Any = None, name: str = "input_ids") -> None:
    """Check token ids `(batch_size, seq_len)`, their masks and `prompt_length`; raise naming what is wrong.

    Args:
        input_ids: must be a 2-D integer tensor with at least one row and one column, its ids in `[0, vocab_size)`.
        attention_mask: None or a tensor of the same shape.
        vocab_size: the models' output vocabulary (None skips the id range check).
        prompt_length: None (not an argument of the caller) or an int in [1, seq_len - 1].
        uncertainty_mask: None or a tensor of shape `(batch_size, seq_len - prompt_length)`.
        name: the argument's name in messages (`inputs` or `input_ids`).
    """
    _check_ids_tensor(input_ids, name)
    if vocab_size is not None:
        _check_vocabulary(input_ids, vocab_size, name)
    _check_mask(attention_mask, input_ids, "attention_mask", tuple(input_ids.shape))
    if prompt_length is not None:
        check_prompt_length(prompt_length, input_ids.shape[1])
        if uncertainty_mask is not None:
            scored = (input_ids.shape[0], input_ids.shape[1] - prompt_length)
            _check_mask(uncertainty_mask, input_ids, "uncertainty_mask", scored)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence `model`'s config says it handles (`max_position_embeddings`), or None if it names none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    return limit if _is_int(limit) and limit > 0 else None


_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")  # GPT-2/BigCode/GPT-J, OPT, BERT-style names


def _learned_positions(model: nn.Module) -> bool:
    """Whether `model` looks up absolute positions in a learned table (an `nn.Embedding` named like one)."""
    return any(isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES
               for name, module in model.named_modules())


def warn_beyond_context(models: Mapping[str, nn.Module], length: int) -> None:
    """Warn once per model when `length` positions exceed its context: its predictions there (and so the EU) are
    unreliable. A model with learned position embeddings cannot go past them: refused with a `ValueError`."""
    for role, model in models.items():
        limit = context_length(model)
        if limit is None or length <= limit:
            continue
        if _learned_positions(model):  # a position table has no row past `limit`: torch would fail with an index error
            raise ValueError(f"The {role} ({type(model).__name__}) has learned position embeddings for {limit} "
                             f"positions (config.max_position_embeddings) and cannot score sequences of {length}. "
                             "Shorten the prompt or `max_new_tokens` so prompt + answer fit in its context.")
        if model in _CONTEXT_WARNED:
            continue
        _CONTEXT_WARNED.add(model)
        logger.warning(f"The {role} ({type(model).__name__}) has a context of {limit} positions (config."
                       f"max_position_embeddings) but is scoring sequences of {length}: its predictions past position "
                       f"{limit} are outside what it was trained on, so the uncertainty there is unreliable. Shorten "
                       "the prompt or `max_new_tokens`, or use models with a longer context. (Warned once per model.)")


def check_finite_scores(score: torch.Tensor, parts: Callable[[], Mapping[str, torch.Tensor | None]],
                        estimator: str) -> None:
    """Raise ValueError naming the part whose outputs are NaN or +inf when `score` is not all finite.

    Divergences are finite by construction for −inf log-probs (`divergences._LOG_FLOOR`); what remains is NaN
    (NaN weights, +inf logits from a float16 overflow), which no cap can turn into a meaningful value.

    Args:
        score: `(N,)` an estimator's scores at one chunk.
        parts: returns `{part name: what it produced at these positions}` (log-probs, logits or features); called
            only when a score is not finite, and looked through in order. None entries are skipped.
        estimator: the estimator's name, named when every part is finite (then the estimator made the NaN).
    """
    if bool(torch.isfinite(score).all()):
        return
    bad = int((~torch.isfinite(score)).sum())
    for role, values in parts().items():
        if values is not None and (torch.isnan(values) | torch.isposinf(values)).any():
            raise ValueError(
                f"The {role} produced NaN or +inf values (NaN weights, or logits that overflowed), which made the "
                f"uncertainty of {bad} of {score.numel()} scored positions non-finite. Check the {role}'s weights "
                "for NaN (a damaged file or a diverged training run) and run it in float32 or bfloat16 (float16 "
                "logits overflow to inf).")
    raise ValueError(f"Estimator '{estimator}' returned non-finite uncertainty at {bad} of {score.numel()} positions "
                     "from finite model outputs; report it with the inputs, or pick another estimator.")
