"""Fit `hf_eu.answer_risk.AnswerRiskDetector`: a logistic regression from answer-level features to "the answer is wrong".

scikit-learn does the fitting; the detector keeps only its numbers (standardization, coefficients, intercept), so
a composite stores JSON, never a pickle. `python -m benchmarks.run --scale small --fit-detector` fits the shipped
one on the evaluation's own held-out detection questions (disjoint from every evaluated question).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hf_eu.answer_risk import ANSWER_FEATURES, AnswerRiskDetector

__all__ = ["fit_answer_risk", "CONFIDENCE_FEATURES"]

# The detector without EU: the target's confidence and the answer length only.
CONFIDENCE_FEATURES = tuple(name for name in ANSWER_FEATURES if not name.startswith("eu_"))


def fit_answer_risk(features: np.ndarray, wrong: np.ndarray, *, estimator: str,
                    feature_names: Sequence[str] = ANSWER_FEATURES, regularization: float = 1.0,
                    sample_weight: np.ndarray | None = None, info: dict[str, Any] | None = None) -> AnswerRiskDetector:
    """Fit a detector on `features` `(N, len(ANSWER_FEATURES))` (all columns, as `answer_features` computes them)
    and labels `wrong` `(N,)` (1 = the answer is wrong), reading the columns `feature_names`.

    Args:
        estimator: the estimator whose token EU the `eu_*` columns hold.
        regularization: scikit-learn's `C` (inverse L2 strength) of the logistic regression.
        sample_weight: `(N,)` non-negative weight of each answer (e.g. `benchmarks.detect_weights`, to fit as
            if the answers had been drawn like the ones the detector will see); the standardization uses the
            same weights. None: all 1.
    """
    from sklearn.linear_model import LogisticRegression

    features, wrong = np.asarray(features, dtype=np.float64), np.asarray(wrong, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != len(ANSWER_FEATURES) or len(features) != len(wrong):
        raise ValueError(f"Expected features (N, {len(ANSWER_FEATURES)}) and N labels, got {features.shape} and "
                         f"{wrong.shape}.")
    if len(np.unique(wrong)) < 2:
        raise ValueError("The fitting answers are all right or all wrong; the detector needs both kinds.")
    weight = np.ones(len(wrong)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if weight.shape != wrong.shape or not np.isfinite(weight).all() or weight.min() < 0 or weight.sum() <= 0:
        raise ValueError(f"`sample_weight` must be {len(wrong)} finite non-negative numbers, not all 0; got shape "
                         f"{weight.shape}, range [{weight.min() if weight.size else None}, "
                         f"{weight.max() if weight.size else None}].")
    weight = weight / weight.mean()
    columns = features[:, [ANSWER_FEATURES.index(name) for name in feature_names]]
    mean = np.average(columns, axis=0, weights=weight)
    std = np.maximum(np.sqrt(np.average((columns - mean) ** 2, axis=0, weights=weight)), 1e-8)
    model = LogisticRegression(C=regularization, max_iter=1000).fit((columns - mean) / std, wrong,
                                                                    sample_weight=weight)
    record = {"answers": int(len(wrong)), "wrong_fraction": round(float(np.average(wrong, weights=weight)), 4),
              "regularization": regularization, "weighted": sample_weight is not None, **(info or {})}
    return AnswerRiskDetector(list(feature_names), mean.tolist(), std.tolist(), model.coef_[0].tolist(),
                              float(model.intercept_[0]), estimator=estimator, info=record)
