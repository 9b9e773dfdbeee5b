"""What DDD and OSD training share: the causal shift, logits only where the loss looks, and the
normalisation of a summed token loss by `num_items_in_batch` (gradient accumulation, several processes).

`DistillationTrainer` is a thin `transformers.Trainer` subclass holding a frozen teacher. Subclasses
override `compute_loss` only; the formulas come from `hf_eu.divergences`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from hf_eu.loading import output_vocab_size

from .checkpoints import CheckedResumeMixin

__all__ = ["DistillationTrainer", "shifted_positions"]


def shifted_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal shift, stated once: logits at position t predict `labels[:, t + 1]`.

    Returns:
        positions: `(T,)` long, the logit positions the loss needs (first scored position - 1 … L - 2);
        targets: `(B, T)` the labels those logits predict;
        mask: `(B, T)` bool, True where a target is not -100.
    """
    scored = (labels[:, 1:] != -100).any(0).nonzero()
    if scored.numel() == 0:
        raise ValueError("The batch has no position to learn from (every label is -100); check `prompt_length`.")
    start = int(scored[0])
    positions = torch.arange(start, labels.shape[1] - 1, device=labels.device)  # (T,)
    targets = labels[:, start + 1 :]  # (B, T)
    return positions, targets, targets != -100


class DistillationTrainer(CheckedResumeMixin, Trainer):
    """A `Trainer` with a frozen `teacher` and helpers for token-level distillation losses."""

    def __init__(self, *args, teacher: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if teacher is not None:
            student_vocab, teacher_vocab = output_vocab_size(self.model), output_vocab_size(teacher)
            if student_vocab != teacher_vocab:
                raise ValueError(f"The student has an output vocabulary of {student_vocab} tokens but the teacher has "
                                 f"{teacher_vocab}; distil into a model with the teacher's tokenizer and vocabulary.")
            teacher.eval().requires_grad_(False)
            teacher = teacher.to(self.args.device)
        self.teacher = teacher
        # compute_loss divides by num_items_in_batch itself, so the Trainer must not divide by GA steps again
        self.model_accepts_loss_kwargs = True

    @staticmethod
    def logps_at(model: nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """Float32 log-probs `(B, T, V)` of `model` at `positions` only (`logits_to_keep`)."""
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       logits_to_keep=positions).logits  # (B, T, V)
        return logits.float().log_softmax(-1)

    def normalize(self, token_losses: torch.Tensor, mask: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Sum of `token_losses` over `mask`, divided by the tokens of the whole accumulated batch.

        Without `num_items_in_batch` (evaluation), the mean over this batch's tokens.
        """
        total = (token_losses * mask).sum()
        if num_items_in_batch is None:
            return total / mask.sum().clamp_min(1)
        loss = total / num_items_in_batch
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return loss
