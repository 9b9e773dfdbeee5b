"""`Trainer(model=wrapper)` saves something that loads: the composite with its fine-tuned target.

The wrapper is a `PreTrainedModel`, so transformers' `Trainer.save_model` and its checkpoints call the wrapper's
`save_pretrained`, which stores the trained target's weights (`model.safetensors`, keys `target.`) beside the
drafts and proxy, leaves the Trainer's own files alone, and `resume_from_checkpoint` restores the target.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB_SIZE, tiny_llama

from hf_eu import UncertaintyAwareModelForCausalLM

torch.set_num_threads(1)


def _data():
    from datasets import Dataset

    ids = torch.randint(3, VOCAB_SIZE, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 8, "labels": ids})


def _trainer(model, output_dir, max_steps=4, **args):
    from transformers import Trainer, TrainingArguments, default_data_collator

    settings = dict(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
                    report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
                    data_seed=0)
    settings.update(args)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=_data(),
                   data_collator=default_data_collator)


@pytest.fixture()
def target_folder(tmp_path):
    folder = tmp_path / "target"
    tiny_llama(0).save_pretrained(folder)
    return str(folder)


def _wrapper(target_folder):
    drafts = [tiny_llama(10 + k, hidden_size=8, num_layers=1) for k in range(2)]
    return UncertaintyAwareModelForCausalLM.from_pretrained(target_folder, drafts=drafts,
                                                            proxy=tiny_llama(20, hidden_size=8, num_layers=1))


def _state(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _assert_equal(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_save_model_after_training_loads_the_fine_tuned_target_and_untouched_parts(target_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    wrapper = _wrapper(target_folder)
    untouched = {"drafts": _state(wrapper.drafts), "proxy": _state(wrapper.proxy)}
    before = _state(wrapper.target)
    _trainer(wrapper, tmp_path / "run").train()
    trained = _state(wrapper.target)
    assert any(not torch.equal(before[name], trained[name]) for name in before)  # the target did train
    _assert_equal(_state(wrapper.drafts), untouched["drafts"])  # the drafts and proxy did not
    _assert_equal(_state(wrapper.proxy), untouched["proxy"])
    out = tmp_path / "run" / "final"
    _trainer(wrapper, tmp_path / "run").save_model(str(out))
    with open(out / "config.json", encoding="utf-8") as handle:
        stored = json.load(handle)
    assert stored["model_type"] == "hf_eu" and stored["has_target_weights"] is True
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert isinstance(loaded, UncertaintyAwareModelForCausalLM)
    _assert_equal(_state(loaded.target), trained)
    _assert_equal(_state(loaded.drafts), untouched["drafts"])
    _assert_equal(_state(loaded.proxy), untouched["proxy"])
    # the reloaded composite still knows it carries a fine-tuned target: saving it again keeps the weights
    loaded.save_pretrained(tmp_path / "again")
    _assert_equal(_state(UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "again")).target), trained)


def test_an_untrained_composite_stores_no_target_weights_unless_asked(target_folder, tmp_path):
    wrapper = _wrapper(target_folder)
    wrapper.save_pretrained(tmp_path / "plain")
    assert not os.path.exists(tmp_path / "plain" / "model.safetensors")
    assert json.loads((tmp_path / "plain" / "config.json").read_text()).get("has_target_weights") is False
    with torch.no_grad():
        wrapper.target.lm_head.weight.add_(1.0)  # edited by hand, never put in training mode
    wrapper.save_pretrained(tmp_path / "forced", save_target=True)
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "forced"))
    assert torch.equal(loaded.target.lm_head.weight, wrapper.target.lm_head.weight)
    wrapper.train()
    wrapper.save_pretrained(tmp_path / "opted-out", save_target=False)
    assert not os.path.exists(tmp_path / "opted-out" / "model.safetensors")
    with pytest.raises(TypeError, match="save_target"):
        wrapper.save_pretrained(tmp_path / "bad", save_target="yes")
    wrapper.save_pretrained(tmp_path / "none", is_main_process=False)  # other ranks of a distributed run write nothing
    assert not os.path.exists(tmp_path / "none")


def test_checkpoints_resume_the_fine_tuned_target_and_save_model_leaves_them_alone(target_folder, tmp_path):
    whole = _wrapper(target_folder)
    _trainer(whole, tmp_path / "whole", save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "hf_eu"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    listing = {path: os.path.getmtime(path) for path in (tmp_path / "whole").rglob("*") if path.is_file()}
    trainer = _trainer(whole, tmp_path / "whole")
    trainer.save_model()  # into the output folder, beside checkpoint-2/ and checkpoint-4/
    for path, mtime in listing.items():
        assert os.path.getmtime(path) == mtime, path  # every file the Trainer wrote is still there, unchanged
    _assert_equal(_state(UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "whole")).target),
                  _state(whole.target))
    resumed = _wrapper(target_folder)
    _trainer(resumed, tmp_path / "resumed", save_strategy="steps", save_steps=2).train(
        resume_from_checkpoint=str(checkpoint))
    for name, value in _state(whole.target).items():  # 2 steps from checkpoint-2 give the 4-step weights
        torch.testing.assert_close(resumed.target.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_stored_target_weights_that_do_not_fit_the_target_are_refused(target_folder, tmp_path):
    wrapper = _wrapper(target_folder)
    wrapper.save_pretrained(tmp_path / "composite", save_target=True)
    other = tmp_path / "other-target"
    tiny_llama(0, num_layers=3).save_pretrained(other)
    with pytest.raises(ValueError, match=r"do not match the loaded target.*unexpected|do not fit"):
        UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "composite"), target=str(other))
    wide = tmp_path / "wide-target"
    tiny_llama(0, hidden_size=32).save_pretrained(wide)
    with pytest.raises(ValueError, match=r"do not fit the loaded target"):
        UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "composite"), target=str(wide))


def test_trainer_sets_use_cache_on_the_target_and_the_composite_config_stays_its_own(target_folder, tmp_path):
    wrapper = _wrapper(target_folder)
    assert wrapper.target.config.use_cache is True
    _trainer(wrapper, tmp_path / "run", use_cache=False)  # `Trainer.__init__` sets `model.config.use_cache`
    assert wrapper.config.use_cache is False and wrapper.target.config.use_cache is False
    assert "use_cache" not in wrapper.config.to_dict()
    wrapper.config.estimator = "proxy_entropy"  # the composite's own keys stay on its config
    assert wrapper.config.to_dict()["estimator"] == "proxy_entropy" and not hasattr(wrapper.target.config, "estimator")


def test_a_fine_tuned_composite_with_drafts_on_the_targets_layers_reloads_with_the_same_eu(target_folder, tmp_path):
    """Drafts and proxy built on the target's first layers copy those layers and share its embeddings: after the
    target is trained, the reloaded composite must rebuild them from the layers they were trained on (not the
    fine-tuned ones) and give the live composite's EU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_eu import truncated_copy

    base_target = AutoModelForCausalLM.from_pretrained(target_folder)
    parts = []
    for k in range(3):
        torch.manual_seed(k)
        parts.append(get_peft_model(truncated_copy(base_target, 1, share_embeddings=True),
                                    LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)))
    wrapper = UncertaintyAwareModelForCausalLM.from_pretrained(base_target, drafts=parts[:2], proxy=parts[2])
    wrapper.config.target_name_or_path = target_folder
    _trainer(wrapper, tmp_path / "run").train()
    wrapper.eval()
    wrapper.save_pretrained(tmp_path / "composite")
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "composite"))
    expected = wrapper.estimate_uncertainty(torch.tensor([[1, 5, 9, 13, 17, 21, 3]]), prompt_length=4)
    got = loaded.estimate_uncertainty(torch.tensor([[1, 5, 9, 13, 17, 21, 3]]), prompt_length=4)
    torch.testing.assert_close(got.epistemic_uncertainty, expected.epistemic_uncertainty, rtol=1e-4, atol=1e-6)
