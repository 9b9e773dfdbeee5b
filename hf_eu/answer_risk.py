"""`AnswerRiskDetector`: the calibrated probability that a generated answer is wrong.

Users act on answers, not tokens. The detector is a logistic regression (fitted by scikit-learn in
`trainers/answer_risk.py`) on answer-level aggregates of

- the token EU of the composite's estimator (`eu_sum`, `eu_mean`, `eu_max`, `eu_q90`),
- the target's own confidence in the tokens it produced: token log-prob (`logp_sum`, `logp_mean`,
  `logp_min`), predictive entropy (`entropy_mean`, `entropy_max`), largest probability (`maxprob_mean`,
  `maxprob_min`),
- and the answer's length (`log_length` = log of the number of answer tokens),

standardized with the fitting data's mean and std. Only numbers are stored, never a pickle:
`detector/detector.json` (feature names, the estimator whose EU it reads, mean, std, coefficients,
intercept, how it was fitted). `answer_features` computes the aggregates from per-token tensors, so the
fitting code and `generate` share one definition.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["AnswerRiskDetector", "answer_features", "abstain", "ANSWER_FEATURES", "EU_FEATURES", "DETECTOR_FOLDER",
           "ABSTAIN_MESSAGE"]

ABSTAIN_MESSAGE = "I am not sure."

DETECTOR_FOLDER = "detector"
_JSON = "detector.json"
EU_FEATURES = ("eu_sum", "eu_mean", "eu_max", "eu_q90")
ANSWER_FEATURES = EU_FEATURES + ("logp_sum", "logp_mean", "logp_min", "entropy_mean", "entropy_max",
                                 "maxprob_mean", "maxprob_min", "log_length")


def _masked(values: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(mask, values.double(), torch.full_like(values, fill, dtype=torch.float64))


def answer_features(eu: torch.Tensor, token_logps: torch.Tensor, entropy: torch.Tensor, max_probs: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Answer-level features `(B, len(ANSWER_FEATURES))` float64 from per-token tensors of shape `(B, T)`.

    Args:
        eu: token EU in nats; token_logps: the target's log-prob of each answer token; entropy: its predictive
            entropy; max_probs: its largest probability at each position.
        mask: bool, True on the answer's real tokens (rows need at least one).
    """
    mask = mask.bool()
    count = mask.sum(-1).double()  # (B,)
    if (count == 0).any():
        raise ValueError("Every answer needs at least one token to compute its risk; got an empty answer row.")

    def mean(x):
        return _masked(x, mask, 0.0).sum(-1) / count

    def total(x):
        return _masked(x, mask, 0.0).sum(-1)

    eu_q90 = torch.stack([torch.quantile(eu[row][mask[row]].double(), 0.9) for row in range(eu.shape[0])])
    columns = [total(eu), mean(eu), _masked(eu, mask, -float("inf")).max(-1).values, eu_q90,
               total(token_logps), mean(token_logps), _masked(token_logps, mask, float("inf")).min(-1).values,
               mean(entropy), _masked(entropy, mask, -float("inf")).max(-1).values,
               mean(max_probs), _masked(max_probs, mask, float("inf")).min(-1).values, count.log()]
    return torch.stack(columns, -1)  # (B, F)


def abstain(answers: Sequence[str], answer_risk: torch.Tensor, threshold: float,
            message: str = ABSTAIN_MESSAGE) -> list[str]:
    """The answers, each replaced by `message` where its risk is above `threshold` (risk > threshold abstains).

    Args:
        answers: one decoded answer per row; answer_risk: `(len(answers),)` from `out.answer_risk`.
        threshold: in [0, 1]; 1 never abstains, 0 abstains on every answer with a positive risk.
    """
    if answer_risk is None:
        raise ValueError("`answer_risk` is None: the composite has no fitted detector for this estimator "
                         "(see `model.detector`); fit one with `python -m benchmarks.run --fit-detector`.")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"`threshold` must be in [0, 1], got {threshold}.")
    risks = torch.as_tensor(answer_risk).reshape(-1).tolist()
    if len(risks) != len(answers):
        raise ValueError(f"Got {len(answers)} answers but {len(risks)} risks; pass one risk per answer.")
    return [message if risk > threshold else answer for answer, risk in zip(answers, risks)]


class AnswerRiskDetector:
    """`detector(features (B, F)) -> (B,)` probability that each answer is wrong, in [0, 1].

    Args:
        feature_names: the F columns it reads, a subset of `ANSWER_FEATURES`, in order.
        mean, std: `(F,)` standardization of the fitting data.
        coef: `(F,)` logistic-regression coefficients on the standardized features; intercept: a float.
        estimator: the estimator whose token EU the `eu_*` features are (it must be the one `generate` uses).
        info: free-form record of how it was fitted (data, sizes, cross-validated AUROC, command).
    """

    def __init__(self, feature_names: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 coef: Sequence[float], intercept: float, estimator: str, info: dict[str, Any] | None = None):
        unknown = [name for name in feature_names if name not in ANSWER_FEATURES]
        if unknown:
            raise ValueError(f"Unknown answer features {unknown}; choose from {ANSWER_FEATURES}.")
        if not len(feature_names) == len(mean) == len(std) == len(coef):
            raise ValueError(f"`mean`, `std` and `coef` need one value per feature ({len(feature_names)}), got "
                             f"{len(mean)}, {len(std)} and {len(coef)}.")
        self.feature_names = tuple(feature_names)
        self.mean, self.std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        self.coef, self.intercept = torch.tensor(coef, dtype=torch.float64), float(intercept)
        self.estimator = estimator
        self.info = dict(info or {})

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """The detector's columns `(B, F)` out of all `ANSWER_FEATURES` `(B, len(ANSWER_FEATURES))`."""
        if features.dim() != 2 or features.shape[1] != len(ANSWER_FEATURES):
            raise ValueError(f"Expected answer features of shape (B, {len(ANSWER_FEATURES)}) ({ANSWER_FEATURES}), "
                             f"got {tuple(features.shape)}; compute them with `answer_features`.")
        return features[:, [ANSWER_FEATURES.index(name) for name in self.feature_names]]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """`(B,)` float32 probabilities of a wrong answer from all `ANSWER_FEATURES` `(B, ·)`."""
        standardized = (self.select(features).double().cpu() - self.mean) / self.std
        return torch.sigmoid(standardized @ self.coef + self.intercept).float()

    # ----------------------------------------------------------------- storage
    @staticmethod
    def exists(folder: str | os.PathLike) -> bool:
        return os.path.isfile(os.path.join(folder, _JSON))

    def save(self, folder: str | os.PathLike) -> None:
        """Write `detector.json` into `folder` (written aside, then renamed)."""
        os.makedirs(folder, exist_ok=True)
        payload = {"feature_names": list(self.feature_names), "mean": self.mean.tolist(), "std": self.std.tolist(),
                   "coef": self.coef.tolist(), "intercept": self.intercept, "estimator": self.estimator,
                   "info": self.info}
        path = os.path.join(folder, _JSON)
        with open(path + ".tmp", "w") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "AnswerRiskDetector":
        path = os.path.join(folder, _JSON)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; fit a detector with `python -m benchmarks.run --fit-detector`.")
        try:
            payload = json.load(open(path))
            known = {"feature_names", "mean", "std", "coef", "intercept", "estimator", "info"}
            return cls(**{k: v for k, v in payload.items() if k in known})
        except (json.JSONDecodeError, TypeError, KeyError) as error:
            raise ValueError(f"{path} is corrupt or incomplete ({type(error).__name__}: {error}); refit the "
                             "detector.") from error
