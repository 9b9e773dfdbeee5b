"""What the distilled EU head reads: the target's own computation at the position that predicts each token.

The ground-truth EU comes from low-rank perturbations W0 + U_r εᵀ of the q/v projections: each adds
U_r εᵀx to the layer's output, with εᵀx ~ N(0, σ²‖x‖² I_r), so its size grows with the norm of the layer's
input x, and to first order the EU is the Fisher-weighted (diag(p) − ppᵀ) size of the resulting logit
change. The features are therefore, per position:

- `values` `(..., F)` float32, F = M + 4: the log-norm log max(‖x‖, 1e-12) of the input of each of the M perturbed
  layers (in `named_modules` order), then the output distribution's entropy, largest log-prob, gap between
  the two largest log-probs and the log-partition (logsumexp of the raw logits);
- `topk_ids` `(..., k)` long and `topk_logps` `(..., k)` float32: the k most likely tokens and their
  log-probs, from which the head computes Fisher-weighted variances of learned logit directions.

`TargetFeatureRecorder` collects them with forward hooks on the target, so the forward passes that
`generate` already runs provide them (no second target pass): one record per forward call, at the
positions whose logits the call computes. `teacher_forced_features` runs one chunked target pass over
given sequences instead (the fallback for decoding modes whose calls do not map to tokens one by one:
beam search, assisted decoding, contrastive search).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ._cache import cache_argument, continues_in_chunks, output_cache

__all__ = ["TargetFeatures", "TargetFeatureRecorder", "teacher_forced_features", "feature_names", "token_confidence",
           "DEFAULT_FEATURE_MODULES", "DEFAULT_TOP_K", "OUTPUT_FEATURES"]

DEFAULT_FEATURE_MODULES = ("q_proj", "v_proj")  # the layers the ground truth perturbs (docs/method.md)
DEFAULT_TOP_K = 64
OUTPUT_FEATURES = ("entropy", "max_logp", "top2_gap", "log_partition")


@dataclass
class TargetFeatures:
    """The head's inputs at some positions (see the module docstring); leading dimensions are shared.

    Attributes:
        values: `(..., M + 4)` float32: log-norms of the M perturbed layers' inputs, then `OUTPUT_FEATURES`.
        topk_ids: `(..., k)` long, the k most likely next tokens.
        topk_logps: `(..., k)` float32, their log-probabilities under the target.
    """

    values: torch.Tensor
    topk_ids: torch.Tensor
    topk_logps: torch.Tensor

    def map(self, fn) -> "TargetFeatures":
        """The same features with `fn` applied to each tensor (e.g. a flatten or an index)."""
        return TargetFeatures(fn(self.values), fn(self.topk_ids), fn(self.topk_logps))

    @classmethod
    def cat(cls, parts: Sequence["TargetFeatures"], dim: int) -> "TargetFeatures":
        return cls(*(torch.cat([getattr(p, name) for p in parts], dim)
                     for name in ("values", "topk_ids", "topk_logps")))


def token_confidence(features: TargetFeatures, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target's confidence in the tokens it produced, from its features `(B, T, ·)` and the tokens `(B, T)`.

    Returns `(token_logps, entropy, max_probs)`, each `(B, T)`: the log-prob of each token (for a token outside
    the recorded top k, the k-th largest log-prob, an upper bound), the predictive entropy and the largest
    probability.
    """
    hit = features.topk_ids == token_ids.to(features.topk_ids.device).unsqueeze(-1)  # (B, T, k)
    token_logps = torch.where(hit.any(-1), (features.topk_logps * hit).sum(-1), features.topk_logps[..., -1])
    statistics = features.values[..., -len(OUTPUT_FEATURES):]  # (B, T, 4): entropy, max_logp, gap, log_partition
    return token_logps, statistics[..., 0], statistics[..., 1].exp()


def feature_layers(model: nn.Module, module_names: Sequence[str] = DEFAULT_FEATURE_MODULES) -> list[tuple[str, nn.Module]]:
    """The layers whose input norms are features: modules named `module_names` that hold a weight."""
    wanted = set(module_names)
    layers = [(name, module) for name, module in model.named_modules()
              if name.split(".")[-1] in wanted and getattr(module, "weight", None) is not None]
    if not layers:
        raise ValueError(f"No layer named {sorted(wanted)} in {type(model).__name__}; the EU head reads the inputs "
                         "of the layers the ground truth perturbs: pass their names as `module_names`.")
    return layers


def feature_names(model: nn.Module, module_names: Sequence[str] = DEFAULT_FEATURE_MODULES) -> list[str]:
    """Names of the columns of `TargetFeatures.values` for `model`."""
    return [f"log_input_norm:{name}" for name, _ in feature_layers(model, module_names)] + list(OUTPUT_FEATURES)


def output_features(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From raw logits `(..., V)`: `OUTPUT_FEATURES` `(..., 4)`, top-k ids `(..., k)` and log-probs `(..., k)`."""
    logits = logits.float()
    log_partition = logits.logsumexp(-1, keepdim=True)  # (..., 1)
    logps = logits - log_partition  # (..., V)
    entropy = -(logps.exp() * logps).sum(-1, keepdim=True)  # (..., 1)
    topk_logps, topk_ids = logps.topk(min(top_k, logps.shape[-1]), dim=-1)  # (..., k)
    second = topk_logps[..., 1:2] if topk_logps.shape[-1] > 1 else topk_logps[..., :1]
    stats = torch.cat([entropy, topk_logps[..., :1], topk_logps[..., :1] - second, log_partition], -1)  # (..., 4)
    return stats, topk_ids, topk_logps


class TargetFeatureRecorder:
    """Forward hooks on `model` that record `TargetFeatures` for every forward call made while recording.

    Use as `with recorder:` (hooks on) and read `recorder.calls`: one `TargetFeatures` of shape
    `(batch, positions)` per forward call, where positions are those whose logits the call computed
    (the last one in a prefill with `logits_to_keep=1`). `pause()` stops recording without removing the
    hooks (e.g. while a perturbed copy of the same model runs).

    Args:
        model: the target (a transformers causal LM or a peft model on one).
        module_names: layers whose input norms are recorded (default: q_proj, v_proj).
        top_k: number of most likely tokens recorded.
        record: whether calls are recorded outside `pause()` / `recording()` blocks (default True).
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str] = DEFAULT_FEATURE_MODULES,
                 top_k: int = DEFAULT_TOP_K, record: bool = True):
        self.model = model
        self.layers = feature_layers(model, module_names)
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise TypeError(f"{type(model).__name__} has no output embeddings; the EU head reads the target's logits.")
        self.top_k = top_k
        self.calls: list[TargetFeatures] = []
        self._norms: list[torch.Tensor] = []
        self._handles: list = []
        self._recording = record

    def _record_norm(self, module, args):
        if self._recording:
            x = args[0]
            self._norms.append(x.detach().float().norm(dim=-1).clamp_min(1e-12).log())  # (B, n)

    def _record_output(self, module, args, output):
        if not self._recording:
            return
        logits = output.detach()  # (B, n', V)
        if len(self._norms) != len(self.layers):
            self._norms.clear()
            raise RuntimeError(f"The EU features expected inputs of {len(self.layers)} layers before the output head, "
                               f"saw {len(self._norms)}; this model's forward is not supported by the recorder.")
        kept = logits.shape[1]
        norms = torch.stack([n[:, -kept:] for n in self._norms], -1)  # (B, n', M)
        self._norms.clear()
        stats, topk_ids, topk_logps = output_features(logits, self.top_k)
        self.calls.append(TargetFeatures(torch.cat([norms, stats], -1), topk_ids, topk_logps))

    def __enter__(self) -> "TargetFeatureRecorder":
        self.calls, self._norms = [], []
        self._handles = [module.register_forward_pre_hook(self._record_norm) for _, module in self.layers]
        self._handles.append(self.head.register_forward_hook(self._record_output))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._norms.clear()

    @contextmanager
    def _recording_set_to(self, value: bool):
        previous, self._recording = self._recording, value
        try:
            yield
        finally:
            self._recording = previous

    def pause(self):
        """Context in which forward calls are not recorded."""
        return self._recording_set_to(False)

    def recording(self):
        """Context in which forward calls are recorded (the default unless built with `record=False`)."""
        return self._recording_set_to(True)

    def pop(self) -> TargetFeatures:
        """The record of the last forward call, removed from `calls`."""
        if not self.calls:
            raise RuntimeError("No forward call was recorded; run the model inside `with recorder:`.")
        return self.calls.pop()

    def generated(self, num_new_tokens: int, batch_size: int) -> TargetFeatures | None:
        """Features of the tokens a plain decoding loop generated: `(batch, num_new_tokens)`, or None when the
        recorded calls do not map one to one onto the new tokens (then score by `teacher_forced_features`)."""
        calls = self.calls
        if len(calls) != num_new_tokens or any(c.values.shape[0] != batch_size for c in calls):
            return None
        return TargetFeatures.cat([c.map(lambda t: t[:, -1:]) for c in calls], dim=1)  # (B, T, ...)


def teacher_forced_features(model: nn.Module, input_ids: torch.Tensor, prompt_length: int,
                            attention_mask: torch.Tensor | None = None, chunk_size: int = 64,
                            module_names: Sequence[str] = DEFAULT_FEATURE_MODULES,
                            top_k: int = DEFAULT_TOP_K) -> TargetFeatures:
    """Features of `input_ids[:, prompt_length:]` from one chunked pass of `model` (the positions predicting them).

    Returns `TargetFeatures` of shape `(batch_size, seq_len - prompt_length)`; positions follow the causal
    shift: logits at i predict token i + 1.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, L), as generate builds them
    device = model.device if hasattr(model, "device") else input_ids.device
    input_ids, attention_mask, position_ids = (t.to(device) for t in (input_ids, attention_mask, position_ids))
    parts, cache = [], None
    recorder = TargetFeatureRecorder(model, module_names, top_k)
    with torch.no_grad(), recorder:
        with recorder.pause():
            if prompt_length > 1:
                cache = output_cache(model(input_ids=input_ids[:, : prompt_length - 1],
                                           attention_mask=attention_mask[:, : prompt_length - 1],
                                           position_ids=position_ids[:, : prompt_length - 1],
                                           use_cache=True, logits_to_keep=1))
        cache_free = prompt_length > 1 and not continues_in_chunks(cache)  # recurrent/hybrid: full forwards
        for start in range(prompt_length - 1, input_ids.shape[1] - 1, chunk_size):
            end = min(start + chunk_size, input_ids.shape[1] - 1)
            if cache_free:
                model(input_ids=input_ids[:, :end], attention_mask=attention_mask[:, :end],
                      position_ids=position_ids[:, :end], use_cache=False, logits_to_keep=end - start)
            else:
                output = model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                               position_ids=position_ids[:, start:end], use_cache=True, **cache_argument(model, cache))
                cache = output_cache(output)
                cache_free = not continues_in_chunks(cache)
            parts.append(recorder.pop())
    return TargetFeatures.cat(parts, dim=1)
