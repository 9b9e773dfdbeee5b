"""Output classes carrying per-token epistemic uncertainty beside transformers' own generate outputs.

`UncertaintyGenerateOutput` is what `UncertaintyAwareModelForCausalLM.generate(...,
return_dict_in_generate=True)` returns: transformers' `GenerateDecoderOnlyOutput` (same fields, same
meaning) plus four uncertainty fields. Beam search returns `UncertaintyGenerateBeamOutput`, the same
additions on `GenerateBeamDecoderOnlyOutput`. `UncertaintyOutput` is what `estimate_uncertainty`
returns for given text. Access fields by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput

__all__ = ["UncertaintyOutput", "UncertaintyGenerateOutput", "UncertaintyGenerateBeamOutput"]

_FIELDS_DOC = """
        epistemic_uncertainty (`torch.FloatTensor` of shape `(batch_size, num_new_tokens)`):
            Per-token epistemic uncertainty in nats (float32, ≥ 0, higher = more uncertain), computed by
            the composite's estimator (default `hf_eu`: `eu_variance + eu_bias`). Column j scores the
            j-th new token given everything before it. 0 where `uncertainty_mask` is False.
            Returned when `return_dict_in_generate=True` (always by `estimate_uncertainty`).
        eu_variance (`torch.FloatTensor` of shape `(batch_size, num_new_tokens)`, *optional*):
            The variance part: K-way Jensen-Shannon divergence among the drafts (nats, ≥ 0).
            None for estimators without this split (e.g. `entropy`).
        eu_bias (`torch.FloatTensor` of shape `(batch_size, num_new_tokens)`, *optional*):
            The bias part: KL(draft mixture ‖ proxy), or against the target when there is no proxy
            (nats, ≥ 0). None for estimators without this split.
        uncertainty_mask (`torch.BoolTensor` of shape `(batch_size, num_new_tokens)`):
            True on real new tokens; False on padding after the end-of-sequence token (and, for
            `estimate_uncertainty`, where `attention_mask` is 0).
        answer_risk (`torch.FloatTensor` of shape `(batch_size,)`, *optional*):
            The probability (float32 in [0, 1], higher = more likely wrong) that each row's answer is wrong,
            from the composite's fitted `AnswerRiskDetector` (answer-level EU, the target's confidence and the
            answer length). Returned only when the composite carries a detector and the estimator is the one it
            was fitted on (`model.detector.estimator`); None otherwise, never zeros."""


@dataclass
class UncertaintyOutput(ModelOutput):
    __doc__ = "Per-token uncertainty for given token sequences (teacher forcing).\n\n    Args:" + _FIELDS_DOC

    epistemic_uncertainty: torch.FloatTensor | None = None
    eu_variance: torch.FloatTensor | None = None
    eu_bias: torch.FloatTensor | None = None
    uncertainty_mask: torch.BoolTensor | None = None
    answer_risk: torch.FloatTensor | None = None


_STOPPED_DOC = """
        stopped_for_uncertainty (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            True for rows that an `EUThresholdCriteria` in `stopping_criteria` stopped because their
            running EU crossed its threshold (the crossing token is kept as the row's last real token).
            Returned when `stopping_criteria` holds an `EUThresholdCriteria`; None otherwise."""


@dataclass
class UncertaintyGenerateOutput(GenerateDecoderOnlyOutput):
    __doc__ = (
        "`GenerateDecoderOnlyOutput` (sequences, scores, logits, attentions, hidden_states, "
        "past_key_values: unchanged) plus per-token uncertainty.\n\n    Args:" + _FIELDS_DOC + _STOPPED_DOC
    )

    epistemic_uncertainty: torch.FloatTensor | None = None
    eu_variance: torch.FloatTensor | None = None
    eu_bias: torch.FloatTensor | None = None
    uncertainty_mask: torch.BoolTensor | None = None
    answer_risk: torch.FloatTensor | None = None
    stopped_for_uncertainty: torch.BoolTensor | None = None


@dataclass
class UncertaintyGenerateBeamOutput(GenerateBeamDecoderOnlyOutput):
    __doc__ = (
        "`GenerateBeamDecoderOnlyOutput` (unchanged fields) plus per-token uncertainty of the returned "
        "beams.\n\n    Args:" + _FIELDS_DOC
    )

    epistemic_uncertainty: torch.FloatTensor | None = None
    eu_variance: torch.FloatTensor | None = None
    eu_bias: torch.FloatTensor | None = None
    uncertainty_mask: torch.BoolTensor | None = None
    answer_risk: torch.FloatTensor | None = None
