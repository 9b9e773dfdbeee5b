"""`prr`: LM-Polygraph's normalized prediction-rejection ratio (an `evaluate` metric).

    import evaluate
    prr = evaluate.load("benchmarks/metrics/prr")
    prr.compute(predictions=uncertainty, references=quality)   # {'prr': ...}

Rejecting the most uncertain answers first, the rejection curve is the mean quality of the kept answers
at each rejection rate (0, 1/n, …, (n−1)/n). PRR = (AUC_unc − AUC_random) / (AUC_oracle − AUC_random),
with the oracle rejecting the lowest-quality answers first and the random curve flat at the mean
quality: 1 is perfect, 0 is random, negative is worse than random. Quality is 1 for a right answer and 0
for a wrong one (any float works).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): uncertainty per answer (higher = less trusted).
    references (`list[float]`): quality per answer (e.g. 1 = correct, 0 = wrong).
Returns:
    prr (`float`); NaN when all qualities are equal (nothing to separate).
"""


def _rejection_auc(order_keys: np.ndarray, quality: np.ndarray) -> float:
    """Mean over rejection rates k/n of the mean quality of answers kept after rejecting the k largest keys."""
    kept = quality[np.argsort(order_keys, kind="stable")]  # ascending key: most trusted first
    n = len(kept)
    means = np.cumsum(kept) / np.arange(1, n + 1)  # mean quality of the i + 1 most trusted
    return float(means[::-1].mean())  # rates 0 … (n-1)/n keep n … 1 answers


def prediction_rejection_ratio(uncertainty, quality) -> float:
    """Normalized PRR of `uncertainty` (higher = reject first) for `quality` (higher = better)."""
    u, q = np.asarray(uncertainty, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    if u.shape != q.shape or u.size == 0:
        raise ValueError(f"uncertainty and quality must be non-empty and of equal length, got {u.shape}, {q.shape}.")
    random = float(q.mean())
    oracle = _rejection_auc(-q, q)
    if oracle - random <= 0:
        return float("nan")
    return (_rejection_auc(u, q) - random) / (oracle - random)


class Prr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        return {"prr": prediction_rejection_ratio(predictions, references)}
