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
                    info: dict[str, Any] | None = None) -> AnswerRiskDetector:
    """Fit a detector on `features` `(N, len(ANSWER_FEATURES))` (all columns, as `answer_features` computes them)
    and labels `wrong` `(N,)` (1 = the answer is wrong), reading the columns `feature_names`.

    Args:
        estimator: the estimator whose token EU the `eu_*` columns hold.
        regularization: scikit-learn's `C` (inverse L2 strength) of the logistic regression.
    """
    from sklearn.linear_model import LogisticRegression

    features, wrong = np.asarray(features, dtype=np.float64), np.asarray(wrong, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != len(ANSWER_FEATURES) or len(features) != len(wrong):
        raise ValueError(f"Expected features (N, {len(ANSWER_FEATURES)}) and N labels, got {features.shape} and "
                         f"{wrong.shape}.")
    if len(np.unique(wrong)) < 2:
        raise ValueError("The fitting answers are all right or all wrong; the detector needs both kinds.")
    columns = features[:, [ANSWER_FEATURES.index(name) for name in feature_names]]
    mean, std = columns.mean(0), np.maximum(columns.std(0), 1e-8)
    model = LogisticRegression(C=regularization, max_iter=1000).fit((columns - mean) / std, wrong)
    record = {"answers": int(len(wrong)), "wrong_fraction": round(float(wrong.mean()), 4),
              "regularization": regularization, **(info or {})}
    return AnswerRiskDetector(list(feature_names), mean.tolist(), std.tolist(), model.coef_[0].tolist(),
                              float(model.intercept_[0]), estimator=estimator, info=record)
