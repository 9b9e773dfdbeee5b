"""`EUHead`: a small network distilled from the ground truth that predicts each token's EU from what the target computes.

Knowledge distillation of uncertainty at token level: the teacher is the 16-copy perturbed ensemble
(the ground truth of docs/method.md §2), the student is this head, and its inputs are the target's own features
at the position predicting the token (`hf_eu.eu_features`): the log-norms of the perturbed layers'
inputs, the output distribution's statistics, and the top-k tokens with their log-probs.

To first order the ground truth is ½ E_ε[δℓᵀ (diag p − ppᵀ) δℓ], the Fisher-weighted size of the logit
change δℓ = W_head δh. The head learns q directions A = (a_1 … a_q) in the space of the final hidden
state and computes, over the target's renormalized top-k distribution p̃, the Fisher variances

    v_j = Var_p̃(W_head a_j) = Σ_v p̃_v (w_v·a_j)² − (Σ_v p̃_v w_v·a_j)²        (w_v: row v of the output head)

— exactly the quantity a perturbation of δh along a_j would produce. A ReLU perceptron maps the
standardized [features, log v] to log EU; the output is exp(·), in nats, ≥ 0.

A head may carry a `proxy_head`: a second head of the same kind whose inputs also hold the OSD proxy's predictive
entropy at each position (column `PROXY_ENTROPY`, last), for the estimator `eu_head_proxy`, which pays the proxy's
pass for it. It is saved inside the same folder (config key `proxy_head`, weights under `proxy_head.`).

The head keeps a reference to the target's output-head weight (`attach`), never a copy: a composite
stores only `eu_head/config.json` and `eu_head/model.safetensors` (about 80 kB per head). Training lives in
`trainers/eu_head_trainer.py`; this module only evaluates, saves and loads.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .eu_features import TargetFeatures

__all__ = ["EUHead", "EU_HEAD_FOLDER", "PROXY_ENTROPY", "fisher_variances", "with_proxy_entropy"]

EU_HEAD_FOLDER = "eu_head"
_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
PROXY_ENTROPY = "proxy_entropy"  # the extra input column of a `proxy_head`
_KNOWN = ("feature_names", "hidden_size", "num_directions", "hidden_sizes", "top_k", "info")


def with_proxy_entropy(features: TargetFeatures, proxy_entropy: torch.Tensor) -> TargetFeatures:
    """`features` `(N, ·)` with the proxy's entropy `(N,)` (nats) appended to `values`: a `proxy_head`'s inputs."""
    values = torch.cat([features.values.float(), proxy_entropy.float().to(features.values.device)[:, None]], -1)
    return TargetFeatures(values, features.topk_ids, features.topk_logps)  # values (N, F + 1)


def fisher_variances(topk_logps: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Var_p̃ of each direction's values over the top-k tokens.

    Args:
        topk_logps: `(N, k)` log-probs of the k most likely tokens (renormalized here to p̃).
        directions: `(N, k, q)` the value w_v·a_j of each of those tokens for each direction.

    Returns:
        `(N, q)`: Σ_v p̃_v d_vj² − (Σ_v p̃_v d_vj)², ≥ 0.
    """
    probs = topk_logps.float().softmax(-1).unsqueeze(-1)  # (N, k, 1) renormalized over the top k
    mean = (probs * directions).sum(1, keepdim=True)  # (N, 1, q)
    return (probs * (directions - mean).square()).sum(1)  # (N, q)


class EUHead(nn.Module):
    """Predicts per-token EU (nats, ≥ 0) from `TargetFeatures`; see the module docstring.

    Args:
        feature_names: names of the F columns of `TargetFeatures.values` it was built for.
        hidden_size: D, the target's final hidden size (rows of its output head).
        num_directions: q learned logit directions (0 disables the Fisher variances).
        hidden_sizes: widths of the perceptron's hidden layers.
        top_k: k of the features it reads.
        info: free-form record of how it was trained (data, seeds, command, fit error).
    """

    def __init__(self, feature_names: list[str], hidden_size: int, num_directions: int = 16,
                 hidden_sizes: tuple[int, ...] = (64, 64), top_k: int = 64, info: dict[str, Any] | None = None):
        super().__init__()
        if num_directions < 0 or not hidden_sizes or min(hidden_sizes) < 1:
            raise ValueError(f"`num_directions` must be ≥ 0 and `hidden_sizes` non-empty positive widths, got "
                             f"{num_directions} and {hidden_sizes}.")
        self.feature_names = list(feature_names)
        self.hidden_size, self.num_directions, self.top_k = int(hidden_size), int(num_directions), int(top_k)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.info = dict(info or {})
        width = len(self.feature_names) + self.num_directions
        self.directions = nn.Parameter(torch.randn(self.hidden_size, self.num_directions) / self.hidden_size ** 0.5)
        self.register_buffer("input_mean", torch.zeros(width))
        self.register_buffer("input_std", torch.ones(width))
        layers, previous = [], width
        for size in self.hidden_sizes:
            layers += [nn.Linear(previous, size), nn.ReLU()]
            previous = size
        layers.append(nn.Linear(previous, 1))
        self.mlp = nn.Sequential(*layers)
        self._attached = ()  # (the target's output head weight (V, D),): a tuple, so it is no parameter of the head
        self.proxy_head: EUHead | None = None  # the variant reading the proxy's entropy too (`eu_head_proxy`)

    def set_proxy_head(self, head: "EUHead | None") -> "EUHead":
        """Carry `head` (trained on this head's inputs plus `PROXY_ENTROPY`) as the `proxy_head`; returns self."""
        if head is not None:
            if not isinstance(head, EUHead) or head.proxy_head is not None:
                raise TypeError(f"`proxy_head` must be an EUHead without a proxy head of its own, got {head!r:.80}.")
            if head.feature_names != self.feature_names + [PROXY_ENTROPY] or head.hidden_size != self.hidden_size:
                raise ValueError(f"A proxy head reads this head's features plus {PROXY_ENTROPY!r} for the same target; "
                                 f"got features {head.feature_names[-3:]} (last three) and hidden size "
                                 f"{head.hidden_size}. Train it with `run_eu_head --proxy_from COMPOSITE`.")
            if self._attached:
                head.attach_weight(self._attached[0])
        self.proxy_head = head
        return self

    def attach(self, target: nn.Module) -> "EUHead":
        """Read the target's output-head weight (by reference) for the Fisher variances; returns self."""
        weight = target.get_output_embeddings().weight
        if weight.shape[1] != self.hidden_size:
            raise ValueError(f"This EU head was built for a hidden size of {self.hidden_size}; the target's output "
                             f"head has {weight.shape[1]}. Train a head for this target (trainers.EUHeadTrainer).")
        return self.attach_weight(weight)

    def attach_weight(self, weight: torch.Tensor) -> "EUHead":
        """`attach` with the output-head weight `(V, D)` itself (also attaches the proxy head)."""
        self._attached = (weight,)
        if self.proxy_head is not None:
            self.proxy_head.attach_weight(weight)
        return self

    @property
    def is_attached(self) -> bool:
        return bool(self._attached)

    def inputs(self, features: TargetFeatures) -> torch.Tensor:
        """The perceptron's unstandardized input `(N, F + q)`: the feature values, then log Fisher variances."""
        values = features.values.float()  # (N, F)
        if values.dim() != 2 or values.shape[1] != len(self.feature_names):
            raise ValueError(f"The EU head expects features of shape (N, {len(self.feature_names)}), got "
                             f"{tuple(values.shape)}: it was trained for another target or feature set.")
        if not self.num_directions:
            return values
        if not self._attached:
            raise RuntimeError("Call `head.attach(target)` before using the EU head: it reads the target's output head.")
        weight = self._attached[0].detach()  # (V, D), never trained through the head
        rows = weight[features.topk_ids.to(weight.device)]  # (N, k, D)
        directions = rows.to(self.directions.dtype) @ self.directions  # (N, k, q)
        variances = fisher_variances(features.topk_logps.to(directions.device), directions)  # (N, q)
        return torch.cat([values.to(variances.device), variances.clamp_min(1e-10).log()], -1)  # (N, F + q)

    def log_eu(self, features: TargetFeatures) -> torch.Tensor:
        """`(N,)` predicted log EU (before the exp)."""
        standardized = (self.inputs(features) - self.input_mean) / self.input_std  # (N, F + q)
        return self.mlp(standardized).squeeze(-1)

    def forward(self, features: TargetFeatures) -> torch.Tensor:
        """`(N,)` predicted EU in nats, ≥ 0, for `features` of shape `(N, ·)`."""
        return self.log_eu(features).clamp(max=20.0).exp()

    # ----------------------------------------------------------------- storage
    def config_dict(self) -> dict[str, Any]:
        config = {"feature_names": self.feature_names, "hidden_size": self.hidden_size,
                  "num_directions": self.num_directions, "hidden_sizes": list(self.hidden_sizes),
                  "top_k": self.top_k, "info": self.info}
        if self.proxy_head is not None:
            config["proxy_head"] = self.proxy_head.config_dict()
        return config

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> "EUHead":
        head = cls(**{k: (tuple(v) if k == "hidden_sizes" else v) for k, v in config.items() if k in _KNOWN})
        if config.get("proxy_head") is not None:
            head.set_proxy_head(cls._from_config(config["proxy_head"]))
        return head

    def save(self, folder: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors` into `folder` (each written aside, then renamed)."""
        os.makedirs(folder, exist_ok=True)
        weights = os.path.join(folder, _WEIGHTS)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
        config = os.path.join(folder, _CONFIG)
        with open(config + ".tmp", "w") as handle:
            json.dump(self.config_dict(), handle, indent=2)
        os.replace(config + ".tmp", config)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "EUHead":
        """Read a head written by `save` (safetensors only); unknown config keys are ignored."""
        paths = [os.path.join(folder, name) for name in (_CONFIG, _WEIGHTS)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"EU head folder {folder!r} lacks {missing}; save one with `EUHead.save`.")
        head = cls._from_config(json.load(open(paths[0])))
        head.load_state_dict(load_file(paths[1]))
        return head.eval()
