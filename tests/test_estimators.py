"""The estimator registry: lookup, errors, and each entry against brute-force float64 values."""

import math

import pytest
import torch
from torch.testing import assert_close

from hf_eu.estimators import get_estimator, list_estimators, register_estimator

from test_divergences import as_lists, brute_entropy, brute_jsd, brute_kl, random_logps


@pytest.fixture()
def logps():
    return {
        "draft_logps": random_logps(3, 6, 5, seed=11),  # (K, N, V)
        "reference_logps": random_logps(6, 5, seed=12),  # (N, V)
        "target_logps": random_logps(6, 5, seed=13),
        "token_ids": torch.tensor([0, 1, 2, 3, 4, 0]),
    }


def brute_hf_eu(draft_logps, reference_logps):
    rows = []
    for n in range(draft_logps.shape[1]):
        members = [as_lists(draft_logps[k])[n] for k in range(draft_logps.shape[0])]
        mix = [sum(m[v] for m in members) / len(members) for v in range(len(members[0]))]
        ref = as_lists(reference_logps)[n]
        rows.append((brute_jsd(members), brute_kl(mix, ref), sum(brute_kl(m, ref) for m in members) / len(members)))
    return torch.tensor(rows, dtype=torch.float64)  # (N, 3): variance, bias, mean KL to reference


def test_hf_eu_is_variance_plus_bias_and_mean_kl_to_proxy(logps):
    out = get_estimator("hf_eu")(**logps)
    expected = brute_hf_eu(logps["draft_logps"], logps["reference_logps"])
    assert_close(out.variance, expected[:, 0])
    assert_close(out.bias, expected[:, 1])
    assert_close(out.score, expected[:, 2])  # EU = (1/K) Σ KL(q_k ‖ proxy)
    assert_close(out.score, out.variance + out.bias)


def test_no_osd_uses_target_and_variance_only_drops_bias(logps):
    no_osd = get_estimator("hf_eu_no_osd")(**logps)
    assert_close(no_osd.score, brute_hf_eu(logps["draft_logps"], logps["target_logps"])[:, 2])
    variance_only = get_estimator("hf_eu_variance_only")(**logps)
    assert_close(variance_only.score, brute_hf_eu(logps["draft_logps"], logps["reference_logps"])[:, 0])


def test_target_baselines(logps):
    probs = as_lists(logps["target_logps"])
    assert_close(get_estimator("entropy")(**logps).score,
                 torch.tensor([brute_entropy(p) for p in probs], dtype=torch.float64))
    assert_close(get_estimator("max_prob")(**logps).score,
                 torch.tensor([1 - max(p) for p in probs], dtype=torch.float64))
    ids = logps["token_ids"].tolist()
    assert_close(get_estimator("neg_logprob")(**logps).score,
                 torch.tensor([-math.log(p[i]) for p, i in zip(probs, ids)], dtype=torch.float64))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"Unknown estimator 'hf_eux'.*Did you mean 'hf_eu'.*Available:"):
        get_estimator("hf_eux")


def test_missing_input_is_named(logps):
    with pytest.raises(ValueError, match="reference_logps"):
        get_estimator("hf_eu")(draft_logps=logps["draft_logps"])


def test_registry_rejects_duplicates_and_unknown_inputs():
    assert {"hf_eu", "hf_eu_variance_only", "hf_eu_no_osd", "entropy", "max_prob", "neg_logprob"} <= set(
        list_estimators())
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("hf_eu", inputs={"drafts"}, description="dup")(lambda draft_logps: None)
    with pytest.raises(ValueError, match="Unknown estimator inputs"):
        register_estimator("x_new", inputs={"logits"}, description="bad")
