"""`EUCalibrator`: a small fitted regressor from per-token features to ground-truth EU (`hf_eu_calibrated`).

The features are the ones the wrapper already computes (`estimators.CALIBRATION_FEATURES`: draft JSD,
KL(draft mixture ‖ proxy), proxy entropy, target entropy). Each is mapped to `log(x + floor)`,
standardized with the training mean and std, and passed through a ReLU multilayer perceptron whose
weights were fitted by scikit-learn's `MLPRegressor` (squared error on the EU itself, so it targets
RMSE); the output is clamped at 0. Only its numbers are stored, never a pickle:

    calibrator/calibrator.json          feature names, floor, layer sizes, how it was fitted
    calibrator/calibrator.safetensors   feature mean/std and the layers' weights and biases

Fitting (scikit-learn) lives in `trainers/calibration.py`; this module only evaluates and stores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["EUCalibrator", "CALIBRATOR_FOLDER"]

CALIBRATOR_FOLDER = "calibrator"
_JSON = "calibrator.json"
_WEIGHTS = "calibrator.safetensors"


class EUCalibrator:
    """Evaluate a fitted calibrator: `calibrator(features (N, F)) -> (N,)` EU in nats, ≥ 0.

    Args:
        feature_names: names of the F input columns, in order.
        feature_mean, feature_std: `(F,)` statistics of the log-features on the fitting data.
        weights, biases: the perceptron's layers, `weights[i]` of shape `(in_i, out_i)` (scikit-learn's
            `coefs_` layout), `biases[i]` `(out_i,)`; ReLU between layers, identity at the end.
        floor: the constant added before the log (keeps log finite at 0).
        info: free-form record of how it was fitted (data, sizes, fit error).
    """

    def __init__(self, feature_names: Sequence[str], feature_mean: torch.Tensor, feature_std: torch.Tensor,
                 weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], floor: float = 1e-4,
                 info: dict[str, Any] | None = None):
        if len(weights) != len(biases) or not weights:
            raise ValueError(f"Need as many bias vectors as weight matrices (≥ 1), got {len(weights)} and {len(biases)}.")
        if weights[0].shape[0] != len(feature_names) or weights[-1].shape[1] != 1:
            raise ValueError(f"The first layer must take {len(feature_names)} features and the last give 1 output; "
                             f"got shapes {[tuple(w.shape) for w in weights]}.")
        self.feature_names = tuple(feature_names)
        self.feature_mean = feature_mean.double()
        self.feature_std = feature_std.double()
        self.weights = [w.double() for w in weights]
        self.biases = [b.double() for b in biases]
        self.floor = float(floor)
        self.info = dict(info or {})

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Standardized log-features `(N, F)`, float64: the perceptron's input."""
        logged = torch.log(features.double().clamp_min(0) + self.floor)  # (N, F)
        return (logged - self.feature_mean.to(features.device)) / self.feature_std.to(features.device)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != len(self.feature_names):
            raise ValueError(f"Expected features of shape (N, {len(self.feature_names)}) for {self.feature_names}, "
                             f"got {tuple(features.shape)}.")
        hidden = self.transform(features)
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = hidden @ weight.to(hidden.device) + bias.to(hidden.device)  # (N, out_i)
            if index < len(self.weights) - 1:
                hidden = hidden.relu()
        return hidden.squeeze(-1).clamp_min(0).to(features.dtype)  # (N,)

    # ----------------------------------------------------------------- storage
    def save(self, folder: str | os.PathLike) -> None:
        """Write `calibrator.json` + `calibrator.safetensors` into `folder` (each file written aside, then renamed)."""
        os.makedirs(folder, exist_ok=True)
        tensors = {"feature_mean": self.feature_mean, "feature_std": self.feature_std}
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            tensors[f"weight_{index}"], tensors[f"bias_{index}"] = weight.contiguous(), bias.contiguous()
        meta = {"feature_names": list(self.feature_names), "floor": self.floor, "num_layers": len(self.weights),
                "info": self.info}
        weights_path, json_path = os.path.join(folder, _WEIGHTS), os.path.join(folder, _JSON)
        save_file(tensors, weights_path + ".tmp", metadata={"format": "pt"})
        with open(json_path + ".tmp", "w") as handle:
            json.dump(meta, handle, indent=2)
        os.replace(weights_path + ".tmp", weights_path)
        os.replace(json_path + ".tmp", json_path)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EUCalibrator:
        """Read a calibrator saved by `save`; a missing file is a FileNotFoundError naming it."""
        paths = [os.path.join(folder, name) for name in (_JSON, _WEIGHTS)]
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"Calibrator files {missing} are missing; re-save the composite or refit it "
                                    "with `python -m trainers.run_calibrator`.")
        with open(paths[0]) as handle:
            meta = json.load(handle)
        tensors = load_file(paths[1])
        layers = range(int(meta["num_layers"]))
        return cls(meta["feature_names"], tensors["feature_mean"], tensors["feature_std"],
                   [tensors[f"weight_{i}"] for i in layers], [tensors[f"bias_{i}"] for i in layers],
                   floor=meta.get("floor", 1e-4), info=meta.get("info"))

    @staticmethod
    def exists(folder: str | os.PathLike) -> bool:
        """Whether `folder` holds a saved calibrator."""
        return os.path.isfile(os.path.join(folder, _JSON))
