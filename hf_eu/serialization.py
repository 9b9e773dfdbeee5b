"""Save and load the parts of a composite that hf_eu adds: drafts, proxy, config and model card.

Layout of a saved composite (the target's weights are never written; the config names the target):

    folder/
      config.json            UncertaintyAwareConfig (model_type "hf_eu")
      README.md              model card rendered from model_cards/composite.md
      drafts/draft_0/        config.json + model.safetensors (+ generation_config.json)
      drafts/draft_1/ …
      proxy/                 same, when the composite has a proxy
      calibrator/            the fitted `EUCalibrator` of `hf_eu_calibrated`, when the composite has one
      student/               the Gaussian-distilled student, when the composite has one: head.safetensors
      eu_head/               the distilled `EUHead` of estimator `eu_head`, when the composite has one
      detector/              the fitted `AnswerRiskDetector` of `answer_risk`, when the composite has one
      model.safetensors      the fine-tuned target's weights (keys `target.`), only once the target was trained
                             (`hf_eu.target_weights`; sharded with model.safetensors.index.json when large)
                             (factor head + fitted noise) and, unless its backbone is the target itself,
                             backbone/ (stored like a draft: full model, or adapter + base spec)

A draft or proxy that is a peft model is stored as its active adapter only (adapter_config.json +
adapter_model.safetensors) plus `hf_eu_adapter_base.json`, which says how to rebuild its base: the
target's first n layers (`truncated_copy`, so no base weights are stored at all) or a model id.

Saving never deletes what hf_eu did not write: the destination is new, empty or a previous composite
(config.json with model_type "hf_eu"), or a folder of other files (a `Trainer` output folder, say) none of
whose entries bears a name the composite writes; never a file or the target's own folder. This is checked
before anything is written, and files that are not the composite's are left where they are.

Saving is atomic: everything is written into a hidden sibling `.<name>.saving-<pid>@<host>-*` that
replaces the folder only when complete (`hf_eu._atomic.replace_folder`: the previous composite is set
aside as `.<name>.replaced-…` and deleted once the new one is in place). A save interrupted at any
point leaves the previous composite (or nothing) at the path, or, if the process was killed between
the two renames, the previous one aside, from where the next save or load restores it. Hidden
siblings left by dead processes are deleted by the next save. In a folder that also holds other files, the
composite's entries are replaced one by one instead (each atomically, config.json last), so the others stay.

Loading checks every expected file before reading any weights and reads safetensors only (a weight
index naming a pickled shard is refused before transformers could open it).
"""

from __future__ import annotations

import json
import os
import warnings
import shutil
import tempfile
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from ._atomic import recover_folder, remove_stale_siblings, replace_entries, replace_folder, sibling_prefix
from .calibration import CALIBRATOR_FOLDER, EUCalibrator
from .answer_risk import DETECTOR_FOLDER, AnswerRiskDetector
from .eu_head import EU_HEAD_FOLDER, EUHead
from .configuration import CONFIG_NAME, UncertaintyAwareConfig, load_composite_config
from .gaussian import GaussianFactorHead, GaussianStudentForCausalLM
from .loading import check_safetensors_only
from .model_card import render_model_card
from .target_weights import is_target_weight_file, save_target_weights

__all__ = ["save_composite", "check_save_destination", "load_composite_parts", "load_calibrator", "load_student", "load_eu_head", "load_detector", "draft_folder", "PROXY_FOLDER",
           "STUDENT_FOLDER", "ADAPTER_BASE_FILE"]

PROXY_FOLDER = "proxy"
STUDENT_FOLDER = "student"
STUDENT_HEAD_FILE = "head.safetensors"
ADAPTER_BASE_FILE = "hf_eu_adapter_base.json"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def draft_folder(index: int) -> str:
    """Relative folder of draft `index` inside a composite."""
    return os.path.join("drafts", f"draft_{index}")


def _save_model(model: nn.Module, folder: str, role: str, adapter_dtype: str | None = None) -> None:
    if hasattr(model, "peft_config"):
        _save_adapter(model, folder, role, adapter_dtype)
    else:
        model.save_pretrained(folder, safe_serialization=True)


def _cast_safetensors(path: str, dtype: torch.dtype) -> None:
    tensors = load_file(path)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


def _adapter_base_spec(model: nn.Module, role: str) -> dict:
    base_config = model.get_base_model().config
    layers = getattr(base_config, "hf_eu_target_layers", None)
    if layers:
        return {"kind": "target_layers", "num_layers": int(layers)}
    name = getattr(base_config, "_name_or_path", None)
    if not name:
        raise TypeError(f"The {role} is a peft model whose base has no id or folder to reload it from; build the base "
                        "with `hf_eu.truncated_copy(target, n)` or from a saved model, or `merge_and_unload()` it first.")
    return {"kind": "pretrained", "name_or_path": name}


def _save_adapter(model: nn.Module, folder: str, role: str, dtype: str | None = None) -> None:
    """Write the active adapter's files (floating tensors in `dtype` if given) and how to rebuild its base."""
    spec = _adapter_base_spec(model, role)
    adapter = model.active_adapter
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter], safe_serialization=True)
        source = tmp if adapter == "default" else os.path.join(tmp, adapter)  # peft nests non-default names
        os.makedirs(folder, exist_ok=True)
        if dtype is not None:
            _cast_safetensors(os.path.join(source, "adapter_model.safetensors"), getattr(torch, dtype))
        for name in _ADAPTER_FILES:
            shutil.move(os.path.join(source, name), os.path.join(folder, name))
    with open(os.path.join(folder, ADAPTER_BASE_FILE), "w", encoding="utf-8") as handle:
        json.dump(spec, handle, indent=2)


def save_composite(
    folder: str | os.PathLike,
    config: UncertaintyAwareConfig,
    drafts: Sequence[nn.Module],
    proxy: nn.Module | None,
    repo_id: str | None = None,
    calibrator: EUCalibrator | None = None,
    student: GaussianStudentForCausalLM | None = None,
    target: nn.Module | None = None,
    eu_head: EUHead | None = None,
    detector: AnswerRiskDetector | None = None,
    target_weights: dict | None = None,
) -> None:
    """Write config, drafts, proxy, calibrator, student and model card to `folder` atomically (replacing a
    previous composite there).

    `target` tells whether the student's backbone is the target itself (then no backbone weights are
    stored) and where the target lives: its own folder is never a destination. `target_weights`
    (`{"state_dict": … or None, "max_shard_size": …}`) also stores the fine-tuned target's weights.

    Raises:
        ValueError: before anything is written, when `folder` is a file or a symbolic link, holds anything
            but a previous hf_eu composite, or is (or contains) the target's own folder.
    """
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    recover_folder(folder)  # a previous save killed halfway: its composite comes back before the checks
    check_save_destination(folder, target, config)
    os.makedirs(parent, exist_ok=True)
    remove_stale_siblings(folder)
    staging = tempfile.mkdtemp(prefix=sibling_prefix(folder, "saving"), dir=parent)
    try:
        dtype = config.adapter_storage_dtype
        for index, draft in enumerate(drafts):
            _save_model(draft, os.path.join(staging, draft_folder(index)), f"draft {index}", dtype)
        if proxy is not None:
            _save_model(proxy, os.path.join(staging, PROXY_FOLDER), "proxy", dtype)
        config.has_calibrator = calibrator is not None
        if calibrator is not None:
            calibrator.save(os.path.join(staging, CALIBRATOR_FOLDER))
        config.has_student = student is not None
        config.student = _save_student(student, os.path.join(staging, STUDENT_FOLDER), target, dtype) if student is not None else {}
        config.has_eu_head = eu_head is not None
        if eu_head is not None:
            eu_head.save(os.path.join(staging, EU_HEAD_FOLDER))
        config.has_detector = detector is not None
        if detector is not None:
            detector.save(os.path.join(staging, DETECTOR_FOLDER))
        config.has_target_weights = target_weights is not None
        if target_weights is not None:
            save_target_weights(staging, target, **target_weights)
        render_model_card(config, repo_id=repo_id).save(os.path.join(staging, "README.md"))
        config.to_json_file(os.path.join(staging, CONFIG_NAME), use_diff=True)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_COMPOSITE_ENTRIES = frozenset({CONFIG_NAME, "README.md", "drafts", PROXY_FOLDER, CALIBRATOR_FOLDER, STUDENT_FOLDER,
                                EU_HEAD_FOLDER, DETECTOR_FOLDER})


def _is_composite_entry(name: str) -> bool:
    """Whether a composite writes an entry of this name (what a save may replace in a previous composite)."""
    return name in _COMPOSITE_ENTRIES or is_target_weight_file(name)


def _replace_folder(staging: str, folder: str) -> None:
    """Move the complete `staging` folder to `folder`; an old `folder` is set aside and removed only afterwards.

    When `folder` also holds entries that are not the composite's (a `Trainer` output folder), only the
    composite's entries are replaced, each atomically and config.json last, and the previous composite's
    entries the new one lacks are removed; nothing else is touched.
    """
    if not os.path.isdir(folder) or all(_is_composite_entry(name) for name in os.listdir(folder)):
        replace_folder(staging, folder)
        return
    written = set(os.listdir(staging))
    stale = [name for name in os.listdir(folder) if _is_composite_entry(name) and name not in written]
    replace_entries(staging, folder, last=CONFIG_NAME, remove=stale)


def _is_composite_folder(folder: str) -> bool:
    try:
        with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "hf_eu"


def _local_folders_of(target: nn.Module | None, config: UncertaintyAwareConfig) -> list[str]:
    """The local folders the target was loaded from (its name_or_path, the config's target), real paths."""
    names = [getattr(target, "name_or_path", None), getattr(getattr(target, "config", None), "_name_or_path", None),
             getattr(config, "target_name_or_path", None)]
    folders = []
    for name in names:
        if isinstance(name, (str, os.PathLike)) and os.fspath(name) and os.path.isdir(name):
            folders.append(os.path.realpath(name))
    return folders


_SAVE_FIX = ("hf_eu never deletes or overwrites what it did not write: choose an empty or new folder, a previous "
             "hf_eu composite, or a folder none of whose entries the composite writes")


def check_save_destination(folder: str | os.PathLike, target: nn.Module | None = None,
                           config: UncertaintyAwareConfig | None = None) -> None:
    """Raise ValueError (naming the path and the fix) unless saving a composite to `folder` loses nothing.

    Allowed: a path where nothing is, an empty folder, a previous composite (config.json with model_type
    "hf_eu", beside other files or not), a folder of other files none of which bears a name the composite
    writes. Refused: a file or symbolic link, a folder that is not a composite but holds an entry the
    composite would overwrite (config.json, README.md, drafts/, model.safetensors, …), and the target's own
    folder (its `name_or_path` or the config's `target_name_or_path`, when a local folder) or a folder
    containing it.
    """
    folder = os.path.abspath(os.fspath(folder))
    if os.path.islink(folder):
        raise ValueError(f"Refusing to save the composite to {folder!r}: it is a symbolic link (to "
                         f"{os.path.realpath(folder)!r}). Save to the folder it points to, or to a new folder.")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"Refusing to save the composite to {folder!r}: it is a file, not a folder. {_SAVE_FIX}.")
    real = os.path.realpath(folder)
    for target_folder in _local_folders_of(target, config):
        if target_folder == real or target_folder.startswith(real.rstrip(os.sep) + os.sep):
            where = "is the target's own folder" if target_folder == real else f"contains the target's folder {target_folder!r}"
            raise ValueError(f"Refusing to save the composite to {folder!r}: it {where}, whose files would be "
                             f"deleted. {_SAVE_FIX}.")
    if not os.path.isdir(folder):
        return
    taken = [name for name in sorted(os.listdir(folder)) if _is_composite_entry(name)]
    if taken and not _is_composite_folder(folder):
        shown = ", ".join(taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
        raise ValueError(f"Refusing to save the composite to {folder!r}: it is not an hf_eu composite (its config.json, "
                         f"if any, has no model_type 'hf_eu') and holds {shown}, which the composite would overwrite. "
                         f"{_SAVE_FIX}.")


def _check_model_folder(path: str, role: str) -> None:
    check_safetensors_only(path, role)
    if os.path.isfile(os.path.join(path, ADAPTER_BASE_FILE)):
        required = [os.path.join(path, name) for name in _ADAPTER_FILES]
    else:
        required = [os.path.join(path, "config.json")]
        if not any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES):
            required.append(os.path.join(path, "model.safetensors"))
    for file in required:
        if not os.path.isfile(file):
            raise ValueError(f"The saved composite is incomplete: {file} ({role}) is missing. hf_eu reads safetensors "
                             "only; re-save the composite with `save_pretrained`, or copy the whole folder again.")


def _load_model(path: str, role: str, target: nn.Module | None, **kwargs) -> nn.Module:
    try:
        if os.path.isfile(os.path.join(path, ADAPTER_BASE_FILE)):
            with warnings.catch_warnings():  # peft < 0.22 asks for the deprecated name on transformers 5.24
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
                return _load_adapter(path, target)
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **kwargs)
    except Exception as error:  # safetensors, JSON and config errors all mean the same to the user
        raise ValueError(f"The {role} in {path} is corrupt or unreadable ({type(error).__name__}: {error}). "
                         "Re-save the composite with `save_pretrained`.") from error


def _load_adapter(path: str, target: nn.Module | None) -> nn.Module:
    from peft import PeftModel

    with open(os.path.join(path, ADAPTER_BASE_FILE), encoding="utf-8") as handle:
        spec = json.load(handle)
    if spec.get("kind") == "target_layers":
        if target is None:
            raise ValueError("this adapter sits on the target's own layers, so the target is needed to rebuild it")
        from .truncation import truncated_copy

        base = truncated_copy(target, int(spec["num_layers"]), share_embeddings=True)  # adapters never touch them
    elif spec.get("kind") == "pretrained":
        check_safetensors_only(spec["name_or_path"], "adapter's base model")
        base = AutoModelForCausalLM.from_pretrained(spec["name_or_path"], use_safetensors=True, trust_remote_code=False)
    else:
        raise ValueError(f"unknown adapter base kind {spec.get('kind')!r} in {ADAPTER_BASE_FILE}; upgrade hf_eu")
    model = PeftModel.from_pretrained(base, path, is_trainable=False).eval()
    model.merge_adapter()  # the base is this draft's own copy: merge for speed; the adapter stays saveable
    return model


def load_composite_parts(
    folder: str | os.PathLike, target: nn.Module | None = None, config: UncertaintyAwareConfig | None = None,
    **model_kwargs,
) -> tuple[UncertaintyAwareConfig, list[nn.Module], nn.Module | None]:
    """Read config, drafts and proxy of a composite folder (every file is checked before any is loaded).

    `target` is needed only for adapters stored on the target's own layers; `config` skips re-reading it.
    """
    folder = os.fspath(folder)
    config = config if config is not None else load_composite_config(folder)
    draft_paths = [os.path.join(folder, draft_folder(k)) for k in range(config.num_drafts)]
    proxy_path = os.path.join(folder, PROXY_FOLDER) if config.has_proxy else None
    for index, path in enumerate(draft_paths):
        _check_model_folder(path, f"draft {index}")
    if proxy_path is not None:
        _check_model_folder(proxy_path, "proxy")
    drafts = [_load_model(path, f"draft {k}", target, **model_kwargs) for k, path in enumerate(draft_paths)]
    proxy = _load_model(proxy_path, "proxy", target, **model_kwargs) if proxy_path is not None else None
    return config, drafts, proxy


def load_calibrator(folder: str | os.PathLike, config: UncertaintyAwareConfig) -> EUCalibrator | None:
    """The composite's calibrator, or None when it has none; a config that promises one it lacks is an error."""
    path = os.path.join(os.fspath(folder), CALIBRATOR_FOLDER)
    if getattr(config, "has_calibrator", False) or EUCalibrator.exists(path):
        return EUCalibrator.load(path)
    return None


def load_detector(folder: str | os.PathLike, config: UncertaintyAwareConfig) -> AnswerRiskDetector | None:
    """The composite's answer-risk detector, or None when it has none; a config that promises one it lacks is an error."""
    if not getattr(config, "has_detector", False):
        return None
    try:
        return AnswerRiskDetector.load(os.path.join(os.fspath(folder), DETECTOR_FOLDER))
    except FileNotFoundError as error:
        raise ValueError(f"The saved composite is incomplete: {error} Re-save the composite.") from error


def load_eu_head(folder: str | os.PathLike, config: UncertaintyAwareConfig) -> EUHead | None:
    """The composite's distilled EU head, or None when it has none; a config that promises one it lacks is an error."""
    if not getattr(config, "has_eu_head", False):
        return None
    path = os.path.join(os.fspath(folder), EU_HEAD_FOLDER)
    try:
        return EUHead.load(path)
    except FileNotFoundError as error:
        raise ValueError(f"The saved composite is incomplete: {error} Re-save the composite.") from error
    except (RuntimeError, ValueError, OSError) as error:
        raise ValueError(f"The EU head in {path} is corrupt or does not match its config ({type(error).__name__}: "
                         f"{error}); re-save the composite.") from error


def _save_student(student: GaussianStudentForCausalLM, folder: str, target: nn.Module | None,
                  dtype: str | None) -> dict:
    """Write the student's head (floating weights in `dtype`, the noise in float32) and, unless it is the
    target itself, its backbone; return the settings the config records."""
    if not isinstance(student, GaussianStudentForCausalLM):
        raise TypeError(f"`student` must be a GaussianStudentForCausalLM, got {type(student).__name__}.")
    os.makedirs(folder, exist_ok=True)
    storage = getattr(torch, dtype) if dtype else None
    tensors = {name: (tensor.to(storage) if storage is not None and name != "noise_variance" else tensor).contiguous()
               for name, tensor in student.head.state_dict().items()}
    save_file({name: tensor.detach().cpu() for name, tensor in tensors.items()},
              os.path.join(folder, STUDENT_HEAD_FILE), metadata={"format": "pt"})
    if target is not None and student.backbone is target:
        backbone = {"kind": "target"}
    else:
        _save_model(student.backbone, os.path.join(folder, "backbone"), "student backbone", dtype)
        backbone = {"kind": "saved"}
    return {**student.head.settings(), "backbone": backbone}


def load_student(folder: str | os.PathLike, config: UncertaintyAwareConfig,
                 target: nn.Module | None = None) -> GaussianStudentForCausalLM | None:
    """The composite's Gaussian-distilled student, or None when it has none (every file checked first)."""
    if not getattr(config, "has_student", False):
        return None
    path = os.path.join(os.fspath(folder), STUDENT_FOLDER)
    settings = dict(config.student or {})
    kind = settings.pop("backbone", {}).get("kind")
    if kind not in ("target", "saved"):
        raise ValueError(f"The composite's config records a student whose backbone kind is {kind!r}; this hf_eu "
                         "knows 'target' and 'saved'. Upgrade hf_eu or re-save the composite.")
    head_path = os.path.join(path, STUDENT_HEAD_FILE)
    if not os.path.isfile(head_path):
        raise ValueError(f"The saved composite is incomplete: {head_path} (student) is missing. Re-save the "
                         "composite with `save_pretrained`, or copy the whole folder again.")
    if kind == "saved":
        _check_model_folder(os.path.join(path, "backbone"), "student backbone")
    elif target is None:
        raise ValueError("The student's backbone is the target itself; pass the loaded target.")
    try:
        head = GaussianFactorHead(**settings)
        head.load_state_dict({name: tensor.float() for name, tensor in load_file(head_path).items()})
    except Exception as error:  # safetensors, shape and key errors all mean the same to the user
        raise ValueError(f"The student head in {head_path} is corrupt or does not match the config ({type(error).__name__}: "
                         f"{error}). Re-save the composite with `save_pretrained`.") from error
    backbone = target if kind == "target" else _load_model(os.path.join(path, "backbone"), "student backbone", target)
    return GaussianStudentForCausalLM(backbone, head=head).eval()
