"""Data-Diverse Drafts: train draft k on partition k only, distilling the target (docs/method.md).

`DDDTrainer` takes the partitioned response data set (from `trainers.partition.partition_dataset`),
keeps only the rows of `args.partition_index`, and trains the draft with token-level forward
KL(target ‖ draft) — from stored top-k teacher log-probs, or from a live `teacher` — or with
cross-entropy on the sampled tokens. The draft may be a full model or a peft model whose active
adapter is draft k on a shared base (only that adapter trains).
"""

from __future__ import annotations

import torch

from hf_eu.divergences import kl

from .collator import DistillationCollator
from .ddd_config import DDDConfig
from .distillation import DistillationTrainer, shifted_positions
from .partition import partition_scheme, select_partition

__all__ = ["DDDTrainer"]


class DDDTrainer(DistillationTrainer):
    """Trains one draft on one partition cell. See the module docstring."""

    _tag_names = ["hf_eu", "ddd", "draft-model"]
    _name = "DDD"
    _paper = {"title": "Epistemic uncertainty from speculative-decoding drafts", "id": "2602.01956"}

    def __init__(self, model, args: DDDConfig, train_dataset, teacher=None, data_collator=None, **kwargs):
        if not isinstance(args, DDDConfig):
            raise TypeError(f"`args` must be a DDDConfig, got {type(args).__name__}.")
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("`train_dataset` is empty: generate responses with `trainers.data.generate_responses`.")
        if "partition" not in train_dataset.column_names:
            raise ValueError("`train_dataset` has no `partition` column: split it with "
                             "`trainers.partition.partition_dataset(dataset, G, S, seed)` first.")
        self._check_scheme(train_dataset, args)
        cell = select_partition(train_dataset, args.partition_index)
        has_topk = "teacher_topk_ids" in cell.column_names
        if args.loss == "forward_kl" and not has_topk and teacher is None:
            raise ValueError("`loss='forward_kl'` needs the teacher: pass `teacher=target`, or data generated with "
                             "`top_k_logprobs=k`, or use `loss='cross_entropy'`.")
        pad_id = getattr(model.config, "pad_token_id", None) or 0
        super().__init__(model=model, args=args, train_dataset=cell, teacher=teacher,
                         data_collator=data_collator or DistillationCollator(pad_token_id=pad_id), **kwargs)

    @staticmethod
    def _check_scheme(dataset, args: DDDConfig) -> None:
        scheme = partition_scheme(dataset)
        expected = (args.num_prompt_groups, args.num_response_slots)
        if (scheme["num_prompt_groups"], scheme["num_response_slots"]) != expected:
            raise ValueError(f"The data set is partitioned {scheme['num_prompt_groups']}x{scheme['num_response_slots']} "
                             f"but the config says {expected[0]}x{expected[1]}; make them agree.")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions, targets, mask = shifted_positions(inputs["labels"])
        student_logps = self.logps_at(model, inputs, positions)  # (B, T, V)
        if self.args.loss == "cross_entropy":
            token_losses = -student_logps.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
        elif "teacher_topk_ids" in inputs:
            topk_ids = inputs["teacher_topk_ids"][:, positions + 1]  # (B, T, k), aligned with targets
            teacher_logps = inputs["teacher_topk_logps"][:, positions + 1].log_softmax(-1)  # renormalised over top-k
            token_losses = kl(teacher_logps, student_logps.gather(-1, topk_ids))  # (B, T)
        else:
            with torch.no_grad():
                teacher_logps = self.logps_at(self.teacher, inputs, positions)  # (B, T, V)
            token_losses = kl(teacher_logps, student_logps)  # (B, T)
        loss = self.normalize(token_losses, mask, num_items_in_batch)
        return (loss, student_logps) if return_outputs else loss
