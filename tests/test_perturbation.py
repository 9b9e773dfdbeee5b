"""Low-rank Gaussian perturbation: exact restore, seeding, span of the top-r singular vectors."""

import pytest
import torch

from hf_eu.perturbation import LowRankGaussianPerturbation, PerturbationConfig

from conftest import tiny_llama


def weights(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restores_bit_for_bit_and_changes_only_chosen_layers(dtype):
    model = tiny_llama(seed=0).to(dtype)
    before = weights(model)
    perturbation = LowRankGaussianPerturbation(model, rank=2, sigma=0.5)
    with perturbation.apply(seed=1):
        inside = weights(model)
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = {k for k in before if not torch.equal(before[k], inside[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    assert all(inside[k].dtype == dtype for k in changed)


def test_restores_even_when_the_block_raises():
    model = tiny_llama(seed=0)
    before = weights(model)
    with pytest.raises(KeyError):
        with LowRankGaussianPerturbation(model).apply(seed=3):
            raise KeyError("boom")
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())


def test_same_seed_same_model_different_seed_different_model():
    model = tiny_llama(seed=0)
    perturbation = LowRankGaussianPerturbation(model)
    ids = torch.tensor([[1, 5, 9, 13]])
    outputs = []
    for seed in (7, 7, 8):
        with perturbation.apply(seed):
            outputs.append(model(ids).logits)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])
    # a second object on the same model gives the same perturbation for the same seed
    other = LowRankGaussianPerturbation(model)
    assert all(torch.equal(perturbation.deltas(7)[k], other.deltas(7)[k]) for k in perturbation.layers)


def test_noise_lies_in_the_span_of_the_top_r_left_singular_vectors():
    model = tiny_llama(seed=0, hidden_size=32)
    rank = 3
    perturbation = LowRankGaussianPerturbation(model, rank=rank, sigma=0.2)
    for name, delta in perturbation.deltas(seed=4).items():
        weight = perturbation.layers[name].weight.detach().double()
        left = torch.linalg.svd(weight).U[:, :rank]  # float64 reference basis
        residual = delta.double() - left @ (left.T @ delta.double())
        assert residual.abs().max() < 1e-5 * delta.abs().max(), name
        assert torch.linalg.matrix_rank(delta.double(), atol=1e-6) == rank


def test_noise_scale_matches_sigma():
    model = tiny_llama(seed=0, hidden_size=64)
    sigma = 0.3
    perturbation = LowRankGaussianPerturbation(model, rank=4, sigma=sigma)
    # U has orthonormal columns, so ||U εᵀ||_F² = ||ε||_F², whose mean is in·r·σ²
    squares = [sum(d.pow(2).sum() for d in perturbation.deltas(s).values()) for s in range(20)]
    expected = sum(layer.weight.shape[1] * 4 for layer in perturbation.layers.values()) * sigma**2
    assert abs(torch.stack(squares).mean().item() / expected - 1) < 0.1


def test_nested_apply_and_bad_settings_are_refused():
    model = tiny_llama(seed=0)
    perturbation = LowRankGaussianPerturbation(model)
    with perturbation.apply(0):
        with pytest.raises(RuntimeError, match="already applied"):
            with perturbation.apply(1):
                pass
    with pytest.raises(ValueError, match="No layer named"):
        LowRankGaussianPerturbation(model, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="rank"):
        PerturbationConfig(rank=0)
    with pytest.raises(ValueError, match="sigma"):
        PerturbationConfig(sigma=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_quantized_target_is_refused_before_anything_changes(tmp_path, bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(seed=0, hidden_size=64).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization)
    before = weights(model)
    with pytest.raises(ValueError, match="quantized weights, which cannot be perturbed"):
        LowRankGaussianPerturbation(model)
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())
