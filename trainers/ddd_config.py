"""Configuration of Data-Diverse Drafts (DDD) training: `DDDConfig`, beside `ddd_trainer.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

__all__ = ["DDDConfig"]

LOSSES = ("forward_kl", "cross_entropy")


@dataclass
class DDDConfig(TrainingArguments):
    """`TrainingArguments` plus the fields of Data-Diverse Drafts.

    Args:
        loss (`str`, defaults to `"forward_kl"`):
            `"forward_kl"`: token-level KL(target ‖ draft), from the stored top-k teacher log-probs when the
            data has them, else from a live teacher; `"cross_entropy"`: on the sampled tokens (cheaper).
        partition_index (`int`, defaults to `0`):
            k, the cell of the partition this draft trains on (the trainer selects it; nothing else is seen).
        num_prompt_groups (`int`, defaults to `1`):
            prompt groups of the partition scheme ("G×S").
        num_response_slots (`int`, defaults to `3`):
            response slots of the partition scheme.
        partition_seed (`int`, defaults to `0`):
            seed of the prompt-group permutation.
    """

    loss: str = field(default="forward_kl", metadata={"help": f"Token loss, one of {LOSSES}."})
    partition_index: int = field(default=0, metadata={"help": "The partition cell k this draft trains on."})
    num_prompt_groups: int = field(default=1, metadata={"help": "Prompt groups G of the G×S partition."})
    num_response_slots: int = field(default=3, metadata={"help": "Response slots S of the G×S partition."})
    partition_seed: int = field(default=0, metadata={"help": "Seed of the prompt-group permutation."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator reads prompt_length and the teacher top-k columns."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {self.loss!r}.")
        if self.num_prompt_groups < 1 or self.num_response_slots < 1:
            raise ValueError(f"`num_prompt_groups` and `num_response_slots` must be ≥ 1, got "
                             f"{self.num_prompt_groups} and {self.num_response_slots}.")
        cells = self.num_prompt_groups * self.num_response_slots
        if not 0 <= self.partition_index < cells:
            raise ValueError(f"`partition_index` must be in [0, {cells - 1}] for a {self.num_prompt_groups}x"
                             f"{self.num_response_slots} scheme, got {self.partition_index}.")
