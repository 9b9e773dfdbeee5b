"""Trainers that produce what hf_eu consumes, as `transformers.Trainer` subclasses with a config dataclass each:
Data-Diverse Drafts (DDD), Online Stochastic Distillation (OSD), Gaussian distillation of an ensemble, and the
distilled EU head; plus the data tools and the answer-risk detector's fitting. Imports `hf_eu`; `hf_eu` never
imports this package.
"""

from .answer_risk import CONFIDENCE_FEATURES, fit_answer_risk
from .calibration import answer_greedily, fit_calibrator
from .collator import DistillationCollator
from .data import generate_responses
from .ddd_config import DDDConfig
from .ddd_trainer import DDDTrainer
from .eu_head_config import EUHeadConfig
from .eu_head_data import EUHeadDataArguments, build_data, load_data
from .eu_head_trainer import EUHeadTrainer, eu_head_dataset, set_input_statistics
from .gaussian_config import GaussianDistillationConfig
from .gaussian_trainer import GaussianDistillationTrainer
from .osd_config import OSDConfig
from .osd_trainer import OSDTrainer
from .partition import parse_scheme, partition_dataset
from .questions import gsm8k_questions, reasoning_gym_questions, training_seed

__all__ = [
    "DDDConfig", "DDDTrainer", "OSDConfig", "OSDTrainer", "GaussianDistillationConfig", "GaussianDistillationTrainer",
    "EUHeadConfig", "EUHeadTrainer", "EUHeadDataArguments", "DistillationCollator",
    "generate_responses", "partition_dataset", "parse_scheme", "gsm8k_questions", "reasoning_gym_questions",
    "training_seed", "answer_greedily", "fit_calibrator", "fit_answer_risk", "CONFIDENCE_FEATURES",
    "build_data", "load_data", "eu_head_dataset", "set_input_statistics",
]
