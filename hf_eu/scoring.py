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

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ._cache import cache_argument, continues_in_chunks, output_cache
from .estimators import Estimator
from .eu_features import TargetFeatureRecorder
from .loading import output_vocab_size
from .outputs import UncertaintyOutput
from .perturbation import LowRankGaussianPerturbation

__all__ = ["score_tokens", "score_tokens_many", "score_recorded", "reads_only_features", "DEFAULT_MAX_CHUNK_ELEMENTS"]

# Budget for one chunk of log-probs across all models: 2**25 float32 = 128 MiB.
DEFAULT_MAX_CHUNK_ELEMENTS = 2**25


def _logps(logits: torch.Tensor) -> torch.Tensor:
    """Raw logits (B, C, V) in any dtype -> float32 log-probs flattened to (B*C, V)."""
    return logits.float().log_softmax(-1).flatten(0, 1)  # (B*C, V)


class _ChunkedForward:
    """One model fed a sequence chunk by chunk through its own KV cache.

    With a `perturbation` and `seed`, every forward runs inside `perturbation.apply(seed)`: the runner
    is then one perturbed copy of the model (weights restored after each chunk), with its own cache.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, perturbation: LowRankGaussianPerturbation | None = None,
                 seed: int | None = None):
        self.model = model
        device = model.device if hasattr(model, "device") else input_ids.device
        self.input_ids = input_ids.to(device)
        self.attention_mask = attention_mask.to(device)
        self.position_ids = position_ids.to(device)
        self.perturbation = perturbation
        self.seed = seed
        self.cache = None
        self.cache_free = False  # set for models whose cache cannot continue in chunks (recurrent, hybrid)

    def _forward(self, start: int, end: int, **kwargs):
        context = self.perturbation.apply(self.seed) if self.perturbation is not None else nullcontext()
        with context:
            if self.cache_free:  # every position again from the start; logits of [start, end) only
                kwargs.setdefault("logits_to_keep", end - start)
                return self.model(input_ids=self.input_ids[:, :end], attention_mask=self.attention_mask[:, :end],
                                  position_ids=self.position_ids[:, :end], use_cache=False, **kwargs)
            output = self.model(
                input_ids=self.input_ids[:, start:end],
                attention_mask=self.attention_mask[:, :end],
                position_ids=self.position_ids[:, start:end],
                **cache_argument(self.model, self.cache),
                use_cache=True,
                **kwargs,
            )
        self.cache = output_cache(output)
        if not continues_in_chunks(self.cache):
            self.cache, self.cache_free = None, True
        return output

    def prefill(self, end: int) -> None:
        """Feed positions [0, end) into the cache, computing logits at the last position only (a cache-free model
        keeps nothing: each chunk then runs from position 0)."""
        if end > 0:
            self._forward(0, end, logits_to_keep=1)

    def outputs(self, start: int, end: int):
        """The model's output at positions [start, end) (logits `(B, end - start, V)`), which must follow what was fed."""
        return self._forward(start, end)


def _auto_chunk_size(num_models: int, batch_size: int, vocab_size: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, num_models * batch_size * vocab_size))


def score_tokens(estimator: Estimator, input_ids: torch.Tensor, prompt_length: int, **kwargs) -> UncertaintyOutput:
    """Per-token uncertainty of `input_ids[:, prompt_length:]` given everything before each token.

    Args:
        estimator: a registered estimator (see `estimators.get_estimator`).
        input_ids: `(batch_size, seq_len)` token ids, prompt (left padding allowed) then answer.
        prompt_length: number of leading columns not scored (≥ 1; the first token has no prediction).
        **kwargs: the models and options of `score_tokens_many` (`drafts`, `proxy`, `target`, …).

    Returns:
        `UncertaintyOutput` whose tensors have shape `(batch_size, seq_len - prompt_length)`.
    """
    return score_tokens_many([estimator], input_ids, prompt_length, **kwargs)[estimator.name]


def score_tokens_many(
    estimators: Sequence[Estimator],
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
    perturbation: LowRankGaussianPerturbation | None = None,
    perturbation_seeds: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    student: nn.Module | None = None,
    calibrator: Any = None,
    eu_head: nn.Module | None = None,
) -> dict[str, UncertaintyOutput]:
    """Several estimators in one teacher-forced pass: each model (or perturbed copy) runs once for all.

    Args:
        estimators: registered (or `perturbed_ensemble_estimator`) estimators with distinct names.
        input_ids, prompt_length: as for `score_tokens`.
        drafts, proxy, target: the composite's models; only those some estimator needs are run.
        attention_mask: `(batch_size, seq_len)`, 0 on padding; None means no padding.
        uncertainty_mask: `(batch_size, seq_len - prompt_length)` bool of tokens to report; defaults to
            `attention_mask[:, prompt_length:]`. Scores are 0 where it is False.
        chunk_size: positions per chunk; None derives it from `max_chunk_elements`.
        max_chunk_elements: bound on the floats of one chunk of log-probs across all models.
        perturbation: for estimators reading ``"perturbed"``: the target's perturbation (default: a
            `LowRankGaussianPerturbation(target)` with docs/method.md §2's defaults).
        perturbation_seeds: seeds of the perturbed copies (default `0 … M-1`); an estimator uses the
            first `num_perturbed`; a mapping gives each estimator name its own list. Estimators that
            share a seed share that copy's pass.
        student: the Gaussian-distilled student, for estimators reading ``"student"``.
        calibrator: the fitted calibrator, for estimators reading ``"calibrator"``.
        eu_head: the distilled `EUHead`, for estimators reading ``"eu_head"``; their ``"features"`` are
            recorded from the target's own pass (`eu_features.TargetFeatureRecorder`).

    Returns:
        `{estimator name: UncertaintyOutput}`, tensors of shape `(batch_size, seq_len - prompt_length)`.
    """
    batch_size, seq_len = input_ids.shape
    if not 1 <= prompt_length < seq_len:
        raise ValueError(
            f"`prompt_length` must be in [1, seq_len - 1] = [1, {seq_len - 1}] so at least one token is scored, "
            f"got {prompt_length}. Pass sequences that contain new tokens after the prompt."
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be ≥ 1 or None, got {chunk_size}.")
    if len({e.name for e in estimators}) != len(estimators):
        raise ValueError(f"Estimator names must be distinct, got {[e.name for e in estimators]}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if uncertainty_mask is None:
        uncertainty_mask = attention_mask[:, prompt_length:].bool()
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, L), as generate builds them

    perturbation = perturbation if perturbation is not None or not any(
        "perturbed" in e.inputs for e in estimators) else LowRankGaussianPerturbation(target)
    roles = {}
    for estimator in estimators:
        seeds = perturbation_seeds.get(estimator.name) if isinstance(perturbation_seeds, Mapping) else perturbation_seeds
        roles[estimator.name] = _select_models(estimator, drafts, proxy, target, student, perturbation, seeds)
        if "calibrator" in estimator.inputs and calibrator is None:
            raise ValueError(f"Estimator '{estimator.name}' needs a fitted calibrator, and this composite has none. "
                             "Load a composite saved with one (the shipped default has it) or pick another estimator.")
        _check_eu_head(estimator, eu_head)
    # One runner per distinct (model, perturbation seed): the target may serve as reference and as target.
    runners = {key: _ChunkedForward(model, input_ids, attention_mask, position_ids, *noise)
               for estimator_roles in roles.values() for members in estimator_roles.values()
               for key, model, noise in members}
    rows = len(runners) + (getattr(student, "num_factors", 0) if student is not None else 0)
    chunk_size = chunk_size or _auto_chunk_size(rows, batch_size, output_vocab_size(target), max_chunk_elements)

    num_new = seq_len - prompt_length
    results: dict[str, dict[str, torch.Tensor]] = {e.name: {} for e in estimators}
    recorder = TargetFeatureRecorder(target) if any("features" in e.inputs for e in estimators) else None
    with torch.no_grad(), recorder or nullcontext(), recorder.pause() if recorder else nullcontext():
        for runner in runners.values():
            runner.prefill(prompt_length - 1)
        for start in range(prompt_length - 1, seq_len - 1, chunk_size):
            end = min(start + chunk_size, seq_len - 1)
            token_ids = input_ids[:, start + 1 : end + 1].flatten().to(_first_device(runners))  # (B*C,) predicted
            outputs = {key: _run_chunk(runner, start, end, recorder if key == id(target) else None)
                       for key, runner in runners.items()}
            for estimator in estimators:
                arguments = _chunk_arguments(roles[estimator.name], outputs, _first_device(runners))
                output = estimator(**arguments, token_ids=token_ids, calibrator=calibrator, eu_head=eu_head)
                _store(results[estimator.name], output, start - (prompt_length - 1), batch_size, num_new)
    mask = uncertainty_mask.to(torch.bool).cpu()
    return {name: _masked_output(values, mask) for name, values in results.items()}


def reads_only_features(estimator: Estimator) -> bool:
    """Whether `estimator` needs nothing but the target's recorded features (and the EU head): then the forward
    passes of `generate` provide everything, and no model runs after decoding."""
    return "features" in estimator.inputs and estimator.inputs <= {"features", "eu_head", "calibrator"}


def score_recorded(estimator: Estimator, features, uncertainty_mask: torch.Tensor, *, eu_head: nn.Module | None = None,
                   calibrator: Any = None) -> UncertaintyOutput:
    """Uncertainty from features recorded while generating (`TargetFeatureRecorder.generated`), no model pass.

    Args:
        estimator: one for which `reads_only_features` holds.
        features: `TargetFeatures` of shape `(batch_size, num_new_tokens)`.
        uncertainty_mask: `(batch_size, num_new_tokens)` bool of tokens to report (0 elsewhere).
    """
    if not reads_only_features(estimator):
        raise ValueError(f"Estimator '{estimator.name}' reads {sorted(estimator.inputs)}, not only recorded features.")
    _check_eu_head(estimator, eu_head)
    batch_size, num_new = features.values.shape[:2]
    results: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        output = estimator(target_features=features.map(lambda t: t.flatten(0, 1)), eu_head=eu_head,
                           calibrator=calibrator)  # (B*T,)
    _store(results, output, 0, batch_size, num_new)
    return _masked_output(results, uncertainty_mask.to(torch.bool).cpu())


def _run_chunk(runner: _ChunkedForward, start: int, end: int, recorder: TargetFeatureRecorder | None):
    """The runner's output at [start, end); with a recorder (the unperturbed target's runner), plus its features."""
    if recorder is None:
        return runner.outputs(start, end)
    with recorder.recording():
        output = runner.outputs(start, end)
    output.target_features = recorder.pop()  # (B, C, ·)
    return output


def _check_eu_head(estimator: Estimator, eu_head: nn.Module | None) -> None:
    if "eu_head" in estimator.inputs and eu_head is None:
        raise ValueError(f"Estimator '{estimator.name}' reads a distilled EU head, and this composite has none. Load a "
                         "composite saved with one (the shipped default has it), train one with "
                         "`trainers.EUHeadTrainer`, or pick another estimator.")


def _store(results: dict[str, torch.Tensor], output, column: int, batch_size: int, num_new: int) -> None:
    """Write a chunk's `(B*C,)` values into `(B, num_new)` tensors at `column`."""
    for name in ("score", "variance", "bias"):
        value = getattr(output, name)
        if value is not None:
            out = results.setdefault(name, torch.zeros(batch_size, num_new, dtype=torch.float32))
            width = value.numel() // batch_size
            out[:, column : column + width] = value.view(batch_size, width).float().cpu()


def _masked_output(values: dict[str, torch.Tensor], mask: torch.Tensor) -> UncertaintyOutput:
    masked = {name: torch.where(mask, value, torch.zeros_like(value)) for name, value in values.items()}
    return UncertaintyOutput(epistemic_uncertainty=masked["score"], eu_variance=masked.get("variance"),
                             eu_bias=masked.get("bias"), uncertainty_mask=mask)


# A role's members: (runner key, model, (perturbation, seed) or ()).
_Members = list[tuple[Any, nn.Module, tuple]]


def _select_models(
    estimator: Estimator, drafts: Sequence[nn.Module], proxy: nn.Module | None, target: nn.Module,
    student: nn.Module | None, perturbation: LowRankGaussianPerturbation | None, seeds: Sequence[int] | None,
) -> dict[str, _Members]:
    """The models to run, by role, for what `estimator` reads."""
    selected: dict[str, _Members] = {}
    if "drafts" in estimator.inputs:
        chosen = list(drafts)[: estimator.max_drafts] if estimator.max_drafts else list(drafts)
        if estimator.max_drafts and len(chosen) < estimator.max_drafts:
            raise ValueError(f"Estimator '{estimator.name}' uses {estimator.max_drafts} drafts; the composite has "
                             f"{len(chosen)}. Add drafts or pick another estimator.")
        selected["draft"] = [(id(m), m, ()) for m in chosen]
    if "reference" in estimator.inputs:
        reference = proxy if proxy is not None else target
        selected["reference"] = [(id(reference), reference, ())]
    if "target" in estimator.inputs:
        selected["target"] = [(id(target), target, ())]
    if "perturbed" in estimator.inputs:
        selected["perturbed"] = _perturbed_members(estimator, target, perturbation, seeds)
    if "features" in estimator.inputs:
        selected["features"] = [(id(target), target, ())]
    if "student" in estimator.inputs:
        if student is None:
            raise ValueError(f"Estimator '{estimator.name}' reads a Gaussian-distilled student, and this composite "
                             "has none. Attach one (`student=`) or pick another estimator.")
        selected["student"] = [(id(student), student, ())]
    if not selected:
        raise ValueError(f"Estimator '{estimator.name}' reads no model output; nothing to score.")
    return selected


def _perturbed_members(estimator: Estimator, target: nn.Module, perturbation: LowRankGaussianPerturbation | None,
                       seeds: Sequence[int] | None) -> _Members:
    count = estimator.num_perturbed
    seeds = list(range(count)) if seeds is None else list(seeds)
    if len(seeds) < count or len(set(seeds[:count])) < count:
        raise ValueError(f"Estimator '{estimator.name}' needs {count} distinct perturbation seeds, got {seeds}.")
    perturbation = perturbation if perturbation is not None else LowRankGaussianPerturbation(target)
    if perturbation.model is not target:
        raise ValueError("`perturbation` was built for another model than this target; build it with "
                         "`LowRankGaussianPerturbation(target, ...)`.")
    return [(("perturbed", seed), target, (perturbation, seed)) for seed in seeds[:count]]


def _first_device(runners: dict[Any, _ChunkedForward]) -> torch.device:
    return next(iter(runners.values())).input_ids.device


def _chunk_arguments(roles: dict[str, _Members], outputs: dict[Any, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Every role's outputs at this chunk's positions, as estimator arguments, on the first model's device."""
    arguments = {}
    for role, members in roles.items():
        if role == "features":
            features = outputs[members[0][0]].target_features
            arguments["target_features"] = features.map(lambda t: t.flatten(0, 1).to(device))  # (B*C, ·)
            continue
        if role == "student":
            student_output = outputs[members[0][0]]
            arguments["student_logits"] = student_output.logits.float().flatten(0, 1).to(device)  # (B*C, V)
            factor_logits = student_output.factor_logits.float()  # (B, C, q, V)
            arguments["student_factor_logits"] = factor_logits.flatten(0, 1).transpose(0, 1).to(device)  # (q, B*C, V)
            continue
        per_model = [_logps(outputs[key].logits).to(device) for key, _, _ in members]  # each (B*C, V)
        single = role in ("reference", "target")
        arguments[f"{role}_logps"] = per_model[0] if single else torch.stack(per_model)  # (N, V) | (K, N, V)
    return arguments
