"""Registry of per-token uncertainty estimators: name -> pure function on log-probabilities.

An estimator turns the log-probabilities that the models of a composite assign at N positions into
one score per position (higher = more uncertain), optionally split into a variance and a bias part.
Each entry declares which inputs it reads, so `scoring.py` runs only the models it needs.

Inputs an estimator may declare:
- ``"drafts"``: `draft_logps` of shape `(K, N, vocab_size)`;
- ``"reference"``: `reference_logps` `(N, vocab_size)`, the proxy when the composite has one, else
  the target (the "no OSD" fallback of docs/method.md);
- ``"target"``: `target_logps` `(N, vocab_size)`, always the target;
- ``"token_ids"``: `token_ids` `(N,)`, the token actually at each position;
- ``"perturbed"``: `perturbed_logps` `(M, N, vocab_size)` from M seeded low-rank Gaussian perturbations
  of the target (`perturbation.py`); M is the entry's `num_perturbed`. Costs M target passes.
- ``"student"``: a Gaussian-distilled student (docs/method.md §1, arXiv 2510.19290): `student_logits` `(N, vocab_size)`
  (its mean member) and `student_factor_logits` `(q, N, vocab_size)` (each latent factor mapped to logits).
- ``"calibrator"``: `calibrator`, the fitted `EUCalibrator` stored with the composite.
- ``"features"``: `target_features`, the target's own computation at each position (`eu_features.TargetFeatures`
  of shape `(N, ·)`): recorded from the forward passes `generate` runs anyway, or one teacher-forced pass.
- ``"eu_head"``: `eu_head`, the distilled `EUHead` stored with the composite.

All formulas come from `divergences.py`; this module only combines them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .divergences import _LOG_FLOOR, entropy, gaussian_mutual_information, jsd, kl, mixture_logps
from .gaussian import member_outputs, standard_normal_factors

__all__ = [
    "Estimator",
    "EstimatorOutput",
    "ESTIMATOR_INPUTS",
    "register_estimator",
    "get_estimator",
    "list_estimators",
    "perturbed_ensemble_estimator",
    "CALIBRATION_FEATURES",
]

# Per-token features `hf_eu_calibrated` reads, in this order.
CALIBRATION_FEATURES = ("draft_jsd", "bias", "proxy_entropy", "target_entropy")

ESTIMATOR_INPUTS = frozenset({"drafts", "reference", "target", "token_ids", "perturbed", "student", "calibrator",
                              "features", "eu_head"})


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
    """A registered estimator: its name, the inputs it reads and its function.

    `num_perturbed` is the number M of perturbed target passes an estimator reading ``"perturbed"``
    needs; `max_drafts` limits how many of the composite's drafts are run (None: all of them).
    `working_copies` is how many float32 `(N, vocab_size)` temporaries the function holds at once beyond
    its inputs (the automatic chunk size of `scoring.py` budgets for them): 4 for the divergences of
    `divergences.py` (a mixture, then per member its probabilities, a difference and a floored copy).
    """

    name: str
    fn: Callable[..., EstimatorOutput]
    inputs: frozenset[str]
    description: str
    num_perturbed: int = 0
    max_drafts: int | None = None
    working_copies: int = 4

    def __call__(self, **given) -> EstimatorOutput:
        """Call the function with the arguments of the declared inputs (extra keyword arguments are ignored)."""
        names = [argument for name in sorted(self.inputs) for argument in _ARGUMENT_NAMES[name]]
        missing = [name for name in names if given.get(name) is None]
        if missing:
            raise ValueError(f"Estimator '{self.name}' needs {missing}, which were not given.")
        return self.fn(**{name: given[name] for name in names})


# Declared input -> argument names of the estimator function.
_ARGUMENT_NAMES = {"drafts": ("draft_logps",), "reference": ("reference_logps",), "target": ("target_logps",),
                   "token_ids": ("token_ids",), "perturbed": ("perturbed_logps",),
                   "student": ("student_logits", "student_factor_logits"), "calibrator": ("calibrator",),
                   "features": ("target_features",), "eu_head": ("eu_head",)}


_REGISTRY: dict[str, Estimator] = {}


def register_estimator(name: str, *, inputs: set[str], description: str, num_perturbed: int = 0,
                       max_drafts: int | None = None, working_copies: int = 4) -> Callable:
    """Decorator registering `fn(**inputs) -> EstimatorOutput` under `name`.

    Argument names of `fn` follow the declared inputs (see the module docstring): `draft_logps`,
    `reference_logps`, `target_logps`, `token_ids`, `perturbed_logps`, `student_logits` +
    `student_factor_logits`, `calibrator`. An entry reading ``"perturbed"`` must set `num_perturbed` ≥ 1.
    `working_copies`: see `Estimator` (keep the default of 4 unless the function holds more vocabulary-sized
    temporaries at once, or fewer).
    """
    unknown = set(inputs) - ESTIMATOR_INPUTS
    if unknown:
        raise ValueError(f"Unknown estimator inputs {sorted(unknown)}; choose from {sorted(ESTIMATOR_INPUTS)}.")
    if ("perturbed" in inputs) != (num_perturbed >= 1):
        raise ValueError(f"Estimator '{name}': `num_perturbed` must be ≥ 1 exactly when it reads 'perturbed' "
                         f"(inputs {sorted(inputs)}, num_perturbed={num_perturbed}).")
    if max_drafts is not None and max_drafts < 1:
        raise ValueError(f"Estimator '{name}': `max_drafts` must be None or ≥ 1, got {max_drafts}.")

    def decorator(fn: Callable[..., EstimatorOutput]) -> Callable[..., EstimatorOutput]:
        if name in _REGISTRY:
            raise ValueError(f"An estimator named '{name}' is already registered; pick another name.")
        _REGISTRY[name] = Estimator(name=name, fn=fn, inputs=frozenset(inputs), description=description,
                                    num_perturbed=num_perturbed, max_drafts=max_drafts, working_copies=working_copies)
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
    """EU_hat = (1/K) Σ_k KL(q_k ‖ q̄) + KL(q̄ ‖ p_φ) = (1/K) Σ_k KL(q_k ‖ p_φ) (docs/method.md)."""
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


@register_estimator("entropy", inputs={"target"}, description="Predictive entropy of the target (total uncertainty).",
                    working_copies=3)
def target_entropy(target_logps: torch.Tensor) -> EstimatorOutput:
    """H(p_T) at each position."""
    return EstimatorOutput(score=entropy(target_logps))


@register_estimator(
    "proxy_entropy",
    inputs={"reference"},
    description="Predictive entropy of the proxy (≈ the BMA's total uncertainty); the target's without a proxy.",
    working_copies=3,
)
def proxy_entropy(reference_logps: torch.Tensor) -> EstimatorOutput:
    """H(p_φ) at each position."""
    return EstimatorOutput(score=entropy(reference_logps))


@register_estimator("max_prob", inputs={"target"}, description="1 − the target's largest token probability.",
                    working_copies=0)
def max_prob(target_logps: torch.Tensor) -> EstimatorOutput:
    """1 − max_v p_T(v) at each position."""
    return EstimatorOutput(score=1.0 - target_logps.max(-1).values.exp())


@register_estimator(
    "neg_logprob",
    inputs={"target", "token_ids"},
    description="Negative log-probability the target gives the token actually there.",
    working_copies=0,
)
def neg_logprob(target_logps: torch.Tensor, token_ids: torch.Tensor) -> EstimatorOutput:
    """−log p_T(x_t) for the observed token x_t, capped at 1e4 nats where p_T(x_t) = 0 (as `divergences.kl`)."""
    return EstimatorOutput(score=-target_logps.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).clamp_min(_LOG_FLOOR))


@register_estimator(
    "hf_eu_idd",
    inputs={"drafts", "reference"},
    description="hf_eu on drafts trained on identical data (IDD ablation): run it on a composite of IDD drafts.",
)
def hf_eu_idd(draft_logps: torch.Tensor, reference_logps: torch.Tensor) -> EstimatorOutput:
    """The `hf_eu` formula; the name records that the composite's drafts are IDD drafts (e.g.
    `hf_eu.defaults.IDD_COMPOSITE_DIR`), the paper's baseline that data-diverse drafts must beat."""
    return _variance_plus_bias(draft_logps, reference_logps)


@register_estimator(
    "hf_eu_k2",
    inputs={"drafts", "reference"},
    description="hf_eu with the first two drafts only (K = 2 ablation).",
    max_drafts=2,
)
def hf_eu_k2(draft_logps: torch.Tensor, reference_logps: torch.Tensor) -> EstimatorOutput:
    """The `hf_eu` formula over drafts 0 and 1 (scoring runs only those)."""
    return _variance_plus_bias(draft_logps[:2], reference_logps)


def _perturbation_mutual_information(perturbed_logps: torch.Tensor) -> EstimatorOutput:
    """MI = H((1/M) Σ_m p_m) − (1/M) Σ_m H(p_m) = JSD of the M perturbed targets (docs/method.md)."""
    information = jsd(perturbed_logps, dim=0)  # (N,)
    return EstimatorOutput(score=information, variance=information)


def perturbed_ensemble_estimator(num_perturbed: int, name: str | None = None) -> Estimator:
    """An unregistered estimator: the mutual information of `num_perturbed` perturbed copies of the target.

    With a large M (default evaluation: 16, on seeds disjoint from TokUR's) this is the ground-truth EU of
    docs/method.md; with M = 4 or 8 it is the TokUR baseline (`tokur_m4`, `tokur_m8`).
    """
    if not isinstance(num_perturbed, int) or num_perturbed < 2:
        raise ValueError(f"`num_perturbed` must be an integer ≥ 2 (mutual information needs two members), "
                         f"got {num_perturbed!r}.")
    return Estimator(name=name or f"perturbed_mi_m{num_perturbed}", fn=_perturbation_mutual_information,
                     inputs=frozenset({"perturbed"}), description=f"MI of {num_perturbed} perturbed targets.",
                     num_perturbed=num_perturbed)


for _m in (4, 8):
    register_estimator(
        f"tokur_m{_m}",
        inputs={"perturbed"},
        description=f"TokUR-style mutual information of {_m} low-rank Gaussian perturbations of the target "
                    f"({_m} extra target passes per token).",
        num_perturbed=_m,
    )(_perturbation_mutual_information)


@register_estimator(
    "hf_eu_calibrated",
    inputs={"drafts", "reference", "target", "calibrator"},
    description="A regressor fitted to ground-truth EU from draft JSD, bias, proxy and target entropy.",
)
def hf_eu_calibrated(draft_logps: torch.Tensor, reference_logps: torch.Tensor, target_logps: torch.Tensor,
                     calibrator) -> EstimatorOutput:
    """calibrator(JSD, KL(q̄ ‖ p_φ), H(p_φ), H(p_T)) ≥ 0, fitted on questions disjoint from any scored ones."""
    parts = _variance_plus_bias(draft_logps, reference_logps)
    features = torch.stack([parts.variance, parts.bias, entropy(reference_logps), entropy(target_logps)], -1)  # (N, 4)
    return EstimatorOutput(score=calibrator(features), variance=parts.variance, bias=parts.bias)


@register_estimator(
    "gaussian_distill",
    inputs={"student"},
    description="Gaussian-distilled student (seed 002): ½ Σ_j Var_p(factor logits j), the second-order mutual "
                "information of its latent factors, from one student pass.",
)
def gaussian_distill(student_logits: torch.Tensor, student_factor_logits: torch.Tensor) -> EstimatorOutput:
    """MI ≈ ½ Σ_j Var_p(a_j), p = softmax(mean logits), a_j = factor logits j (`gaussian_mutual_information`)."""
    information = gaussian_mutual_information(student_logits.float().log_softmax(-1), student_factor_logits.float())
    return EstimatorOutput(score=information, variance=information)


# Members the sampled estimator draws (z ~ N(0, I_q), the same draws at every position) and the
# bound on the floats of its (samples, positions, vocab) log-probs, which it fills a slice at a time.
GAUSSIAN_DISTILL_SAMPLES = 32
GAUSSIAN_DISTILL_SEED = 0
_SAMPLED_MAX_ELEMENTS = 2**25


@register_estimator(
    "gaussian_distill_sampled",
    inputs={"student"},
    description=f"Gaussian-distilled student (seed 002): JSD of {GAUSSIAN_DISTILL_SAMPLES} members sampled from its "
                "latent factors (fixed seed), from one student pass.",
    working_copies=2 * GAUSSIAN_DISTILL_SAMPLES + 4,  # the members' logits and log-probs, then the JSD's
)
def gaussian_distill_sampled(student_logits: torch.Tensor, student_factor_logits: torch.Tensor) -> EstimatorOutput:
    """MI of S members with logits ℓ + Σ_j z_sj a_j, z_s ~ N(0, I_q) drawn once with a fixed seed: their JSD."""
    num_positions, vocab_size = student_logits.shape
    z = standard_normal_factors(GAUSSIAN_DISTILL_SAMPLES, student_factor_logits.shape[0], GAUSSIAN_DISTILL_SEED)
    step = max(1, _SAMPLED_MAX_ELEMENTS // (GAUSSIAN_DISTILL_SAMPLES * vocab_size))
    parts = []
    for start in range(0, num_positions, step):
        rows = slice(start, start + step)
        member_logits = member_outputs(student_logits[rows].float(), student_factor_logits[:, rows].float(), z)  # (S, n, V)
        parts.append(jsd(member_logits.log_softmax(-1), dim=0))  # (n,)
    information = torch.cat(parts)
    return EstimatorOutput(score=information, variance=information)


@register_estimator(
    "eu_head",
    inputs={"features", "eu_head"},
    description="Distilled EU head: a small network trained on the 16-copy ground truth, reading the target's "
                "own features (input norms of the perturbed layers, output statistics, Fisher variances of "
                "learned logit directions) from the passes generate already runs.",
    working_copies=0,
)
def eu_head(target_features, eu_head) -> EstimatorOutput:
    """EUHead(features) ≥ 0 in nats (`hf_eu.eu_head`); no draft, proxy or extra target pass."""
    return EstimatorOutput(score=eu_head(target_features).float())


@register_estimator(
    "eu_head_proxy",
    inputs={"features", "reference", "eu_head"},
    description="The EU head's variant that also reads the OSD proxy's predictive entropy (`EUHead.proxy_head`): "
                "one proxy pass more than eu_head.",
    working_copies=1,
)
def eu_head_proxy(target_features, reference_logps: torch.Tensor, eu_head) -> EstimatorOutput:
    """proxy_head([features, H(proxy)]) ≥ 0 in nats; H is `divergences.entropy` of the proxy's log-probs `(N, V)`."""
    from .eu_head import with_proxy_entropy

    if getattr(eu_head, "proxy_head", None) is None:
        raise ValueError("Estimator 'eu_head_proxy' reads the EU head's proxy variant, and this head has none; load a "
                         "composite whose head carries one or pick 'eu_head'.")
    return EstimatorOutput(score=eu_head.proxy_head(with_proxy_entropy(target_features, entropy(reference_logps))).float())
