"""Metrics of the evaluation: estimation error against the ground truth, hallucination detection, detectors.

- `estimation_error`: RMSE (through the `eu_rmse` metric module; affinely fitted on the calibration set for
  estimators on another scale), Pearson and Spearman correlation, pooled over answer tokens.
- `detection`: label = final answer wrong; a sequence score (sum, mean or max of token values); AUROC and
  AUPRC (scikit-learn) and the normalized PRR (the `prr` metric module), each with a bootstrap 95% interval.
- `detector_auroc`: a logistic-regression detector on aggregated features with stratified k-fold
  cross-validation (scikit-learn), AUROC mean ± std over seeds.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["estimation_error", "sequence_scores", "detection", "detector_auroc", "METRICS_DIR", "AGGREGATES"]

METRICS_DIR = os.path.join(os.path.dirname(__file__), "metrics")
AGGREGATES = ("sum", "mean", "max")


def _metric_function(module: str, function: str):
    """A pure function of a local `evaluate` metric module (the same file `evaluate.load(path)` runs)."""
    spec = importlib.util.spec_from_file_location(f"hf_eu_metric_{module}", os.path.join(METRICS_DIR, module,
                                                                                          f"{module}.py"))
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return getattr(loaded, function)


eu_rmse = _metric_function("eu_rmse", "eu_rmse")
prediction_rejection_ratio = _metric_function("prr", "prediction_rejection_ratio")


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 5)


def estimation_error(estimate: np.ndarray, truth: np.ndarray, fit: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """RMSE (after an affine map fitted on `fit` = (calibration estimates, calibration truths) if given), Pearson, Spearman."""
    result = eu_rmse(estimate, truth, *(fit or (None, None)))
    constant = np.std(estimate) == 0 or np.std(truth) == 0
    return {"rmse": _nan_to_none(result["rmse"]),
            "pearson": None if constant else _nan_to_none(pearsonr(estimate, truth)[0]),
            "spearman": None if constant else _nan_to_none(spearmanr(estimate, truth)[0]),
            "affine": [result["slope"], result["intercept"]] if "slope" in result else None}


def estimation_intervals(estimate: list[np.ndarray], truth: list[np.ndarray], bootstrap: int = 300,
                         seed: int = 0) -> dict:
    """95% bootstrap intervals over answers (resampled with replacement, their tokens pooled) of the raw RMSE and
    the Spearman correlation against the ground truth: `{"rmse_ci": [lo, hi], "spearman_ci": [lo, hi]}`."""
    rng = np.random.default_rng(seed)
    rmse, rho = [], []
    for _ in range(bootstrap if len(estimate) > 1 else 0):
        index = rng.integers(0, len(estimate), len(estimate))
        e, t = np.concatenate([estimate[i] for i in index]), np.concatenate([truth[i] for i in index])
        if len(e) > 2 and np.std(e) > 0 and np.std(t) > 0:
            rmse.append(np.sqrt(np.mean((e - t) ** 2)))
            rho.append(spearmanr(e, t)[0])
    interval = lambda v: [_nan_to_none(np.percentile(v, 2.5)), _nan_to_none(np.percentile(v, 97.5))] if v else None  # noqa: E731
    return {"rmse_ci": interval(rmse), "spearman_ci": interval(rho)}


def sequence_scores(per_token: list[np.ndarray], how: str) -> np.ndarray:
    """One score per answer: sum, mean or max of its token values (0 for an empty answer)."""
    reduce = {"sum": np.sum, "mean": np.mean, "max": np.max}[how]
    return np.array([float(reduce(v)) if len(v) else 0.0 for v in per_token])


def _point_metrics(wrong: np.ndarray, score: np.ndarray) -> tuple[float, float, float]:
    if wrong.min() == wrong.max():
        return float("nan"), float("nan"), float("nan")
    return (roc_auc_score(wrong, score), average_precision_score(wrong, score),
            prediction_rejection_ratio(score, 1.0 - wrong))


def detection(wrong: np.ndarray, score: np.ndarray, bootstrap: int = 1000, seed: int = 0) -> dict:
    """AUROC, AUPRC, PRR of `score` for detecting `wrong` answers, each with a bootstrap 95% interval."""
    wrong = np.asarray(wrong, dtype=np.float64)
    point = _point_metrics(wrong, score)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap if np.isfinite(point[0]) else 0):
        index = rng.integers(0, len(wrong), len(wrong))
        samples.append(_point_metrics(wrong[index], score[index]))
    samples = np.array(samples, dtype=np.float64).reshape(-1, 3)
    result = {}
    for column, name in enumerate(("auroc", "auprc", "prr")):
        result[name] = _nan_to_none(point[column])
        finite = samples[:, column][np.isfinite(samples[:, column])] if len(samples) else []
        result[f"{name}_ci"] = ([_nan_to_none(np.percentile(finite, 2.5)), _nan_to_none(np.percentile(finite, 97.5))]
                                if len(finite) else None)
    return result


def detector_auroc(features: np.ndarray, wrong: np.ndarray, seeds: int = 5, folds: int = 5) -> dict:
    """Cross-validated AUROC of a logistic regression on `features` (answers × features), mean ± std over seeds."""
    wrong = np.asarray(wrong, dtype=int)
    folds = min(folds, int(np.bincount(wrong, minlength=2).min()))
    if folds < 2:
        return {"auroc_mean": None, "auroc_std": None, "folds": folds}
    values = []
    for seed in range(seeds):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0))
        probability = cross_val_predict(model, features, wrong, cv=splitter, method="predict_proba")[:, 1]
        values.append(roc_auc_score(wrong, probability))
    return {"auroc_mean": _nan_to_none(np.mean(values)), "auroc_std": _nan_to_none(np.std(values)), "folds": folds}
