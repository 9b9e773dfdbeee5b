"""EU-aware stopping: a `StoppingCriteria` that ends a row when its running uncertainty crosses a threshold.

`EUThresholdCriteria(eu_model, threshold, window=1, aggregate="mean", min_new_tokens=0)` scores each
new token with an `IncrementalScorer` (one KV cache per draft / proxy, one small forward each per
step) and stops row b once the mean (or max) EU of its last `window` new tokens exceeds `threshold`.
After `generate`, `stopped_for_uncertainty` `(batch,)` says which rows it stopped, `stop_step` at which
new token, and `uncertainty` holds the per-token EU it computed. The wrapper's `generate(...,
return_dict_in_generate=True)` copies the flags into `out.stopped_for_uncertainty`.

The stop comes *after* the token that crossed the threshold was generated: that token is part of the
output (transformers asks the criteria once a token is appended). Rows that end with their EOS token
are not counted as stopped for uncertainty, even if the EOS token itself crosses the threshold.

Works at batch > 1 with left padding, with greedy and sampled decoding (and assisted decoding, at
batch 1, where several tokens arrive at once and a stop takes effect after the whole accepted run).
Not for beam search, which reorders rows every step (a clear error). At its first call in a `generate`
the criterion takes `input_ids[:, :-1]` as the prompt, with the attention mask given to
`prepare(attention_mask)` (the wrapper's `generate` calls it), else 0 on each row's leading run of
the target's `pad_token_id` (left padding). When you reuse one criterion across calls of the
*target's* `generate`, call `prepare(...)` before each one.

Recipe, abstention in a chat loop (see `examples/abstain_chat.py`):

    criteria = EUThresholdCriteria(model, threshold=1.5, window=4)
    out = model.generate(**inputs, stopping_criteria=[criteria], return_dict_in_generate=True)
    reply = "I am not sure." if out.stopped_for_uncertainty[0] else tokenizer.decode(...)
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from transformers import StoppingCriteria

from .aggregation import aggregate_uncertainty
from .incremental import IncrementalScorer

__all__ = ["EUThresholdCriteria", "AGGREGATES", "prepare_eu_criteria", "stopped_for_uncertainty"]

AGGREGATES = ("mean", "max")


class EUThresholdCriteria(StoppingCriteria):
    """Stop a row once the EU of its last `window` new tokens, aggregated, exceeds `threshold`.

    Args:
        eu_model: the `UncertaintyAwareModelForCausalLM` whose drafts/proxy score the tokens; its target
            must be the model that generates.
        threshold: finite, ≥ 0, in nats: a row stops when the aggregate is strictly above it.
        window: number of most recent new tokens aggregated (integer ≥ 1); fewer at the start.
        aggregate: "mean" or "max" over the window.
        min_new_tokens: never stop before this many new tokens (integer ≥ 0).
        estimator: registered estimator name; default: the composite's.
        eos_token_id: id(s) ending a row; default: the target's `generation_config.eos_token_id`.

    Attributes (after / during `generate`):
        stopped_for_uncertainty: `(batch_size,)` bool, True for rows this criterion stopped.
        stop_step: `(batch_size,)` long, index of the new token at which a row stopped, -1 if it did not.
        uncertainty: `(batch_size, num_new_tokens)` float32, the EU of every new token scored so far.
    """

    def __init__(self, eu_model: Any, threshold: float, window: int = 1, aggregate: str = "mean",
                 min_new_tokens: int = 0, *, estimator: str | None = None, eos_token_id: Any = None):
        _check_arguments(threshold, window, aggregate, min_new_tokens)
        self.threshold = float(threshold)
        self.window = window
        self.aggregate = aggregate
        self.min_new_tokens = min_new_tokens
        self.scorer = IncrementalScorer(eu_model, estimator=estimator)
        config = eu_model.target.generation_config
        self.eos_token_id = _ids(eos_token_id if eos_token_id is not None else config.eos_token_id)
        self.pad_token_id = config.pad_token_id
        self._prompt_mask: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None  # (B, L) the input_ids of the last call
        self._done = torch.zeros(0, dtype=torch.bool)  # (B,) rows that ended (EOS) or fired
        self.stopped_for_uncertainty = torch.zeros(0, dtype=torch.bool)
        self.stop_step = torch.zeros(0, dtype=torch.long)
        self.uncertainty = torch.zeros(0, 0)

    def prepare(self, attention_mask: torch.Tensor | None = None) -> None:
        """Start afresh at the next call, with the prompt's attention mask `(batch_size, prompt_len)` if given.

        The wrapper's `generate` calls it. Call it yourself before each `target.generate(...)` that reuses
        this criterion: a new prompt that extends the last output (a chat history) would otherwise be
        taken for the continuation of the last generation.
        """
        self._prompt_mask = None if attention_mask is None else attention_mask.detach().long().cpu()
        self._seen = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs) -> torch.BoolTensor:
        device = input_ids.device
        new_tokens = self._advance(input_ids.detach().cpu())  # (B, k): k = 1, more with assisted decoding
        for column in new_tokens.T:
            self._observe(column)
        return self.stopped_for_uncertainty.to(device)

    def _advance(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a new generation or continue this one; return the tokens not seen yet."""
        seen = self._seen
        continues = (seen is not None and seen.shape[0] == input_ids.shape[0] and input_ids.shape[1] > seen.shape[1]
                     and torch.equal(input_ids[:, : seen.shape[1]], seen))
        if not continues:
            if seen is not None and seen.shape == input_ids[:, :-1].shape and seen.shape[1] > 0:
                raise ValueError(
                    "EUThresholdCriteria saw the rows change under it (beam search reorders them), which it does not "
                    "support: use greedy or sampling. If this is a new generate call whose prompt happens to be as long "
                    "as the last output, call `criteria.prepare(attention_mask)` before it."
                )
            self._start(input_ids[:, :-1])
            seen = self._seen
        self._seen = input_ids
        return input_ids[:, seen.shape[1]:]  # (B, k)

    def _start(self, prompt_ids: torch.Tensor) -> None:
        batch_size = prompt_ids.shape[0]
        mask = self._prompt_mask
        if mask is not None and mask.shape != prompt_ids.shape:
            rows = mask.shape[0]
            if batch_size % rows or mask.shape[1] != prompt_ids.shape[1]:
                raise ValueError(f"The attention mask given to `prepare` has shape {tuple(mask.shape)} but generate's "
                                 f"prompt has {tuple(prompt_ids.shape)}; pass the mask of the same `input_ids`.")
            mask = mask.repeat_interleave(batch_size // rows, dim=0)  # (B, P): num_return_sequences copies
        if mask is None:
            mask = _left_padding_mask(prompt_ids, self.pad_token_id)
        self._prompt_mask = None  # used once
        self.scorer.start(prompt_ids, mask)
        self._seen = prompt_ids
        self._done = torch.zeros(batch_size, dtype=torch.bool)
        self.stopped_for_uncertainty = torch.zeros(batch_size, dtype=torch.bool)
        self.stop_step = torch.full((batch_size,), -1, dtype=torch.long)
        self.uncertainty = torch.zeros(batch_size, 0)

    def _observe(self, token_ids: torch.Tensor) -> None:
        """Score one new token per row (B,) and update which rows stop."""
        eu = self.scorer.step(token_ids).score.float().cpu()  # (B,)
        self.uncertainty = torch.cat([self.uncertainty, eu[:, None]], dim=1)  # (B, T)
        num_new = self.uncertainty.shape[1]
        recent = self.uncertainty[:, -self.window:]  # (B, ≤ window)
        running = aggregate_uncertainty(recent, None, self.aggregate)  # (B,)
        fires = (running > self.threshold) & ~self._done & (num_new >= self.min_new_tokens)
        is_eos = torch.isin(token_ids, self.eos_token_id)
        stops = fires & ~is_eos
        self.stopped_for_uncertainty |= stops
        self.stop_step[stops] = num_new - 1
        self._done |= fires | is_eos


def prepare_eu_criteria(generate_kwargs: dict, input_ids: torch.Tensor | None,
                        generation_config: Any) -> list[EUThresholdCriteria]:
    """The `EUThresholdCriteria` among `generate_kwargs["stopping_criteria"]`, each prepared for this call.

    Each gets the prompt's attention mask (all ones when none is given, as the post-hoc pass assumes).
    Beam search is refused: it reorders rows every step.
    """
    criteria = [c for c in (generate_kwargs.get("stopping_criteria") or []) if isinstance(c, EUThresholdCriteria)]
    if not criteria:
        return criteria
    num_beams = generate_kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1
    if num_beams > 1:
        raise ValueError(f"EUThresholdCriteria does not support beam search (got num_beams={num_beams}); "
                         "use greedy decoding or sampling (num_beams=1).")
    attention_mask = generate_kwargs.get("attention_mask")
    if attention_mask is None and input_ids is not None:
        attention_mask = torch.ones_like(input_ids)
    for criterion in criteria:
        criterion.prepare(attention_mask)
    return criteria


def stopped_for_uncertainty(criteria: list[EUThresholdCriteria], uncertainty_mask: torch.Tensor) -> torch.Tensor:
    """`(rows,)` bool: rows that some criterion stopped at a token that is a real generated token.

    `uncertainty_mask` `(rows, new_tokens)` is the output's; a row that had already ended by another
    criterion (its later columns are padding, False in the mask) is not counted.
    """
    rows = uncertainty_mask.shape[0]
    stopped = torch.zeros(rows, dtype=torch.bool)
    mask = uncertainty_mask.bool().cpu()
    for criterion in criteria:
        if criterion.stopped_for_uncertainty.shape != (rows,):
            continue  # not called in this generate (e.g. no step ran)
        step = criterion.stop_step.clamp(0, mask.shape[1] - 1)  # (rows,)
        real = mask.gather(1, step[:, None]).squeeze(1)  # (rows,)
        stopped |= criterion.stopped_for_uncertainty & real
    return stopped


def _check_arguments(threshold: Any, window: Any, aggregate: Any, min_new_tokens: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"`threshold` must be a finite number ≥ 0 (nats of EU), got {threshold!r}; "
                         "try a value near the EU your model gives uncertain tokens, e.g. 1.0.")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"`window` must be an integer ≥ 1 (number of recent tokens aggregated), got {window!r}.")
    if aggregate not in AGGREGATES:
        raise ValueError(f"`aggregate` must be one of {AGGREGATES}, got {aggregate!r}.")
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"`min_new_tokens` must be an integer ≥ 0, got {min_new_tokens!r}.")


def _ids(token_id: Any) -> torch.Tensor:
    if token_id is None:
        return torch.empty(0, dtype=torch.long)
    return torch.as_tensor(token_id, dtype=torch.long).flatten()


def _left_padding_mask(prompt_ids: torch.Tensor, pad_token_id: Any) -> torch.Tensor:
    """Attention mask `(B, P)` with 0 on each row's leading run of `pad_token_id` (left padding)."""
    if pad_token_id is None:
        return torch.ones_like(prompt_ids)
    is_pad = torch.isin(prompt_ids, _ids(pad_token_id)).long()  # (B, P)
    leading_pad = is_pad.cumprod(-1).bool()  # (B, P): pad from the start up to here
    return (~leading_pad).long()
