"""Trainers that produce what hf_eu consumes: Data-Diverse Drafts (DDD) and Online Stochastic
Distillation (OSD) as `transformers.Trainer` subclasses. Imports `hf_eu`; `hf_eu` never imports this.

Nothing is exported yet: the trainers arrive with the training issue.
"""

__all__: list[str] = []
