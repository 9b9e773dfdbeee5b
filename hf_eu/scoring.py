"""Teacher-forced scoring of token sequences by drafts, proxy and target, in bounded memory.

`score_tokens` runs each model the estimator needs over given sequences (prompt + answer) and turns
their log-probabilities into per-token uncertainty. It never holds logits for the whole sequence:
the prompt is pre-filled into each model's KV cache (logits of its last position only), then the
answer is fed in chunks of `chunk_size` positions, so the largest tensor is
`(num_models, batch, chunk_size, vocab)` whatever the sequence length.

Memory: the automatic chunk size keeps every vocabulary-sized float32 tensor of a chunk, together, within
`max_chunk_elements` (2**25 floats = 128 MiB by default): the log-probs of each model run (one buffer,
reused), a Gaussian student's raw outputs, the logits of the model running and the estimators'
temporaries (`Estimator.working_copies`), as `_peak_copies` counts them. Not counted: each model's
weights, KV cache and hidden activations, which grow with the sequence length and hidden size but not
with the vocabulary. When one position alone needs more than the budget (many models, a large batch
and vocabulary, or `gaussian_distill_sampled`'s 32 members), chunks are one position and the peak is
that position's tensors.

Causal shift, stated once: logits at position i predict token i + 1, so the new tokens
`input_ids[:, prompt_length:]` are scored from logits at positions `prompt_length - 1 … L - 2`.

This module does not decode: transformers' `generate` does that; this runs after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ._cache import cache_argument, continues_in_chunks, forward_parameter, output_cache
from ._validation import check_chunk_size, check_finite_scores, check_token_inputs, warn_beyond_context
from .estimators import Estimator
from .eu_features import TargetFeatureRecorder, teacher_forced_features
from .loading import output_vocab_size
from .outputs import UncertaintyOutput
from .perturbation import LowRankGaussianPerturbation

__all__ = ["score_tokens", "score_tokens_many", "score_recorded", "reads_only_features", "DEFAULT_MAX_CHUNK_ELEMENTS"]

# Budget for the vocabulary-sized tensors of one chunk (all models' log-probs, the estimators' temporaries):
# 2**25 float32 = 128 MiB.
DEFAULT_MAX_CHUNK_ELEMENTS = 2**25


def _logps(logits: torch.Tensor) -> torch.Tensor:
    """Raw logits (B, C, V) in any dtype -> float32 log-probs flattened to (B*C, V)."""
    return logits.float().log_softmax(-1).flatten(0, 1)  # (B*C, V)


class _ChunkLogps:
    """The float32 log-probs of every model at one chunk, in one `(S, B*C, V)` buffer reused across chunks.

    One slot per runner whose log-probs some estimator reads; a role whose runners hold consecutive slots
    (the drafts, in order) is a view of the buffer, so no `(K, B*C, V)` stack is copied.
    """

    def __init__(self, keys: Sequence[Any], device: torch.device):
        self.slots = {key: slot for slot, key in enumerate(keys)}
        self.device = device
        self.buffer: torch.Tensor | None = None  # (S, rows ≥ B*C, V)
        self.rows = 0

    def fill(self, key: Any, logits: torch.Tensor) -> None:
        """Write the log-softmax of `logits` `(B, C, V)` into `key`'s slot (after which the logits can go)."""
        rows, vocab = logits.shape[0] * logits.shape[1], logits.shape[-1]
        if self.buffer is None or self.buffer.shape[1] < rows:
            self.buffer = None  # the old buffer is freed before the new one is allocated
            self.buffer = torch.empty(len(self.slots), rows, vocab, dtype=torch.float32, device=self.device)
        self.rows = rows
        torch.log_softmax(logits.flatten(0, 1).to(self.device), -1, dtype=torch.float32,
                          out=self.buffer[self.slots[key], :rows])  # (B*C, V)

    def member(self, key: Any) -> torch.Tensor:
        return self.buffer[self.slots[key], : self.rows]  # (B*C, V)

    def members(self, keys: Sequence[Any]) -> torch.Tensor:
        slots = [self.slots[key] for key in keys]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return self.buffer[slots[0] : slots[0] + len(slots), : self.rows]  # (K, B*C, V), a view
        return torch.stack([self.buffer[slot, : self.rows] for slot in slots])  # (K, B*C, V)


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
        """Feed positions [0, end) into the cache, computing no logits (a cache-free model keeps nothing: each chunk
        then runs from position 0).

        `logits_to_keep` is an empty index tensor where the model takes one: with `1`, transformers slices the
        hidden states to a non-contiguous `(B, 1, D)` view, and a bfloat16 output head then runs as a batched
        matmul over a `(B, D, V)` copy of its weight (0.72 s of the bfloat16 proxy's 2.6 s at batch 8 on CPU).
        """
        if end > 0:
            self._forward(0, end, logits_to_keep=_no_logits(self.model, self.input_ids.device))

    def outputs(self, start: int, end: int):
        """The model's output at positions [start, end) (logits `(B, end - start, V)`), which must follow what was fed."""
        return self._forward(start, end)


def _no_logits(model: nn.Module, device: torch.device) -> int | torch.Tensor:
    """`logits_to_keep` selecting no position where `model.forward` takes an index tensor for it, else 1 (a PEFT
    model passes it on to its base model, whose signature decides)."""
    parameter = forward_parameter(model, "logits_to_keep")
    annotation = str(parameter.annotation) if parameter is not None else ""
    return torch.zeros(0, dtype=torch.long, device=device) if "Tensor" in annotation else 1


def _auto_chunk_size(num_models: int, batch_size: int, vocab_size: int, max_elements: int) -> int:
    """The most positions whose `num_models` float32 `(batch_size, ·, vocab_size)` tensors fit `max_elements`."""
    return max(1, max_elements // max(1, num_models * batch_size * vocab_size))


def _peak_copies(estimators: Sequence[Estimator], num_slots: int, student: nn.Module | None, recorded: bool) -> int:
    """How many float32 `(batch, chunk, vocab)` tensors one chunk holds at its peak.

    The log-probs buffer (`num_slots`), a Gaussian student's raw logits and factor logits (and their float32
    copies when it runs in another dtype), then the larger of the running model's logits (1, plus the
    recorder's 3 temporaries when it records the target's features, plus 1 for a transfer or cast) and the
    estimators' temporaries (`Estimator.working_copies`).
    """
    raw = 0
    if student is not None and any("student" in e.inputs for e in estimators):
        dtype = next(student.parameters()).dtype
        raw = (1 + getattr(student, "num_factors", 0)) * (1 if dtype == torch.float32 else 2)
    forward = 2 + (3 if recorded else 0)
    return num_slots + raw + max(forward, max(e.working_copies for e in estimators))


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
    target_features: Any = None,
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
        max_chunk_elements: bound on the float32 elements of the vocabulary-sized tensors one chunk holds at
            once (every model's log-probs and the estimators' temporaries, see the module docstring); used
            when `chunk_size` is None.
        perturbation: for estimators reading ``"perturbed"``: the target's perturbation (default: a
            `LowRankGaussianPerturbation(target)` with docs/method.md §2's defaults).
        perturbation_seeds: seeds of the perturbed copies (default `0 … M-1`); an estimator uses the
            first `num_perturbed`; a mapping gives each estimator name its own list. Estimators that
            share a seed share that copy's pass.
        student: the Gaussian-distilled student, for estimators reading ``"student"``.
        calibrator: the fitted calibrator, for estimators reading ``"calibrator"``.
        eu_head: the distilled `EUHead`, for estimators reading ``"eu_head"``; their ``"features"`` are
            recorded from the target's own pass (`eu_features.TargetFeatureRecorder`).
        target_features: those features already recorded while decoding, `TargetFeatures` of shape
            `(batch_size, seq_len - prompt_length)`: then the target runs for none of them (it still runs when an
            estimator reads its log-probs).

    Returns:
        `{estimator name: UncertaintyOutput}`, tensors of shape `(batch_size, seq_len - prompt_length)`.
    """
    _check_arguments(estimators, input_ids, prompt_length, attention_mask, uncertainty_mask, chunk_size, target)
    batch_size, seq_len = input_ids.shape
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
        _check_eu_head(estimator, eu_head, proxy)
    _use_recorded_features(roles, target_features, batch_size, seq_len - prompt_length)
    # One runner per distinct (model, perturbation seed): the target may serve as reference and as target.
    runners = {key: _ChunkedForward(model, input_ids, attention_mask, position_ids, *noise)
               for estimator_roles in roles.values() for members in estimator_roles.values()
               for key, model, noise in members if model is not None}
    names = _part_names(roles, drafts, proxy)
    warn_beyond_context({names[key]: runner.model for key, runner in runners.items()}, seq_len)
    logps = _ChunkLogps(_logp_keys(roles), _first_device(runners))
    records = target_features is None and "features" in set().union(*roles.values())
    copies = _peak_copies(estimators, len(logps.slots), student, records)
    chunk_size = chunk_size or _auto_chunk_size(copies, batch_size, output_vocab_size(target), max_chunk_elements)
    recorder = TargetFeatureRecorder(target) if records else None
    with torch.no_grad(), recorder or nullcontext(), recorder.pause() if recorder else nullcontext():
        results = _score_chunks(estimators, roles, runners, logps, names, input_ids, prompt_length, chunk_size,
                                recorder, id(target), recorded=target_features, calibrator=calibrator, eu_head=eu_head)
    mask = uncertainty_mask.to(torch.bool).cpu()
    return {name: _masked_output(values, mask) for name, values in results.items()}


def _check_arguments(estimators, input_ids, prompt_length, attention_mask, uncertainty_mask, chunk_size,
                     target) -> None:
    """The public arguments' rules (`_validation.py`), before any model runs."""
    check_token_inputs(input_ids, attention_mask, vocab_size=output_vocab_size(target), prompt_length=prompt_length,
                       uncertainty_mask=uncertainty_mask)
    check_chunk_size(chunk_size)
    if len({e.name for e in estimators}) != len(estimators):
        raise ValueError(f"Estimator names must be distinct, got {[e.name for e in estimators]}.")


def _score_chunks(estimators, roles, runners, logps, names, input_ids, prompt_length, chunk_size, recorder,
                  target_key, recorded=None, **extras) -> dict[str, dict[str, torch.Tensor]]:
    """Prefill every runner, then score the answer chunk by chunk: `{estimator: {field: (B, num_new)}}`."""
    batch_size, seq_len = input_ids.shape
    num_new = seq_len - prompt_length
    device = _first_device(runners)
    results: dict[str, dict[str, torch.Tensor]] = {e.name: {} for e in estimators}
    for runner in runners.values():
        runner.prefill(prompt_length - 1)
    for start in range(prompt_length - 1, seq_len - 1, chunk_size):
        end = min(start + chunk_size, seq_len - 1)
        token_ids = input_ids[:, start + 1 : end + 1].flatten().to(device)  # (B*C,) predicted
        outputs = {}  # the previous chunk's outputs are freed before this chunk's models run
        for key, runner in runners.items():
            outputs[key] = _run_chunk(runner, start, end, recorder if key == target_key else None,
                                      logps if key in logps.slots else None, key)
        if recorded is not None:  # features recorded while decoding, at this chunk's positions
            columns = slice(start - (prompt_length - 1), end - (prompt_length - 1))
            outputs[_RECORDED] = SimpleNamespace(target_features=recorded.map(lambda t: t[:, columns]))  # (B, C, ·)
        for estimator in estimators:
            estimator_roles = roles[estimator.name]
            output = estimator(**_chunk_arguments(estimator_roles, outputs, device, logps), token_ids=token_ids,
                               **extras)
            check_finite_scores(output.score, lambda: _chunk_parts(estimator_roles, outputs, logps, names),
                                estimator.name)
            _store(results[estimator.name], output, start - (prompt_length - 1), batch_size, num_new)
    return results


def score_features_pass(target: nn.Module, input_ids: torch.Tensor, prompt_length: int,
                        attention_mask: torch.Tensor | None, chunk_size: int | None = None,
                        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS):
    """The target's `TargetFeatures` `(batch, seq_len - prompt_length)` from one teacher-forced pass, chunked like
    `score_tokens` (for decoding modes whose calls do not map onto tokens; they also feed the answer risk)."""
    check_chunk_size(chunk_size)
    copies = 2  # the chunk's raw logits and their float32 log-softmax in `output_features`
    chunk_size = chunk_size or _auto_chunk_size(copies, input_ids.shape[0], output_vocab_size(target), max_chunk_elements)
    return teacher_forced_features(target, input_ids, prompt_length, attention_mask=attention_mask,
                                   chunk_size=chunk_size)


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
    check_finite_scores(output.score, lambda: {"target": features.values}, estimator.name)
    _store(results, output, 0, batch_size, num_new)
    return _masked_output(results, uncertainty_mask.to(torch.bool).cpu())


def _run_chunk(runner: _ChunkedForward, start: int, end: int, recorder: TargetFeatureRecorder | None,
               logps: _ChunkLogps | None, key: Any):
    """The runner's output at [start, end); with a recorder (the unperturbed target's runner), plus its features.

    With `logps`, its log-probs go into the shared buffer and only the features are kept (the logits are freed).
    """
    with recorder.recording() if recorder is not None else nullcontext():
        output = runner.outputs(start, end)
    features = recorder.pop() if recorder is not None else None  # (B, C, ·)
    if logps is None:
        output.target_features = features
        return output
    logps.fill(key, output.logits)
    return SimpleNamespace(target_features=features)


_RECORDED = "recorded target features"  # the runner key standing for features given to `score_tokens_many`


def _use_recorded_features(roles: dict, target_features: Any, batch_size: int, num_new: int) -> None:
    """Point every estimator's ``"features"`` role at the given recorded features (no model runs for it)."""
    if target_features is None:
        return
    if tuple(target_features.values.shape[:2]) != (batch_size, num_new):
        raise ValueError(f"`target_features` cover {tuple(target_features.values.shape[:2])} (batch, tokens); the "
                         f"sequences to score have {(batch_size, num_new)}. Pass the features of exactly these tokens.")
    for estimator_roles in roles.values():
        if "features" in estimator_roles:
            estimator_roles["features"] = [(_RECORDED, None, ())]


def _check_eu_head(estimator: Estimator, eu_head: nn.Module | None, proxy: Any = None) -> None:
    """Refuse, before any pass, an estimator reading an EU head the composite lacks (or its proxy variant, which
    also needs the proxy: a head trained on the proxy's entropy must not read the target's instead)."""
    if "eu_head" in estimator.inputs and eu_head is None:
        raise ValueError(f"Estimator '{estimator.name}' reads a distilled EU head, and this composite has none. Load a "
                         "composite saved with one (the shipped default has it), train one with "
                         "`trainers.EUHeadTrainer`, or pick another estimator.")
    if "eu_head" in estimator.inputs and "reference" in estimator.inputs:
        if getattr(eu_head, "proxy_head", None) is None:
            raise ValueError(f"Estimator '{estimator.name}' reads the EU head's proxy variant, and this composite's head "
                             "has none: train one with `python -m trainers.run_eu_head --proxy_from COMPOSITE` "
                             "(`EUHead.set_proxy_head`) or pick 'eu_head'.")
        if proxy is None:
            raise ValueError(f"Estimator '{estimator.name}' reads the OSD proxy's entropy, and no proxy was given; pass "
                             "the composite's proxy or pick 'eu_head'.")


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


def _chunk_arguments(roles: dict[str, _Members], outputs: dict[Any, Any], device: torch.device,
                     logps: _ChunkLogps | None = None) -> dict[str, torch.Tensor]:
    """Every role's outputs at this chunk's positions, as estimator arguments, on the first model's device.

    With `logps`, log-probs are read from its buffer (views); without, they are computed from each output's logits.
    """
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
        single = role in ("reference", "target")
        if logps is not None:
            keys = [key for key, _, _ in members]
            arguments[f"{role}_logps"] = logps.member(keys[0]) if single else logps.members(keys)  # (N, V) | (K, N, V)
            continue
        per_model = [_logps(outputs[key].logits).to(device) for key, _, _ in members]  # each (B*C, V)
        arguments[f"{role}_logps"] = per_model[0] if single else torch.stack(per_model)  # (N, V) | (K, N, V)
    return arguments


def _logp_keys(roles: Mapping[str, dict[str, _Members]]) -> list[Any]:
    """The runners whose log-probs some estimator reads (every role but the student and the features), in order."""
    keys: dict[Any, None] = {}
    for estimator_roles in roles.values():
        for role, members in estimator_roles.items():
            if role not in ("student", "features"):
                keys.update((key, None) for key, _, _ in members)
    return list(keys)


def _part_names(roles: Mapping[str, dict[str, _Members]], drafts: Sequence[nn.Module], proxy: nn.Module | None
                ) -> dict[Any, str]:
    """Runner key -> the part's name in messages ("draft 1", "proxy", "target", "perturbed target (seed 3)")."""
    draft_index = {id(draft): k for k, draft in enumerate(drafts)}
    names = {}
    for estimator_roles in roles.values():
        for role, members in estimator_roles.items():
            for key, model, noise in members:
                if noise:
                    names[key] = f"perturbed target (seed {noise[1]})"
                elif role == "student":
                    names[key] = "student"
                elif key in draft_index:
                    names[key] = f"draft {draft_index[key]}"
                else:
                    names.setdefault(key, "proxy" if proxy is not None and model is proxy else "target")
    return names


def _chunk_parts(roles: dict[str, _Members], outputs: dict[Any, Any], logps: _ChunkLogps, names: dict[Any, str]
                 ) -> dict[str, torch.Tensor | None]:
    """What each part an estimator read produced at this chunk, by name (looked through when a score is not finite)."""
    parts = {}
    for role, members in roles.items():
        for key, _, _ in members:
            if role == "features":
                parts[names[key]] = outputs[key].target_features.values
            elif role == "student":
                parts[names[key]] = outputs[key].logits
            else:
                parts[names[key]] = logps.member(key)
    return parts
