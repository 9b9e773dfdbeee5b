"""Save and load the parts of a composite that hf_eu adds: drafts, proxy, config and model card.

Layout of a saved composite (the target's weights are never written; the config names the target):

    folder/
      config.json            UncertaintyAwareConfig (model_type "hf_eu")
      README.md              model card rendered from model_cards/composite.md
      drafts/draft_0/        config.json + model.safetensors (+ generation_config.json)
      drafts/draft_1/ …
      proxy/                 same, when the composite has a proxy

Saving is atomic: everything is written into a temporary sibling folder that is renamed into place
only when complete, so an interrupted save leaves the previous folder (or nothing) behind.
Loading checks every expected file before reading any weights and reads safetensors only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

from torch import nn
from transformers import AutoModelForCausalLM

from .configuration import CONFIG_NAME, UncertaintyAwareConfig, load_composite_config
from .model_card import render_model_card

__all__ = ["save_composite", "load_composite_parts", "draft_folder", "PROXY_FOLDER"]

PROXY_FOLDER = "proxy"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def draft_folder(index: int) -> str:
    """Relative folder of draft `index` inside a composite."""
    return os.path.join("drafts", f"draft_{index}")


def _save_model(model: nn.Module, folder: str, role: str) -> None:
    if hasattr(model, "peft_config"):
        raise TypeError(
            f"The {role} is a peft model; saving adapters inside a composite is not supported yet. "
            "Call `model.merge_and_unload()` first and pass the merged model."
        )
    model.save_pretrained(folder, safe_serialization=True)


def save_composite(
    folder: str | os.PathLike,
    config: UncertaintyAwareConfig,
    drafts: Sequence[nn.Module],
    proxy: nn.Module | None,
    repo_id: str | None = None,
) -> None:
    """Write config, drafts, proxy and model card to `folder` atomically (replacing an existing one)."""
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.saving-", dir=parent)
    try:
        for index, draft in enumerate(drafts):
            _save_model(draft, os.path.join(staging, draft_folder(index)), f"draft {index}")
        if proxy is not None:
            _save_model(proxy, os.path.join(staging, PROXY_FOLDER), "proxy")
        render_model_card(config, repo_id=repo_id).save(os.path.join(staging, "README.md"))
        config.to_json_file(os.path.join(staging, CONFIG_NAME), use_diff=True)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(staging: str, folder: str) -> None:
    """Move the complete `staging` folder to `folder`; an old `folder` is removed only afterwards."""
    if not os.path.exists(folder):
        os.rename(staging, folder)
        return
    retired = staging + ".old"
    os.rename(folder, retired)
    os.rename(staging, folder)
    shutil.rmtree(retired, ignore_errors=True)


def _check_model_folder(path: str, role: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"The saved composite is incomplete: {os.path.join(path, 'config.json')} ({role}) is "
                         "missing. Re-save the composite with `save_pretrained`, or copy the whole folder again.")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES):
        raise ValueError(f"The saved composite is incomplete: no model.safetensors in {path} ({role}). hf_eu reads "
                         "safetensors only; re-save the composite with `save_pretrained`.")


def _load_model(path: str, role: str, **kwargs) -> nn.Module:
    try:
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **kwargs)
    except Exception as error:  # safetensors, JSON and config errors all mean the same to the user
        raise ValueError(f"The {role} in {path} is corrupt or unreadable ({type(error).__name__}: {error}). "
                         "Re-save the composite with `save_pretrained`.") from error


def load_composite_parts(
    folder: str | os.PathLike, **model_kwargs
) -> tuple[UncertaintyAwareConfig, list[nn.Module], nn.Module | None]:
    """Read config, drafts and proxy of a composite folder (every file is checked before any is loaded)."""
    folder = os.fspath(folder)
    config = load_composite_config(folder)
    draft_paths = [os.path.join(folder, draft_folder(k)) for k in range(config.num_drafts)]
    proxy_path = os.path.join(folder, PROXY_FOLDER) if config.has_proxy else None
    for index, path in enumerate(draft_paths):
        _check_model_folder(path, f"draft {index}")
    if proxy_path is not None:
        _check_model_folder(proxy_path, "proxy")
    drafts = [_load_model(path, f"draft {k}", **model_kwargs) for k, path in enumerate(draft_paths)]
    proxy = _load_model(proxy_path, "proxy", **model_kwargs) if proxy_path is not None else None
    return config, drafts, proxy
