"""Online Stochastic Distillation: train the proxy towards the target's Bayesian model average.

Every micro-batch (or step) the teacher is perturbed afresh with `hf_eu.perturbation`'s low-rank
Gaussian noise, and the proxy minimises the forward KL(perturbed teacher ‖ proxy) on the batch's
response tokens. Forward KL is minimised by the average of the noisy teachers, i.e. the BMA; reverse
KL would collapse onto one mode. The perturbation of a micro-batch is a deterministic function of
`perturbation_seed`, the process index and the (global step, micro-batch) counter, so a resumed run
draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import torch

from hf_eu.divergences import kl
from hf_eu.perturbation import LowRankGaussianPerturbation

from .collator import DistillationCollator
from .distillation import DistillationTrainer, shifted_positions
from .osd_config import OSDConfig

__all__ = ["OSDTrainer"]


class OSDTrainer(DistillationTrainer):
    """Trains a proxy on forward KL to a freshly perturbed teacher. See the module docstring."""

    _tag_names = ["hf_eu", "osd", "proxy-model"]
    _name = "OSD"
    _paper = {"title": "Epistemic uncertainty from speculative-decoding drafts", "id": "2602.01956"}

    def __init__(self, model, args: OSDConfig, train_dataset, teacher, data_collator=None, **kwargs):
        if not isinstance(args, OSDConfig):
            raise TypeError(f"`args` must be an OSDConfig, got {type(args).__name__}.")
        if teacher is None:
            raise ValueError("OSD needs the target as `teacher=`: it is perturbed afresh at every step.")
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("`train_dataset` is empty: pass rows with `input_ids` (and `prompt_length`).")
        perturbation = LowRankGaussianPerturbation(teacher, config=args.perturbation_config())  # refuses quantized
        pad_id = getattr(model.config, "pad_token_id", None) or 0
        super().__init__(model=model, args=args, train_dataset=train_dataset, teacher=teacher,
                         data_collator=data_collator or DistillationCollator(pad_token_id=pad_id), **kwargs)
        self.perturbation = perturbation
        self._noise_step, self._noise_micro = -1, 0

    def noise_seed(self) -> int:
        """Seed of the current micro-batch's perturbation (advances while training)."""
        step = self.state.global_step
        if step != self._noise_step:
            self._noise_step, self._noise_micro = step, 0
        micro = self._noise_micro if self.args.noise_per == "micro_batch" else 0
        self._noise_micro += 1
        counter = step * self.args.gradient_accumulation_steps + micro
        return self.args.perturbation_seed + 1_000_003 * self.args.process_index + counter

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions, _, mask = shifted_positions(inputs["labels"])
        seed = self.noise_seed() if model.training else self.args.perturbation_seed - 1
        with torch.no_grad(), self.perturbation.apply(seed):
            teacher_logps = self.logps_at(self.teacher, inputs, positions)  # (B, T, V)
        student_logps = self.logps_at(model, inputs, positions)  # (B, T, V)
        loss = self.normalize(kl(teacher_logps, student_logps), mask, num_items_in_batch)
        return (loss, student_logps) if return_outputs else loss
