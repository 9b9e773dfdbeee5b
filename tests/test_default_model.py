"""The real embedded SmolLM2-135M-Instruct through the same call a user makes: `hf_eu.load_default()`."""

import warnings

import pytest
import torch

from hf_eu import aggregate_uncertainty, load_default

# The shipped composite's EU of its greedy answer "2 + 3 = 5<|im_end|>" to "What is 2 + 3?" (eu_head, the default;
# eu_head_proxy, its proxy head; hf_eu, the drafts' estimate): a silent fallback to untrained drafts, a missing proxy or another head changes them.
# Recompute after retraining the defaults (python -m trainers.train_defaults / trainers.run_eu_head).
SHIPPED_EU_HEAD = [0.1772, 0.0802, 0.0034, 0.0063, 0.1228, 0.0637, 0.0940, 0.1949]  # head trained on two label sets
SHIPPED_EU_HEAD_PROXY = [0.1741, 0.0323, 0.0032, 0.0049, 0.1464, 0.0457, 0.0342, 0.1823]  # its proxy head
SHIPPED_HF_EU = [5.9226, 5.0819, 1.6191, 5.1628, 4.9080, 0.1772, 4.8845, 4.8665]  # proxy in bfloat16 (float32: 4.5272 at 6)


@pytest.fixture(scope="module")
def shipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the untrained-fallback notice must not appear
        return load_default()


@pytest.mark.slow
def test_load_default_loads_the_shipped_parts(shipped):
    model, tokenizer = shipped
    assert len(model.drafts) == 3 and model.proxy is not None and model.eu_head is not None
    assert model.config.estimator == "eu_head" and tokenizer.padding_side == "left"
    inputs = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                                     add_generation_prompt=True), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:]) == "2 + 3 = 5<|im_end|>"
    torch.testing.assert_close(out.epistemic_uncertainty[0], torch.tensor(SHIPPED_EU_HEAD), atol=2e-3, rtol=1e-2)
    proxy = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                           estimator="eu_head_proxy")
    torch.testing.assert_close(proxy.epistemic_uncertainty[0], torch.tensor(SHIPPED_EU_HEAD_PROXY), atol=2e-3, rtol=1e-2)
    drafts = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, estimator="hf_eu")
    torch.testing.assert_close(drafts.epistemic_uncertainty[0], torch.tensor(SHIPPED_HF_EU), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(drafts.epistemic_uncertainty, drafts.eu_variance + drafts.eu_bias)


@pytest.mark.slow
def test_load_default_generates_identically_with_eu(shipped):
    model, tokenizer = shipped
    questions = ["What is 2 + 3?", "Name a colour."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    assert inputs["attention_mask"][:, 0].tolist().count(0) == 1, "the test needs one left-padded row"
    plain = model.target.generate(**inputs, max_new_tokens=8, do_sample=False)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.epistemic_uncertainty.shape == (2, out.sequences.shape[1] - inputs["input_ids"].shape[1])
    real = out.epistemic_uncertainty[out.uncertainty_mask]
    assert torch.isfinite(real).all() and (real > 0).all()
    width = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], out.uncertainty_mask.long()], 1)
    again = model.estimate_uncertainty(out.sequences, mask, prompt_length=width)  # teacher forcing, no hooks
    torch.testing.assert_close(again.epistemic_uncertainty, out.epistemic_uncertainty, atol=1e-5, rtol=1e-4)
    assert (aggregate_uncertainty(out.epistemic_uncertainty, out.uncertainty_mask, "mean") > 0).all()
    assert model.config.target_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
