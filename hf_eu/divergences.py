"""Divergences between categorical distributions given as log-probabilities.

The only place in hf_eu where an entropy, a KL divergence or a Jensen-Shannon divergence is written
down. Every function is pure, takes log-probabilities (`logps`, i.e. log-softmaxed values) over the
last dimension and returns values in nats. Zero-probability entries (`-inf` log-probs) are handled
with the convention 0 · log 0 = 0.

Nothing here knows about models, masks or chunks: `estimators.py` combines these functions and
`scoring.py` feeds them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["entropy", "kl", "mixture_logps", "jsd"]


def _p_log_ratio(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """Elementwise p · (log p − log q), with 0 where p = 0 (so −inf − −inf never turns into NaN)."""
    p_probs = p_logps.exp()
    terms = p_probs * (p_logps - q_logps)
    return torch.where(p_probs > 0, terms, torch.zeros_like(terms))


def entropy(logps: torch.Tensor) -> torch.Tensor:
    """Shannon entropy H(p) = −Σ_v p(v) log p(v) over the last dimension.

    Args:
        logps: log-probabilities of shape `(..., vocab_size)`.

    Returns:
        Tensor of shape `(...)`, in nats, ≥ 0.
    """
    probs = logps.exp()
    terms = probs * logps
    return -torch.where(probs > 0, terms, torch.zeros_like(terms)).sum(-1)


def kl(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """Forward Kullback-Leibler divergence KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)).

    The first argument is the distribution the expectation is taken under. Shapes broadcast.

    Args:
        p_logps: log-probabilities of p, shape `(..., vocab_size)`.
        q_logps: log-probabilities of q, shape broadcastable to `p_logps`.

    Returns:
        Tensor of shape `(...)`, in nats, ≥ 0 (clamped at 0 against rounding).
    """
    return _p_log_ratio(p_logps, q_logps).sum(-1).clamp_min(0.0)


def mixture_logps(member_logps: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Log-probabilities of the uniform mixture q̄ = (1/K) Σ_k q_k of K members along `dim`.

    log q̄ = logsumexp_k(log q_k) − log K.

    Args:
        member_logps: log-probabilities with the K members along `dim`, e.g. `(K, N, vocab_size)`.
        dim: the member dimension.

    Returns:
        Tensor with `dim` removed, e.g. `(N, vocab_size)`.
    """
    num_members = member_logps.shape[dim]
    return torch.logsumexp(member_logps, dim=dim) - math.log(num_members)


def jsd(member_logps: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """K-way Jensen-Shannon divergence JSD = (1/K) Σ_k KL(q_k ‖ q̄) = H(q̄) − (1/K) Σ_k H(q_k).

    q̄ is the uniform mixture of the K members. This equals the mutual information between the
    member index and the outcome, so it is also the epistemic term of an ensemble of K equally
    weighted members (perturbed targets, TokUR samples, drafts). Bounded by log K.

    Args:
        member_logps: log-probabilities with the K members along `dim`, e.g. `(K, N, vocab_size)`.
        dim: the member dimension.

    Returns:
        Tensor with `dim` and the vocabulary removed, e.g. `(N,)`, in nats, ≥ 0.
    """
    dim = dim % member_logps.dim()
    if dim == member_logps.dim() - 1:
        raise ValueError("`dim` must not be the vocabulary (last) dimension; put the K members on another axis.")
    mix_logps = mixture_logps(member_logps, dim=dim).unsqueeze(dim)  # (1, N, V) for dim=0
    return _p_log_ratio(member_logps, mix_logps).sum(-1).mean(dim).clamp_min(0.0)
