"""Estimators beyond the paper's core: TokUR perturbation MI, the K = 2 and IDD ablations, the calibrated
regressor's plumbing, and the perturbed-copy scoring behind the ground truth, each against float64 loops."""

import pytest
import torch
from torch.testing import assert_close

from hf_eu import get_estimator, score_tokens
from hf_eu.estimators import perturbed_ensemble_estimator, register_estimator
from hf_eu.perturbation import LowRankGaussianPerturbation

from test_divergences import brute_entropy, brute_jsd
from test_estimators import brute_hf_eu
from test_scoring import full_logps64


def brute_perturbed_mi(target, seeds, input_ids, attention_mask, prompt_length, rank=8, sigma=0.1):
    """Ground-truth style MI by full float64 forwards of each perturbed copy, then Python loops: (B, T)."""
    perturbation = LowRankGaussianPerturbation(target, rank=rank, sigma=sigma)
    member_probs = []
    for seed in seeds:
        with perturbation.apply(seed):
            member_probs.append(full_logps64(target, input_ids, attention_mask).exp())
    batch, length = input_ids.shape
    out = torch.zeros(batch, length - prompt_length, dtype=torch.float64)
    for b in range(batch):
        for t in range(prompt_length, length):
            out[b, t - prompt_length] = brute_jsd([p[b, t - 1].tolist() for p in member_probs])
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_tokur_scores_equal_full_forwards_of_perturbed_copies(target, batch, chunk_size):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    original = {k: v.clone() for k, v in target.state_dict().items()}
    out = score_tokens(get_estimator("tokur_m4"), ids, 2, drafts=[], proxy=None, target=target,
                       attention_mask=mask, chunk_size=chunk_size)
    expected = brute_perturbed_mi(target, range(4), ids, mask, 2)
    assert_close(out.epistemic_uncertainty.double(), expected * mask[:, 2:], atol=2e-5, rtol=1e-4)
    assert expected.max() > 0.05  # the perturbations really change the distributions
    assert all(torch.equal(original[k], v) for k, v in target.state_dict().items())  # weights restored


def test_ground_truth_estimator_uses_given_seeds_and_settings(target, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    perturbation = LowRankGaussianPerturbation(target, rank=2, sigma=0.3)
    seeds = [100, 101, 102, 103, 104, 105]
    out = score_tokens(perturbed_ensemble_estimator(6), ids, 3, drafts=[], proxy=None, target=target,
                       attention_mask=mask, perturbation=perturbation, perturbation_seeds=seeds)
    expected = brute_perturbed_mi(target, seeds, ids, mask, 3, rank=2, sigma=0.3)
    assert_close(out.epistemic_uncertainty.double(), expected * mask[:, 3:], atol=2e-5, rtol=1e-4)
    tokur = score_tokens(get_estimator("tokur_m4"), ids, 3, drafts=[], proxy=None, target=target, attention_mask=mask)
    assert not torch.allclose(tokur.epistemic_uncertainty, out.epistemic_uncertainty)


def test_perturbed_scoring_rejects_bad_seeds_and_foreign_perturbation(target, proxy, batch):
    ids = batch["input_ids"][:1]
    with pytest.raises(ValueError, match="needs 4 distinct perturbation seeds"):
        score_tokens(get_estimator("tokur_m4"), ids, 2, drafts=[], proxy=None, target=target,
                     perturbation_seeds=[0, 0, 1, 2])
    with pytest.raises(ValueError, match="another model"):
        score_tokens(get_estimator("tokur_m4"), ids, 2, drafts=[], proxy=None, target=target,
                     perturbation=LowRankGaussianPerturbation(proxy))
    with pytest.raises(ValueError, match="integer ≥ 2"):
        perturbed_ensemble_estimator(1)
    with pytest.raises(ValueError, match="num_perturbed"):
        register_estimator("x_perturbed", inputs={"perturbed"}, description="no M")


def test_k2_uses_first_two_drafts_and_idd_is_the_hf_eu_formula(target, drafts, proxy, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    k2 = score_tokens(get_estimator("hf_eu_k2"), ids, 2, drafts=drafts, proxy=proxy, target=target, attention_mask=mask)
    two = score_tokens(get_estimator("hf_eu"), ids, 2, drafts=drafts[:2], proxy=proxy, target=target,
                       attention_mask=mask)
    three = score_tokens(get_estimator("hf_eu"), ids, 2, drafts=drafts, proxy=proxy, target=target,
                         attention_mask=mask)
    assert_close(k2.epistemic_uncertainty, two.epistemic_uncertainty)
    assert not torch.allclose(k2.epistemic_uncertainty, three.epistemic_uncertainty)
    idd = score_tokens(get_estimator("hf_eu_idd"), ids, 2, drafts=drafts, proxy=proxy, target=target,
                       attention_mask=mask)
    assert_close(idd.epistemic_uncertainty, three.epistemic_uncertainty)
    with pytest.raises(ValueError, match="uses 2 drafts; the composite has 1"):
        score_tokens(get_estimator("hf_eu_k2"), ids, 2, drafts=drafts[:1], proxy=proxy, target=target)


def test_calibrated_estimator_feeds_the_four_features_in_order():
    draft_logps = torch.randn(3, 5, 6).log_softmax(-1)  # (K, N, V)
    reference_logps = torch.randn(5, 6).log_softmax(-1)
    target_logps = torch.randn(5, 6).log_softmax(-1)
    weights = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    out = get_estimator("hf_eu_calibrated")(draft_logps=draft_logps, reference_logps=reference_logps,
                                            target_logps=target_logps, calibrator=lambda f: f @ weights)
    brute = brute_hf_eu(draft_logps.double(), reference_logps.double())
    entropies = [torch.tensor([brute_entropy(p) for p in x.double().exp().tolist()]) for x in
                 (reference_logps, target_logps)]
    expected = brute[:, 0] + 10 * brute[:, 1] + 100 * entropies[0] + 1000 * entropies[1]
    assert_close(out.score.double(), expected, rtol=1e-5, atol=1e-4)


def test_calibrated_estimator_without_calibrator_is_a_clear_error(target, drafts, proxy, batch):
    with pytest.raises(ValueError, match="needs a fitted calibrator"):
        score_tokens(get_estimator("hf_eu_calibrated"), batch["input_ids"], 2, drafts=drafts, proxy=proxy,
                     target=target)


def test_many_estimators_in_one_pass_equal_separate_passes(target, drafts, proxy, batch):
    from hf_eu.scoring import score_tokens_many

    ids, mask = batch["input_ids"], batch["attention_mask"]
    truth = perturbed_ensemble_estimator(5, "ground_truth")
    names = ["hf_eu", "hf_eu_k2", "entropy", "neg_logprob", "tokur_m4"]
    chosen = [get_estimator(n) for n in names] + [truth]
    seeds = {"ground_truth": range(5), "tokur_m4": [50, 51, 52, 53]}
    many = score_tokens_many(chosen, ids, 2, drafts=drafts, proxy=proxy, target=target, attention_mask=mask,
                             perturbation_seeds=seeds, chunk_size=3)
    for estimator in chosen:
        alone = score_tokens(estimator, ids, 2, drafts=drafts, proxy=proxy, target=target, attention_mask=mask,
                             perturbation_seeds=seeds.get(estimator.name))
        assert_close(many[estimator.name].epistemic_uncertainty, alone.epistemic_uncertainty, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="distinct"):
        score_tokens_many([truth, truth], ids, 2, drafts=drafts, proxy=proxy, target=target)
