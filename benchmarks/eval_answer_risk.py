"""Answer-level risk in the evaluation: fit the detector on the `detect` set, measure it on held-out answers.

`answer_feature_matrix` builds `hf_eu.answer_risk.ANSWER_FEATURES` for cached answers from the per-token
values the evaluation already has (`neg_logprob`, `entropy`, `max_prob` and the EU estimator's), the same
definitions `generate` uses. `fit_detector` fits `AnswerRiskDetector` on the `detect` set (arithmetic
questions of their own seed, disjoint from every evaluated one; no ground truth needed). `risk_records`
measures it on an evaluated set: AUROC, AUPRC and LM-Polygraph's normalized PRR with bootstrap intervals,
expected calibration error (10 equal-width bins) with a reliability diagram, what the EU features add over
confidence and length (both detectors cross-validated on the same folds of that set), and risk-coverage
curves (accuracy of the answers kept when abstaining by risk, by the target's confidence, by TokUR M = 8).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from benchmarks.eval_metrics import _nan_to_none, detection
from hf_eu.answer_risk import ANSWER_FEATURES, AnswerRiskDetector, answer_features

__all__ = ["answer_feature_matrix", "fit_detector", "risk_records", "expected_calibration_error", "risk_coverage",
           "DETECT_ESTIMATORS"]

DETECT_ESTIMATORS = ("entropy", "max_prob", "neg_logprob")  # plus the EU estimator: all from one target pass


def answer_feature_matrix(scores: dict, eu_name: str) -> np.ndarray:
    """`(answers, len(ANSWER_FEATURES))` from cached per-token lists; empty answers get a zero row."""
    rows = []
    for eu, neg_logp, entropy, max_prob in zip(scores[eu_name], scores["neg_logprob"], scores["entropy"],
                                               scores["max_prob"]):
        if not len(eu):
            rows.append(np.zeros(len(ANSWER_FEATURES)))
            continue
        as_row = lambda values: torch.as_tensor(np.asarray(values, dtype=np.float64))[None]  # noqa: E731 (1, T)
        rows.append(answer_features(as_row(eu), -as_row(neg_logp), as_row(entropy), 1.0 - as_row(max_prob),
                                    torch.ones(1, len(eu), dtype=torch.bool))[0].numpy())
    return np.stack(rows)


def fit_detector(detect: dict, eu_name: str, info: dict,
                 weights: np.ndarray | None = None) -> tuple[AnswerRiskDetector, AnswerRiskDetector]:
    """The detector on all features and the one on confidence and length only, both fitted on the `detect` set
    (each answer weighted by `weights`, see `benchmarks.detect_weights`)."""
    from trainers.answer_risk import CONFIDENCE_FEATURES, fit_answer_risk

    features = answer_feature_matrix(detect["scores"], eu_name)
    full = fit_answer_risk(features, detect["wrong"], estimator=eu_name, sample_weight=weights, info=info)
    confidence = fit_answer_risk(features, detect["wrong"], estimator=eu_name, feature_names=CONFIDENCE_FEATURES,
                                 sample_weight=weights, info=info)
    return full, confidence


def expected_calibration_error(probability: np.ndarray, outcome: np.ndarray, bins: int = 10) -> tuple[float, list]:
    """ECE = Σ_b (n_b / N) |mean outcome_b − mean probability_b| over equal-width bins; plus the diagram's points."""
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(probability, edges[1:-1]), 0, bins - 1)
    error, points = 0.0, []
    for b in range(bins):
        inside = index == b
        if inside.any():
            gap = abs(outcome[inside].mean() - probability[inside].mean())
            error += inside.mean() * gap
            points.append([float(probability[inside].mean()), float(outcome[inside].mean()), int(inside.sum())])
    return float(error), points


def risk_coverage(score: np.ndarray, wrong: np.ndarray) -> list[list[float]]:
    """`[[coverage, accuracy of the kept answers]]` when keeping the answers of lowest `score` first."""
    order = np.argsort(score, kind="stable")
    kept_right = np.cumsum(1.0 - wrong[order])
    counts = np.arange(1, len(order) + 1)
    return [[float(c / len(order)), float(r / c)] for c, r in zip(counts, kept_right)]


def _cross_validated(features: np.ndarray, wrong: np.ndarray, columns: list[int], seeds: int) -> dict:
    from benchmarks.eval_metrics import detector_auroc

    return detector_auroc(features[:, columns], wrong, seeds=seeds)


def risk_records(set_data: dict, detector: AnswerRiskDetector, confidence_detector: AnswerRiskDetector | None,
                 bootstrap: int, cv_seeds: int) -> dict:
    """The measurements of the module docstring for one evaluated set."""
    from trainers.answer_risk import CONFIDENCE_FEATURES

    wrong = np.asarray(set_data["wrong"], dtype=np.float64)
    features = answer_feature_matrix(set_data["scores"], detector.estimator)
    risk = detector(torch.as_tensor(features)).double().numpy()
    ece, diagram = expected_calibration_error(risk, wrong)
    record = {"detector_estimator": detector.estimator, **detection(wrong, risk, bootstrap=bootstrap),
              "ece": _nan_to_none(ece), "reliability": diagram, "fitted_on": detector.info.get("fitted_on"),
              "weighting": detector.info.get("weighting")}
    every = list(range(len(ANSWER_FEATURES)))
    without_eu = [ANSWER_FEATURES.index(name) for name in CONFIDENCE_FEATURES]
    record["cross_validated"] = {"confidence_and_length": _cross_validated(features, wrong, without_eu, cv_seeds),
                                 "with_eu": _cross_validated(features, wrong, every, cv_seeds)}
    cv = record["cross_validated"]
    if None not in (cv["with_eu"]["auroc_mean"], cv["confidence_and_length"]["auroc_mean"]):
        record["eu_adds_auroc"] = round(cv["with_eu"]["auroc_mean"] - cv["confidence_and_length"]["auroc_mean"], 4)
    curves = {"answer_risk": risk_coverage(risk, wrong)}
    if confidence_detector is not None:
        confidence_risk = confidence_detector(torch.as_tensor(features)).double().numpy()
        curves["confidence_detector"] = risk_coverage(confidence_risk, wrong)
        record["confidence_detector"] = detection(wrong, confidence_risk, bootstrap=0)
    if "tokur_m8" in set_data["scores"]:
        tokur = np.array([float(np.mean(v)) if len(v) else 0.0 for v in set_data["scores"]["tokur_m8"]])
        curves["tokur_m8_mean"] = risk_coverage(tokur, wrong)
    record["risk_coverage"] = curves
    return record


def plot_answer_risk(record: dict, path_prefix: str) -> list[str]:
    """`<prefix>_reliability.png` and `<prefix>_risk_coverage.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [f"{path_prefix}_reliability.png", f"{path_prefix}_risk_coverage.png"]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    points = np.array(record["reliability"]) if record["reliability"] else np.zeros((0, 3))
    axis.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    axis.scatter(points[:, 0], points[:, 1], s=10 + points[:, 2], alpha=0.8)
    axis.set(xlabel="predicted risk (bin mean)", ylabel="fraction wrong", xlim=(0, 1), ylim=(0, 1),
             title=f"answer_risk reliability, ECE {record['ece']:.3f}")
    figure.tight_layout()
    figure.savefig(paths[0], dpi=110)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    for name, curve in record["risk_coverage"].items():
        curve = np.array(curve)
        axis.plot(curve[:, 0], curve[:, 1], label=name)
    axis.set(xlabel="coverage (fraction of answers kept)", ylabel="accuracy of the kept answers",
             title="Abstaining on the riskiest answers")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=110)
    plt.close(figure)
    return paths


def save_detector(detector: AnswerRiskDetector, composite: str, questions: list[str]) -> None:
    """Store the detector in the composite folder (atomically per file) with the questions it was fitted on."""
    import json

    from hf_eu.answer_risk import DETECTOR_FOLDER

    detector.save(os.path.join(composite, DETECTOR_FOLDER))
    config_path = os.path.join(composite, "config.json")
    config = json.load(open(config_path))
    config["has_detector"] = True
    config.setdefault("training", {})["answer_risk_detector"] = (
        f"logistic regression on {len(detector.feature_names)} answer features (EU of '{detector.estimator}', the "
        f"target's confidence, log length), fitted on {detector.info.get('fitted_on')}; questions in "
        "detector_questions.json")
    for path, payload in ((config_path, config), (os.path.join(composite, "detector_questions.json"), questions)):
        with open(path + ".tmp", "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=path == config_path)
        os.replace(path + ".tmp", path)
    from hf_eu.configuration import UncertaintyAwareConfig
    from hf_eu.model_card import render_model_card

    render_model_card(UncertaintyAwareConfig(**config)).save(os.path.join(composite, "README.md"))
