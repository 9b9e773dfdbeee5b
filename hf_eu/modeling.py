"""`UncertaintyAwareModelForCausalLM`: a target causal LM plus drafts and a proxy that score its tokens.

The wrapper never decodes by itself: `generate` hands every argument to the target's own `generate`
(optionally with a draft as transformers' `assistant_model`), so `sequences` are exactly the target's.
With `return_dict_in_generate=True` it then runs one chunked, teacher-forced pass of the drafts and
proxy over the generated sequences (`scoring.score_tokens`) and returns the per-token epistemic
uncertainty beside transformers' usual fields. `estimate_uncertainty` does the same for given text.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext
from collections.abc import Sequence
from typing import Any

import torch
from huggingface_hub import HfApi
from torch import nn
from transformers import PreTrainedModel
from transformers.generation import GenerateBeamDecoderOnlyOutput
from transformers.utils import logging

from ._validation import check_causal_lm, check_chunk_size, check_draft_index, check_prompt_length, check_token_inputs
from ._version import __version__
from .calibration import EUCalibrator
from .configuration import UncertaintyAwareConfig, load_composite_config
from .estimators import get_estimator
from .generation_utils import (TARGET_API, check_left_padded, decodes_token_by_token, full_attention_mask,
                               generated_token_mask, target_attribute)
from .loading import (check_part_tokenizers, check_same_vocabulary, composite_folder, drop_loader_bookkeeping,
                      is_composite, load_causal_lm)
from .part_dtype import cast_part, check_part_dtype
from .outputs import UncertaintyGenerateBeamOutput, UncertaintyGenerateOutput, UncertaintyOutput
from .scoring import _check_eu_head, reads_only_features, score_features_pass, score_recorded, score_tokens
from .perturbation import LowRankGaussianPerturbation
from .answer_risk import AnswerRiskDetector, answer_features
from .eu_features import TargetFeatureRecorder, teacher_forced_features, token_confidence
from .eu_head import EUHead
from .serialization import (load_calibrator, load_composite_parts, load_detector, load_eu_head, load_student,
                            save_composite)
from .stopping import prepare_eu_criteria, stopped_for_uncertainty
from .target_weights import load_target_weights

__all__ = ["UncertaintyAwareModelForCausalLM"]

logger = logging.get_logger(__name__)


class UncertaintyAwareModelForCausalLM(PreTrainedModel):
    """A target causal LM whose `generate` also returns per-token epistemic uncertainty.

    Build one with `from_pretrained`. Attributes: `target` (the wrapped model, used as is), `drafts`
    (`nn.ModuleList` of K ≥ 1 draft models sharing the target's vocabulary), `proxy` (the OSD proxy or
    None) and `config` (`UncertaintyAwareConfig`). Calling the wrapper runs the target's forward.

    It is a `PreTrainedModel`, so `Trainer`, TRL and accelerate treat it as one (`Trainer.save_model` calls its
    `save_pretrained`), while the target's model API (embeddings, `tie_weights`, `num_parameters`,
    `gradient_checkpointing_enable`, `name_or_path`, …, the names in `TARGET_API`) is the target's, reached
    through the wrapper as PEFT's `PeftModel` does.
    """

    config_class = UncertaintyAwareConfig
    input_modalities = "text"  # read by transformers' pipelines
    output_modalities = "text"

    def __init__(
        self,
        target: nn.Module,
        drafts: Sequence[nn.Module],
        proxy: nn.Module | None = None,
        config: UncertaintyAwareConfig | None = None,
        calibrator: EUCalibrator | None = None,
        student: nn.Module | None = None,
        eu_head: EUHead | None = None,
        detector: AnswerRiskDetector | None = None,
    ):
        _check_drafts_argument(drafts)
        if any(draft is target for draft in drafts) or proxy is target:
            raise ValueError("A draft or the proxy is the target object itself; pass separate (smaller) models.")
        parts = {f"draft {k}": draft for k, draft in enumerate(drafts)}
        if proxy is not None:
            parts["proxy"] = proxy
        for role, model in {"target": target, **parts}.items():
            check_causal_lm(model, role)
        if student is not None:
            _check_student_argument(student)
            parts["student"] = student
        vocab_size = check_same_vocabulary(target, parts)
        config = config or UncertaintyAwareConfig(target_name_or_path=_name_of(target), num_drafts=len(drafts),
                                                  has_proxy=proxy is not None)
        self._init_pretrained(config)
        self.target = target
        self.drafts = nn.ModuleList(drafts)
        self.proxy = cast_part(proxy, config.proxy_dtype, target) if proxy is not None and config.proxy_dtype else proxy
        self.calibrator = calibrator  # the fitted regressor of `hf_eu_calibrated`, or None
        self.student = student  # the Gaussian-distilled student of `gaussian_distill*`, or None
        if eu_head is not None and not isinstance(eu_head, EUHead):
            raise TypeError(f"`eu_head` must be an hf_eu.eu_head.EUHead, got {type(eu_head).__name__}.")
        self.eu_head = eu_head.attach(target).to(_device_of(target)).eval() if eu_head is not None else None
        if detector is not None and not isinstance(detector, AnswerRiskDetector):
            raise TypeError(f"`detector` must be an hf_eu.answer_risk.AnswerRiskDetector, got {type(detector).__name__}.")
        self.detector = detector  # the fitted answer-risk detector of `answer_risk`, or None
        self._perturbation = None  # built on first use by estimators reading perturbed targets
        # Whether `save_pretrained` writes the target's weights: a loaded fine-tuned target, or one trained since.
        self._saves_target = bool(getattr(config, "has_target_weights", False))
        self.config.num_drafts = len(drafts)
        self.config.has_proxy = proxy is not None
        self.config.has_calibrator = calibrator is not None
        self.config.has_student = student is not None
        self.config.has_eu_head = eu_head is not None
        self.config.vocab_size = vocab_size
        if getattr(target, "config", None) is not None:
            self.config.attach_target_config(target.config)
        get_estimator(self.config.estimator)  # unknown names fail now, not at the first generate
        for part in parts.values():
            part.eval()
        self.training = target.training  # `model.training` reads as the target's (eval after from_pretrained)

    def _init_pretrained(self, config: UncertaintyAwareConfig) -> None:
        """`PreTrainedModel.__init__`, leaving the config's attention settings as they were (the target's apply)."""
        saved = {name: config.__dict__.get(name) for name in ("_attn_implementation_internal",
                                                                "_experts_implementation_internal")}
        super().__init__(config)
        config.__dict__.update(saved)

    def train(self, mode: bool = True):
        """`nn.Module.train`; training the wrapper with trainable target parameters marks the target as fine-tuned,
        so `save_pretrained` then stores its weights (`hf_eu.target_weights`)."""
        if mode and any(parameter.requires_grad for parameter in self.target.parameters()):
            self._saves_target = True
        return super().train(mode)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Any,
        *,
        drafts: Sequence[Any] | None = None,
        proxy: Any = None,
        target: Any = None,
        estimator: str | None = None,
        chunk_size: int | None = None,
        config: UncertaintyAwareConfig | None = None,
        student: nn.Module | None = None,
        eu_head: EUHead | None = None,
        proxy_dtype: Any = None,
        **target_kwargs,
    ) -> UncertaintyAwareModelForCausalLM:
        """Load a composite.

        Args:
            pretrained_model_name_or_path: the target (hub id, local folder or loaded `PreTrainedModel`),
                or a saved composite (folder or hub id) whose drafts and proxy are then loaded.
            drafts: the draft models (each a hub id, folder or loaded model); required unless loading a
                saved composite.
            proxy: the OSD proxy (same kinds) or None, in which case the bias uses the target.
            target: with a saved composite, the target to use instead of the recorded id (id, folder or model).
                A composite that stores a fine-tuned target's weights loads them over a target given by id or
                folder (or the recorded one), never over a target passed loaded, which is used as it is.
            estimator: registered estimator name to compute (default: the config's, `"hf_eu"`).
            chunk_size: positions scored per chunk (default: derived from a 128 MiB budget).
            config: with a saved composite, the `UncertaintyAwareConfig` to use instead of its config.json
                (what `AutoModelForCausalLM.from_pretrained` passes; the stored file is still checked).
            student: a loaded `hf_eu.gaussian.GaussianStudentForCausalLM` (Gaussian-distilled, for the
                `gaussian_distill*` estimators) or None; a saved composite brings its own.
            eu_head: a trained `hf_eu.eu_head.EUHead` for the target (estimator `eu_head`) or None; a saved
                composite brings its own.
            proxy_dtype: dtype the proxy runs in (`torch.bfloat16`, "bfloat16", …), apart from the target's: in
                bfloat16 its pass costs about half on CPUs with AVX512-BF16 and on GPUs (`hf_eu.part_dtype`).
                Default: a saved composite's recorded `proxy_dtype`, else the target's dtype.
            **target_kwargs: passed to `AutoModelForCausalLM.from_pretrained` for the target (`dtype`,
                `device_map`, `quantization_config`, `revision`, …).
        """
        drop_loader_bookkeeping(target_kwargs)
        overrides = {"estimator": estimator, "chunk_size": chunk_size, "proxy_dtype": check_part_dtype(proxy_dtype)}
        if config is not None and not isinstance(config, UncertaintyAwareConfig):
            raise TypeError(f"`config` must be an UncertaintyAwareConfig, got {type(config).__name__}; load the "
                            "composite's own with `AutoConfig.from_pretrained(folder)` or leave it out.")
        revision = target_kwargs.get("revision")
        if is_composite(pretrained_model_name_or_path, revision=revision):
            if drafts is not None or proxy is not None or student is not None or eu_head is not None:
                raise ValueError(
                    f"{pretrained_model_name_or_path!r} is a saved composite that brings its own drafts, proxy and "
                    "student; do not pass `drafts=`/`proxy=`/`student=` with it (use `target=` to replace the target)."
                )
            return cls._from_composite(pretrained_model_name_or_path, target, overrides, target_kwargs, config)
        if config is not None:
            raise ValueError("`config=` is only for loading a saved composite; with a target and drafts the config "
                             "is built from `estimator=`/`chunk_size=`.")
        if target is not None:
            raise ValueError("`target=` is only for loading a saved composite; pass the target as the first argument.")
        if drafts is None:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} is not a saved hf_eu composite, so `drafts=[...]` is required: "
                "pass at least one draft model (hub id, folder or loaded model)."
            )
        target_model = load_causal_lm(pretrained_model_name_or_path, role="target", **target_kwargs)
        draft_models, proxy_model = _load_parts(target_model, drafts, proxy)
        check_part_tokenizers(pretrained_model_name_or_path, drafts, proxy)
        config = UncertaintyAwareConfig(
            target_name_or_path=_name_of(pretrained_model_name_or_path),
            target_revision=revision,
            num_drafts=len(draft_models),
            has_proxy=proxy_model is not None,
            estimator=estimator or "hf_eu",
            chunk_size=chunk_size,
            proxy_dtype=overrides["proxy_dtype"],
        )
        return cls(target_model, draft_models, proxy_model, config=config, student=student, eu_head=eu_head)

    @classmethod
    def _from_composite(cls, reference, target, overrides, target_kwargs, config=None):
        folder = composite_folder(reference, target_kwargs.pop("revision", None))  # the composite's revision
        stored_config = load_composite_config(folder)  # version and key checks, also when `config` is given
        config = stored_config if config is None else config
        if target is None:
            if not config.target_name_or_path:
                raise ValueError(f"The composite in {folder!r} records no target; pass `target=` (id, folder or model).")
            target = config.target_name_or_path
            if config.target_revision:
                target_kwargs["revision"] = config.target_revision
        target_model = load_causal_lm(target, role="target", **target_kwargs)
        config, draft_models, proxy_model = load_composite_parts(folder, target=target_model, config=config)
        if config.has_target_weights and isinstance(target, (str, os.PathLike)):  # not over a target passed loaded
            # after the parts: drafts on the target's layers copy the layers they were trained on, as in the live
            # composite, and share its embeddings, which fine-tuning trained
            load_target_weights(folder, target_model)
        if not isinstance(target, (str, os.PathLike)) or target != config.target_name_or_path:
            config.target_name_or_path = _name_of(target)
            config.target_revision = None
        device = _device_of(target_model)
        draft_models = [draft.to(device) for draft in draft_models]
        proxy_model = proxy_model.to(device) if proxy_model is not None else None
        for key, value in overrides.items():  # estimator=, chunk_size=, proxy_dtype= over the stored ones
            if value is not None:
                setattr(config, key, value)
        student = load_student(folder, config, target_model)
        return cls(target_model, draft_models, proxy_model, config=config, calibrator=load_calibrator(folder, config),
                   student=student.to(device) if student is not None else None, eu_head=load_eu_head(folder, config),
                   detector=load_detector(folder, config))

    # ---------------------------------------------------------------- inference
    @property
    def device(self) -> torch.device:
        return _device_of(self.target)

    @property
    def generation_config(self):
        return self.target.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        if "target" in self._modules:  # `PreTrainedModel.__init__` sets one before the target is attached
            self.target.generation_config = value

    @property
    def dtype(self) -> torch.dtype:
        """The target's dtype (drafts and proxy may use another)."""
        return getattr(self.target, "dtype", None) or next(self.target.parameters()).dtype

    @classmethod
    def can_generate(cls) -> bool:
        """True: transformers' generation pipelines ask before calling `generate`."""
        return True

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """The target's forward, unchanged (named arguments, so `Trainer` keeps the usual dataset columns)."""
        return self.target(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, inputs: torch.Tensor | None = None, *, assistant_draft: int | None = None,
                 estimator: str | None = None, **kwargs):
        """The target's `generate`, plus per-token uncertainty when `return_dict_in_generate=True`.

        Args:
            inputs, **kwargs: exactly as for the target's `generate` (input_ids, attention_mask,
                generation_config, max_new_tokens, do_sample, …).
            assistant_draft: index of a draft to use as `assistant_model` (speculative decoding). Only
                at batch size 1, as transformers requires; larger batches decode without it (warned once).
            estimator: registered estimator to compute instead of the config's.

        Returns:
            Without `return_dict_in_generate`: the token tensor the target returns. With it:
            `UncertaintyGenerateOutput` (or `UncertaintyGenerateBeamOutput` for beam search) holding the
            target's fields plus `epistemic_uncertainty`, `eu_variance`, `eu_bias`, `uncertainty_mask`.

        Errors (even before the first token) also reach an `EUTextIteratorStreamer`'s reading loop, which raises them.
        """
        with getattr(kwargs.get("streamer"), "reporting_failures", nullcontext)():
            return self._generate(inputs, assistant_draft, estimator, kwargs)

    def _generate(self, inputs: torch.Tensor | None, assistant_draft: int | None, estimator: str | None, kwargs: dict):
        chosen = get_estimator(estimator or self.config.estimator)
        _check_eu_head(chosen, self.eu_head, self.proxy)  # a missing head is refused before any token
        generation_config = kwargs.get("generation_config") or self.target.generation_config
        return_dict = kwargs.get("return_dict_in_generate", generation_config.return_dict_in_generate)
        if kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None)) == 0:
            raise ValueError("`max_new_tokens=0` generates no token, so there is no uncertainty to compute; "
                             "ask for at least one new token.")
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None:
            check_token_inputs(input_ids, kwargs.get("attention_mask"), vocab_size=self.config.vocab_size,
                               name="inputs" if inputs is not None else "input_ids")
        if return_dict and input_ids is None:
            raise ValueError("Uncertainty needs the prompt's token ids: pass `input_ids` (not only `inputs_embeds`), "
                             "or leave `return_dict_in_generate` unset to get the tokens alone.")
        check_left_padded(kwargs.get("attention_mask"), "attention_mask")
        if assistant_draft is not None:
            self._attach_assistant(kwargs, assistant_draft, input_ids)
        eu_criteria = prepare_eu_criteria(kwargs, input_ids, generation_config)
        recorder = (TargetFeatureRecorder(self.target) if return_dict and "features" in chosen.inputs
                    and decodes_token_by_token(kwargs, generation_config) else None)
        with recorder if recorder is not None else nullcontext():
            output = self.target.generate(inputs, **kwargs)
        if not return_dict:
            return output
        prompt_length = input_ids.shape[1]
        sequences = output.sequences
        if sequences.shape[1] <= prompt_length:
            raise ValueError(f"generate returned no new tokens (sequence length {sequences.shape[1]} ≤ prompt length "
                             f"{prompt_length}); raise `max_new_tokens` or `max_length` to get uncertainty.")
        eos_token_id = kwargs.get("eos_token_id", generation_config.eos_token_id)
        pad_token_id = kwargs.get("pad_token_id", generation_config.pad_token_id)
        features = recorder.generated(sequences.shape[1] - prompt_length, sequences.shape[0]) if recorder else None
        full_mask = full_attention_mask(kwargs.get("attention_mask"), sequences, prompt_length, input_ids.shape[0])
        if features is None and reads_only_features(chosen):  # beam, assisted, …: one pass serves EU and answer risk
            features = score_features_pass(self.target, sequences, prompt_length, full_mask, self.config.chunk_size)
        if features is not None and reads_only_features(chosen):  # from the decoding passes or the one fallback pass
            mask = generated_token_mask(sequences[:, prompt_length:], eos_token_id, pad_token_id)
            scores = score_recorded(chosen, features, mask, eu_head=self.eu_head, calibrator=self.calibrator)
        else:  # other models run after decoding; recorded features spare the target's pass (eu_head_proxy)
            scores = self._score_generated(chosen, sequences, prompt_length, full_mask, eos_token_id, pad_token_id,
                                           features)
        scores.answer_risk = self._answer_risk(chosen.name, scores, sequences, prompt_length, full_mask, features)
        output_class = (UncertaintyGenerateBeamOutput if isinstance(output, GenerateBeamDecoderOnlyOutput)
                        else UncertaintyGenerateOutput)
        stopped = {"stopped_for_uncertainty": stopped_for_uncertainty(eu_criteria, scores.uncertainty_mask)
                   } if eu_criteria else {}  # which rows an EUThresholdCriteria stopped
        return output_class(**dict(output), **dict(scores), **stopped)

    def _attach_assistant(self, kwargs: dict, assistant_draft: int, input_ids: torch.Tensor | None) -> None:
        check_draft_index(assistant_draft, len(self.drafts))
        if kwargs.get("assistant_model") is not None:
            raise ValueError("Pass either `assistant_draft` or `assistant_model`, not both.")
        batch_size = input_ids.shape[0] if input_ids is not None else 1
        if batch_size > 1:
            logger.warning_once(f"Assisted generation supports batch size 1 only; decoding this batch of {batch_size} "
                                "without the assistant draft. Uncertainty is computed the same way.")
            return
        kwargs["assistant_model"] = self.drafts[assistant_draft]

    def _score_generated(self, estimator, sequences, prompt_length, full_mask, eos_token_id,
                         pad_token_id, features=None) -> UncertaintyOutput:
        new_tokens = sequences[:, prompt_length:]  # (R, T)
        return score_tokens(
            estimator, sequences, prompt_length,
            drafts=self.drafts, proxy=self.proxy, target=self.target, attention_mask=full_mask,
            uncertainty_mask=generated_token_mask(new_tokens, eos_token_id, pad_token_id),
            chunk_size=self.config.chunk_size, target_features=features, **self._scoring_extras(estimator),
        )

    def _answer_risk(self, estimator_name: str, scores: UncertaintyOutput, sequences: torch.Tensor,
                     prompt_length: int, attention_mask: torch.Tensor, features=None) -> torch.Tensor | None:
        """`(R,)` probability that each answer is wrong, when a detector fitted on `estimator_name`'s EU ships."""
        if self.detector is None or self.detector.estimator != estimator_name:
            return None
        if features is None:  # the target's confidence: one teacher-forced pass (the recorded passes had it)
            features = teacher_forced_features(self.target, sequences, prompt_length, attention_mask=attention_mask)
        mask = scores.uncertainty_mask.to(features.values.device)
        empty = ~mask.any(-1)  # an answer with no real token (EOS first) still gets a risk, from its first token
        mask = mask | (empty[:, None] & (torch.arange(mask.shape[1], device=mask.device) == 0))
        token_logps, entropy, max_probs = token_confidence(features, sequences[:, prompt_length:])
        aggregated = answer_features(scores.epistemic_uncertainty.to(mask.device), token_logps, entropy, max_probs, mask)
        return self.detector(aggregated)

    def _scoring_extras(self, estimator) -> dict:
        """Inputs beyond drafts/proxy/target some estimators read: the calibrator, the target's perturbation."""
        extras = {"calibrator": self.calibrator, "student": self.student, "eu_head": self.eu_head}
        if "perturbed" in estimator.inputs:
            if self._perturbation is None:
                self._perturbation = LowRankGaussianPerturbation(self.target)  # docs/method.md §2 defaults: r = 8, σ = 0.1
            extras["perturbation"] = self._perturbation
        return extras

    def estimate_uncertainty(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_length: int = 1,
        *,
        estimator: str | None = None,
        chunk_size: int | None = None,
    ) -> UncertaintyOutput:
        """Per-token uncertainty of existing text by teacher forcing (no generation).

        Args:
            input_ids: `(batch_size, seq_len)` prompt + answer, the prompt left-padded to a common width as
                `generate` produces it.
            attention_mask: `(batch_size, seq_len)`, 0 on padding (left or right); None means none.
            prompt_length: leading columns not scored (≥ 1); the rest are scored as "new tokens".
            estimator: registered estimator to compute instead of the config's.
            chunk_size: positions per chunk (default: the config's, else from a memory budget).

        Returns:
            `UncertaintyOutput` with fields of shape `(batch_size, seq_len - prompt_length)`; the mask is
            `attention_mask[:, prompt_length:]`. With a fitted detector, `answer_risk` `(batch_size,)` treats the
            scored columns of each row as its answer.
        """
        check_token_inputs(input_ids, attention_mask, vocab_size=self.config.vocab_size)
        check_prompt_length(prompt_length)  # its range is checked by scoring, after the padding
        check_chunk_size(chunk_size)
        if attention_mask is not None:
            check_left_padded(attention_mask[:, :prompt_length], "attention_mask[:, :prompt_length] (the prompts)")
        chosen = get_estimator(estimator or self.config.estimator)
        scores = score_tokens(
            chosen, input_ids, prompt_length,
            drafts=self.drafts, proxy=self.proxy, target=self.target, attention_mask=attention_mask,
            chunk_size=chunk_size if chunk_size is not None else self.config.chunk_size, **self._scoring_extras(chosen),
        )
        scores.answer_risk = self._answer_risk(chosen.name, scores, input_ids, prompt_length, attention_mask)
        return scores

    # ------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        state_dict: dict | None = None, *, repo_id: str | None = None, safe_serialization: bool = True,
                        max_shard_size: int | str = "5GB", save_target: bool | None = None, **kwargs) -> None:
        """Write config, drafts, proxy (safetensors) and model card to `save_directory`, atomically.

        The target's weights are written only once it has been fine-tuned (`save_target=None`: the wrapper was
        put in training mode with trainable target parameters, as `Trainer` does, or was loaded with stored
        target weights); otherwise the config records its id and revision. Other files in the folder (a
        `Trainer` output folder's) are left untouched.

        Args:
            save_directory: the folder (see `hf_eu.serialization` for what may be there already).
            is_main_process: False on the other processes of a distributed run, which then write nothing.
            state_dict: the wrapper's state dict to take the target's tensors from (`Trainer` passes the gathered
                one under FSDP or DeepSpeed); default: the target's own.
            repo_id: the hub id the model card names.
            safe_serialization: must stay True (hf_eu writes safetensors only).
            max_shard_size: largest file of the target's weights (`"5GB"`); drafts and proxy are small.
            save_target: True / False to store the target's weights or not, whatever was done to it.
            **kwargs: transformers' other saving arguments (`push_to_hub=`, `token=`, …), accepted and ignored.
        """
        if not safe_serialization:
            raise ValueError("`safe_serialization=False` would write pickled weights; hf_eu saves safetensors only. "
                             "Leave it at True.")
        if save_target is not None and not isinstance(save_target, bool):
            raise TypeError(f"`save_target` must be True, False or None, got {save_target!r}.")
        if not is_main_process:
            return
        store_target = self._saves_target if save_target is None else save_target
        self.config.hf_eu_version = __version__
        save_composite(save_directory, self.config, list(self.drafts), self.proxy, repo_id=repo_id,
                       calibrator=self.calibrator, student=self.student, target=self.target, eu_head=self.eu_head,
                       detector=self.detector,
                       target_weights={"state_dict": state_dict, "max_shard_size": max_shard_size} if store_target else None)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str = "Upload hf_eu composite") -> str:
        """Save the composite to a temporary folder and upload it to `repo_id` with huggingface_hub.

        Returns the URL of the commit.
        """
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "composite")
            self.save_pretrained(folder, repo_id=repo_id)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message, repo_type="model")
        return getattr(commit, "commit_url", str(commit))


for _name in TARGET_API:  # code written for the bare model (lm-eval, TRL, accelerate) finds the target's API
    setattr(UncertaintyAwareModelForCausalLM, _name, target_attribute(_name))


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _name_of(reference: Any) -> str | None:
    """The id or folder a model was given as, or the one it was loaded from."""
    if isinstance(reference, (str, os.PathLike)):
        return os.fspath(reference)
    return getattr(getattr(reference, "config", None), "_name_or_path", None) or None


def _check_student_argument(student: Any) -> None:
    if not (isinstance(student, nn.Module) and hasattr(student, "num_factors")):
        raise TypeError(f"`student` must be a loaded `hf_eu.gaussian.GaussianStudentForCausalLM`, got "
                        f"{type(student).__name__}; build one with `GaussianStudentForCausalLM(backbone, num_factors=q)` "
                        "and fit it with `trainers.gaussian_trainer.GaussianDistillationTrainer`.")


def _check_drafts_argument(drafts: Any) -> None:
    if isinstance(drafts, (str, os.PathLike, nn.Module)) or not isinstance(drafts, Sequence):
        raise TypeError(f"`drafts` must be a list, got {type(drafts).__name__}; wrap a single draft as [draft].")
    if len(drafts) < 1:
        raise ValueError("`drafts` is empty: hf_eu needs at least one draft model (3 or more recommended).")


def _load_parts(target: nn.Module, drafts: Sequence[Any], proxy: Any) -> tuple[list[nn.Module], nn.Module | None]:
    _check_drafts_argument(drafts)  # before anything is loaded
    device = _device_of(target)
    kwargs = {"dtype": getattr(target, "dtype", None)}
    draft_models = [load_causal_lm(d, role=f"draft {k}", **kwargs).to(device) for k, d in enumerate(drafts)]
    proxy_model = load_causal_lm(proxy, role="proxy", **kwargs).to(device) if proxy is not None else None
    return draft_models, proxy_model
