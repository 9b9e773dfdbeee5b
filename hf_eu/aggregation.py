"""Sequence-level uncertainty: aggregate per-token values over the tokens that are real.

`aggregate_uncertainty(token_values, mask, reduction)` turns `(batch, new_tokens)` per-token EU and its
`uncertainty_mask` into one number per row: the sum, mean or max over masked-in tokens. Rows with
no real token get 0 for every reduction.
"""

from __future__ import annotations

import torch

__all__ = ["aggregate_uncertainty", "REDUCTIONS"]

REDUCTIONS = ("sum", "mean", "max")


def aggregate_uncertainty(token_values: torch.Tensor, mask: torch.Tensor | None = None,
                          reduction: str = "sum") -> torch.Tensor:
    """One uncertainty value per row from per-token values.

    Args:
        token_values: `(batch_size, num_new_tokens)` per-token values, e.g. `out.epistemic_uncertainty`.
        mask: `(batch_size, num_new_tokens)` bool, True on tokens to include (`out.uncertainty_mask`);
            None includes every token.
        reduction: "sum", "mean" or "max" over the included tokens.

    Returns:
        `(batch_size,)` float tensor; 0 for rows without included tokens.

    Example:
        >>> out = model.generate(**inputs, return_dict_in_generate=True)
        >>> aggregate_uncertainty(out.epistemic_uncertainty, out.uncertainty_mask, "mean")
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    if mask is None:
        mask = torch.ones_like(token_values, dtype=torch.bool)
    if mask.shape != token_values.shape:
        raise ValueError(f"`mask` has shape {tuple(mask.shape)} but `token_values` has {tuple(token_values.shape)}; "
                         "pass the `uncertainty_mask` that came with the values.")
    mask = mask.bool()
    values = token_values.float()
    if reduction == "max":
        filled = values.masked_fill(~mask, float("-inf")).max(-1).values
        return torch.where(mask.any(-1), filled, torch.zeros_like(filled))
    total = values.masked_fill(~mask, 0.0).sum(-1)
    if reduction == "sum":
        return total
    return total / mask.sum(-1).clamp_min(1)
