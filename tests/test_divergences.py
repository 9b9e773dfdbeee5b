"""Divergences against float64 brute-force loops over a 5-token vocabulary, plus their properties."""

import math

import pytest
import torch
from torch.testing import assert_close

from hf_eu.divergences import entropy, jsd, kl, mixture_logps


def random_logps(*shape, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=generator, dtype=dtype)).log_softmax(-1)


def brute_entropy(p):
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def brute_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def brute_jsd(members):
    k = len(members)
    mix = [sum(m[v] for m in members) / k for v in range(len(members[0]))]
    return sum(brute_kl(m, mix) for m in members) / k


def as_lists(logps):
    return logps.exp().tolist()


def test_entropy_matches_brute_force():
    logps = random_logps(4, 5)
    expected = torch.tensor([brute_entropy(p) for p in as_lists(logps)], dtype=torch.float64)
    assert_close(entropy(logps), expected)


def test_kl_matches_brute_force_and_direction():
    p, q = random_logps(4, 5, seed=1), random_logps(4, 5, seed=2)
    expected = torch.tensor([brute_kl(a, b) for a, b in zip(as_lists(p), as_lists(q))], dtype=torch.float64)
    assert_close(kl(p, q), expected)
    assert not torch.allclose(kl(p, q), kl(q, p)), "KL is asymmetric: the direction must matter"


def test_jsd_matches_brute_force_and_entropy_form():
    members = random_logps(3, 4, 5, seed=3)  # (K, N, V)
    expected = torch.tensor(
        [brute_jsd([as_lists(members[k])[n] for k in range(3)]) for n in range(4)], dtype=torch.float64
    )
    assert_close(jsd(members), expected)
    entropy_form = entropy(mixture_logps(members)) - entropy(members).mean(0)
    assert_close(jsd(members), entropy_form)


def test_mixture_is_the_average_of_probabilities():
    members = random_logps(3, 4, 5, seed=4)
    assert_close(mixture_logps(members).exp(), members.exp().mean(0))


def test_variance_plus_bias_identity():
    """(1/K) Σ KL(q_k ‖ r) = JSD(q_1..q_K) + KL(q̄ ‖ r) for any reference r."""
    members, reference = random_logps(4, 6, 5, seed=5), random_logps(6, 5, seed=6)
    left = kl(members, reference.unsqueeze(0)).mean(0)
    right = jsd(members) + kl(mixture_logps(members), reference)
    assert_close(left, right)


def test_zero_on_identical_inputs():
    p = random_logps(4, 5, seed=7)
    assert_close(kl(p, p), torch.zeros(4, dtype=torch.float64))
    assert_close(jsd(torch.stack([p, p, p])), torch.zeros(4, dtype=torch.float64))


def test_nonnegative_and_jsd_bounded_by_log_k():
    for seed in range(5):
        members = random_logps(3, 8, 5, seed=seed)
        assert (kl(members[0], members[1]) >= 0).all()
        assert (jsd(members) >= 0).all() and (jsd(members) <= math.log(3) + 1e-12).all()
    # two one-hot members on different tokens reach the bound log 2
    one_hot = torch.full((2, 1, 5), float("-inf"), dtype=torch.float64)
    one_hot[0, 0, 0] = one_hot[1, 0, 1] = 0.0
    assert_close(jsd(one_hot), torch.tensor([math.log(2)], dtype=torch.float64))


def test_zero_probabilities_give_finite_values():
    p = torch.tensor([[0.0, float("-inf"), float("-inf")]], dtype=torch.float64)  # one-hot
    q = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()
    assert torch.isfinite(kl(p, q)).all() and torch.isfinite(entropy(p)).all()
    assert_close(kl(p, q), torch.tensor([math.log(2)], dtype=torch.float64))
    assert_close(entropy(p), torch.tensor([0.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_close_to_float64(dtype):
    members = random_logps(3, 4, 5, seed=8)
    expected = jsd(members)
    got = jsd(members.to(dtype).float())
    assert_close(got.double(), expected, atol=5e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0.05)


def test_jsd_rejects_vocab_dimension():
    with pytest.raises(ValueError, match="dim"):
        jsd(random_logps(3, 5), dim=-1)
