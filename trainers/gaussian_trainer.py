"""Gaussian distillation (seed 002): fit a student's latent factor head to a teacher ensemble by EM.

`GaussianDistillationTrainer` takes a `hf_eu.gaussian.GaussianStudentForCausalLM`, training rows
(prompt + response token ids, as `trainers.data.generate_responses` writes them) and a teacher
ensemble: a list of models (e.g. hf_eu's drafts), or one `teacher` (the target) that
`hf_eu.perturbation.LowRankGaussianPerturbation` turns into `num_members` members, one seed each.

It first collects the design points (`trainers.gaussian_design`): the last hidden states of the
student's backbone and of every member at each response position, cached on disk. The backbone is not
trained: the factor head sees its cached hidden states, so an EM iteration costs no backbone pass.
Then one `Trainer.train()` run is the whole EM (`trainers.factor_em.FactorEM`, the same code the
synthetic tests check): the Trainer's optimizer steps on minibatches of design points are the M-steps
(`compute_loss` = the expected complete-data NLL with the E-step moments fixed), and a callback runs
the closed-form noise update and the E-step over all design points every `m_step_steps` steps, logging
the marginal log-likelihood. Unlike `fit_factor_model`, Trainer steps are not undone when they lower
Q, so the logged likelihood is usually but not provably monotone.

Why the Trainer's model is the head, not the student: it is the only part that trains, and saving
or checkpointing the student through the Trainer would write the backbone's (often the target's)
weights. The fitted noise variance is the head's buffer, so checkpoints carry it.
"""

from __future__ import annotations

import os

import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_eu.gaussian import GaussianStudentForCausalLM
from hf_eu.perturbation import LowRankGaussianPerturbation

from .checkpoints import CheckedResumeMixin
from .factor_em import FactorEM
from .gaussian_config import GaussianDistillationConfig
from .gaussian_design import TeacherEnsemble, check_shared_head, collect_design_points

__all__ = ["GaussianDistillationTrainer"]


class _EMCallback(TrainerCallback):
    """Runs the E-step (and noise update) at the start, every `m_step_steps` steps and at the end."""

    def __init__(self, trainer: GaussianDistillationTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.begin_em(resumed=state.global_step > 0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.m_step_steps == 0:
            should_log = control.should_log
            self.trainer.em_step()
            control.should_log = should_log  # logging the E-step resets it: the step's loss is still logged

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step % args.m_step_steps != 0:  # a partial last M-step: finish its EM iteration
            self.trainer.em_step()


class GaussianDistillationTrainer(CheckedResumeMixin, Trainer):
    """Fits a Gaussian student's factor head to a teacher ensemble by EM. See the module docstring.

    Args:
        model: the `GaussianStudentForCausalLM` (its head is fitted in place; its backbone is not trained).
        args: a `GaussianDistillationConfig`.
        train_dataset: rows with `input_ids` and `prompt_length` (the design points are their response positions).
        teachers: the ensemble as a list of ≥ 2 models sharing the student's output head, or None.
        teacher: the target, made an ensemble of `args.num_members` seeded perturbations, or None.
    """

    _tag_names = ["hf_eu", "gaussian-distillation", "student-model"]
    _name = "GaussianDistillation"
    _paper = {"title": "Knowledge Distillation of Uncertainty using Deep Latent Factor Model", "id": "2510.19290"}

    def __init__(self, model: GaussianStudentForCausalLM, args: GaussianDistillationConfig, train_dataset,
                 teachers: list[nn.Module] | None = None, teacher: nn.Module | None = None, **kwargs):
        if not isinstance(args, GaussianDistillationConfig):
            raise TypeError(f"`args` must be a GaussianDistillationConfig, got {type(args).__name__}.")
        if not isinstance(model, GaussianStudentForCausalLM):
            raise TypeError(f"`model` must be a hf_eu.gaussian.GaussianStudentForCausalLM, got {type(model).__name__}.")
        if model.num_factors != args.num_factors:
            raise ValueError(f"The student has {model.num_factors} factors but `num_factors` is {args.num_factors}; "
                             "build the student with the config's q or change the config.")
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("`train_dataset` is empty: pass rows with `input_ids` and `prompt_length`.")
        ensemble = self._ensemble(teachers, teacher, args)
        for member in {id(ensemble.model(k)): ensemble.model(k) for k in range(len(ensemble))}.values():
            member.eval().requires_grad_(False)
        check_shared_head(model.get_output_embeddings(), ensemble)
        cache_dir = args.design_cache_dir or os.path.join(args.output_dir, "design_cache")
        inputs, observations = collect_design_points(model.backbone, ensemble, train_dataset,
                                                     args.design_batch_size, cache_dir)
        self.em = FactorEM(inputs, observations, args.num_factors, noise_model=args.noise_model, init=args.init,
                           seed=args.seed)
        design = Dataset.from_dict({"design_index": list(range(inputs.shape[0]))})
        super().__init__(model=model.head, args=args, train_dataset=design, **kwargs)
        self.student, self.teachers = model, ensemble
        self.add_callback(_EMCallback(self))

    @staticmethod
    def _ensemble(teachers, teacher, args: GaussianDistillationConfig) -> TeacherEnsemble:
        if (teachers is None) == (teacher is None):
            raise ValueError("Pass the teacher ensemble as `teachers=[model, ...]` (e.g. drafts) or as `teacher=target` "
                             "(an implicit ensemble of its perturbations), exactly one of them.")
        if teachers is not None:
            return TeacherEnsemble(list(teachers))
        perturbation = LowRankGaussianPerturbation(teacher, config=args.perturbation_config())
        seeds = range(args.member_seed, args.member_seed + args.num_members)
        return TeacherEnsemble(target=teacher, perturbation=perturbation, seeds=list(seeds))

    def begin_em(self, resumed: bool) -> None:
        """Start EM: the whitened initialisation, or (resuming) an E-step from the checkpoint's head and noise."""
        if resumed:
            self.em.psi = self.model.noise_variance.detach().double().cpu()
            self._log_em(self.em.update(self.model, noise=False))
        else:
            self.em.initialize()
            self._store_noise()

    def em_step(self) -> None:
        """After an M-step: closed-form noise update and E-step over all design points."""
        self._log_em(self.em.update(self.model))
        self._store_noise()

    def _store_noise(self) -> None:
        with torch.no_grad():
            self.model.noise_variance.copy_(self.em.psi.to(self.model.noise_variance))

    def _log_em(self, record: dict) -> None:
        self.log({f"em/{name}": value for name, value in record.items()})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.em.loss(model, inputs["design_index"])
        return (loss, None) if return_outputs else loss
