"""Configuration of Online Stochastic Distillation (OSD): `OSDConfig`, beside `osd_trainer.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hf_eu.perturbation import PerturbationConfig

__all__ = ["OSDConfig"]

NOISE_SCHEDULES = ("step", "micro_batch")


@dataclass
class OSDConfig(TrainingArguments):
    """`TrainingArguments` plus the fields of Online Stochastic Distillation.

    Args:
        perturbation_modules (`list[str]`, defaults to `["q_proj", "v_proj"]`):
            names of the teacher's linear layers that are perturbed.
        perturbation_rank (`int`, defaults to `8`):
            r: the noise lives in the span of each weight's top-r left singular vectors.
        perturbation_sigma (`float`, defaults to `0.1`):
            σ: standard deviation of the Gaussian noise entries.
        perturbation_seed (`int`, defaults to `0`):
            base seed; the perturbation of a step is a deterministic function of it and the step.
        noise_per (`str`, defaults to `"micro_batch"`):
            draw a fresh perturbation every optimizer `"step"` or every `"micro_batch"` (more samples).
    """

    perturbation_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"],
                                            metadata={"help": "Teacher layers to perturb."})
    perturbation_rank: int = field(default=8, metadata={"help": "Rank r of the perturbation."})
    perturbation_sigma: float = field(default=0.1, metadata={"help": "Noise scale σ."})
    perturbation_seed: int = field(default=0, metadata={"help": "Base seed of the perturbations."})
    noise_per: str = field(default="micro_batch", metadata={"help": f"One of {NOISE_SCHEDULES}."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator reads prompt_length."})

    def __post_init__(self):
        super().__post_init__()
        if self.noise_per not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_per` must be one of {NOISE_SCHEDULES}, got {self.noise_per!r}.")
        self.perturbation_config()  # validates rank, sigma and modules

    def perturbation_config(self) -> PerturbationConfig:
        """The `hf_eu.perturbation.PerturbationConfig` these fields describe."""
        return PerturbationConfig(target_modules=tuple(self.perturbation_modules), rank=self.perturbation_rank,
                                  sigma=self.perturbation_sigma)
