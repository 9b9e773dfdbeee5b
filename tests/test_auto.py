"""hf_eu in transformers' Auto classes and pipelines: a saved composite through AutoModelForCausalLM, EU in records."""

import logging

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM, pipeline

from hf_eu import UncertaintyAwareConfig, UncertaintyAwareModelForCausalLM, UncertaintyTextGenerationPipeline

from conftest import PAD_ID, tiny_llama
from test_composite import word_tokenizer

PROMPT = "w1 w5 w9 w13"


def pad_ready_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.pad_token = f"w{PAD_ID}"  # batched pipelines pad prompts
    return tokenizer


def save_composite_with_tokenizer(root, target, drafts, proxy) -> str:
    """A composite whose recorded target is a local folder that also holds the tokenizer; returns its folder."""
    target_dir, composite_dir = str(root / "target"), str(root / "composite")
    target.save_pretrained(target_dir)
    pad_ready_tokenizer().save_pretrained(target_dir)
    UncertaintyAwareModelForCausalLM.from_pretrained(target_dir, drafts=drafts, proxy=proxy).save_pretrained(
        composite_dir)
    return composite_dir


@pytest.fixture(scope="module")
def composite(tmp_path_factory, target, drafts, proxy):
    return save_composite_with_tokenizer(tmp_path_factory.mktemp("auto"), target, drafts, proxy)


@pytest.fixture()
def tokenizer():
    return pad_ready_tokenizer()


def greedy(model, tokenizer, prompt=PROMPT, **kwargs):
    inputs = tokenizer(prompt, return_tensors="pt")
    return inputs, model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, **kwargs)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ------------------------------------------------------------------------------------------ Auto classes
def test_config_is_registered(composite):
    assert type(AutoConfig.for_model("hf_eu")) is UncertaintyAwareConfig
    config = AutoConfig.from_pretrained(composite)
    assert type(config) is UncertaintyAwareConfig and config.num_drafts == 3 and config.has_proxy


def test_auto_model_returns_the_wrapper_with_the_saved_parts(composite, tokenizer):
    auto = AutoModelForCausalLM.from_pretrained(composite)
    direct = UncertaintyAwareModelForCausalLM.from_pretrained(composite)
    assert type(auto) is UncertaintyAwareModelForCausalLM
    for auto_part, direct_part in zip([*auto.drafts, auto.proxy], [*direct.drafts, direct.proxy]):
        for (name, a), (_, b) in zip(auto_part.state_dict().items(), direct_part.state_dict().items()):
            assert torch.equal(a, b), name
    _, expected = greedy(direct, tokenizer)
    _, got = greedy(auto, tokenizer)
    assert torch.equal(got.sequences, expected.sequences)
    assert_close(got.epistemic_uncertainty, expected.epistemic_uncertainty)
    assert got.epistemic_uncertainty[got.uncertainty_mask].min() > 0


def test_auto_model_honours_estimator_dtype_and_target(composite, target):
    auto = AutoModelForCausalLM.from_pretrained(composite, estimator="entropy", dtype=torch.bfloat16)
    assert auto.config.estimator == "entropy"  # AutoConfig took it into the config, which the wrapper uses
    assert auto.target.dtype == torch.bfloat16 and auto.dtype == torch.bfloat16
    replaced = AutoModelForCausalLM.from_pretrained(composite, target=target)
    assert replaced.target is target


def test_auto_model_refuses_remote_code(composite):
    with pytest.raises(ValueError, match="without remote code"):
        AutoModelForCausalLM.from_pretrained(composite, trust_remote_code=True)


def test_config_argument_only_with_a_composite(target, drafts):
    with pytest.raises(ValueError, match="only for loading a saved composite"):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, config=UncertaintyAwareConfig())
    with pytest.raises(TypeError, match="must be an UncertaintyAwareConfig, got LlamaConfig"):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, config=target.config)


# ----------------------------------------------------------------------------------------------- pipelines
def test_stock_text_generation_pipeline_accepts_the_wrapper(eu_model, tokenizer):
    handler = _Records()
    logging.getLogger("transformers.pipelines.base").addHandler(handler)
    try:
        pipe = pipeline("text-generation", model=eu_model, tokenizer=tokenizer)
    finally:
        logging.getLogger("transformers.pipelines.base").removeHandler(handler)
    assert not [m for m in handler.messages if "not supported" in m], handler.messages

    inputs, expected = greedy(eu_model, tokenizer)
    new_tokens = expected.sequences[0, inputs["input_ids"].shape[1]:]
    plain = pipe(PROMPT, max_new_tokens=6, do_sample=False)
    assert plain == [{"generated_text": PROMPT + tokenizer.decode(new_tokens)}]  # drop-in: text only

    [record] = pipe(PROMPT, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert record["generated_text"] == plain[0]["generated_text"]
    assert_close(torch.tensor(record["epistemic_uncertainty"]), expected.epistemic_uncertainty[0])
    assert record["uncertainty_mask"] == expected.uncertainty_mask[0].tolist()


def test_uncertainty_pipeline_records_hold_tokens_and_their_eu(eu_model, tokenizer):
    pipe = pipeline("text-generation-with-uncertainty", model=eu_model, tokenizer=tokenizer)
    assert isinstance(pipe, UncertaintyTextGenerationPipeline)
    inputs, expected = greedy(eu_model, tokenizer)
    mask = expected.uncertainty_mask[0]
    [record] = pipe(PROMPT, max_new_tokens=6, do_sample=False, return_full_text=False)
    assert "".join(record["tokens"]) == record["generated_text"]
    assert len(record["tokens"]) == int(mask.sum()) == len(record["epistemic_uncertainty"])
    assert_close(torch.tensor(record["epistemic_uncertainty"]), expected.epistemic_uncertainty[0][mask])
    assert_close(torch.tensor(record["eu_variance"]) + torch.tensor(record["eu_bias"]),
                 torch.tensor(record["epistemic_uncertainty"]))
    assert "uncertainty_mask" not in record
    [bare] = pipe(PROMPT, max_new_tokens=6, do_sample=False, return_full_text=False, return_uncertainty=False)
    assert bare == {"generated_text": record["generated_text"]}


def test_uncertainty_pipeline_batches_and_samples_like_single_calls(eu_model, tokenizer):
    pipe = pipeline("text-generation-with-uncertainty", model=eu_model, tokenizer=tokenizer)
    prompts = [PROMPT, "w3"]
    alone = [pipe(p, max_new_tokens=5, do_sample=False)[0] for p in prompts]
    batched = [records[0] for records in pipe(prompts, max_new_tokens=5, do_sample=False, batch_size=2)]
    for one, many in zip(alone, batched):  # the short prompt is left-padded in the batch
        assert one["tokens"] == many["tokens"]
        assert_close(torch.tensor(many["epistemic_uncertainty"]), torch.tensor(one["epistemic_uncertainty"]),
                     rtol=1e-4, atol=1e-5)

    torch.manual_seed(0)
    records = pipe(PROMPT, max_new_tokens=5, do_sample=True, num_return_sequences=2, return_full_text=False)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    for record in records:  # each sampled answer's EU equals teacher-forced EU of exactly that answer
        answer_ids = tokenizer(record["generated_text"], add_special_tokens=False)["input_ids"]
        forced = eu_model.estimate_uncertainty(torch.tensor([prompt_ids + answer_ids]), prompt_length=len(prompt_ids))
        assert_close(torch.tensor(record["epistemic_uncertainty"]), forced.epistemic_uncertainty[0])


def test_uncertainty_pipeline_from_a_composite_folder(composite, tokenizer):
    pipe = pipeline("text-generation-with-uncertainty", model=composite, tokenizer=tokenizer)
    assert type(pipe.model) is UncertaintyAwareModelForCausalLM
    [record] = pipe(PROMPT, max_new_tokens=3, do_sample=False)
    assert len(record["epistemic_uncertainty"]) == len(record["tokens"]) >= 1
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(composite)  # the same values as the loaded composite
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = loaded.generate(prompt_ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    new_ids = out.sequences[0, prompt_ids.shape[1]:]
    assert "".join(record["tokens"]).strip() == tokenizer.decode(new_ids).strip() and len(record["tokens"]) == len(new_ids)
    assert_close(torch.tensor(record["epistemic_uncertainty"]), out.epistemic_uncertainty[0, : len(new_ids)].float())


def test_uncertainty_pipeline_needs_the_wrapper(tokenizer):
    with pytest.raises(TypeError, match="needs an UncertaintyAwareModelForCausalLM, got LlamaForCausalLM"):
        pipeline("text-generation-with-uncertainty", model=tiny_llama(seed=3), tokenizer=tokenizer)
