"""Loading parts from ids/folders/models, the checks on them, and the composite's save/load round trip."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.testing import assert_close
from transformers import PreTrainedTokenizerFast

from hf_eu import UncertaintyAwareConfig, UncertaintyAwareModelForCausalLM
from hf_eu._version import __version__

from conftest import VOCAB_SIZE, tiny_llama


def word_tokenizer(shift: int = 0) -> PreTrainedTokenizerFast:
    vocab = {f"w{(i + shift) % VOCAB_SIZE}": i for i in range(VOCAB_SIZE)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


def save_model(model, folder, tokenizer=None):
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def folders(tmp_path, target, drafts, proxy):
    tokenizer = word_tokenizer()
    return {
        "target": save_model(target, tmp_path / "target", tokenizer),
        "drafts": [save_model(d, tmp_path / f"draft{k}", tokenizer) for k, d in enumerate(drafts)],
        "proxy": save_model(proxy, tmp_path / "proxy", tokenizer),
    }


def eu_of(model, batch):
    return model.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)


def test_from_folders_equals_from_loaded_models(folders, eu_model, batch):
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(folders["target"], drafts=folders["drafts"],
                                                              proxy=folders["proxy"])
    assert loaded.config.target_name_or_path == folders["target"]
    expected, got = eu_of(eu_model, batch), eu_of(loaded, batch)
    assert torch.equal(got.sequences, expected.sequences)
    assert_close(got.epistemic_uncertainty, expected.epistemic_uncertainty)


def test_target_kwargs_reach_the_target(folders):
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(folders["target"], drafts=folders["drafts"][:1],
                                                              dtype=torch.bfloat16)
    assert loaded.target.dtype == torch.bfloat16 and loaded.drafts[0].dtype == torch.bfloat16


def test_vocabulary_mismatch_is_refused(target, drafts):
    odd = tiny_llama(seed=5, hidden_size=8, num_layers=1, vocab_size=VOCAB_SIZE + 8)
    with pytest.raises(ValueError, match=r"draft 1 has an output vocabulary of 72 tokens but the target has 64"):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=[drafts[0], odd])
    with pytest.raises(ValueError, match=r"proxy has an output vocabulary"):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=odd)


def test_tokenizer_mismatch_is_refused(tmp_path, folders, drafts):
    other = save_model(drafts[0], tmp_path / "other_draft", word_tokenizer(shift=1))
    with pytest.raises(ValueError, match=r"draft 1's tokenizer differs from the target's"):
        UncertaintyAwareModelForCausalLM.from_pretrained(folders["target"], drafts=[folders["drafts"][0], other])


@pytest.mark.parametrize(("drafts_arg", "error", "match"), [
    ([], ValueError, "at least one draft"),
    (None, ValueError, "drafts=\\[...\\]. is required"),
    ("some/draft", TypeError, "must be a list"),
    ([3.5], TypeError, "draft 0 must be a hub id"),
])
def test_bad_drafts_argument(target, drafts_arg, error, match):
    with pytest.raises(error, match=match):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts_arg)


def test_missing_folder_names_the_path(target, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="draft 0 from .*nope"):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=[missing])


# ------------------------------------------------------------------ save / load
@pytest.fixture()
def saved(tmp_path, folders):
    model = UncertaintyAwareModelForCausalLM.from_pretrained(folders["target"], drafts=folders["drafts"],
                                                             proxy=folders["proxy"])
    folder = tmp_path / "composite"
    model.save_pretrained(folder)
    return model, str(folder)


def test_round_trip_restores_drafts_proxy_and_eu(saved, batch):
    model, folder = saved
    files = {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}
    assert "model.safetensors" not in files, "the target's weights must never be written"
    assert {"config.json", "README.md", "drafts/draft_0/model.safetensors", "drafts/draft_2/model.safetensors",
            "proxy/model.safetensors"} <= files
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == "hf_eu" and config["hf_eu_version"] == __version__
    assert config["num_drafts"] == 3 and config["has_proxy"] is True and config["estimator"] == "hf_eu"

    reloaded = UncertaintyAwareModelForCausalLM.from_pretrained(folder)  # target from the recorded folder
    for original, restored in zip([*model.drafts, model.proxy], [*reloaded.drafts, reloaded.proxy]):
        for (name, a), (_, b) in zip(original.state_dict().items(), restored.state_dict().items()):
            assert torch.equal(a, b), name
    assert_close(eu_of(reloaded, batch).epistemic_uncertainty, eu_of(model, batch).epistemic_uncertainty)


def test_target_override_on_load(saved, target):
    _, folder = saved
    reloaded = UncertaintyAwareModelForCausalLM.from_pretrained(folder, target=target)
    assert reloaded.target is target
    with pytest.raises(ValueError, match="brings its own drafts"):
        UncertaintyAwareModelForCausalLM.from_pretrained(folder, drafts=[target])


def test_model_card_declares_library_and_base_model(saved):
    _, folder = saved
    card = open(os.path.join(folder, "README.md")).read()
    assert "library_name: hf_eu" in card and "base_model:" in card and "pipeline_tag: text-generation" in card
    assert "## Additional arguments" in card and "## Output type changes" in card


def test_missing_file_is_reported(saved):
    _, folder = saved
    os.remove(os.path.join(folder, "drafts", "draft_1", "model.safetensors"))
    with pytest.raises(ValueError, match=r"incomplete: .*draft_1.model.safetensors .draft 1. is missing"):
        UncertaintyAwareModelForCausalLM.from_pretrained(folder)


def test_corrupt_weights_are_reported(saved):
    _, folder = saved
    path = os.path.join(folder, "proxy", "model.safetensors")
    with open(path, "r+b") as handle:
        handle.write(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"proxy in .* is corrupt"):
        UncertaintyAwareModelForCausalLM.from_pretrained(folder)


def test_corrupt_config_is_reported(saved):
    _, folder = saved
    with open(os.path.join(folder, "config.json"), "w") as handle:
        handle.write("{not json")
    with pytest.raises(ValueError, match="config.json is corrupt"):
        UncertaintyAwareModelForCausalLM.from_pretrained(folder)


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def test_newer_major_version_is_refused(saved):
    _, folder = saved
    edit_config(folder, hf_eu_version="99.0.0")
    with pytest.raises(ValueError, match="written by hf_eu 99.0.0.*upgrade hf_eu"):
        UncertaintyAwareModelForCausalLM.from_pretrained(folder)


def test_unknown_keys_warn_and_load(saved):
    _, folder = saved
    edit_config(folder, hf_eu_version="0.9.0", future_option=3)
    with pytest.warns(UserWarning, match="future_option"):
        model = UncertaintyAwareModelForCausalLM.from_pretrained(folder)
    assert len(model.drafts) == 3


def test_interrupted_save_leaves_previous_folder_intact(saved, monkeypatch):
    model, folder = saved
    before = sorted(os.listdir(folder))
    import hf_eu.serialization as serialization

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(serialization, "render_model_card", explode)
    model.drafts[0].lm_head.weight.data.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == before
    assert [p for p in os.listdir(os.path.dirname(folder)) if ".saving-" in p] == []
    monkeypatch.undo()
    reloaded = UncertaintyAwareModelForCausalLM.from_pretrained(folder)
    assert not torch.equal(reloaded.drafts[0].lm_head.weight, model.drafts[0].lm_head.weight)


def test_push_to_hub_uploads_the_saved_folder(saved, monkeypatch):
    model, _ = saved
    uploaded = {}
    import huggingface_hub

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["repo"] = repo_id

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["files"] = sorted(os.path.relpath(os.path.join(d, f), folder_path)
                                   for d, _, fs in os.walk(folder_path) for f in fs)
        uploaded["card"] = open(os.path.join(folder_path, "README.md")).read()
        return "https://example/commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    assert model.push_to_hub("me/my-eu") == "https://example/commit"
    reference = saved_files(model)
    assert uploaded["repo"] == "me/my-eu" and uploaded["files"] == reference  # exactly what save_pretrained writes
    assert "config.json" in uploaded["files"] and "README.md" in uploaded["files"]
    assert not [f for f in uploaded["files"] if f.startswith("target") or f == "model.safetensors"]  # never the target
    assert 'from_pretrained("me/my-eu")' in uploaded["card"]


def saved_files(model) -> list[str]:
    """The files `save_pretrained` writes for `model`, relative to the folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(os.path.join(folder, "c"))
        root = os.path.join(folder, "c")
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_config_validates_its_fields():
    with pytest.raises(ValueError, match="num_drafts"):
        UncertaintyAwareConfig(num_drafts=0)
    with pytest.raises(ValueError, match="chunk_size"):
        UncertaintyAwareConfig(chunk_size=0)


def test_composite_from_a_hub_id(saved, monkeypatch):
    """The hub path (`from_pretrained("org/composite")`) on a local folder of the same shape."""
    model, folder = saved
    import huggingface_hub

    import hf_eu.loading as loading

    monkeypatch.setattr(loading, "cached_file", lambda repo, name, **kw: os.path.join(folder, name))
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, **kwargs):
        calls["args"] = (repo_id, revision)
        return folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    reloaded = UncertaintyAwareModelForCausalLM.from_pretrained("org/composite", revision="v1")
    assert calls["args"] == ("org/composite", "v1")
    assert torch.equal(reloaded.proxy.lm_head.weight, model.proxy.lm_head.weight)


def test_lora_drafts_on_the_targets_layers_store_only_adapters(tmp_path, target, batch):
    """Drafts that are LoRA adapters on `truncated_copy(target, n)` save without any base weights."""
    from peft import LoraConfig, get_peft_model

    from hf_eu import truncated_copy

    drafts = []
    for k in range(2):
        torch.manual_seed(k)
        draft = get_peft_model(truncated_copy(target, 1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
        drafts.append(draft)
    model = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts)
    folder = tmp_path / "lora-composite"
    model.save_pretrained(folder)
    files = {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}
    assert "drafts/draft_0/adapter_model.safetensors" in files
    assert not any(f.endswith("model.safetensors") and "adapter" not in f for f in files), files
    target_before = {name: p.detach().clone() for name, p in target.named_parameters()}
    reloaded = UncertaintyAwareModelForCausalLM.from_pretrained(folder, target=target)
    assert_close(eu_of(reloaded, batch).epistemic_uncertainty, eu_of(model, batch).epistemic_uncertainty)
    base = reloaded.drafts[0].get_base_model()
    assert base.get_input_embeddings() is target.get_input_embeddings()  # shared, not copied
    assert base.get_output_embeddings() is target.get_output_embeddings()
    assert all(torch.equal(p, target_before[n]) for n, p in target.named_parameters()), "merging touched the target"
    reloaded.save_pretrained(tmp_path / "again")  # loaded adapters are merged for speed and still save as adapters
    again = UncertaintyAwareModelForCausalLM.from_pretrained(tmp_path / "again", target=target)
    assert_close(eu_of(again, batch).epistemic_uncertainty, eu_of(model, batch).epistemic_uncertainty)
    assert eu_of(model, batch).eu_variance.max() > 1e-3, "the two adapters must make the drafts differ"
    halved = tmp_path / "bf16-composite"
    model.config.adapter_storage_dtype = "bfloat16"
    model.save_pretrained(halved)
    from safetensors.torch import load_file

    stored = load_file(os.path.join(halved, "drafts", "draft_0", "adapter_model.safetensors"))
    assert stored and all(t.dtype == torch.bfloat16 for t in stored.values())
    from_bf16 = UncertaintyAwareModelForCausalLM.from_pretrained(halved, target=target)
    assert from_bf16.drafts[0].base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype \
        == torch.float32  # stored in bfloat16, computed in the model's dtype
    assert_close(eu_of(from_bf16, batch).epistemic_uncertainty, eu_of(model, batch).epistemic_uncertainty,
                 atol=0.05, rtol=0.05)
    prompt = batch["input_ids"][:1]
    assisted = reloaded.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, assistant_draft=1)
    assert torch.equal(assisted, target.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))
