"""The real embedded SmolLM2-135M-Instruct through the same call a user makes: `hf_eu.load_default()`."""

import warnings

import pytest
import torch

from hf_eu import aggregate_uncertainty, load_default


@pytest.mark.slow
def test_load_default_generates_identically_with_eu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained-fallback notice, until trained defaults ship
        model, tokenizer = load_default()
    questions = ["What is 2 + 3?", "Name a colour."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    assert inputs["attention_mask"][:, 0].tolist().count(0) == 1, "the test needs one left-padded row"
    plain = model.target.generate(**inputs, max_new_tokens=8, do_sample=False)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.epistemic_uncertainty.shape == (2, out.sequences.shape[1] - inputs["input_ids"].shape[1])
    real = out.epistemic_uncertainty[out.uncertainty_mask]
    assert torch.isfinite(real).all() and (real > 0).all()
    torch.testing.assert_close(out.epistemic_uncertainty, out.eu_variance + out.eu_bias)
    assert (aggregate_uncertainty(out.epistemic_uncertainty, out.uncertainty_mask, "mean") > 0).all()
    assert model.config.target_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
