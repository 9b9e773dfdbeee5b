"""Per-token uncertainty while generating: each model the estimator needs keeps its own KV cache.

`IncrementalScorer` is the streaming counterpart of `scoring.score_tokens`. `start(input_ids,
attention_mask)` prefills the prompt into one KV cache per model and keeps each model's log-probs at
the last prompt position (they predict the first new token). Each `step(token_ids)` then scores the
new tokens from the stored log-probs (the distributions that predicted them) with the registry
estimator, and feeds the tokens to every model (one forward of one position each) to get the
distributions that predict the next token. Position ids come from the attention-mask cumsum, as in
`scoring.py` and transformers' `generate`, so the values equal the post-hoc teacher-forced pass's
within float tolerance.

Which models run is decided by `scoring.py`'s own selection: the drafts when the estimator reads
``"drafts"``; the proxy (or the target when the composite has no proxy) for ``"reference"``; the target
for ``"target"``; M perturbed copies of the target for ``"perturbed"`` (each run inside
`perturbation.apply(seed)`, weights restored after each forward); the student for ``"student"``. The
target is then run by the scorer itself, with its own cache, beside the target's own decoding: one
more target forward per token (M more for perturbed estimators). Capturing the target's logits from inside
`generate` instead is not done, because a `LogitsProcessor` sees the scores after temperature,
repetition penalty, top-k …, and a `StoppingCriteria` sees no logits at all, so the values would not be
the target's distribution that the post-hoc pass scores.

This module does not decode: transformers' `generate` does; the streamer (`streaming.py`) and the
stopping criterion (`stopping.py`) call this scorer from inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ._cache import cache_argument, output_cache
from ._validation import check_finite_scores, check_token_inputs, context_length, warn_beyond_context
from .eu_features import TargetFeatureRecorder
from .loading import output_vocab_size
from .estimators import Estimator, EstimatorOutput, get_estimator
from .scoring import _check_eu_head, _chunk_arguments, _part_names, _select_models

__all__ = ["IncrementalScorer"]


class _CachedModel:
    """One model (or one perturbed copy of it) advanced position by position through its own KV cache."""

    def __init__(self, model: nn.Module, perturbation: Any = None, seed: int | None = None,
                 recorder: TargetFeatureRecorder | None = None):
        self.model = model
        self.recorder = recorder  # records the target's features at each position it is fed (estimators reading them)
        self.device = model.device if hasattr(model, "device") else next(model.parameters()).device
        self.perturbation, self.seed = perturbation, seed
        self.cache = None
        self.last_output = None  # the output at the last position fed: it predicts the next token

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Feed `input_ids` (B, C) after what the cache holds; keep the output at the last position."""
        context = self.perturbation.apply(self.seed) if self.perturbation is not None else nullcontext()
        with context, self.recorder.recording() if self.recorder is not None else nullcontext():
            output = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                position_ids=position_ids.to(self.device),
                **cache_argument(self.model, self.cache),
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache = output_cache(output)
        factor_logits = getattr(output, "factor_logits", None)  # a Gaussian-distilled student's, (B, C, q, V)
        features = self.recorder.pop().map(lambda t: t[:, -1:]) if self.recorder is not None else None  # (B, 1, ·)
        self.last_output = SimpleNamespace(
            logits=output.logits[:, -1:],  # (B, 1, V)
            factor_logits=None if factor_logits is None else factor_logits[:, -1:],  # (B, 1, q, V)
            target_features=features,
        )


class IncrementalScorer:
    """Scores tokens one generation step at a time, with one KV cache per model it needs.

    Build it from a composite, `IncrementalScorer(eu_model)`, or from parts,
    `IncrementalScorer(estimator="hf_eu", drafts=[...], proxy=..., target=...)`.

    Args:
        eu_model: an `UncertaintyAwareModelForCausalLM`; its drafts, proxy, target, configured
            estimator (and calibrator / perturbation where the estimator reads them) are used. Leave
            None to pass the parts instead.
        estimator: registered estimator name (or `Estimator`); default: the composite's, else `"hf_eu"`.
        drafts, proxy, target: the models, when `eu_model` is None (`target` is needed only if the
            estimator reads it, or reads the reference and there is no proxy).
        student, calibrator, perturbation, perturbation_seeds: as for `scoring.score_tokens`, for the
            estimators that read them.

    Example:
        >>> scorer = IncrementalScorer(eu_model)
        >>> scorer.start(input_ids, attention_mask)            # prompt, (B, P)
        >>> out = scorer.step(next_token_ids)                   # (B,) -> EstimatorOutput with score (B,)
    """

    def __init__(self, eu_model: Any = None, *, estimator: str | Estimator | None = None,
                 drafts: Sequence[nn.Module] | None = None, proxy: nn.Module | None = None,
                 target: nn.Module | None = None, student: nn.Module | None = None, calibrator: Any = None,
                 perturbation: Any = None, perturbation_seeds: Sequence[int] | None = None, eu_head: nn.Module | None = None):
        if eu_model is not None:
            if any(part is not None for part in (drafts, proxy, target, student, calibrator, perturbation, eu_head)):
                raise ValueError("Pass either `eu_model` or the parts (`drafts=`, `proxy=`, `target=`, …), not both.")
            drafts, proxy, target = list(eu_model.drafts), eu_model.proxy, eu_model.target
            student = getattr(eu_model, "student", None)
            eu_head = getattr(eu_model, "eu_head", None)
            estimator = estimator or eu_model.config.estimator
        self.estimator = estimator if isinstance(estimator, Estimator) else get_estimator(estimator or "hf_eu")
        if eu_model is not None and hasattr(eu_model, "_scoring_extras"):  # calibrator, perturbation, as generate
            extras = eu_model._scoring_extras(self.estimator)
            calibrator, perturbation = extras.get("calibrator"), extras.get("perturbation")
        if target is None and _needs_target(self.estimator, proxy):
            raise ValueError(f"Estimator '{self.estimator.name}' reads the target's distribution; pass `target=`.")
        if "calibrator" in self.estimator.inputs and calibrator is None:
            raise ValueError(f"Estimator '{self.estimator.name}' needs a fitted calibrator; pass `calibrator=` or "
                             "pick another estimator.")
        self.roles = _select_models(self.estimator, list(drafts or []), proxy, target, student, perturbation,
                                    perturbation_seeds)
        if "draft" in self.roles and not self.roles["draft"]:
            raise ValueError(f"Estimator '{self.estimator.name}' reads the drafts but `drafts` is empty.")
        self.calibrator = calibrator
        _check_eu_head(self.estimator, eu_head, proxy)
        self.eu_head = eu_head
        self.target = target
        self._names = _part_names({self.estimator.name: self.roles}, list(drafts or []), proxy)  # key -> "draft 0", …
        self._models_by_name = {self._names[key]: model for members in self.roles.values() for key, model, _ in members}
        limits = [limit for limit in map(context_length, self._models_by_name.values()) if limit is not None]
        self._context = min(limits) if limits else None  # the shortest context of the models run
        self._recorder = None  # hooks on the target while started, for estimators reading its features
        self._models: dict[Any, _CachedModel] = {}
        self._attention_mask: torch.Tensor | None = None  # (B, L) of everything fed so far
        self._next_position: torch.Tensor | None = None  # (B,) position id of the next token

    @property
    def started(self) -> bool:
        """True between `start` and `reset`."""
        return self._attention_mask is not None

    @property
    def batch_size(self) -> int | None:
        return None if self._attention_mask is None else self._attention_mask.shape[0]

    def reset(self) -> None:
        """Drop the caches; the next use must call `start` again."""
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = None
        self._models = {}
        self._attention_mask = None
        self._next_position = None

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Prefill the prompt `input_ids` `(batch_size, prompt_len)` (left padding marked 0 in `attention_mask`)."""
        vocab_size = output_vocab_size(self.target) if self.target is not None else None
        check_token_inputs(input_ids, attention_mask, vocab_size=vocab_size)  # the shared rules of `_validation.py`
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.long().cpu()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (B, P), as generate builds them
        # One cache per distinct (model, perturbation seed): the target may serve as reference and as target.
        self.reset()
        if "features" in self.roles:  # hooks that record only the scorer's own target passes
            self._recorder = TargetFeatureRecorder(self.target, record=False).__enter__()
        self._models = {key: _CachedModel(model, *noise, recorder=self._recorder if key == id(self.target) else None)
                        for members in self.roles.values() for key, model, noise in members}
        with torch.no_grad():
            for model in self._models.values():
                model.forward(input_ids, attention_mask, position_ids)
        self._attention_mask = attention_mask
        self._next_position = attention_mask.sum(-1)  # (B,)

    def step(self, token_ids: torch.Tensor) -> EstimatorOutput:
        """Score the tokens just generated, then feed them to every model.

        Args:
            token_ids: `(batch_size,)` the token each row generated at this step (padding after a row
                finished is fed like any token, as the post-hoc pass does).

        Returns:
            The estimator's `EstimatorOutput`: `score` (and `variance`/`bias` when defined) of shape
            `(batch_size,)`, float32 on the first model's device.
        """
        token_ids = self._checked_tokens(token_ids, "step")
        with torch.no_grad():
            output = self.estimator(**self._arguments(), token_ids=token_ids.to(self._device()),
                                    calibrator=self.calibrator, eu_head=self.eu_head)
            check_finite_scores(output.score, self._last_outputs, self.estimator.name)
        self.feed(token_ids)
        return output

    def feed(self, token_ids: torch.Tensor) -> None:
        """Feed the tokens `(batch_size,)` to every model without scoring them (the second half of `step`)."""
        token_ids = self._checked_tokens(token_ids, "feed")
        with torch.no_grad():
            if self._context is not None and self._attention_mask.shape[1] >= self._context:
                warn_beyond_context(self._models_by_name, self._attention_mask.shape[1] + 1)
            self._attention_mask = torch.cat([self._attention_mask, torch.ones_like(token_ids)[:, None]], 1)  # (B, L+1)
            position_ids = self._next_position[:, None]  # (B, 1)
            for model in self._models.values():
                model.forward(token_ids[:, None], self._attention_mask, position_ids)
        self._next_position = self._next_position + 1

    def _checked_tokens(self, token_ids: torch.Tensor, method: str) -> torch.Tensor:
        if not self.started:
            raise RuntimeError(f"Call `start(prompt_ids, attention_mask)` before `{method}`.")
        token_ids = torch.as_tensor(token_ids).reshape(-1).long().cpu()  # (B,)
        if token_ids.shape[0] != self.batch_size:
            raise ValueError(f"`token_ids` has {token_ids.shape[0]} rows but the prompt had {self.batch_size}; "
                             "pass one new token per row, shape (batch_size,).")
        return token_ids

    def reference_logps(self) -> torch.Tensor:
        """`(B, V)` the reference's (the proxy's, else the target's) log-probs at the current position, before `step`."""
        if not self.started:
            raise RuntimeError("Call `start(prompt_ids, attention_mask)` before `reference_logps`.")
        with torch.no_grad():
            arguments = self._arguments()
        if "reference_logps" not in arguments:
            raise ValueError(f"Estimator '{self.estimator.name}' does not read the reference model.")
        return arguments["reference_logps"]

    def _last_outputs(self) -> dict[str, torch.Tensor | None]:
        """What each model produced at the current position, by part name (read when a score is not finite)."""
        parts = {}
        for key, model in self._models.items():
            output = model.last_output
            features = output.target_features
            parts[self._names[key]] = features.values if features is not None else output.logits
        return parts

    def _device(self) -> torch.device:
        return next(iter(self._models.values())).device  # combine on the first model's device

    def _arguments(self) -> dict[str, torch.Tensor]:
        """Every role's distributions at the current position, as estimator arguments (built as scoring.py does)."""
        outputs = {key: model.last_output for key, model in self._models.items()}
        return _chunk_arguments(self.roles, outputs, self._device())  # (B, V) | (K, B, V) per role


def _needs_target(estimator: Estimator, proxy: nn.Module | None) -> bool:
    return bool({"target", "perturbed", "features"} & estimator.inputs) or ("reference" in estimator.inputs and proxy is None)
