"""Trainers that produce what hf_eu consumes, as `transformers.Trainer` subclasses with a config dataclass each:
Data-Diverse Drafts (DDD), Online Stochastic Distillation (OSD), Gaussian distillation of an ensemble, and the
distilled EU head; plus the data tools and the answer-risk detector's fitting. Imports `hf_eu`; `hf_eu` never
imports this package (`import hf_eu` loads none of it).

Installed, this folder is `hf_eu.trainers` (as `model_cards/` is `hf_eu.model_cards`): `from hf_eu.trainers import
DDDTrainer`, `python -m hf_eu.trainers.run_ddd ...`. In a clone, `trainers` from the repository root is the same
code (`python -m trainers.run_ddd ...`); the modules import each other relatively, so both names work. The command
line scripts (`run_ddd`, `run_osd`, `run_gaussian`, `run_eu_head`, `eu_head_data`, `fit_calibrator`,
`train_defaults`) are modules to run, not imported here, except `eu_head_data`'s data tools.
"""

from .answer_risk import CONFIDENCE_FEATURES, fit_answer_risk
from .calibration import Answer, answer_greedily, calibration_features, fit_calibrator, token_values
from .collator import DistillationCollator
from .data import SETTINGS_FILE, generate_responses
from .ddd_config import DDDConfig
from .ddd_trainer import DDDTrainer
from .distillation import DistillationTrainer, shifted_positions
from .eu_head_config import EUHeadConfig
from .eu_head_data import EUHeadDataArguments, build_data, build_questions, load_data
from .eu_head_trainer import EUHeadTrainer, batch_features, eu_head_dataset, set_input_statistics
from .factor_em import (
    INITS, NOISE_MODELS, FactorEM, FactorMoments, FactorStatistics, expected_nll, fit_factor_model,
)
from .gaussian_config import GaussianDistillationConfig
from .gaussian_design import (
    TeacherEnsemble, check_shared_head, collect_design_points, collect_hidden_states, rows_fingerprint,
)
from .gaussian_trainer import GaussianDistillationTrainer
from .osd_config import OSDConfig
from .osd_trainer import OSDTrainer
from .partition import parse_scheme, partition_dataset, partition_scheme, select_partition
from .questions import (
    REASONING_GYM_PRESETS, TRAIN_SEED_OFFSET, gsm8k_questions, reasoning_gym_questions, training_seed,
)
from .script_utils import ScriptArguments, build_student, load_rows, load_target, train_and_save

__all__ = [
    # trainers and their configs
    "DDDConfig", "DDDTrainer", "OSDConfig", "OSDTrainer", "GaussianDistillationConfig", "GaussianDistillationTrainer",
    "EUHeadConfig", "EUHeadTrainer", "DistillationTrainer", "DistillationCollator", "shifted_positions",
    # response data, partitions, questions
    "generate_responses", "SETTINGS_FILE", "partition_dataset", "parse_scheme", "partition_scheme",
    "select_partition", "gsm8k_questions", "reasoning_gym_questions", "training_seed", "REASONING_GYM_PRESETS",
    "TRAIN_SEED_OFFSET",
    # EU-head data and features
    "EUHeadDataArguments", "build_data", "build_questions", "load_data", "eu_head_dataset", "batch_features",
    "set_input_statistics",
    # Gaussian distillation: design points and the factor model's EM
    "TeacherEnsemble", "check_shared_head", "collect_design_points", "collect_hidden_states", "rows_fingerprint",
    "FactorEM", "FactorMoments", "FactorStatistics", "expected_nll", "fit_factor_model", "INITS", "NOISE_MODELS",
    # calibration and answer risk
    "Answer", "answer_greedily", "calibration_features", "token_values", "fit_calibrator", "fit_answer_risk",
    "CONFIDENCE_FEATURES",
    # what the command line scripts share
    "ScriptArguments", "load_rows", "load_target", "build_student", "train_and_save",
]
