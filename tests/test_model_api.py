"""The wrapper behaves like the model it wraps: config attributes, model API, Trainer columns, save arguments."""

from __future__ import annotations

import inspect

import pytest
import torch

torch.set_num_threads(1)


def test_config_reads_fall_through_to_the_target(eu_model, target):
    for name in ("eos_token_id", "pad_token_id", "hidden_size", "max_position_embeddings", "use_cache"):
        assert getattr(eu_model.config, name) == getattr(target.config, name)
    assert eu_model.config.model_type == "hf_eu" and eu_model.config.num_drafts == 3  # its own keys stay its own
    assert "_target_config" not in eu_model.config.to_dict() and "hidden_size" not in eu_model.config.to_dict()
    with pytest.raises(AttributeError):
        eu_model.config.no_such_attribute


def test_training_mode_reads_as_the_targets(target, drafts, proxy):
    """transformers' from_pretrained returns a model in eval mode; so does the wrapper of an eval-mode target.
    TRL's GKD samples from the student before Trainer calls `train()`: it must see the same mode."""
    from hf_eu import UncertaintyAwareModelForCausalLM

    assert not target.training
    assert not UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy).training
    target.train()
    try:
        wrapper = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy)
        assert wrapper.training and not any(d.training for d in wrapper.drafts) and not wrapper.proxy.training
    finally:
        target.eval()


def test_model_api_is_the_targets(eu_model, target):
    from transformers import PreTrainedModel

    assert isinstance(eu_model, PreTrainedModel)  # what Trainer, TRL and accelerate check before save_pretrained
    assert eu_model.get_input_embeddings() is target.get_input_embeddings()
    assert eu_model.get_output_embeddings() is target.get_output_embeddings()
    assert eu_model.num_parameters() == target.num_parameters()
    assert eu_model.main_input_name == "input_ids" and eu_model.name_or_path == target.name_or_path
    assert eu_model.get_memory_footprint() == target.get_memory_footprint()
    eu_model.tie_weights()
    config = target.generation_config
    eu_model.generation_config = config
    assert target.generation_config is config
    with pytest.raises(AttributeError):
        eu_model.no_such_method


def test_every_target_api_name_is_the_targets_not_the_composites(eu_model, target):
    """The wrapper is a `PreTrainedModel`, whose own methods (`num_parameters`, `activation_checkpointing_enable`,
    `resize_token_embeddings`, …) would act on target, drafts and proxy together; each name of TARGET_API is the
    target's bound method or value instead."""
    import warnings

    from hf_eu.generation_utils import TARGET_API

    checked = 0
    for name in sorted(TARGET_API):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                theirs = getattr(target, name)
            except (AttributeError, ValueError):
                continue
            ours = getattr(eu_model, name)
        assert ours == theirs if callable(theirs) else ours is theirs or ours == theirs, name
        checked += 1
    assert checked >= 25
    eu_model.activation_checkpointing_enable()
    try:
        assert target.is_activation_checkpointing and not any(
            getattr(module, "gradient_checkpointing", False) for module in eu_model.drafts.modules())
    finally:
        eu_model.activation_checkpointing_disable()
    assert not target.is_activation_checkpointing


def test_forward_has_trainer_columns_and_matches_the_target(eu_model, target, batch):
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(eu_model.forward).parameters)
    with torch.no_grad():
        ours = eu_model(**batch, labels=batch["input_ids"])
        theirs = target(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(ours.logits, theirs.logits)
    torch.testing.assert_close(ours.loss, theirs.loss)


def test_save_accepts_transformers_arguments(eu_model, tmp_path):
    eu_model.save_pretrained(tmp_path / "a", safe_serialization=True, max_shard_size="1GB")
    assert (tmp_path / "a" / "config.json").is_file()
    with pytest.raises(ValueError, match="safetensors only"):
        eu_model.save_pretrained(tmp_path / "b", safe_serialization=False)


def test_right_padded_prompts_are_refused(eu_model):
    ids = torch.tensor([[1, 5, 9, 13], [1, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="right-padded in rows \\[1\\]"):
        eu_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="right-padded"):
        eu_model.estimate_uncertainty(ids, mask, prompt_length=4)
    answer_padding = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # padding after the answer is fine
    out = eu_model.estimate_uncertainty(ids, answer_padding, prompt_length=2)
    assert out.uncertainty_mask.tolist() == [[True, True], [True, False]]
