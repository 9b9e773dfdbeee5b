"""Reversible, seeded low-rank Gaussian weight perturbation of a model (docs/method.md).

For each chosen linear layer (default: attention `q_proj` and `v_proj`), W = W0 + U_r εᵀ, where U_r
holds the top-r left singular vectors of W0 (shape `(out_features, r)`) and ε has i.i.d. N(0, σ²)
entries (shape `(in_features, r)`). The update therefore lies in the span of the top-r singular
directions of each weight. This is the weight posterior sample used by OSD training, by the
ground-truth ensemble and by the TokUR baseline.

    perturbation = LowRankGaussianPerturbation(model, rank=8, sigma=0.1)
    with perturbation.apply(seed=3):
        logits = model(input_ids).logits      # one posterior sample
    # here every weight is bit-for-bit W0 again

The SVDs are computed once per object, in float32; the noise is drawn on the CPU from a generator
seeded with `seed`, so the same seed gives the same perturbation on any device. Quantized weights
(bitsandbytes 4-bit/8-bit) cannot be perturbed and are refused before anything changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PerturbationConfig", "LowRankGaussianPerturbation"]


@dataclass(frozen=True)
class PerturbationConfig:
    """Settings of the low-rank Gaussian perturbation.

    Args:
        target_modules: names (last component) of the linear layers to perturb.
        rank: r, the number of top singular directions the noise lives in (≥ 1).
        sigma: σ, the standard deviation of each noise entry (> 0).
    """

    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    sigma: float = 0.1

    def __post_init__(self):
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"`target_modules` must be a non-empty list of layer names, got {self.target_modules!r}.")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"`rank` must be an integer ≥ 1, got {self.rank!r}.")
        if not self.sigma > 0:
            raise ValueError(f"`sigma` must be > 0, got {self.sigma!r}.")


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__ if weight is not None else ""
    return kind in {"Params4bit", "Int8Params"} or (weight is not None and not weight.is_floating_point())


class LowRankGaussianPerturbation:
    """Seeded, exactly reversible low-rank Gaussian perturbations of one model's chosen linear layers.

    Args:
        model: the model to perturb in place (inside `apply`).
        target_modules, rank, sigma: see `PerturbationConfig`; or pass `config=`.
    """

    def __init__(self, model: nn.Module, target_modules: Sequence[str] | None = None, rank: int | None = None,
                 sigma: float | None = None, config: PerturbationConfig | None = None):
        defaults = config or PerturbationConfig()
        self.config = PerturbationConfig(
            target_modules=tuple(target_modules) if target_modules is not None else defaults.target_modules,
            rank=rank if rank is not None else defaults.rank,
            sigma=sigma if sigma is not None else defaults.sigma,
        )
        self.model = model
        self.layers = self._find_layers(model)
        # (out, r) top-r left singular vectors of each W0, float32, on the weight's device
        self.bases = {name: self._top_left_singular_vectors(layer.weight) for name, layer in self.layers.items()}
        self._active = False

    def _find_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        wanted = set(self.config.target_modules)
        layers = {name: module for name, module in model.named_modules()
                  if name.split(".")[-1] in wanted and getattr(module, "weight", None) is not None}
        if not layers:
            available = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"No layer named {sorted(wanted)} in {type(model).__name__}; pass `target_modules` "
                             f"from the linear layers it has: {available}.")
        quantized = [name for name, module in layers.items() if _is_quantized(module)]
        if quantized:
            raise ValueError(f"Layers {quantized[:3]} hold quantized weights, which cannot be perturbed exactly. "
                             "Load the target unquantized (float32/bfloat16) to perturb it.")
        for name, module in layers.items():
            if module.weight.dim() != 2:
                raise ValueError(f"Layer {name!r} has a {module.weight.dim()}-D weight; only linear layers are supported.")
        return layers

    def _top_left_singular_vectors(self, weight: torch.Tensor) -> torch.Tensor:
        rank = min(self.config.rank, *weight.shape)
        left, _, _ = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # (out, min(out, in))
        return left[:, :rank].contiguous()  # (out, r)

    def deltas(self, seed: int) -> dict[str, torch.Tensor]:
        """The float32 weight updates U_r εᵀ of `seed`, by layer name, each of the weight's shape."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        updates = {}
        for name, layer in self.layers.items():
            basis = self.bases[name]  # (out, r)
            noise = torch.randn(layer.weight.shape[1], basis.shape[1], generator=generator) * self.config.sigma  # (in, r)
            updates[name] = basis @ noise.to(basis.device).T  # (out, in)
        return updates

    @contextmanager
    def apply(self, seed: int) -> Iterator[nn.Module]:
        """Context in which the model carries the perturbation of `seed`; weights are restored exactly on exit."""
        if self._active:
            raise RuntimeError("This perturbation is already applied; exit its `with` block before applying another.")
        originals = {name: layer.weight.detach().clone() for name, layer in self.layers.items()}
        self._active = True
        try:
            with torch.no_grad():
                for name, delta in self.deltas(seed).items():
                    weight = self.layers[name].weight
                    weight.copy_((originals[name].float() + delta).to(weight.dtype))
            yield self.model
        finally:
            with torch.no_grad():
                for name, layer in self.layers.items():
                    layer.weight.copy_(originals[name])
            self._active = False
