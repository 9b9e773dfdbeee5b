"""Gaussian distillation (seed 002): EM on a known low-rank GP, the E-step against float64 brute force,
sampling, the analytic MI, the student LM, its estimators, the composite round trip and the trainer."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from torch.testing import assert_close

from hf_eu import UncertaintyAwareModelForCausalLM, get_estimator, truncated_copy
from hf_eu.divergences import gaussian_mutual_information, jsd, kl
from hf_eu.gaussian import (
    GaussianFactorHead,
    GaussianStudentForCausalLM,
    member_outputs,
    standard_normal_factors,
)
from trainers.factor_em import (
    FactorEM,
    FactorStatistics,
    expected_nll,
    fit_factor_model,
)


@pytest.fixture()
def one_thread():
    """EM's many small steps run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def known_gp(seed: int, dims: int = 4, num_factors: int = 2, width: int = 8) -> GaussianFactorHead:
    """A latent factor model with known, non-trivial μ(x) and Φ(x) (a randomly weighted head)."""
    torch.manual_seed(seed)
    truth = GaussianFactorHead(dims, num_factors, intermediate_size=width)
    with torch.no_grad():
        for parameter in truth.parameters():
            parameter.normal_(0, 0.6)
    return truth


def draw_members(truth, inputs, num_members, noise_variance, seed):
    """Members y_m(x) = μ(x) + Φ(x)ᵀ z_m + ε, one z_m per member: `(M, N, D)`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mean, factors = truth(inputs)
    z = torch.randn(num_members, truth.num_factors, generator=generator)
    noise = noise_variance**0.5 * torch.randn(num_members, *mean.shape, generator=generator)
    return mean + torch.einsum("mq,nqd->mnd", z, factors) + noise


def covariance(factors, noise_variance):
    """ΦᵀΦ + Ψ at every design point: `(N, D, D)`."""
    return torch.einsum("nqd,nqe->nde", factors, factors) + torch.diag_embed(noise_variance.expand(factors.shape[-1]))


def relative_error(estimate, truth):
    return ((estimate - truth).flatten(1).norm(dim=1) / truth.flatten(1).norm(dim=1)).mean().item()


# ------------------------------------------------------------------------------------------ E-step
def brute_force_posterior(mean, factors, observations, psi):
    """Posterior of z_m and log p(y_m) from the joint Gaussian of all N·D outputs, in float64."""
    loadings = factors.double().permute(1, 0, 2).reshape(factors.shape[1], -1)  # (q, N·D), column i·D + d
    noise = torch.diag(psi.double().repeat(mean.shape[0]))  # (N·D, N·D)
    joint = loadings.T @ loadings + noise
    residuals = (observations.double() - mean.double()).flatten(1)  # (M, N·D)
    gain = loadings @ torch.linalg.inv(joint)  # (q, N·D)
    means = residuals @ gain.T  # (M, q)
    posterior = torch.eye(factors.shape[1], dtype=torch.float64) - gain @ loadings.T
    marginal = torch.distributions.MultivariateNormal(mean.double().flatten(), covariance_matrix=joint)
    return means, posterior, marginal.log_prob(observations.double().flatten(1)).sum()


def test_e_step_and_likelihoods_match_brute_force_float64():
    torch.manual_seed(0)
    num_members, points, dims, num_factors = 5, 6, 3, 2
    mean, factors = torch.randn(points, dims), torch.randn(points, num_factors, dims)
    observations = torch.randn(num_members, points, dims) * 2
    psi = torch.tensor([0.5, 1.5, 0.8], dtype=torch.float64)  # diagonal noise
    stats = FactorStatistics.of_chunk(mean[:4], factors[:4], observations[:, :4]) + FactorStatistics.of_chunk(
        mean[4:], factors[4:], observations[:, 4:])  # two chunks add up to the whole
    moments = stats.posterior(psi)
    means, posterior, log_likelihood = brute_force_posterior(mean, factors, observations, psi)
    assert_close(moments.means, means)
    assert_close(moments.covariance, posterior)
    assert stats.log_likelihood(psi) == pytest.approx(log_likelihood.item(), rel=1e-10)

    # Q and the noise update against the explicit expectation E‖r − Φᵀz‖² = ‖r − Φᵀm‖² + tr(Φ Φᵀ Σ_post) per dim
    residuals = observations.double() - mean.double()
    fitted = torch.einsum("mq,nqd->mnd", moments.means, factors.double())
    spread = torch.einsum("nqd,npd,qp->d", factors.double(), factors.double(), moments.covariance)
    per_dim = (residuals - fitted).square().sum((0, 1)) + num_members * spread  # (D,)
    expected = -0.5 * (num_members * points * (dims * math.log(2 * math.pi) + psi.log().sum()) + (per_dim / psi).sum())
    assert stats.expected_log_likelihood(psi, moments) == pytest.approx(expected.item(), rel=1e-10)
    assert_close(stats.noise_update(moments, "diagonal"), per_dim / (num_members * points))
    assert_close(stats.noise_update(moments, "isotropic"), (per_dim / (num_members * points)).mean().expand(dims))

    # the M-step loss is the same Q, per member·point·dim, up to terms constant in μ and Φ
    loss = expected_nll(mean.double(), factors.double(), observations.double(), moments, psi)
    constant = 0.5 * num_members * points * (dims * math.log(2 * math.pi) + psi.log().sum())
    assert (loss * num_members * points * dims + constant).item() == pytest.approx(-expected.item(), rel=1e-10)


def test_whitened_initialisation_has_the_moments_of_the_prior():
    observations = torch.randn(6, 10, 3)
    em = FactorEM(torch.zeros(10, 3), observations, num_factors=3)
    em.initialize()
    scores = em.moments.means
    assert_close(scores.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    assert_close(scores.T @ scores / 6, torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_factors": 5}, "num_factors"), ({"num_factors": 0}, "num_factors"),
    ({"noise_model": "full"}, "noise_model"), ({"init": "zeros"}, "init"),
])
def test_bad_em_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FactorEM(torch.zeros(4, 2), torch.zeros(5, 4, 2), **{"num_factors": 2, **kwargs})


# ------------------------------------------------------------------------------ EM on a known GP
def test_em_recovers_a_known_low_rank_gp_and_likelihood_never_decreases(one_thread):
    """Tolerances: covariance ΦᵀΦ + σ²I within 15% (relative Frobenius, mean over x) and mean within 10%, each
    at most 1.5× the error of the members' own sample covariance / mean (what M = 400 draws allow); σ² within 10%.
    (Measured: covariance 0.082 against the sample covariance's 0.083, mean 0.071 against 0.056.)"""
    dims, num_factors, points, num_members, noise_variance = 4, 2, 96, 400, 0.05
    truth = known_gp(seed=0, dims=dims, num_factors=num_factors)
    inputs = torch.randn(points, dims, generator=torch.Generator().manual_seed(1))
    observations = draw_members(truth, inputs, num_members, noise_variance, seed=2)
    torch.manual_seed(3)
    student = GaussianFactorHead(dims, num_factors, intermediate_size=32)
    em = fit_factor_model(student, inputs, observations, num_factors=num_factors, num_iterations=25,
                          m_step_steps=60, batch_size=64, learning_rate=1e-2)

    log_likelihoods = [record["log_likelihood"] for record in em.history]
    assert all(later >= earlier - 1e-9 * abs(earlier) for earlier, later in zip(log_likelihoods, log_likelihoods[1:]))
    assert log_likelihoods[-1] > log_likelihoods[0]
    with torch.no_grad():
        true_mean, true_factors = truth(inputs)
        mean, factors = student(inputs)
    true_covariance = covariance(true_factors, torch.tensor(noise_variance))
    fitted_covariance = covariance(factors, em.psi.float())
    centred = observations - observations.mean(0)
    sample_covariance = torch.einsum("mnd,mne->nde", centred, centred) / (num_members - 1)
    error, oracle = relative_error(fitted_covariance, true_covariance), relative_error(sample_covariance, true_covariance)
    assert error < 0.15 and error < 1.5 * oracle, (error, oracle)
    mean_error, mean_oracle = relative_error(mean, true_mean), relative_error(observations.mean(0), true_mean)
    assert mean_error < 0.1 and mean_error < 1.5 * mean_oracle, (mean_error, mean_oracle)
    assert em.psi.mean().item() == pytest.approx(noise_variance, rel=0.1)


def test_sampling_z_reproduces_the_fitted_covariance_within_monte_carlo_error():
    truth = known_gp(seed=4, dims=3, num_factors=2)
    with torch.no_grad():
        mean, factors = truth(torch.randn(2, 3))  # (N, D), (N, q, D)
    psi = torch.tensor([0.1, 0.2, 0.3])
    samples = 40_000
    z = standard_normal_factors(samples, 2, seed=5)
    noise = psi.sqrt() * torch.randn(samples, 2, 3, generator=torch.Generator().manual_seed(6))
    members = member_outputs(mean, factors.transpose(0, 1), z, noise=noise).double()  # (S, N, D)
    target = covariance(factors, psi).double()  # (N, D, D)
    centred = members - members.mean(0)
    estimate = torch.einsum("snd,sne->nde", centred, centred) / (samples - 1)
    variance = torch.diagonal(target, dim1=1, dim2=2)
    standard_error = ((variance[:, :, None] * variance[:, None, :] + target.square()) / samples).sqrt()
    assert ((estimate - target).abs() < 4 * standard_error).all()
    assert ((members.mean(0) - mean.double()).abs() < 4 * (variance / samples).sqrt()).all()


# ------------------------------------------------------------------------------- analytic MI
def test_gaussian_mutual_information_matches_brute_force_loop():
    torch.manual_seed(7)
    logps = (torch.randn(3, 5, dtype=torch.float64) * 2).log_softmax(-1)
    factor_logits = torch.randn(2, 3, 5, dtype=torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    for n in range(3):
        for j in range(2):
            p, a = logps[n].exp(), factor_logits[j, n]
            expected[n] += 0.5 * (sum(p[v] * a[v] ** 2 for v in range(5)) - sum(p[v] * a[v] for v in range(5)) ** 2)
    assert_close(gaussian_mutual_information(logps, factor_logits), expected)
    shifted = factor_logits + torch.randn(2, 3, 1, dtype=torch.float64)  # a constant logit shift changes nothing
    assert_close(gaussian_mutual_information(logps, shifted), expected)


def exact_gaussian_mi(logits, factor_logits, nodes: int = 30):
    """E_z KL(p_z ‖ E p_z) for q = 2 by tensor-product Gauss-Hermite quadrature in float64 (exact to ~1e-12)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    z = torch.tensor(np.stack(np.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2))  # (K, 2)
    weights = torch.tensor(np.outer(w, w).reshape(-1))  # (K,)
    members = (logits + torch.einsum("kq,qnv->knv", z, factor_logits)).log_softmax(-1)  # (K, N, V)
    mixture = (weights[:, None, None] * members.exp()).sum(0).log()  # (N, V)
    return (weights[:, None] * kl(members, mixture[None])).sum(0)


def test_gaussian_mutual_information_is_exact_to_second_order():
    torch.manual_seed(8)
    logits = torch.randn(3, 7, dtype=torch.float64) * 2
    factor_logits = torch.randn(2, 3, 7, dtype=torch.float64)
    errors = []
    for scale in (1e-2, 1e-3):
        exact = exact_gaussian_mi(logits, scale * factor_logits)
        approx = gaussian_mutual_information(logits.log_softmax(-1), scale * factor_logits)
        errors.append(((approx - exact) / exact).abs().max().item())
    assert errors[0] < 1e-3 and errors[1] < errors[0] / 50  # relative error O(scale²)


# ------------------------------------------------------------------------------- student LM
def fitted_looking_student(backbone, num_factors=2, seed=9):
    """A student whose head is not at its initialisation (non-zero mean correction, large factors)."""
    torch.manual_seed(seed)
    student = GaussianStudentForCausalLM(backbone, num_factors=num_factors, intermediate_size=8)
    with torch.no_grad():
        for parameter in student.head.parameters():
            parameter.normal_(0, 0.3)
    return student.eval()


def test_student_outputs_match_a_direct_computation(target):
    student = fitted_looking_student(target)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        output = student(input_ids=ids)
        hidden = target(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        mean, factors = student.head(hidden)
        head = target.get_output_embeddings().weight
        assert_close(output.logits, mean @ head.T)
        assert_close(output.factor_logits, factors @ head.T)
        z = torch.tensor([0.7, -1.3])
        member = target.get_output_embeddings()(mean + torch.einsum("q,btqd->btd", z, factors))
        assert_close(output.logits + torch.einsum("q,btqv->btv", z, output.factor_logits), member, atol=1e-5, rtol=1e-5)
        # chunked through the KV cache as scoring feeds it, and only the kept positions
        first = student(input_ids=ids[:, :4], use_cache=True, logits_to_keep=1)
        rest = student(input_ids=ids[:, 4:], cache=first.cache, use_cache=True,
                       position_ids=torch.arange(4, 7)[None])
    assert student.num_factors == 2 and output.factor_logits.shape == (1, 7, 2, 64)
    assert_close(first.logits[:, 0], output.logits[:, 3], atol=1e-5, rtol=1e-5)
    assert_close(rest.factor_logits, output.factor_logits[:, 4:], atol=1e-5, rtol=1e-5)


def test_student_rejects_bad_arguments(target):
    with pytest.raises(ValueError, match="num_factors"):
        GaussianStudentForCausalLM(target)
    with pytest.raises(ValueError, match="num_factors"):
        GaussianStudentForCausalLM(target, num_factors=0)
    with pytest.raises(ValueError, match="hidden states of size"):
        GaussianStudentForCausalLM(target, head=GaussianFactorHead(8, 2))
    with pytest.raises(ValueError, match="num_samples"):
        standard_normal_factors(0, 2)


def test_estimators_match_brute_force(monkeypatch):
    from hf_eu import estimators

    torch.manual_seed(10)
    logits, factor_logits = torch.randn(6, 64) * 2, torch.randn(3, 6, 64) * 0.5
    analytic = get_estimator("gaussian_distill")(student_logits=logits, student_factor_logits=factor_logits)
    assert_close(analytic.score, gaussian_mutual_information(logits.log_softmax(-1), factor_logits))
    z = standard_normal_factors(estimators.GAUSSIAN_DISTILL_SAMPLES, 3, estimators.GAUSSIAN_DISTILL_SEED)
    members = torch.stack([(logits + torch.einsum("q,qnv->nv", z_s, factor_logits)).log_softmax(-1) for z_s in z])
    sampled = get_estimator("gaussian_distill_sampled")
    expected = jsd(members, dim=0)
    assert_close(sampled(student_logits=logits, student_factor_logits=factor_logits).score, expected)
    monkeypatch.setattr(estimators, "_SAMPLED_MAX_ELEMENTS", 2 * 64 * estimators.GAUSSIAN_DISTILL_SAMPLES)
    assert_close(sampled(student_logits=logits, student_factor_logits=factor_logits).score, expected)  # 2 rows a slice
    assert (expected > 0).all() and (analytic.score > 0).all()
    zero = get_estimator("gaussian_distill")(student_logits=logits, student_factor_logits=torch.zeros(3, 6, 64))
    assert_close(zero.score, torch.zeros(6))


# ------------------------------------------------------------------------ composite and generate
def direct_student_eu(student, input_ids, attention_mask, prompt_length, name="gaussian_distill"):
    """The estimator on the student's full forward over the sequences, as a (B, T) tensor."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        output = student(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    logits = output.logits[:, prompt_length - 1 : -1]  # (B, T, V): the causal shift
    factor_logits = output.factor_logits[:, prompt_length - 1 : -1]  # (B, T, q, V)
    score = get_estimator(name)(student_logits=logits.flatten(0, 1),
                                student_factor_logits=factor_logits.flatten(0, 1).transpose(0, 1)).score
    return score.view(logits.shape[:2])


@pytest.mark.parametrize("name", ["gaussian_distill", "gaussian_distill_sampled"])
def test_generate_returns_the_students_eu_and_the_composite_round_trips(tmp_path, target, drafts, batch, name):
    student = fitted_looking_student(target)  # its backbone is the target itself: nothing of it is stored
    model = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, student=student)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, estimator=name)
    assert torch.equal(out.sequences, target.generate(**batch, max_new_tokens=5, do_sample=False))
    prompt_length = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, prompt_length:])], 1)
    expected = direct_student_eu(student, out.sequences, mask, prompt_length, name) * out.uncertainty_mask
    assert_close(out.epistemic_uncertainty, expected, atol=1e-5, rtol=1e-4)
    assert (out.epistemic_uncertainty[out.uncertainty_mask] > 0).all()

    model.save_pretrained(tmp_path / "composite")
    stored = {p.relative_to(tmp_path / "composite").as_posix() for p in (tmp_path / "composite").rglob("*") if p.is_file()}
    assert "student/head.safetensors" in stored and not any(p.startswith("student/backbone") for p in stored)
    assert not any(p.endswith("model.safetensors") and not p.startswith("drafts") for p in stored)
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "composite"), target=target)
    assert loaded.config.has_student and loaded.config.student["num_factors"] == 2
    assert loaded.student.backbone is target
    assert_close(loaded.student.head.noise_variance, student.head.noise_variance)
    again = loaded.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, estimator=name)
    assert_close(again.epistemic_uncertainty, out.epistemic_uncertainty)


def test_a_lora_student_on_truncated_layers_is_stored_as_an_adapter(tmp_path, target, drafts, batch):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    backbone = get_peft_model(truncated_copy(target, 1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    student = fitted_looking_student(backbone)
    model = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, student=student)
    expected = model.estimate_uncertainty(**batch, prompt_length=2, estimator="gaussian_distill")
    model.save_pretrained(tmp_path / "composite")
    folder = tmp_path / "composite" / "student" / "backbone"
    assert {"adapter_model.safetensors", "hf_eu_adapter_base.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "model.safetensors").exists()
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "composite"), target=target)
    got = loaded.estimate_uncertainty(**batch, prompt_length=2, estimator="gaussian_distill")
    assert_close(got.epistemic_uncertainty, expected.epistemic_uncertainty, atol=1e-5, rtol=1e-4)

    (tmp_path / "composite" / "student" / "head.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="student head .* corrupt"):
        UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "composite"), target=target)


def test_missing_or_wrong_student_gives_clear_errors(eu_model, target, drafts, batch):
    with pytest.raises(ValueError, match="has none"):
        eu_model.generate(**batch, max_new_tokens=2, return_dict_in_generate=True, estimator="gaussian_distill")
    with pytest.raises(TypeError, match="GaussianStudentForCausalLM"):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, student="student/")
    small = GaussianStudentForCausalLM(tiny_llama(seed=30, vocab_size=32), num_factors=2)
    with pytest.raises(ValueError, match="vocabulary"):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, student=small)


# ---------------------------------------------------------------------------------- trainer
def design_rows(count=6, length=12, prompt_length=4, seed=12):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 64, (length,), generator=generator).tolist(), "prompt_length": prompt_length}
            for _ in range(count)]


def gaussian_config(tmp_path, **overrides):
    from trainers.gaussian_config import GaussianDistillationConfig

    settings = dict(output_dir=str(tmp_path / "out"), max_steps=6, m_step_steps=2, num_factors=2, num_members=4,
                    per_device_train_batch_size=16, perturbation_sigma=0.5, report_to=[], use_cpu=True,
                    save_strategy="no", logging_steps=1)
    return GaussianDistillationConfig(**{**settings, **overrides})


def test_trainer_fits_the_head_only_and_likelihood_rises(tmp_path, one_thread):
    from trainers.gaussian_trainer import GaussianDistillationTrainer

    target = tiny_llama(seed=0)
    backbone = truncated_copy(target, 1, share_embeddings=True)
    student = GaussianStudentForCausalLM(backbone, num_factors=2, intermediate_size=16)
    head_before = {k: v.clone() for k, v in student.head.state_dict().items()}
    frozen_before = {k: v.clone() for k, v in [*target.state_dict().items(), *backbone.state_dict().items()]}
    trainer = GaussianDistillationTrainer(model=student, args=gaussian_config(tmp_path), train_dataset=design_rows(),
                                          teacher=target)
    trainer.train()
    assert all(not torch.equal(v, student.head.state_dict()[k]) for k, v in head_before.items())
    frozen_after = dict([*target.state_dict().items(), *backbone.state_dict().items()])
    assert all(torch.equal(v, frozen_after[k]) for k, v in frozen_before.items())  # target, shared embeddings
    assert_close(student.head.noise_variance, trainer.em.psi.float())
    likelihoods = [e["em/log_likelihood"] for e in trainer.state.log_history if "em/log_likelihood" in e]
    assert len(likelihoods) == 3 and likelihoods[-1] > likelihoods[0]
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]  # E-steps hide none
    # the observations are the perturbed targets' hidden states: member 0 is seed member_seed = 1000
    from hf_eu.perturbation import LowRankGaussianPerturbation
    from trainers.gaussian_design import collect_hidden_states

    with LowRankGaussianPerturbation(target, sigma=0.5).apply(1000):
        assert_close(trainer.em.observations[0], collect_hidden_states(target, design_rows()))


def test_trainer_reuses_its_design_cache_and_accepts_explicit_teachers(tmp_path, monkeypatch):
    import copy

    import trainers.gaussian_design as design
    from trainers.gaussian_trainer import GaussianDistillationTrainer

    target = tiny_llama(seed=0)
    teachers = []
    for k in range(3):
        teacher = copy.deepcopy(target)
        with torch.no_grad():
            teacher.model.layers[0].self_attn.q_proj.weight.add_(0.3 * torch.randn(16, 16))
        teachers.append(teacher)
    student = GaussianStudentForCausalLM(target, num_factors=2, intermediate_size=16)
    args = gaussian_config(tmp_path, num_members=3)
    first = GaussianDistillationTrainer(model=student, args=args, train_dataset=design_rows(), teachers=teachers)
    monkeypatch.setattr(design, "collect_hidden_states", lambda *a, **k: pytest.fail("recomputed a cached member"))
    second = GaussianDistillationTrainer(model=student, args=args, train_dataset=design_rows(), teachers=teachers)
    assert torch.equal(first.em.observations, second.em.observations) and first.em.observations.shape[0] == 3


def test_trainer_rejects_bad_arguments(tmp_path, target, drafts):
    from trainers.gaussian_trainer import GaussianDistillationTrainer

    student = GaussianStudentForCausalLM(target, num_factors=2)
    args = gaussian_config(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        GaussianDistillationTrainer(model=student, args=args, train_dataset=design_rows())
    with pytest.raises(ValueError, match="another output head"):
        GaussianDistillationTrainer(model=student, args=args, train_dataset=design_rows(), teachers=drafts)
    with pytest.raises(ValueError, match="factors"):
        GaussianDistillationTrainer(model=student, args=gaussian_config(tmp_path, num_factors=3),
                                    train_dataset=design_rows(), teacher=target)
    with pytest.raises(TypeError, match="GaussianDistillationConfig"):
        GaussianDistillationTrainer(model=student, args=None, train_dataset=design_rows(), teacher=target)
    with pytest.raises(ValueError, match="no response token"):
        GaussianDistillationTrainer(model=student, args=args, teacher=target,
                                    train_dataset=[{"input_ids": [1, 2, 3], "prompt_length": 3}])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"num_factors": 0}, "num_factors"), ({"noise_model": "full"}, "noise_model"), ({"init": "zeros"}, "init"),
    ({"m_step_steps": 0}, "m_step_steps"), ({"num_members": 1}, "num_members"), ({"member_seed": -1}, "member_seed"),
    ({"perturbation_rank": 0}, "rank"), ({"design_batch_size": 0}, "design_batch_size"),
])
def test_bad_config_values_raise(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        gaussian_config(tmp_path, **overrides)


def test_run_gaussian_adds_a_fitted_student_to_a_composite(tmp_path, batch):
    from test_trainers import response_rows

    from trainers.run_gaussian import main as run_gaussian

    target_dir, draft_dir, composite_dir = (str(tmp_path / name) for name in ("target", "draft", "composite"))
    tiny_llama(seed=0).save_pretrained(target_dir)
    tiny_llama(seed=10, hidden_size=8, num_layers=1).save_pretrained(draft_dir)
    UncertaintyAwareModelForCausalLM.from_pretrained(target_dir, drafts=[draft_dir]).save_pretrained(composite_dir)
    response_rows(num_prompts=4, num_responses=1).save_to_disk(str(tmp_path / "rows"))
    out = str(tmp_path / "gaussian")
    trainer = run_gaussian(["--dataset_path", str(tmp_path / "rows"), "--target", target_dir, "--composite",
                            composite_dir, "--backbone", "target_layers:1", "--head_intermediate_size", "8",
                            "--output_dir", out, "--num_factors", "2", "--num_members", "3", "--max_steps", "4",
                            "--m_step_steps", "2", "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no"])
    assert trainer.em.observations.shape[:2] == (3, trainer.em.num_points)
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(f"{out}/composite", target=target_dir)
    assert loaded.config.has_student and len(loaded.drafts) == 1
    assert_close(loaded.student.head.noise_variance, trainer.student.head.noise_variance)
    result = loaded.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, estimator="gaussian_distill")
    assert torch.isfinite(result.epistemic_uncertainty).all()
