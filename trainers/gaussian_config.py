"""Configuration of Gaussian distillation (seed 002): `GaussianDistillationConfig`, beside `gaussian_trainer.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hf_eu.perturbation import PerturbationConfig

from .factor_em import INITS, NOISE_MODELS

__all__ = ["GaussianDistillationConfig"]


@dataclass
class GaussianDistillationConfig(TrainingArguments):
    """`TrainingArguments` plus the fields of Gaussian distillation (EM for a deep latent factor model).

    The Trainer's steps are the M-steps' SGD steps on minibatches of design points
    (`per_device_train_batch_size` design points each); every `m_step_steps` steps the E-step and the
    closed-form noise update run, so `max_steps // m_step_steps` EM iterations are done.

    Args:
        num_factors (`int`, defaults to `4`):
            q, the number of latent factors; must equal the student's, and be < the number of members.
        noise_model (`str`, defaults to `"isotropic"`):
            observation noise Ψ: `"isotropic"` (σ² I) or `"diagonal"` (one variance per hidden dimension).
        init (`str`, defaults to `"pca"`):
            `"pca"`: the posterior of z starts at the members' whitened principal-component scores (empirical
            mean 0, covariance I: the moments of N(0, I)); `"random"`: at N(0, I) draws (an ablation).
        m_step_steps (`int`, defaults to `50`):
            optimizer steps of each M-step, between two E-steps.
        num_members (`int`, defaults to `8`):
            teacher members when the ensemble is a target with its low-rank Gaussian perturbation.
        member_seed (`int`, defaults to `1000`):
            perturbation seed of member 0 (member k uses `member_seed + k`); ≥ 1000 keeps them apart from
            the evaluation's seeds (< 1000).
        perturbation_modules (`list[str]`, defaults to `["q_proj", "v_proj"]`), perturbation_rank (`int`,
        defaults to `8`), perturbation_sigma (`float`, defaults to `0.1`):
            the perturbation of an implicit ensemble (as in `OSDConfig`).
        design_batch_size (`int`, defaults to `8`):
            rows per forward pass when the teachers' and student's hidden states are collected.
        design_cache_dir (`str`, *optional*):
            where the collected hidden states are cached, one file per member (default
            `<output_dir>/design_cache`), so an interrupted run does not recompute finished members.
    """

    num_factors: int = field(default=4, metadata={"help": "Latent factors q (< number of members)."})
    noise_model: str = field(default="isotropic", metadata={"help": f"Observation noise, one of {NOISE_MODELS}."})
    init: str = field(default="pca", metadata={"help": f"Initial posterior of z, one of {INITS}."})
    m_step_steps: int = field(default=50, metadata={"help": "Optimizer steps per M-step (between E-steps)."})
    num_members: int = field(default=8, metadata={"help": "Members of a perturbed-target ensemble."})
    member_seed: int = field(default=1000, metadata={"help": "Perturbation seed of member 0 (≥ 1000 recommended)."})
    perturbation_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"],
                                            metadata={"help": "Target layers the perturbation touches."})
    perturbation_rank: int = field(default=8, metadata={"help": "Rank r of the perturbation."})
    perturbation_sigma: float = field(default=0.1, metadata={"help": "Noise scale σ of the perturbation."})
    design_batch_size: int = field(default=8, metadata={"help": "Rows per forward when collecting hidden states."})
    design_cache_dir: str | None = field(default=None, metadata={"help": "Cache of hidden states (default "
                                                                         "<output_dir>/design_cache)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the factor head."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Design points per M-step batch."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: batches are design indices."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_factors", "m_step_steps", "design_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer ≥ 1, got {value!r}.")
        if not isinstance(self.num_members, int) or self.num_members < 2:
            raise ValueError(f"`num_members` must be an integer ≥ 2 (and > num_factors), got {self.num_members!r}.")
        if not isinstance(self.member_seed, int) or self.member_seed < 0:
            raise ValueError(f"`member_seed` must be an integer ≥ 0, got {self.member_seed!r}.")
        if self.noise_model not in NOISE_MODELS:
            raise ValueError(f"`noise_model` must be one of {NOISE_MODELS}, got {self.noise_model!r}.")
        if self.init not in INITS:
            raise ValueError(f"`init` must be one of {INITS}, got {self.init!r}.")
        self.perturbation_config()  # validates rank, sigma and modules

    def perturbation_config(self) -> PerturbationConfig:
        """The `hf_eu.perturbation.PerturbationConfig` of an implicit (perturbed-target) ensemble."""
        return PerturbationConfig(target_modules=tuple(self.perturbation_modules), rank=self.perturbation_rank,
                                  sigma=self.perturbation_sigma)
