"""Divergences between categorical distributions given as log-probabilities.

The only place in hf_eu where an entropy, a KL divergence or a Jensen-Shannon divergence is written
down. Every function is pure, takes log-probabilities (`logps`, i.e. log-softmaxed values) over the
last dimension and returns values in nats. Zero-probability entries (`-inf` log-probs) are handled
with the convention 0 · log 0 = 0.

Nothing here knows about models, masks or chunks: `estimators.py` combines these functions and
`scoring.py` feeds them.
"""

from __future__ import annotations


import torch

__all__ = ["entropy", "kl", "mixture_logps", "jsd", "gaussian_mutual_information"]


# Where a log-probability is −inf, p · log p is 0 · (−inf) = NaN in floating point. Such sums are
# recomputed with log-probabilities clamped at this floor: every positive float32/float64 probability
# has log ≥ −745, so the floor changes no term with p > 0 and turns 0 · log 0 into 0 (the convention).
# A KL(p ‖ q) with q = 0 where p > 0 is thereby capped at p · 1e4 instead of +inf.
_LOG_FLOOR = -1.0e4


def _floored(logps: torch.Tensor) -> torch.Tensor:
    return logps.clamp_min(_LOG_FLOOR)


def _expected_log_ratio(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """Σ_v p(v) (log p(v) − log q(v)) over the last dimension, with 0 · log 0 = 0.

    The fast path reads each input once; only when it yields a non-finite value (a −inf log-prob) is the
    sum recomputed on floored log-probabilities, which makes it finite wherever the inputs have no NaN.
    When one input is broadcast along the first of several leading dimensions (K ensemble members
    against one shared distribution, as in `jsd`), the members are taken one at a time, so temporaries
    stay the size of one member's `(N, vocab_size)` whatever K.
    """
    shape = torch.broadcast_shapes(p_logps.shape, q_logps.shape)
    if len(shape) > 2 and shape[0] > 1 and tuple(p_logps.shape) != tuple(q_logps.shape):
        p_logps, q_logps = p_logps.expand(shape), q_logps.expand(shape)
        return torch.stack([_expected_log_ratio(p_logps[k], q_logps[k]) for k in range(shape[0])])
    p_probs = p_logps.exp()
    result = torch.linalg.vecdot(p_probs, p_logps - q_logps)
    if not torch.isfinite(result).all():
        floored = _floored(p_logps)
        floored = floored.sub_(_floored(q_logps)) if floored.shape == shape else floored - _floored(q_logps)
        result = torch.linalg.vecdot(p_probs, floored)
    return result


def entropy(logps: torch.Tensor) -> torch.Tensor:
    """Shannon entropy H(p) = −Σ_v p(v) log p(v) over the last dimension.

    Args:
        logps: log-probabilities of shape `(..., vocab_size)`.

    Returns:
        Tensor of shape `(...)`, in nats, ≥ 0.
    """
    return (-_expected_log_ratio(logps, torch.zeros_like(logps[..., :1]))).clamp_min(0.0)


def kl(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """Forward Kullback-Leibler divergence KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)).

    The first argument is the distribution the expectation is taken under. Shapes broadcast.

    Args:
        p_logps: log-probabilities of p, shape `(..., vocab_size)`.
        q_logps: log-probabilities of q, shape broadcastable to `p_logps`.

    Returns:
        Tensor of shape `(...)`, in nats, ≥ 0 (clamped at 0 against rounding).
    """
    return _expected_log_ratio(p_logps, q_logps).clamp_min(0.0)


def mixture_logps(member_logps: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Log-probabilities of the uniform mixture q̄ = (1/K) Σ_k q_k of K members along `dim`.

    log q̄ = log((1/K) Σ_k exp(log q_k)). Where every member's probability underflows to 0 the result
    is −inf, i.e. probability 0, which no divergence here can tell from the true tiny value.

    Args:
        member_logps: log-probabilities with the K members along `dim`, e.g. `(K, N, vocab_size)`.
        dim: the member dimension.

    Returns:
        Tensor with `dim` removed, e.g. `(N, vocab_size)`.
    """
    members = member_logps.unbind(dim)
    probs = members[0].exp()  # summed one member at a time: temporaries of one member's size
    for member in members[1:]:
        probs.add_(member.exp())
    return probs.div_(len(members)).log_()


def jsd(member_logps: torch.Tensor, dim: int = 0, mixture: torch.Tensor | None = None) -> torch.Tensor:
    """K-way Jensen-Shannon divergence JSD = (1/K) Σ_k KL(q_k ‖ q̄) = H(q̄) − (1/K) Σ_k H(q_k).

    q̄ is the uniform mixture of the K members. This equals the mutual information between the
    member index and the outcome, so it is also the epistemic term of an ensemble of K equally
    weighted members (perturbed targets, TokUR samples, drafts). Bounded by log K.

    Args:
        member_logps: log-probabilities with the K members along `dim`, e.g. `(K, N, vocab_size)`.
        dim: the member dimension.
        mixture: `mixture_logps(member_logps, dim)` if already computed (saves one pass).

    Returns:
        Tensor with `dim` and the vocabulary removed, e.g. `(N,)`, in nats, ≥ 0.
    """
    dim = dim % member_logps.dim()
    if dim == member_logps.dim() - 1:
        raise ValueError("`dim` must not be the vocabulary (last) dimension; put the K members on another axis.")
    if mixture is None:
        mixture = mixture_logps(member_logps, dim=dim)
    return kl(member_logps, mixture.unsqueeze(dim)).mean(dim)  # (K, N) -> (N,)


def gaussian_mutual_information(logps: torch.Tensor, factor_logits: torch.Tensor) -> torch.Tensor:
    """Mutual information of a categorical with Gaussian logit noise, to second order in the noise.

    Members have logits ℓ + Σ_j z_j a_j with z ~ N(0, I_q), and p = softmax(ℓ) (`logps` = log p). Then

        MI = E_z[KL(p_z ‖ E_z p_z)] ≈ ½ Σ_j Var_p(a_j),   Var_p(a) = Σ_v p_v a_v² − (Σ_v p_v a_v)²,

    i.e. half the logit covariance Σ_j a_j a_jᵀ contracted with the softmax's Fisher information
    diag(p) − p pᵀ. The expansion is exact as the a_j → 0 (relative error O(‖a‖²): odd orders vanish
    by the symmetry z → −z); it is the analytic epistemic term of a Gaussian-distilled student
    (seed 002). Var_p is computed centred (Σ_v p_v (a_v − E_p a)²), avoiding the two-term form's
    cancellation.

    Args:
        logps: log-probabilities of the mean member, shape `(..., vocab_size)`.
        factor_logits: `(q, ..., vocab_size)`, the logit direction a_j of each factor j.

    Returns:
        Tensor of shape `(...)`, in nats, ≥ 0.
    """
    probs = logps.exp()
    total = torch.zeros_like(probs[..., 0])
    for factor in factor_logits:  # one factor at a time: temporaries of one `(..., V)` each
        centered = factor - torch.linalg.vecdot(probs, factor).unsqueeze(-1)  # (..., V)
        total += torch.linalg.vecdot(probs, centered.square_())
    return 0.5 * total
