"""The Gaussian-distilled student (docs/method.md §1, arXiv 2510.19290): one network that stands for a whole ensemble.

The deep latent factor model treats each member of a teacher ensemble as a draw

    f(x) = μ_θ(x) + Φ_θ(x)ᵀ z,    z ~ N(0, I_q),

of a Gaussian process whose mean μ_θ and q factor loadings Φ_θ are heads of one student network
(fitted by EM in `trainers/`; this module only evaluates the model).

For a causal LM the factors act on the student's last hidden state h (after the final norm), not on
the logits: a loading over a 49k-token vocabulary per factor and position is too large to learn, and
the output head is linear, so a member's logits follow exactly from hidden-space members:

    lm_head(μ(x) + Φ(x)ᵀ z) = lm_head(μ(x)) + Σ_j z_j · lm_head(φ_j(x))      (lm_head without bias)

A bias of the head is added to the mean only. `GaussianStudentForCausalLM` therefore returns the mean
member's `logits` and one row of `factor_logits` per factor: any number of members
(`member_outputs`) or the analytic mutual information (`divergences.gaussian_mutual_information`)
follow from one forward pass. The teachers' hidden states must live in the same space, i.e. the
teachers share the student's output head (true for perturbed copies of the target, drafts cut from
it, and a student whose backbone is the target itself).

`GaussianFactorHead` maps hidden states to (μ, Φ): μ(h) = h + a zero-initialised MLP correction, and
Φ(h) = an MLP with q·hidden outputs. It also stores the fitted variance of the observation noise
ε ~ N(0, Ψ) (isotropic or diagonal Ψ), which is part of the fit but, as in the paper, not of the
sampled members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ._cache import cache_argument, output_cache

__all__ = [
    "GaussianFactorHead",
    "GaussianStudentForCausalLM",
    "GaussianStudentOutput",
    "decoder_hidden_states",
    "member_outputs",
    "standard_normal_factors",
]


class GaussianFactorHead(nn.Module):
    """Mean and factor loadings of the latent factor model from hidden states.

    Args:
        hidden_size: D, the size of the hidden states (and of the model's outputs μ, φ_j).
        num_factors: q ≥ 1, the number of latent factors.
        intermediate_size: width of the two heads' hidden layer.
        factor_init_std: standard deviation of the factor head's output layer at initialisation.

    `forward(hidden)` with `hidden` of shape `(..., D)` returns `(mean, factors)` of shapes `(..., D)`
    and `(..., q, D)`. The buffer `noise_variance` `(D,)` holds the fitted Ψ's diagonal.
    """

    def __init__(self, hidden_size: int, num_factors: int, intermediate_size: int = 256,
                 factor_init_std: float = 1e-2):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_factors", num_factors),
                            ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer ≥ 1, got {value!r}.")
        self.hidden_size, self.num_factors, self.intermediate_size = hidden_size, num_factors, intermediate_size
        self.mean_correction = nn.Sequential(nn.Linear(hidden_size, intermediate_size), nn.GELU(),
                                             nn.Linear(intermediate_size, hidden_size))
        self.factor_proj = nn.Sequential(nn.Linear(hidden_size, intermediate_size), nn.GELU(),
                                         nn.Linear(intermediate_size, num_factors * hidden_size))
        nn.init.zeros_(self.mean_correction[-1].weight)  # μ starts at the backbone's own hidden state
        nn.init.zeros_(self.mean_correction[-1].bias)
        nn.init.normal_(self.factor_proj[-1].weight, std=factor_init_std)
        nn.init.zeros_(self.factor_proj[-1].bias)
        self.register_buffer("noise_variance", torch.ones(hidden_size))

    def settings(self) -> dict[str, int]:
        """The constructor arguments that rebuild this head's shapes (stored with a saved student)."""
        return {"hidden_size": self.hidden_size, "num_factors": self.num_factors,
                "intermediate_size": self.intermediate_size}

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden.to(self.factor_proj[0].weight.dtype)
        mean = hidden + self.mean_correction(hidden)  # (..., D)
        factors = self.factor_proj(hidden).unflatten(-1, (self.num_factors, self.hidden_size))  # (..., q, D)
        return mean, factors


@dataclass
class GaussianStudentOutput(ModelOutput):
    """Output of `GaussianStudentForCausalLM`.

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_positions, vocab_size)`):
            the mean member's logits, lm_head(μ(x)).
        factor_logits (`torch.FloatTensor` of shape `(batch_size, num_positions, num_factors, vocab_size)`):
            lm_head(φ_j(x)) without bias for each factor j; member z has logits `logits + Σ_j z_j factor_logits[..., j, :]`.
        cache (`Cache`): the backbone's KV cache, returned when `use_cache=True`.
        mean_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_positions, hidden_size)`): μ(x).
        factor_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_positions, num_factors, hidden_size)`): Φ(x).
    """

    logits: torch.FloatTensor | None = None
    factor_logits: torch.FloatTensor | None = None
    cache: Any = None
    mean_hidden_states: torch.FloatTensor | None = None
    factor_hidden_states: torch.FloatTensor | None = None


def decoder_hidden_states(model: nn.Module, **kwargs) -> Any:
    """Run the decoder of a causal LM (peft models included) without its output head.

    Returns the decoder's output: `last_hidden_state` `(B, L, D)` after the final norm, which the head
    maps to the logits, and its cache.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise TypeError(f"{type(model).__name__} exposes no decoder (`get_decoder()`); the Gaussian student needs "
                        "a transformers causal LM (or a peft model on one) as backbone.")
    return decoder(**kwargs)


class GaussianStudentForCausalLM(nn.Module):
    """A causal LM backbone plus a latent factor head on its last hidden state (see the module docstring).

    Args:
        backbone: any transformers causal LM with a linear output head (a truncated copy of the target,
            with or without a peft adapter, or the target itself); its head maps hidden states to logits.
        num_factors: q; ignored when `head` is given.
        head: a fitted `GaussianFactorHead`; None builds a fresh one.
        intermediate_size: width of a fresh head's layers.

    Called like a causal LM (`input_ids`, `attention_mask`, `position_ids`, `cache` (or the older name
    `past_key_values`), `use_cache`, `logits_to_keep`), it returns a `GaussianStudentOutput`.
    """

    def __init__(self, backbone: nn.Module, num_factors: int | None = None, head: GaussianFactorHead | None = None,
                 intermediate_size: int = 256):
        super().__init__()
        lm_head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"The backbone's output head is {type(lm_head).__name__}, not a linear layer; member logits "
                            "are linear in the hidden state only through a linear head.")
        hidden_size = lm_head.in_features
        if head is None:
            if num_factors is None:
                raise ValueError("Pass `num_factors` (q ≥ 1) or a fitted `head`.")
            head = GaussianFactorHead(hidden_size, num_factors, intermediate_size=intermediate_size)
        if head.hidden_size != hidden_size:
            raise ValueError(f"The head expects hidden states of size {head.hidden_size}, the backbone has {hidden_size}; "
                             "build the head for this backbone.")
        self.backbone = backbone
        self.head = head.to(lm_head.weight.device)

    @property
    def num_factors(self) -> int:
        return self.head.num_factors

    @property
    def config(self):
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return self.backbone.get_output_embeddings().weight.device

    def get_output_embeddings(self) -> nn.Linear:
        return self.backbone.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> GaussianStudentOutput:
        cache = cache if cache is not None else past_key_values
        decoder = self.backbone.get_decoder() if hasattr(self.backbone, "get_decoder") else self.backbone
        output = decoder_hidden_states(self.backbone, input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=use_cache,
                                       **cache_argument(decoder, cache), **kwargs)
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden = output.last_hidden_state[:, kept]  # (B, C, D)
        mean, factors = self.head(hidden)  # (B, C, D), (B, C, q, D)
        lm_head = self.get_output_embeddings()
        logits = lm_head(mean.to(lm_head.weight.dtype))  # (B, C, V)
        factor_logits = F.linear(factors.to(lm_head.weight.dtype), lm_head.weight)  # (B, C, q, V): no bias
        return GaussianStudentOutput(logits=logits, factor_logits=factor_logits,
                                     cache=output_cache(output),
                                     mean_hidden_states=mean, factor_hidden_states=factors)


def standard_normal_factors(num_samples: int, num_factors: int, seed: int = 0) -> torch.Tensor:
    """`(num_samples, num_factors)` float32 draws of z ~ N(0, I_q) from a CPU generator seeded with `seed`."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be an integer ≥ 1, got {num_samples!r}.")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(num_samples, num_factors, generator=generator)


def member_outputs(mean: torch.Tensor, factors: torch.Tensor, z: torch.Tensor,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Members f = mean + Σ_j z_j factors_j (+ noise) of the latent factor model.

    Args:
        mean: `(..., D)`, e.g. logits `(N, V)` or hidden states `(N, D)`.
        factors: `(q, ..., D)`, one loading per factor (factor first, as estimators receive them).
        z: `(S, q)` latent draws, e.g. from `standard_normal_factors`.
        noise: optional `(S, ..., D)` observation noise to add (ε ~ N(0, Ψ)).

    Returns:
        `(S, ..., D)` members.
    """
    if factors.shape[0] != z.shape[-1]:
        raise ValueError(f"`z` has {z.shape[-1]} factors but `factors` has {factors.shape[0]}.")
    members = mean + torch.tensordot(z.to(factors), factors, dims=1)  # (S, ..., D)
    return members if noise is None else members + noise
