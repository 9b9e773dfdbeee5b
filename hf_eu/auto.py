"""hf_eu in transformers' Auto classes and pipelines.

`register_auto_classes()` (run by `import hf_eu`) registers:
- `AutoConfig`: model_type `"hf_eu"` -> `UncertaintyAwareConfig`;
- `AutoModelForCausalLM`: `UncertaintyAwareConfig` -> `UncertaintyAwareModelForCausalLM`, so
  `AutoModelForCausalLM.from_pretrained(saved_composite)` returns the wrapper, and transformers'
  `pipeline("text-generation", model=eu_model, tokenizer=tokenizer)` accepts it. That stock pipeline
  passes `generate`'s extra output fields through: with `return_dict_in_generate=True`, each record
  carries `epistemic_uncertainty`, `eu_variance`, `eu_bias` and `uncertainty_mask`, one value per new
  token (0 / False on padding after EOS);
- the task `"text-generation-with-uncertainty"` -> `UncertaintyTextGenerationPipeline`: the same
  pipeline whose records hold `tokens` (the generated tokens as text) and, for exactly those tokens,
  `epistemic_uncertainty`, `eu_variance` and `eu_bias` as lists of floats in nats.

Decoding stays the target's own `generate`; this module only routes arguments and shapes records.
"""

from __future__ import annotations

import torch

from transformers import AutoConfig, AutoModelForCausalLM, TextGenerationPipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.text_generation import ReturnType

from .configuration import UncertaintyAwareConfig
from .modeling import UncertaintyAwareModelForCausalLM
from .viz import token_strings

__all__ = ["register_auto_classes", "UncertaintyTextGenerationPipeline", "UNCERTAINTY_TASK"]

UNCERTAINTY_TASK = "text-generation-with-uncertainty"
_UNCERTAINTY_FIELDS = ("epistemic_uncertainty", "eu_variance", "eu_bias")


class UncertaintyTextGenerationPipeline(TextGenerationPipeline):
    """`TextGenerationPipeline` whose records also hold the per-token EU of the generated tokens.

    Build it with `pipeline("text-generation-with-uncertainty", model=eu_model, tokenizer=tokenizer)`
    (or `pipeline("text-generation", ..., pipeline_class=UncertaintyTextGenerationPipeline)`). Every
    argument of the text-generation pipeline works unchanged, plus:

    Args:
        return_uncertainty (`bool`, *optional*, defaults to `True`): add to each text record
            `tokens` (list of str: the generated tokens as text, special tokens kept, up to and including
            EOS; they concatenate to the decoded answer, see `hf_eu.viz.token_strings`) and `epistemic_uncertainty`, `eu_variance`, `eu_bias` (lists of float, nats,
            one per entry of `tokens`; `eu_variance`/`eu_bias` are None for estimators without that split).

    Example:
        >>> pipe = pipeline("text-generation-with-uncertainty", model=eu_model, tokenizer=tokenizer)
        >>> pipe("What is 7 * 8?", max_new_tokens=16, do_sample=False)
        [{'generated_text': 'What is 7 * 8? 56', 'tokens': [' 5', '6', ...], 'epistemic_uncertainty': [0.41, ...], ...}]
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, UncertaintyAwareModelForCausalLM):
            raise TypeError(f"{type(self).__name__} needs an UncertaintyAwareModelForCausalLM, got "
                            f"{type(self.model).__name__}; wrap the model with "
                            "`UncertaintyAwareModelForCausalLM.from_pretrained(model, drafts=[...])` first.")

    def _sanitize_parameters(self, return_uncertainty: bool | None = None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if return_uncertainty is not None:
            if not isinstance(return_uncertainty, bool):
                raise TypeError(f"`return_uncertainty` must be True or False, got {return_uncertainty!r}.")
            forward_params["return_uncertainty"] = return_uncertainty
            postprocess_params["return_uncertainty"] = return_uncertainty
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, return_uncertainty: bool = True, **generate_kwargs):
        if return_uncertainty:
            generate_kwargs["return_dict_in_generate"] = True
        return super()._forward(model_inputs, **generate_kwargs)

    def postprocess(self, model_outputs, return_type=ReturnType.FULL_TEXT, return_uncertainty: bool = True,
                    **kwargs):
        records = super().postprocess(model_outputs, return_type=return_type, **kwargs)
        if not return_uncertainty or return_type == ReturnType.TENSORS:
            return records
        sequences = model_outputs["generated_sequence"][0]  # (num_return_sequences, seq_len)
        input_ids = model_outputs["input_ids"]
        prompt_length = 0 if input_ids is None else input_ids.shape[-1]
        masks = model_outputs["uncertainty_mask"][0]  # (num_return_sequences, new_tokens)
        for idx, record in enumerate(records):
            mask = masks[idx].bool()
            record["tokens"] = token_strings(self.tokenizer, sequences[idx, prompt_length:][mask].tolist())
            for name in _UNCERTAINTY_FIELDS:
                values = model_outputs.get(name)
                record[name] = None if values is None else values[0][idx][mask].tolist()
            record.pop("uncertainty_mask", None)
            risk = model_outputs.get("answer_risk")  # P(the answer is wrong), when the composite has a detector
            record["answer_risk"] = None if risk is None else float(torch.as_tensor(risk).reshape(-1)[idx])
        return records


def register_auto_classes() -> None:
    """Register hf_eu's config, model and pipeline task with transformers (idempotent)."""
    AutoConfig.register(UncertaintyAwareConfig.model_type, UncertaintyAwareConfig, exist_ok=True)
    AutoModelForCausalLM.register(UncertaintyAwareConfig, UncertaintyAwareModelForCausalLM, exist_ok=True)
    if UNCERTAINTY_TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(UNCERTAINTY_TASK, pipeline_class=UncertaintyTextGenerationPipeline,
                                            pt_model=AutoModelForCausalLM, type="text")

