"""Trainers that produce what hf_eu consumes, as `transformers.Trainer` subclasses with a config dataclass each:
Data-Diverse Drafts (DDD), Online Stochastic Distillation (OSD), Gaussian distillation of an ensemble, and the
distilled EU head; plus the data tools and the answer-risk detector's fitting. Imports `hf_eu`; `hf_eu` never
imports this package (`import hf_eu` loads none of it).

Installed, this folder is `hf_eu.trainers` (as `model_cards/` is `hf_eu.model_cards`): `from hf_eu.trainers import
DDDTrainer`, `python -m hf_eu.trainers.run_ddd ...`. In a clone, `trainers` from the repository root is the same
code (`python -m trainers.run_ddd ...`); the modules import each other relatively, so both names work. The command
line scripts (`run_ddd`, `run_osd`, `run_gaussian`, `run_eu_head`, `eu_head_data`, `run_calibrator`,
`train_defaults`) are modules to run, not imported here, except `eu_head_data`'s data tools.
"""

import importlib

_EXPORTS = {  # name -> module: imported on first use, so `python -m trainers.X` and `import trainers.questions`
    # load only what they need (and no module runs twice under runpy)
    "CONFIDENCE_FEATURES": "answer_risk", "fit_answer_risk": "answer_risk",
    "Answer": "calibration", "answer_greedily": "calibration", "calibration_features": "calibration",
    "fit_calibrator": "calibration", "token_values": "calibration",
    "DistillationCollator": "collator",
    "SETTINGS_FILE": "data", "generate_responses": "data",
    "DDDConfig": "ddd_config",
    "DDDTrainer": "ddd_trainer",
    "DistillationTrainer": "distillation", "shifted_positions": "distillation",
    "EUHeadConfig": "eu_head_config",
    "EUHeadDataArguments": "eu_head_data", "build_data": "eu_head_data", "build_questions": "eu_head_data",
    "load_data": "eu_head_data",
    "proxy_entropy_column": "eu_head_data", "batch_seeds": "eu_head_data", "copies_scale": "eu_head_data",
    "EUHeadTrainer": "eu_head_trainer", "batch_features": "eu_head_trainer", "eu_head_dataset": "eu_head_trainer",
    "set_input_statistics": "eu_head_trainer",
    "INITS": "factor_em", "NOISE_MODELS": "factor_em", "FactorEM": "factor_em", "FactorMoments": "factor_em",
    "FactorStatistics": "factor_em", "expected_nll": "factor_em", "fit_factor_model": "factor_em",
    "GaussianDistillationConfig": "gaussian_config",
    "TeacherEnsemble": "gaussian_design", "check_shared_head": "gaussian_design",
    "collect_design_points": "gaussian_design", "collect_hidden_states": "gaussian_design",
    "rows_fingerprint": "gaussian_design",
    "GaussianDistillationTrainer": "gaussian_trainer",
    "OSDConfig": "osd_config",
    "OSDTrainer": "osd_trainer",
    "parse_scheme": "partition", "partition_dataset": "partition", "partition_scheme": "partition",
    "select_partition": "partition",
    "REASONING_GYM_PRESETS": "questions", "TRAIN_SEED_OFFSET": "questions", "gsm8k_questions": "questions",
    "reasoning_gym_questions": "questions", "training_seed": "questions",
    "CheckedResumeMixin": "checkpoints", "check_checkpoint": "checkpoints",
    "ScriptArguments": "script_utils", "build_student": "script_utils", "load_rows": "script_utils",
    "load_target": "script_utils", "train_and_save": "script_utils",
}

__all__ = sorted(_EXPORTS)  # one list of names: the table above says where each lives


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
