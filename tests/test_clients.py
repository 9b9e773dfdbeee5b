"""Real clients written for a transformers model run on the wrapper and give the bare target's results.

lm-evaluation-harness (`HFLM`: loglikelihood, generate_until, `simple_evaluate` on a local task) and TRL
(`SFTTrainer`, and `GKDTrainer` with the wrapper as the student) on a tiny random Llama over the embedded
SmolLM2 tokenizer (real chat template, no download).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hf_eu.embedded import embedded_target_path

    return AutoTokenizer.from_pretrained(embedded_target_path())


def _model(tokenizer, seed: int, hidden_size: int = 16, num_layers: int = 2):
    model = tiny_llama(seed, hidden_size=hidden_size, num_layers=num_layers, vocab_size=len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
        setattr(model.generation_config, name, getattr(tokenizer, name))
    return model


def _wrapped(tokenizer, target):
    from hf_eu import UncertaintyAwareModelForCausalLM

    return UncertaintyAwareModelForCausalLM.from_pretrained(
        target, drafts=[_model(tokenizer, 10 + k, 8, 1) for k in range(2)], proxy=_model(tokenizer, 20, 8, 1))


@pytest.fixture(scope="module")
def pair(tokenizer):
    """(bare target, the wrapper around an identical copy of it)."""
    return _model(tokenizer, 0), _wrapped(tokenizer, _model(tokenizer, 0))


# ------------------------------------------------------------------------------------------- lm-evaluation-harness
def _hflm(model, tokenizer):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)


def test_lm_eval_requests_match_the_target(pair, tokenizer, tmp_path):
    from lm_eval.api.instance import Instance

    from hf_eu import UncertaintyAwareModelForCausalLM

    target, wrapper = pair
    wrapper.save_pretrained(tmp_path / "composite")
    reloaded = UncertaintyAwareModelForCausalLM.from_pretrained(tmp_path / "composite", target=_model(tokenizer, 0))
    bare = _hflm(target, tokenizer)
    assert bare.max_length == target.config.max_position_embeddings  # the target's context, not lm-eval's 2048
    contexts = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"), ("Hello", " world, how are you")]
    likelihood = [Instance("loglikelihood", {}, pair_, i) for i, pair_ in enumerate(contexts)]
    until = [Instance("generate_until", {}, (text, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), i)
             for i, (text, _) in enumerate(contexts)]
    expected = bare.loglikelihood(likelihood), bare.generate_until(until)
    for model in (wrapper, reloaded):
        lm = _hflm(model, tokenizer)
        assert lm.max_length == bare.max_length
        got = lm.loglikelihood(likelihood), lm.generate_until(until)
        assert [c for c, _ in got[0]] == pytest.approx([c for c, _ in expected[0]], abs=1e-5)
        assert [g for _, g in got[0]] == [g for _, g in expected[0]] and got[1] == expected[1]


def test_lm_eval_simple_evaluate_on_a_local_task_matches_the_target(pair, tokenizer, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    rows = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1)], "label": 0}
            for a, b in [(1, 2), (3, 4), (10, 5), (7, 7)]]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "task.yaml").write_text(
        "task: hf_eu_local_sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    manager = TaskManager(include_path=str(tmp_path))
    results = [simple_evaluate(model=_hflm(model, tokenizer), tasks=["hf_eu_local_sums"], task_manager=manager,
                               log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
               for model in pair]
    samples = [[s["resps"] for s in r["samples"]["hf_eu_local_sums"]] for r in results]
    flat = [[float(x[0][0]) for doc in doc_samples for x in doc] for doc_samples in samples]
    assert len(flat[0]) == 2 * len(rows) and flat[1] == pytest.approx(flat[0], abs=1e-5)
    assert results[1]["results"]["hf_eu_local_sums"] == results[0]["results"]["hf_eu_local_sums"]


# ---------------------------------------------------------------------------------------------------------- TRL
def _changed(before: dict, model) -> set[str]:
    return {name for name, value in model.state_dict().items() if not torch.equal(before[name], value)}


def _sft(model, tokenizer, output_dir):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_dict({"text": ["Hello world, this is a test.", "2 + 2 = 4, and 3 + 3 = 6."] * 4})
    args = SFTConfig(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                     max_length=32, report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_trl_sft_trains_the_wrapped_target_like_the_bare_one(tokenizer, tmp_path):
    target, wrapper = _model(tokenizer, 0), _wrapped(tokenizer, _model(tokenizer, 0))
    before = {name: value.clone() for name, value in wrapper.state_dict().items()}
    wrapped_losses = _sft(wrapper, tokenizer, tmp_path / "wrapped")
    bare_losses = _sft(target, tokenizer, tmp_path / "bare")
    changed = _changed(before, wrapper)
    assert changed and all(name.startswith("target.") for name in changed)  # drafts and proxy stay frozen
    assert wrapped_losses == pytest.approx(bare_losses, rel=1e-5)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(wrapper.target.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    # SFTTrainer.save_model wrote the composite with the fine-tuned target: loaded over the original target's
    # folder, it gives the trained weights (TRL's own files in the folder did not stop it)
    from hf_eu import UncertaintyAwareModelForCausalLM

    _model(tokenizer, 0).save_pretrained(tmp_path / "original")
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(str(tmp_path / "wrapped"), target=str(tmp_path / "original"))
    for name, value in wrapper.target.state_dict().items():
        assert torch.equal(loaded.target.state_dict()[name], value), name


LMBDA = 1.0


def _gkd(student, teacher, tokenizer, output_dir):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    messages = [[{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
                for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    args = GKDConfig(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     max_length=64, max_new_tokens=4, lmbda=LMBDA, temperature=1.0, report_to=[], save_strategy="no",
                     use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"messages": messages}))
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_trl_gkd_with_the_wrapper_as_student(tokenizer, tmp_path):
    """lmbda = 1: every step samples on-policy from the student, through the wrapper's own `generate`.

    Only the first step's loss is compared: after it, TRL's patched forward of the *bare* model (its fused LM
    head) returns logits that differ from `LlamaForCausalLM.forward` with the same weights, so the bare model's
    second sample differs; off-policy (lmbda = 0) every step matches."""
    teacher = _model(tokenizer, 5, 16, 2)
    target, wrapper = _model(tokenizer, 0), _wrapped(tokenizer, _model(tokenizer, 0))
    before = {name: value.clone() for name, value in wrapper.state_dict().items()}
    wrapped_losses = _gkd(wrapper, teacher, tokenizer, tmp_path / "wrapped")
    bare_losses = _gkd(target, teacher, tokenizer, tmp_path / "bare")
    changed = _changed(before, wrapper)
    assert changed and all(name.startswith("target.") for name in changed)
    assert wrapped_losses[0] == pytest.approx(bare_losses[0], rel=1e-5) and len(wrapped_losses) == 2


def test_trl_gkd_off_policy_matches_the_bare_student(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "LMBDA", 0.0)
    teacher = _model(tokenizer, 5, 16, 2)
    wrapped_losses = _gkd(_wrapped(tokenizer, _model(tokenizer, 0)), teacher, tokenizer, tmp_path / "wrapped")
    assert wrapped_losses == pytest.approx(_gkd(_model(tokenizer, 0), teacher, tokenizer, tmp_path / "bare"), rel=1e-5)


# ------------------------------------------------------------------------------------------- transformers Trainer
def _plain_trainer(model, tokenizer, output_dir):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    texts = ["Hello world, this is a test.", "2 + 2 = 4, and 3 + 3 = 6.", "One", "The capital of France is Paris."]
    dataset = Dataset.from_dict(tokenizer(texts * 2))  # default remove_unused_columns: the forward names its columns
    args = TrainingArguments(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_transformers_trainer_fine_tunes_the_wrapped_target_like_the_bare_one(tokenizer, tmp_path):
    """Padded batches of unequal lengths: the loss is averaged over the shifted labels, as for the bare target
    (Trainer counts `num_items_in_batch` that way only when it sees the target's causal-LM `loss_type`)."""
    target, wrapper = _model(tokenizer, 0), _wrapped(tokenizer, _model(tokenizer, 0))
    before = {name: value.clone() for name, value in wrapper.state_dict().items()}
    wrapped_losses = _plain_trainer(wrapper, tokenizer, tmp_path / "wrapped")
    assert wrapped_losses == pytest.approx(_plain_trainer(target, tokenizer, tmp_path / "bare"), rel=1e-5)
    changed = _changed(before, wrapper)
    assert changed and all(name.startswith("target.") for name in changed)
