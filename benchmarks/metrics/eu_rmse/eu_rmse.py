"""`eu_rmse`: root-mean-square error of per-token EU estimates against ground-truth EU (an `evaluate` metric).

    import evaluate
    rmse = evaluate.load("benchmarks/metrics/eu_rmse")      # a local path: no hub access needed
    rmse.compute(predictions=[0.1, 0.4], references=[0.0, 0.5])   # {'rmse': 0.1}

RMSE = sqrt(mean_t (EU_hat(t) − GT_EU(t))²), pooled over all answer tokens (docs/method.md). With
`affine_fit=True` the predictions are first mapped by the least-squares line a·x + b fitted on
`fit_predictions`/`fit_references` (calibration tokens, never the evaluated ones): how cheap baselines on
another scale are compared.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): estimated EU per token.
    references (`list[float]`): ground-truth EU per token, same length.
    fit_predictions, fit_references (`list[float]`, optional): calibration tokens for the affine map.
Returns:
    rmse (`float`), and `slope`, `intercept` when an affine map was fitted.
"""


def affine_fit(predictions, references) -> tuple[float, float]:
    """Least-squares (slope, intercept) of references on predictions."""
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    if x.std() == 0:
        return 0.0, float(y.mean())
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def eu_rmse(predictions, references, fit_predictions=None, fit_references=None) -> dict:
    """RMSE of predictions against references, optionally after an affine map fitted on other tokens."""
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"predictions and references must be non-empty and of equal length, got {x.shape} and "
                         f"{y.shape}.")
    result = {}
    if fit_predictions is not None:
        slope, intercept = affine_fit(fit_predictions, fit_references)
        x = slope * x + intercept
        result.update(slope=slope, intercept=intercept)
    result["rmse"] = float(np.sqrt(np.mean((x - y) ** 2)))
    return result


class EuRmse(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references, fit_predictions=None, fit_references=None):
        return eu_rmse(predictions, references, fit_predictions, fit_references)
