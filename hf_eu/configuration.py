"""The composite's configuration: which target, how many drafts, whether a proxy, which estimator.

`UncertaintyAwareConfig` is a `PretrainedConfig` with `model_type = "hf_eu"`, saved as the
composite folder's `config.json`. It records the target's id and revision (never its weights), the
drafts' and proxy's storage, the estimator name, the scoring chunk size and the hf_eu version that
wrote it. `load_composite_config` reads it defensively: a config written by a newer major version is
refused, unknown keys are kept with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from transformers import PretrainedConfig

from ._validation import check_chunk_size
from .part_dtype import check_part_dtype
from ._version import __version__

__all__ = ["UncertaintyAwareConfig", "load_composite_config", "CONFIG_NAME"]

CONFIG_NAME = "config.json"


class UncertaintyAwareConfig(PretrainedConfig):
    """Configuration of an `UncertaintyAwareModelForCausalLM` composite.

    Args:
        target_name_or_path (`str`, *optional*): hub id or folder of the target model.
        target_revision (`str`, *optional*): the target's revision (branch, tag or commit).
        num_drafts (`int`): number of draft models K (≥ 1).
        has_proxy (`bool`): whether a proxy is stored; without one the bias uses the target.
        has_calibrator (`bool`): whether a fitted `EUCalibrator` (estimator `hf_eu_calibrated`) is stored.
        has_student (`bool`): whether a Gaussian-distilled student (estimators `gaussian_distill*`) is stored.
        has_detector (`bool`): whether a fitted `AnswerRiskDetector` (`answer_risk`) is stored under `detector/`.
        has_eu_head (`bool`): whether a distilled `EUHead` (estimator `eu_head`) is stored under `eu_head/`.
        has_target_weights (`bool`): whether the fine-tuned target's weights are stored (`model.safetensors`,
            keys `target.`; see `hf_eu.target_weights`); they are loaded over the recorded target.
        student (`dict`, *optional*): the student's settings: its head's shapes (`hidden_size`,
            `num_factors`, `intermediate_size`) and `backbone` (`{"kind": "target"}`: the target itself,
            nothing stored; `{"kind": "saved"}`: stored under `student/backbone/`).
        estimator (`str`): name of the registered estimator `generate` uses (default `"hf_eu"`).
        chunk_size (`int`, *optional*): positions scored per chunk; None picks it from a memory budget.
        vocab_size (`int`, *optional*): size of the shared output vocabulary.
        adapter_storage_dtype (`str`, *optional*): dtype the files of peft adapters are written in
            (e.g. `"bfloat16"` halves them); they are loaded back into the model's own dtype.
        proxy_dtype (`str`, *optional*): dtype the proxy runs in (`"bfloat16"`, `"float16"`, `"float32"`); the
            composite casts its proxy to it when built, never the target's shared weights
            (`hf_eu.part_dtype.cast_part`). None: the proxy keeps the dtype it was loaded in (the target's).
        training (`dict`, *optional*): free-form record of how drafts and proxy were trained
            (partition scheme, losses, noise settings, evaluation numbers); rendered in the model card.
        hf_eu_version (`str`): version of hf_eu that wrote the config.
    """

    model_type = "hf_eu"

    def __init__(
        self,
        target_name_or_path: str | None = None,
        target_revision: str | None = None,
        num_drafts: int = 1,
        has_proxy: bool = False,
        has_calibrator: bool = False,
        has_student: bool = False,
        has_eu_head: bool = False,
        has_detector: bool = False,
        has_target_weights: bool = False,
        student: dict[str, Any] | None = None,
        estimator: str = "hf_eu",
        chunk_size: int | None = None,
        vocab_size: int | None = None,
        adapter_storage_dtype: str | None = None,
        proxy_dtype: str | None = None,
        training: dict[str, Any] | None = None,
        hf_eu_version: str = __version__,
        **kwargs,
    ):
        if not isinstance(num_drafts, int) or num_drafts < 1:
            raise ValueError(f"`num_drafts` must be an integer ≥ 1, got {num_drafts!r}: pass at least one draft model.")
        check_chunk_size(chunk_size)
        self.target_name_or_path = target_name_or_path
        self.target_revision = target_revision
        self.num_drafts = num_drafts
        self.has_proxy = has_proxy
        self.has_calibrator = has_calibrator
        self.has_student = has_student
        self.has_eu_head = has_eu_head
        self.has_detector = has_detector
        self.has_target_weights = has_target_weights
        self.student = student or {}
        self.estimator = estimator
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size
        if adapter_storage_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"`adapter_storage_dtype` must be None, 'float32', 'bfloat16' or 'float16', "
                             f"got {adapter_storage_dtype!r}.")
        self.adapter_storage_dtype = adapter_storage_dtype
        self.proxy_dtype = check_part_dtype(proxy_dtype)
        self.training = training or {}
        self.hf_eu_version = hf_eu_version
        super().__init__(**kwargs)

    def __getattr__(self, name: str):
        """Attributes this config lacks (`eos_token_id`, `hidden_size`, `max_position_embeddings`, …) are read from
        the target's config once a wrapper has attached it, so clients reading `model.config` see the target's."""
        target_config = self.__dict__.get("_target_config")
        if target_config is not None and not name.startswith("__"):
            return getattr(target_config, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        """Setting an attribute this config lacks but the target's has (`use_cache`, which `Trainer` sets) sets the
        target's, the one that is read back and that the target runs with; the composite's own keys stay here."""
        target_config = self.__dict__.get("_target_config")
        if (target_config is not None and not name.startswith("_") and name not in self.__dict__
                and not hasattr(type(self), name) and hasattr(target_config, name)):
            setattr(target_config, name, value)
            return
        super().__setattr__(name, value)

    def attach_target_config(self, target_config) -> None:
        """Let reads of attributes this config lacks fall through to `target_config` (never saved)."""
        self.__dict__["_target_config"] = target_config

    def to_dict(self) -> dict[str, Any]:
        target_config = self.__dict__.pop("_target_config", None)
        try:
            return super().to_dict()
        finally:
            if target_config is not None:
                self.__dict__["_target_config"] = target_config


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError as error:
        raise ValueError(f"`hf_eu_version` {version!r} in the composite config is not a version string.") from error


def load_composite_config(folder: str | os.PathLike) -> UncertaintyAwareConfig:
    """Read `folder/config.json` as an `UncertaintyAwareConfig`, checking version and keys.

    Raises:
        ValueError: the file is missing, is not JSON, is not an hf_eu config, or was written by a
            newer major version of hf_eu.
    """
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"No {CONFIG_NAME} in {folder!r}: this is not a saved hf_eu composite. "
                         "Save one with `UncertaintyAwareModelForCausalLM.save_pretrained(folder)`.")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt (not valid JSON: {error}); re-save the composite.") from error
    if not isinstance(raw, dict) or raw.get("model_type") != UncertaintyAwareConfig.model_type:
        kind = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} describes model_type {kind!r}, not an hf_eu composite ('hf_eu').")
    version = raw.get("hf_eu_version", "0")
    if _major(version) > _major(__version__):
        raise ValueError(f"{path} was written by hf_eu {version}, newer than the installed {__version__}; "
                         "upgrade hf_eu (`pip install -U hf_eu`) to load it.")
    known = set(UncertaintyAwareConfig().to_dict())
    unknown = sorted(set(raw) - known)
    if unknown:
        warnings.warn(f"Keys {unknown} in {path} are unknown to hf_eu {__version__} (written by hf_eu {version}); "
                      "they are kept but ignored. Upgrade hf_eu if they matter.", UserWarning, stacklevel=3)
    return UncertaintyAwareConfig(**raw)
