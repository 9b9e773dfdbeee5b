"""Resuming from a damaged checkpoint names the file before training starts; missing optimizer/RNG state warns."""

import os
import warnings

import pytest
import torch
from datasets import Dataset

from trainers.checkpoints import check_checkpoint
from trainers.osd_config import OSDConfig
from trainers.osd_trainer import OSDTrainer

from conftest import tiny_llama


def _osd(output_dir, target, max_steps):
    proxy = tiny_llama(seed=4, hidden_size=8, num_layers=1)
    data = Dataset.from_list([{"input_ids": [1, 5, 9, 13, 17, 21], "prompt_length": 2}] * 8)
    args = OSDConfig(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
                     save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                     logging_strategy="no")
    return OSDTrainer(model=proxy, args=args, train_dataset=data, teacher=target), proxy


@pytest.fixture()
def checkpoint(tmp_path, target):
    trainer, _ = _osd(tmp_path, target, max_steps=2)
    trainer.train()
    return tmp_path / "checkpoint-2"


def test_a_truncated_weights_file_is_named_before_training(tmp_path, target, checkpoint):
    weights = checkpoint / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(content[: len(content) - 100])
    trainer, proxy = _osd(tmp_path, target, max_steps=4)
    before = {n: p.detach().clone() for n, p in proxy.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated .*earlier checkpoint"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(before[n], p) for n, p in proxy.named_parameters())  # nothing trained
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        _osd(tmp_path, target, max_steps=4)[0].train(resume_from_checkpoint=True)  # the last checkpoint, same check


@pytest.mark.parametrize("name, match", [("trainer_state.json", "lacks trainer_state.json"),
                                         ("model.safetensors", "holds no weights")])
def test_a_missing_file_is_named(tmp_path, target, checkpoint, name, match):
    os.remove(checkpoint / name)
    with pytest.raises(ValueError, match=match):
        _osd(tmp_path, target, max_steps=4)[0].train(resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match="is not a folder"):
        check_checkpoint(str(tmp_path / "nowhere"))


def test_missing_optimizer_or_rng_state_warns_and_resumes(tmp_path, target, checkpoint):
    os.remove(checkpoint / "optimizer.pt")
    os.remove(checkpoint / "rng_state.pth")
    trainer, _ = _osd(tmp_path, target, max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(checkpoint))
    messages = [str(w.message) for w in caught if "will differ from an uninterrupted one" in str(w.message)]
    assert len(messages) == 1 and "optimizer.pt" in messages[0] and "rng_state.pth" in messages[0]
    assert trainer.state.global_step == 4
