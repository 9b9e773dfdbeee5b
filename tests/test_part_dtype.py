"""The proxy in its own dtype (`proxy_dtype`): cast without touching the target, scored in that dtype, saved and
loaded with the composite."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from hf_eu import UncertaintyAwareConfig, UncertaintyAwareModelForCausalLM
from hf_eu.part_dtype import cast_part, check_part_dtype
from hf_eu.truncation import truncated_copy


def _snapshot(model):
    return {name: (p.data_ptr(), p.dtype, p.detach().clone()) for name, p in model.named_parameters(remove_duplicate=False)}


def _assert_unchanged(model, snapshot):
    for name, p in model.named_parameters(remove_duplicate=False):
        pointer, dtype, values = snapshot[name]
        assert (p.data_ptr(), p.dtype) == (pointer, dtype), name
        assert torch.equal(p.detach(), values), name


def test_cast_part_copies_what_it_shares_with_the_target_and_keeps_buffers(target):
    part = truncated_copy(target, 1, share_embeddings=True)
    assert part.get_output_embeddings() is target.get_output_embeddings()
    before = _snapshot(target)
    assert cast_part(part, torch.bfloat16, target) is part
    _assert_unchanged(target, before)
    assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    head, target_head = part.get_output_embeddings().weight, target.get_output_embeddings().weight
    assert head is not target_head and torch.equal(head, target_head.to(torch.bfloat16))
    assert part.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their precision
    assert all(p.dtype == torch.float32 for p in target.parameters())


def test_tied_parameters_stay_tied_when_copied_from_the_target():
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    tied = LlamaForCausalLM(config).eval()
    assert tied.get_input_embeddings().weight is tied.get_output_embeddings().weight
    part = cast_part(truncated_copy(tied, 1, share_embeddings=True), "bfloat16", tied)
    assert part.get_input_embeddings().weight is part.get_output_embeddings().weight  # one copy, still tied
    assert part.get_input_embeddings().weight is not tied.get_input_embeddings().weight
    assert tied.get_input_embeddings().weight.dtype == torch.float32
    own = cast_part(LlamaForCausalLM(config), "bfloat16")  # no target: its own tied weight is cast once
    assert own.get_input_embeddings().weight is own.get_output_embeddings().weight
    assert own.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("value, name", [(None, None), ("bfloat16", "bfloat16"), (torch.float16, "float16"),
                                         ("torch.float32", "float32")])
def test_check_part_dtype_accepts_dtypes_and_their_names(value, name):
    assert check_part_dtype(value) == name


@pytest.mark.parametrize("value", ["bf16", torch.int8, 16, "float64"])
def test_a_bad_proxy_dtype_is_refused_naming_it(value, target, drafts):
    with pytest.raises(ValueError, match="proxy_dtype.*bfloat16"):
        UncertaintyAwareConfig(proxy_dtype=value)
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy_dtype=value)


def _entropy_float64(model, ids, prompt_length):
    """Brute force: the model's predictive entropy at every position predicting a new token, in float64."""
    with torch.no_grad():
        logps = model(input_ids=ids).logits[:, prompt_length - 1:-1].double().log_softmax(-1)  # (B, T, V)
    return -(logps.exp() * logps).sum(-1)  # (B, T)


def test_the_composite_runs_its_proxy_in_proxy_dtype_and_keeps_the_targets_tokens(target, drafts, tmp_path):
    before = _snapshot(target)
    proxy = truncated_copy(target, 1, share_embeddings=True).eval()
    model = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy,
                                                             proxy_dtype=torch.bfloat16, estimator="proxy_entropy")
    _assert_unchanged(target, before)
    assert model.config.proxy_dtype == "bfloat16" and model.proxy.dtype == torch.bfloat16
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 13], [1, 7, 11, 3]])}
    args = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    out = model.generate(**inputs, **args, return_dict_in_generate=True)
    assert torch.equal(out.sequences, target.generate(**inputs, **args))
    expected = _entropy_float64(model.proxy, out.sequences, 4)
    assert_close(out.epistemic_uncertainty.double(), expected, atol=2e-5, rtol=1e-4)
    float32 = _entropy_float64(truncated_copy(target, 1), out.sequences, 4)
    assert not torch.allclose(expected, float32, atol=1e-4)  # the bfloat16 pass, not a float32 one

    model.save_pretrained(tmp_path / "composite")
    assert json.loads((tmp_path / "composite" / "config.json").read_text())["proxy_dtype"] == "bfloat16"
    assert "| proxy | yes (runs in bfloat16) |" in (tmp_path / "composite" / "README.md").read_text()
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(tmp_path / "composite", target=target)
    assert loaded.proxy.dtype == torch.bfloat16
    again = loaded.generate(**inputs, **args, return_dict_in_generate=True)
    assert_close(again.epistemic_uncertainty, out.epistemic_uncertainty)
    wide = UncertaintyAwareModelForCausalLM.from_pretrained(tmp_path / "composite", target=target, proxy_dtype="float32")
    assert wide.config.proxy_dtype == "float32" and wide.proxy.dtype == torch.float32
    _assert_unchanged(target, before)
