"""Teacher-forced scoring of token sequences by drafts, proxy and target, in bounded memory.

`score_tokens` runs each model the estimator needs over given sequences (prompt + answer) and turns
their log-probabilities into per-token uncertainty. It never holds logits for the whole sequence:
the prompt is pre-filled into each model's KV cache (logits of its last position only), then the
answer is fed in chunks of `chunk_size` positions, so the largest tensor is
`(num_models, batch, chunk_size, vocab)` whatever the sequence length.

Causal shift, stated once: logits at position i predict token i + 1, so the new tokens
`input_ids[:, prompt_length:]` are scored from logits at positions `prompt_length - 1 … L - 2`.

This module does not decode: transformers' `generate` does that; this runs after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .estimators import Estimator
from .loading import output_vocab_size
from .outputs import UncertaintyOutput

__all__ = ["score_tokens", "DEFAULT_MAX_CHUNK_ELEMENTS"]

# Budget for one chunk of log-probs across all models: 2**25 float32 = 128 MiB.
DEFAULT_MAX_CHUNK_ELEMENTS = 2**25


def _logps(logits: torch.Tensor) -> torch.Tensor:
    """Raw logits (B, C, V) in any dtype -> float32 log-probs flattened to (B*C, V)."""
    return logits.float().log_softmax(-1).flatten(0, 1)  # (B*C, V)


class _ChunkedForward:
    """One model fed a sequence chunk by chunk through its own KV cache."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor):
        self.model = model
        device = model.device if hasattr(model, "device") else input_ids.device
        self.input_ids = input_ids.to(device)
        self.attention_mask = attention_mask.to(device)
        self.position_ids = position_ids.to(device)
        self.cache = None

    def _forward(self, start: int, end: int, **kwargs) -> torch.Tensor:
        output = self.model(
            input_ids=self.input_ids[:, start:end],
            attention_mask=self.attention_mask[:, :end],
            position_ids=self.position_ids[:, start:end],
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        self.cache = output.past_key_values
        return output.logits

    def prefill(self, end: int) -> None:
        """Feed positions [0, end) into the cache, computing logits at the last position only."""
        if end > 0:
            self._forward(0, end, logits_to_keep=1)

    def logits(self, start: int, end: int) -> torch.Tensor:
        """Logits (B, end - start, V) at positions [start, end), which must follow what was fed."""
        return self._forward(start, end)


def _auto_chunk_size(num_models: int, batch_size: int, vocab_size: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, num_models * batch_size * vocab_size))


def score_tokens(
    estimator: Estimator,
    input_ids: torch.Tensor,
    prompt_length: int,
    *,
    drafts: Sequence[nn.Module],
    proxy: nn.Module | None,
    target: nn.Module,
    attention_mask: torch.Tensor | None = None,
    uncertainty_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> UncertaintyOutput:
    """Per-token uncertainty of `input_ids[:, prompt_length:]` given everything before each token.

    Args:
        estimator: a registered estimator (see `estimators.get_estimator`).
        input_ids: `(batch_size, seq_len)` token ids, prompt (left padding allowed) then answer.
        prompt_length: number of leading columns not scored (≥ 1; the first token has no prediction).
        drafts, proxy, target: the composite's models; only those the estimator needs are run.
        attention_mask: `(batch_size, seq_len)`, 0 on padding; None means no padding.
        uncertainty_mask: `(batch_size, seq_len - prompt_length)` bool of tokens to report; defaults to
            `attention_mask[:, prompt_length:]`. Scores are 0 where it is False.
        chunk_size: positions per chunk; None derives it from `max_chunk_elements`.
        max_chunk_elements: bound on the floats of one chunk of log-probs across all models.

    Returns:
        `UncertaintyOutput` whose tensors have shape `(batch_size, seq_len - prompt_length)`.
    """
    batch_size, seq_len = input_ids.shape
    if not 1 <= prompt_length < seq_len:
        raise ValueError(
            f"`prompt_length` must be in [1, seq_len - 1] = [1, {seq_len - 1}] so at least one token is scored, "
            f"got {prompt_length}. Pass sequences that contain new tokens after the prompt."
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be ≥ 1 or None, got {chunk_size}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if uncertainty_mask is None:
        uncertainty_mask = attention_mask[:, prompt_length:].bool()
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, L), as generate builds them

    roles = _select_models(estimator, drafts, proxy, target)
    # One runner per distinct model: the target may serve as reference and as target; run it once.
    runners = {id(m): _ChunkedForward(m, input_ids, attention_mask, position_ids) for ms in roles.values() for m in ms}
    vocab_size = output_vocab_size(next(iter(roles.values()))[0])
    chunk_size = chunk_size or _auto_chunk_size(len(runners), batch_size, vocab_size, max_chunk_elements)

    num_new = seq_len - prompt_length
    results: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for runner in runners.values():
            runner.prefill(prompt_length - 1)
        for start in range(prompt_length - 1, seq_len - 1, chunk_size):
            end = min(start + chunk_size, seq_len - 1)
            token_ids = input_ids[:, start + 1 : end + 1]  # (B, C): the tokens these logits predict
            output = estimator(**_chunk_logps(roles, runners, start, end), token_ids=token_ids.flatten())
            for name in ("score", "variance", "bias"):
                value = getattr(output, name)
                if value is not None:
                    column = start - (prompt_length - 1)
                    out = results.setdefault(name, torch.zeros(batch_size, num_new, dtype=torch.float32))
                    out[:, column : column + end - start] = value.view(batch_size, end - start).float().cpu()
    mask = uncertainty_mask.to(torch.bool).cpu()
    masked = {name: torch.where(mask, value, torch.zeros_like(value)) for name, value in results.items()}
    return UncertaintyOutput(
        epistemic_uncertainty=masked["score"],
        eu_variance=masked.get("variance"),
        eu_bias=masked.get("bias"),
        uncertainty_mask=mask,
    )


def _select_models(
    estimator: Estimator, drafts: Sequence[nn.Module], proxy: nn.Module | None, target: nn.Module
) -> dict[str, list[nn.Module]]:
    """The models to run, by role, for what `estimator` reads."""
    selected: dict[str, list[nn.Module]] = {}
    if "drafts" in estimator.inputs:
        selected["draft"] = list(drafts)
    if "reference" in estimator.inputs:
        selected["reference"] = [proxy if proxy is not None else target]
    if "target" in estimator.inputs:
        selected["target"] = [target]
    if not selected:
        raise ValueError(f"Estimator '{estimator.name}' reads no model output; nothing to score.")
    return selected


def _chunk_logps(
    roles: dict[str, list[nn.Module]], runners: dict[int, _ChunkedForward], start: int, end: int
) -> dict[str, torch.Tensor]:
    """Log-probs of every role's models at positions [start, end), as estimator arguments."""
    device = next(iter(runners.values())).input_ids.device  # combine on the first model's device
    logps = {key: _logps(runner.logits(start, end)).to(device) for key, runner in runners.items()}  # (B*C, V)
    arguments = {}
    for role, models in roles.items():
        per_model = [logps[id(m)] for m in models]
        arguments[f"{role}_logps"] = torch.stack(per_model) if role == "draft" else per_model[0]  # (K, N, V) | (N, V)
    return arguments
