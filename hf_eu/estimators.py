"""Registry of per-token uncertainty estimators: name -> pure function on log-probabilities.

An estimator turns the log-probabilities that the models of a composite assign at N positions into
one score per position (higher = more uncertain), optionally split into a variance and a bias part.
Each entry declares which inputs it reads, so `scoring.py` runs only the models it needs.

Inputs an estimator may declare:
- ``"drafts"``: `draft_logps` of shape `(K, N, vocab_size)`;
- ``"reference"``: `reference_logps` `(N, vocab_size)`, the proxy when the composite has one, else
  the target (the "no OSD" fallback of DESIGN.md §1);
- ``"target"``: `target_logps` `(N, vocab_size)`, always the target;
- ``"token_ids"``: `token_ids` `(N,)`, the token actually at each position.

All formulas come from `divergences.py`; this module only combines them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .divergences import entropy, jsd, kl, mixture_logps

__all__ = [
    "Estimator",
    "EstimatorOutput",
    "ESTIMATOR_INPUTS",
    "register_estimator",
    "get_estimator",
    "list_estimators",
]

ESTIMATOR_INPUTS = frozenset({"drafts", "reference", "target", "token_ids"})


@dataclass(frozen=True)
class EstimatorOutput:
    """What an estimator returns for N positions.

    Attributes:
        score: `(N,)` float, the uncertainty (higher = more uncertain).
        variance: `(N,)` float or None: the disagreement part (JSD among drafts), when defined.
        bias: `(N,)` float or None: the part against the reference (KL(draft mixture ‖ reference)).
    """

    score: torch.Tensor
    variance: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: its name, the inputs it reads and its function."""

    name: str
    fn: Callable[..., EstimatorOutput]
    inputs: frozenset[str]
    description: str

    def __call__(
        self,
        *,
        draft_logps: torch.Tensor | None = None,
        reference_logps: torch.Tensor | None = None,
        target_logps: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> EstimatorOutput:
        given = {"draft_logps": draft_logps, "reference_logps": reference_logps, "target_logps": target_logps,
                 "token_ids": token_ids}
        arguments = {_ARGUMENT_NAMES[name]: given[_ARGUMENT_NAMES[name]] for name in self.inputs}
        missing = sorted(name for name, value in arguments.items() if value is None)
        if missing:
            raise ValueError(f"Estimator '{self.name}' needs {missing}, which were not given.")
        return self.fn(**arguments)


# Declared input -> argument name of the estimator function.
_ARGUMENT_NAMES = {"drafts": "draft_logps", "reference": "reference_logps", "target": "target_logps",
                   "token_ids": "token_ids"}


_REGISTRY: dict[str, Estimator] = {}


def register_estimator(name: str, *, inputs: set[str], description: str) -> Callable:
    """Decorator registering `fn(**inputs) -> EstimatorOutput` under `name`.

    Argument names of `fn` are the declared inputs, with `_logps` appended for log-prob inputs
    (`draft_logps`, `reference_logps`, `target_logps`) and `token_ids` as is.
    """
    unknown = set(inputs) - ESTIMATOR_INPUTS
    if unknown:
        raise ValueError(f"Unknown estimator inputs {sorted(unknown)}; choose from {sorted(ESTIMATOR_INPUTS)}.")

    def decorator(fn: Callable[..., EstimatorOutput]) -> Callable[..., EstimatorOutput]:
        if name in _REGISTRY:
            raise ValueError(f"An estimator named '{name}' is already registered; pick another name.")
        _REGISTRY[name] = Estimator(name=name, fn=fn, inputs=frozenset(inputs), description=description)
        return fn

    return decorator


def get_estimator(name: str) -> Estimator:
    """The registered estimator `name`; an unknown name raises a ValueError with suggestions."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown estimator '{name}'.{hint} Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def list_estimators() -> list[str]:
    """Names of all registered estimators, sorted."""
    return sorted(_REGISTRY)


def _variance_plus_bias(draft_logps: torch.Tensor, reference_logps: torch.Tensor) -> EstimatorOutput:
    mixture = mixture_logps(draft_logps, dim=0)  # (N, V)
    variance = jsd(draft_logps, dim=0, mixture=mixture)  # (N,)
    bias = kl(mixture, reference_logps)  # (N,)
    return EstimatorOutput(score=variance + bias, variance=variance, bias=bias)


@register_estimator(
    "hf_eu",
    inputs={"drafts", "reference"},
    description="JSD among drafts + KL(draft mixture ‖ proxy); the proxy falls back to the target.",
)
def hf_eu(draft_logps: torch.Tensor, reference_logps: torch.Tensor) -> EstimatorOutput:
    """EU_hat = (1/K) Σ_k KL(q_k ‖ q̄) + KL(q̄ ‖ p_φ) = (1/K) Σ_k KL(q_k ‖ p_φ) (DESIGN.md §1)."""
    return _variance_plus_bias(draft_logps, reference_logps)


@register_estimator(
    "hf_eu_no_osd",
    inputs={"drafts", "target"},
    description="JSD among drafts + KL(draft mixture ‖ raw target): the 'no OSD' ablation.",
)
def hf_eu_no_osd(draft_logps: torch.Tensor, target_logps: torch.Tensor) -> EstimatorOutput:
    """As `hf_eu`, with the bias always taken against the unperturbed target."""
    return _variance_plus_bias(draft_logps, target_logps)


@register_estimator(
    "hf_eu_variance_only",
    inputs={"drafts"},
    description="JSD among drafts only (no bias term).",
)
def hf_eu_variance_only(draft_logps: torch.Tensor) -> EstimatorOutput:
    """variance = (1/K) Σ_k KL(q_k ‖ q̄); the bias is left out (reported as zero)."""
    variance = jsd(draft_logps, dim=0)  # (N,)
    return EstimatorOutput(score=variance, variance=variance, bias=torch.zeros_like(variance))


@register_estimator("entropy", inputs={"target"}, description="Predictive entropy of the target (total uncertainty).")
def target_entropy(target_logps: torch.Tensor) -> EstimatorOutput:
    """H(p_T) at each position."""
    return EstimatorOutput(score=entropy(target_logps))


@register_estimator("max_prob", inputs={"target"}, description="1 − the target's largest token probability.")
def max_prob(target_logps: torch.Tensor) -> EstimatorOutput:
    """1 − max_v p_T(v) at each position."""
    return EstimatorOutput(score=1.0 - target_logps.max(-1).values.exp())


@register_estimator(
    "neg_logprob",
    inputs={"target", "token_ids"},
    description="Negative log-probability the target gives the token actually there.",
)
def neg_logprob(target_logps: torch.Tensor, token_ids: torch.Tensor) -> EstimatorOutput:
    """−log p_T(x_t) for the observed token x_t."""
    return EstimatorOutput(score=-target_logps.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1))
